"""End-to-end: a misbehaving NBD client on raw sockets (no NBD library) against a real daemon.

Each case sends one kind of bad input, checks the server's answer (an error reply that keeps the
connection, or a disconnect), and then checks that a second, well-behaved client (qemu-io) is still
served and the daemon is alive.  Frames are built from the constants of ``p2pvbd.wire.nbd_codec``.
Socket timeouts are hang guards, never speed assertions.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import time
from collections.abc import Iterator

import pytest

from p2pvbd.wire import nbd_codec as nbd
from tests.daemons import Host, run

MiB = 1 << 20
KiB = 1 << 10
DISK = "vm1"
PATTERN = 0x5A
HANG_GUARD = 60.0  # seconds; bounds a hung server, it is not a speed assertion

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")


class ServerClosed(Exception):
    pass


class RawClient:
    """Just enough of an NBD client, frame by frame, to misbehave on purpose."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        """``address``: a Unix socket's path, or a TCP (host, port)."""
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(HANG_GUARD)
        self.sock.connect(address)
        self.structured = False

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ServerClosed(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def assert_closed(self) -> bytes:
        """Read until the server hangs up (a timeout here means it did not); return what came before."""
        got = bytearray()
        try:
            while chunk := self.sock.recv(65536):
                got += chunk
        except (ConnectionResetError, ssl.SSLError):  # an SSLError: a TLS connection cut without close_notify
            pass
        except TimeoutError:
            raise AssertionError(f"server kept the connection open (got {bytes(got[:64])!r})") from None
        return bytes(got)

    # ---- handshake ----
    def greeting(self) -> None:
        magic, ihaveopt, flags = _GREETING.unpack(self.recv_exact(_GREETING.size))
        assert (magic, ihaveopt) == (nbd.NBD_MAGIC, nbd.NBD_IHAVEOPT)
        assert flags & nbd.NBD_FLAG_FIXED_NEWSTYLE

    def client_flags(self, flags: int = nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES) -> None:
        self.send(struct.pack(">I", flags))

    def handshake(self) -> None:
        self.greeting()
        self.client_flags()

    def option(self, opt: int, data: bytes = b"", magic: int = nbd.NBD_IHAVEOPT) -> None:
        self.send(_OPTION.pack(magic, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = _OPTION_REPLY.unpack(self.recv_exact(_OPTION_REPLY.size))
        assert magic == nbd.NBD_OPTION_REPLY_MAGIC, hex(magic)
        return opt, rtype, self.recv_exact(length)

    def structured_reply(self) -> None:
        self.option(nbd.NBD_OPT_STRUCTURED_REPLY)
        assert self.option_reply() == (nbd.NBD_OPT_STRUCTURED_REPLY, nbd.NBD_REP_ACK, b"")
        self.structured = True

    def go(self, name: str = DISK) -> tuple[int, int]:
        """NBD_OPT_GO; returns (export size, transmission flags)."""
        raw = name.encode()
        self.option(nbd.NBD_OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = tflags = None
        while True:
            opt, rtype, data = self.option_reply()
            assert opt == nbd.NBD_OPT_GO
            if rtype == nbd.NBD_REP_ACK:
                assert size is not None, "GO acknowledged without NBD_INFO_EXPORT"
                return size, tflags  # type: ignore[return-value]
            assert rtype == nbd.NBD_REP_INFO, hex(rtype)
            (info,) = struct.unpack_from(">H", data)
            if info == nbd.NBD_INFO_EXPORT:
                _, size, tflags = struct.unpack(">HQH", data)

    # ---- transmission ----
    def request(self, cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"", magic: int = nbd.NBD_REQUEST_MAGIC) -> None:
        self.send(_REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload)

    def reply(self, cookie: int, read_length: int = 0, offset: int = 0) -> tuple[int, bytes]:
        """One complete reply to request ``cookie`` (a READ of ``read_length`` at ``offset``): (error, data)."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == nbd.NBD_SIMPLE_REPLY_MAGIC:
            error, got = struct.unpack(">IQ", self.recv_exact(12))
            assert got == cookie, (got, cookie)
            return error, (self.recv_exact(read_length) if read_length and not error else b"")
        assert magic == nbd.NBD_STRUCTURED_REPLY_MAGIC and self.structured, hex(magic)
        error, data = 0, bytearray(read_length)
        while True:
            flags, ctype, got, length = struct.unpack(">HHQI", self.recv_exact(16))
            assert got == cookie, (got, cookie)
            payload = self.recv_exact(length)
            if ctype == nbd.NBD_REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack_from(">Q", payload)
                data[off - offset : off - offset + len(payload) - 8] = payload[8:]
            elif ctype == nbd.NBD_REPLY_TYPE_OFFSET_HOLE:
                off, n = struct.unpack(">QI", payload)
                data[off - offset : off - offset + n] = bytes(n)
            elif ctype & (1 << 15):  # an error chunk
                (error,) = struct.unpack_from(">I", payload)
            else:
                assert ctype == nbd.NBD_REPLY_TYPE_NONE, ctype
            if flags & nbd.NBD_REPLY_FLAG_DONE:
                return error, (bytes(data) if not error else b"")

    def read(self, offset: int, length: int, cookie: int = 0xAB) -> bytes:
        self.request(nbd.NBD_CMD_READ, cookie, offset, length)
        error, data = self.reply(cookie, length, offset)
        assert error == 0, f"READ failed with NBD error {error}"
        return data

    def disconnect(self) -> None:
        self.request(nbd.NBD_CMD_DISC, 0xD15C)
        assert self.assert_closed() == b""


@pytest.fixture(scope="module")
def nbd_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """One daemon takes every bad case of this module in turn: it must survive them all."""
    host = Host(tmp_path_factory.mktemp("bad-input") / "office-pc", "office-pc")
    host.start()
    try:
        host.cli("disk", "create", DISK, "--size", "64M")
        qemu_io(host, f"write -P {PATTERN} 0 1M", "flush")
        yield host
        assert host.stop() == 0, host.log_tail()  # and it still stops cleanly
    finally:
        if host.alive():
            host.stop()


def qemu_io(host: Host, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    res = run(*args, host.uri(DISK), check=False, timeout=HANG_GUARD)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Pattern verification failed" not in out and "failed" not in out.lower(), out
    return out


def assert_served(host: Host) -> None:
    """A second, well-behaved client still gets its data, and the daemon is alive and did not crash."""
    qemu_io(host, f"read -P {PATTERN} 0 1M", "read -P 0 1M 1M")
    assert host.alive(), host.log_tail()
    # Bad input is a client's problem: the NBD server logs no error (no "NBD connection failed" traceback).
    log = (host.home / "daemon.log").read_text()
    assert "ERROR p2pvbd.nbd.server" not in log, host.log_tail()


def connect(host: Host) -> RawClient:
    return RawClient(host.nbd_socket)


def open_fds(host: Host) -> int:
    assert host.proc is not None
    return len(os.listdir(f"/proc/{host.proc.pid}/fd"))


def wait_fds_at_most(host: Host, limit: int) -> int:
    deadline = time.monotonic() + HANG_GUARD  # hang guard only
    while (n := open_fds(host)) > limit and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


# --- handshake phase ------------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    random.Random(1).randbytes(1 * MiB),
    b"\xff" * 4,  # client flags with every unknown bit set
    b"\x00" * 64,  # client flags without FIXED_NEWSTYLE
], ids=["http", "random-1MiB", "unknown-client-flags", "no-fixed-newstyle"])
def test_garbage_instead_of_handshake_disconnects(nbd_host: Host, garbage: bytes) -> None:
    c = connect(nbd_host)
    c.greeting()
    try:
        c.send(garbage)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may hang up before it has all of it
    assert c.assert_closed() == b""  # no option reply to garbage: just a disconnect
    c.close()
    assert_served(nbd_host)


def test_garbage_before_reading_the_greeting_disconnects(nbd_host: Host) -> None:
    c = connect(nbd_host)
    c.send(b"\x13\x37" * 1000)
    got = c.assert_closed()
    assert got == _GREETING.pack(nbd.NBD_MAGIC, nbd.NBD_IHAVEOPT, nbd.SERVER_HANDSHAKE_FLAGS)  # greeting only
    c.close()
    assert_served(nbd_host)


def test_truncated_handshake_is_dropped_without_leaking(nbd_host: Host) -> None:
    # One client stalls half-way through its flags while another is served.
    stalled = connect(nbd_host)
    stalled.greeting()
    stalled.send(b"\x00\x00")
    assert_served(nbd_host)
    stalled.close()
    baseline = open_fds(nbd_host)
    for i in range(30):
        c = connect(nbd_host)
        if i % 3:
            c.greeting()
        if i % 3 == 2:
            c.send(b"\x00\x00")  # half the client flags
        c.close()
    assert wait_fds_at_most(nbd_host, baseline) <= baseline  # every dropped connection was closed
    assert_served(nbd_host)


def test_wrong_ihaveopt_magic_disconnects(nbd_host: Host) -> None:
    c = connect(nbd_host)
    c.handshake()
    c.option(nbd.NBD_OPT_GO, b"\x00" * 6, magic=nbd.NBD_IHAVEOPT ^ 0xFF)
    assert c.assert_closed() == b""
    c.close()
    assert_served(nbd_host)


@pytest.mark.parametrize(("opt", "answer"), [
    (0x4242, nbd.NBD_REP_ERR_UNSUP),
    (0xFFFFFFFF, nbd.NBD_REP_ERR_UNSUP),
    (nbd.NBD_OPT_EXTENDED_HEADERS, nbd.NBD_REP_ERR_UNSUP),
    # NOTLS mode on the Unix socket: "NBD_REP_ERR_POLICY (if it does not support TLS for policy reasons)".
    (nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ERR_POLICY),
], ids=["0x4242", "0xffffffff", "extended-headers", "starttls"])
def test_unknown_option_gets_an_error_and_haggling_continues(nbd_host: Host, opt: int, answer: int) -> None:
    c = connect(nbd_host)
    c.handshake()
    c.option(opt, b"some option data")
    got_opt, rtype, message = c.option_reply()
    assert (got_opt, rtype) == (opt, answer)
    message.decode("utf-8")  # an error message is a UTF-8 string
    assert_served(nbd_host)  # while this client is still haggling
    # Still in option haggling: more options, then GO, then I/O.
    c.structured_reply()
    size, tflags = c.go()
    assert size == 64 * MiB and tflags & nbd.NBD_FLAG_HAS_FLAGS
    assert c.read(0, 64 * KiB) == bytes([PATTERN]) * (64 * KiB)
    c.disconnect()
    c.close()
    assert_served(nbd_host)


def test_unknown_export_in_go_keeps_haggling(nbd_host: Host) -> None:
    c = connect(nbd_host)
    c.handshake()
    raw = b"no-such-disk"
    c.option(nbd.NBD_OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
    opt, rtype, _ = c.option_reply()
    assert (opt, rtype) == (nbd.NBD_OPT_GO, nbd.NBD_REP_ERR_UNKNOWN)
    c.go()
    assert c.read(4096, 4096) == bytes([PATTERN]) * 4096
    c.disconnect()
    c.close()
    assert_served(nbd_host)


@pytest.mark.parametrize("length", [nbd.MAX_OPTION_LENGTH + 1, 0xFFFFFFFF], ids=["64KiB+1", "4GiB-1"])
def test_option_with_huge_length_disconnects(nbd_host: Host, length: int) -> None:
    c = connect(nbd_host)
    c.handshake()
    c.send(_OPTION.pack(nbd.NBD_IHAVEOPT, nbd.NBD_OPT_GO, length) + b"\x00" * 4096)
    # Disconnected without waiting for (or buffering) gigabytes of payload.
    assert c.assert_closed() == b""
    c.close()
    assert_served(nbd_host)


# --- transmission phase ---------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_bad_request_magic_after_go_disconnects(nbd_host: Host, structured: bool) -> None:
    c = connect(nbd_host)
    c.handshake()
    if structured:
        c.structured_reply()
    c.go()
    assert c.read(0, 4096) == bytes([PATTERN]) * 4096
    c.request(nbd.NBD_CMD_READ, 7, 0, 4096, magic=nbd.NBD_REQUEST_MAGIC ^ 0x01000000)
    assert c.assert_closed() == b""
    c.close()
    assert_served(nbd_host)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
# 8 is NBD_CMD_RESIZE of the experimental RESIZE extension, which is neither offered nor understood.
@pytest.mark.parametrize("cmd", [8, 0x42, 0xFFFF], ids=["resize-extension", "0x42", "0xffff"])
def test_unknown_command_gets_einval_and_connection_usable(nbd_host: Host, cmd: int, structured: bool) -> None:
    c = connect(nbd_host)
    c.handshake()
    if structured:
        c.structured_reply()
    c.go()
    c.request(cmd, 0x1234_5678_9ABC_DEF0, 0, 4096)
    error, _ = c.reply(0x1234_5678_9ABC_DEF0)
    assert error == nbd.NBD_EINVAL
    assert_served(nbd_host)
    assert c.read(0, 8192) == bytes([PATTERN]) * 8192
    c.disconnect()
    c.close()
    assert_served(nbd_host)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_oversized_write_payload_is_skipped_with_einval(nbd_host: Host, structured: bool) -> None:
    c = connect(nbd_host)
    c.handshake()
    if structured:
        c.structured_reply()
    c.go()
    length = 40 * MiB  # over the 32 MiB cap; the payload is sent anyway, as the protocol requires
    c.request(nbd.NBD_CMD_WRITE, 0xBEEF, 0, length, payload=b"\x77" * length)
    error, _ = c.reply(0xBEEF)
    assert error == nbd.NBD_EINVAL
    # The payload was consumed, not parsed as requests (0x77777777 would be a bad magic: a disconnect),
    # and not written.
    assert c.read(0, 2 * MiB) == bytes([PATTERN]) * MiB + bytes(MiB)
    # An oversized READ (no payload) is refused the same way, and the connection still works.
    c.request(nbd.NBD_CMD_READ, 0xFEED, 0, length)
    error, _ = c.reply(0xFEED)
    assert error in (nbd.NBD_EINVAL, nbd.NBD_EOVERFLOW)
    assert c.read(MiB - 4096, 8192) == bytes([PATTERN]) * 4096 + bytes(4096)
    assert_served(nbd_host)
    c.disconnect()
    c.close()
    assert_served(nbd_host)


def test_a_burst_of_writes_is_applied_in_order_with_each_error_its_own(nbd_host: Host) -> None:
    """Plain writes received together are applied as one batch: overlapping ones in order, a bad one failing
    alone, a READ after them seeing them and a write after the READ not."""
    c = connect(nbd_host)
    c.handshake()
    size, _ = c.go()
    base = 4 * MiB  # away from what assert_served reads
    burst = [
        (nbd.NBD_CMD_WRITE, 1, base, b"a" * 8192, 0),
        (nbd.NBD_CMD_WRITE, 2, base + 4096, b"b" * 100, 0),
        (nbd.NBD_CMD_WRITE, 3, size - 10, b"x" * 20, 0),  # past the end: ENOSPC
        (nbd.NBD_CMD_WRITE, 4, base + 8192, b"c" * 4096, nbd.NBD_CMD_FLAG_NO_HOLE),  # not a WRITE's flag: EINVAL
        (nbd.NBD_CMD_WRITE, 5, base + 8192 + 4096, b"e" * 4096, 0),
        (nbd.NBD_CMD_READ, 6, base, b"", 0),
        (nbd.NBD_CMD_WRITE, 7, base, b"d" * 10, 0),
    ]
    c.send(b"".join(_REQUEST.pack(nbd.NBD_REQUEST_MAGIC, flags, cmd, cookie, off, 16384 if cmd == nbd.NBD_CMD_READ
                                  else len(data)) + data for cmd, cookie, off, data, flags in burst))
    replies = [c.reply(cookie, 16384 if cmd == nbd.NBD_CMD_READ else 0) for cmd, cookie, *_ in burst]
    assert [error for error, _ in replies] == [0, 0, nbd.NBD_ENOSPC, nbd.NBD_EINVAL, 0, 0, 0]
    assert replies[5][1] == b"a" * 4096 + b"b" * 100 + b"a" * 3996 + bytes(4096) + b"e" * 4096
    assert c.read(base, 16384) == b"d" * 10 + b"a" * 4086 + b"b" * 100 + b"a" * 3996 + bytes(4096) + b"e" * 4096
    c.disconnect()
    c.close()
    assert_served(nbd_host)


def test_pipelined_requests_right_after_go(nbd_host: Host) -> None:
    """GO and the first requests in one send: the requests after the handshake must not be lost."""
    c = connect(nbd_host)
    c.handshake()
    raw = DISK.encode()
    go = _OPTION.pack(nbd.NBD_IHAVEOPT, nbd.NBD_OPT_GO, 4 + len(raw) + 2) + struct.pack(">I", len(raw)) + raw + b"\0\0"
    reqs = b"".join(_REQUEST.pack(nbd.NBD_REQUEST_MAGIC, 0, nbd.NBD_CMD_READ, k, k * 4096, 4096) for k in range(4))
    c.send(go + reqs)
    while c.option_reply()[1] != nbd.NBD_REP_ACK:
        pass
    replies = {}
    for _ in range(4):  # simple replies, in whatever order the server sends them
        magic, error, cookie = _SIMPLE_REPLY.unpack(c.recv_exact(_SIMPLE_REPLY.size))
        assert magic == nbd.NBD_SIMPLE_REPLY_MAGIC and error == 0
        replies[cookie] = c.recv_exact(4096)
    assert replies == {k: bytes([PATTERN]) * 4096 for k in range(4)}
    c.disconnect()
    c.close()
    assert_served(nbd_host)
