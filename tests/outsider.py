"""An outsider for tests: someone who can reach a host's ports but holds no certificate of its swarm.

It floods a port with idle TCP connections, sends frames built to expand when decoded (a bomb), garbage
where TLS is expected, trickles bytes (slowloris), and sends arbitrary datagrams. The functions are used
by tests/test_outsiders.py; ``python -m tests.outsider flood|bomb HOST PORT ...`` runs them by hand.
Only ever aim it at loopback or at addresses inside a test's own network namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import socket
import ssl
import struct
import sys
import time
from collections.abc import Iterator

# The peer protocol's frame header: a 4-byte big-endian length (p2pvbd/wire/peer_wire.py).
_HEADER = struct.Struct(">I")
# Connecting to a listener whose accept queue is full waits for SYN retries; a flood does not wait that long.
CONNECT_SECONDS = 3.0


def frame(payload: bytes) -> bytes:
    """``payload`` as one frame of the peer protocol (the join port speaks it too)."""
    return _HEADER.pack(len(payload)) + payload


def nested_maps(size: int) -> bytes:
    """A msgpack request envelope whose body holds ``size`` bytes of empty maps: one byte each on the wire,
    a 64-byte dict and an 8-byte pointer each once decoded (the bomb that grew a daemon 60 -> 586 MB)."""
    per_array = 1 << 20  # the per-array element limit the decoder had
    maps, arrays = b"", []
    left = size
    while left > 0:
        n = min(per_array, left)
        arrays.append(b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n)
        left -= n
    maps = b"\xdd" + len(arrays).to_bytes(4, "big") + b"".join(arrays)
    # {"id": 1, "op": "join", "body": {"x": maps}}
    return (b"\x83\xa2id\x01\xa2op\xa4join\xa4body\x81\xa1x" + maps)


def bomb(size: int = 7 * 1024 * 1024) -> bytes:
    """The nested-maps bomb as one peer-protocol frame."""
    return frame(nested_maps(size))


def tcp(host: str, port: int, source: str | None = None, timeout: float = CONNECT_SECONDS) -> socket.socket:
    """A plain TCP connection (from ``source``, a local address, if given)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if source is not None:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def flood(host: str, port: int, count: int, sources: list[str] | None = None) -> list[socket.socket]:
    """Open up to ``count`` idle connections that never send a byte, cycling through ``sources``; the
    ones that connected are returned (the caller closes them). Stops early when the kernel refuses more."""
    conns: list[socket.socket] = []
    sources = sources or [None]  # type: ignore[list-item]
    for i in range(count):
        try:
            conns.append(tcp(host, port, sources[i % len(sources)]))
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):  # this process ran out itself
                break
            continue  # refused or timed out: the listener is shedding load, which is fine
    return conns


def close_all(conns: list[socket.socket]) -> None:
    for s in conns:
        with contextlib.suppress(OSError):
            s.close()


def open_count(conns: list[socket.socket]) -> int:
    """How many of ``conns`` the far end still holds open (a closed one reads EOF or a reset at once)."""
    alive = 0
    for s in conns:
        s.setblocking(False)
        alive += _connected(s)
    return alive


def tls_client(host: str, port: int, timeout: float = CONNECT_SECONDS) -> ssl.SSLSocket:
    """A TLS connection without a client certificate, as a joiner opens to the join port."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = tcp(host, port, timeout=timeout)
    try:
        return ctx.wrap_socket(s)
    except BaseException:
        s.close()
        raise


def send_over_tls(host: str, port: int, data: bytes, wait: float = 1.0) -> bytes:
    """Send ``data`` after a TLS handshake (no certificate) and return what came back within ``wait`` s."""
    with tls_client(host, port) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        return _drain(s, wait)


def send_raw(host: str, port: int, data: bytes, wait: float = 0.5) -> bytes:
    """Send ``data`` as is (garbage where TLS or NBD is expected) and return what came back."""
    with tcp(host, port) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        return _drain(s, wait)


def send_unix(path: str, data: bytes, wait: float = 0.5) -> bytes:
    """Send ``data`` to a Unix socket (the control socket: only its owner can reach it) and return the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CONNECT_SECONDS)
        s.connect(path)
        with contextlib.suppress(OSError):
            s.sendall(data)
        return _drain(s, wait)


def _drain(s: socket.socket, wait: float) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def slowloris(host: str, port: int, data: bytes, seconds: float) -> bool:
    """Trickle ``data`` over ``seconds``; whether the far end closed the connection before the end."""
    with tcp(host, port) as s:
        pause = seconds / max(1, len(data))
        for b in data:
            try:
                s.sendall(bytes([b]))
            except OSError:
                return True
            time.sleep(pause)
        return not _connected(s)


def _connected(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def datagrams(host: str, port: int, payloads: list[bytes]) -> None:
    """Send each payload as one UDP datagram (the DHT's port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        for p in payloads:
            with contextlib.suppress(OSError):
                s.sendto(p, (host, port))


@contextlib.contextmanager
def held(conns: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield conns
    finally:
        close_all(conns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.outsider", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flood", help="hold idle connections until interrupted")
    f.add_argument("host")
    f.add_argument("port", type=int)
    f.add_argument("count", type=int)
    f.add_argument("--source", action="append", help="local address to connect from (repeatable)")
    b = sub.add_parser("bomb", help="send the nested-maps frame over TLS (the join port)")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("--mib", type=float, default=7.0)
    args = parser.parse_args(argv)
    if args.cmd == "flood":
        with held(flood(args.host, args.port, args.count, args.source)) as conns:
            print(f"{len(conns)} connections open; Ctrl-C ends them", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
                    print(f"{open_count(conns)} still open", flush=True)
    else:
        reply = send_over_tls(args.host, args.port, bomb(int(args.mib * 1024 * 1024)), wait=5.0)
        print(f"sent; {len(reply)} bytes came back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
