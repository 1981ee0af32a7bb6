"""NBD over TCP only inside TLS with client certificates: real clients (qemu-img, qemu-io, nbdinfo, nbdcopy,
libnbd) with credentials from ``p2pvbd nbd-client-cert``, clients that must be refused, and the spec's FORCEDTLS
rules on a raw socket. Timeouts are hang guards, never speed assertions; the stalled-client cases run on trio's
mock clock.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pvbd.kernel_hook_ctl import HookController
from p2pvbd.nbd import tls as nbd_tls
from p2pvbd.nbd.server import MAX_TCP_CONNECTIONS, TLS_SETUP_SECONDS, _handle
from p2pvbd.wire import nbd_codec as nbd
from tests.daemons import BIN, Host, env_without_venv, free_port, run, system_python
from tests.test_nbd_bad_input import RawClient, ServerClosed

KiB, MiB = 1 << 10, 1 << 20
DISK = "vm1"
DISK_SIZE = 16 * MiB
HANG_GUARD = 120.0  # seconds; bounds a hung client or server, not a speed assertion
PATTERN = 0x5A


@dataclass
class TlsHost:
    """A running host serving NBD over TLS on 127.0.0.1:port, and a client credentials directory of its NBD CA."""

    host: Host
    port: int
    creds: Path

    def uri(self, disk: str = DISK, creds: Path | None = None, address: str = "127.0.0.1") -> str:
        return f"nbds://{address}:{self.port}/{disk}?tls-certificates={creds or self.creds}"

    def qemu_args(self, disk: str = DISK, creds: Path | None = None) -> list[str]:
        """qemu's way: an x509 credentials object and the NBD driver's options naming it."""
        return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={creds or self.creds}", "--image-opts",
                f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={self.port},export={disk},"
                "tls-creds=tls0"]


@pytest.fixture
def tls_host(make_host: Callable[..., Host], tmp_path: Path) -> TlsHost:
    port = free_port()
    host = make_host("office-pc", "--nbd-tcp", f"127.0.0.1:{port}")
    host.cli("disk", "create", DISK, "--size", str(DISK_SIZE))
    creds = tmp_path / "creds"
    host.cli("nbd-client-cert", str(creds), "--name", "test-client")
    return TlsHost(host, port, creds)


def libnbd(script: str, *args: str) -> dict[str, object]:
    """Run a libnbd script under the system Python; it prints one JSON document as its last line."""
    res = run(system_python(), "-c", script, *args, timeout=HANG_GUARD, env=env_without_venv())
    return json.loads(res.stdout.strip().splitlines()[-1])


LIBNBD_CONNECT = """
import json, sys
import nbd
h = nbd.NBD()
h.set_uri_allow_local_file(True)  # libnbd reads tls-certificates=DIR only when allowed to
try:
    h.connect_uri(sys.argv[1])
    h.pread(4096, 0)
except nbd.Error as e:
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({"error": None, "tls": h.get_tls_negotiated()}))
"""


def assert_served(t: TlsHost) -> None:
    """The daemon is alive, serves a client with this host's certificate, and logged no error."""
    assert libnbd(LIBNBD_CONNECT, t.uri()) == {"error": None, "tls": True}
    assert t.host.alive(), t.host.log_tail()
    assert "ERROR p2pvbd.nbd.server" not in (t.host.home / "daemon.log").read_text(), t.host.log_tail()


# --- real clients with credentials ---------------------------------------------------------------------------


def test_credentials_layout_and_modes(tls_host: TlsHost) -> None:
    creds, home = tls_host.creds, tls_host.host.home
    assert sorted(os.listdir(creds)) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
    assert stat.S_IMODE(creds.stat().st_mode) == 0o700
    assert stat.S_IMODE((creds / "client-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "nbd-tls").stat().st_mode) == 0o700
    for key in ("ca-key.pem", "server-key.pem"):
        assert stat.S_IMODE((home / "nbd-tls" / key).stat().st_mode) == 0o600
    # A second certificate never replaces credentials a client may be using.
    res = tls_host.host.cli("nbd-client-cert", str(creds), check=False)
    assert res.returncode == 1 and "already holds" in res.stderr and "Traceback" not in res.stderr


def test_qemu_img_and_qemu_io_write_and_read_over_tls(tls_host: TlsHost, tmp_path: Path) -> None:
    image = tmp_path / "in.raw"
    data = random.Random(7).randbytes(DISK_SIZE)
    image.write_bytes(data)
    qemu = tls_host.qemu_args()
    info = json.loads(run("qemu-img", "info", "--output=json", *qemu, timeout=HANG_GUARD).stdout)
    assert info["virtual-size"] == DISK_SIZE
    run("qemu-img", "convert", "-n", "-f", "raw", "--object", qemu[1], str(image), "--target-image-opts", qemu[3],
        timeout=HANG_GUARD)
    run("qemu-img", "convert", *qemu, "-O", "raw", str(tmp_path / "out.raw"), timeout=HANG_GUARD)
    assert (tmp_path / "out.raw").read_bytes() == data
    res = run("qemu-io", *qemu, "-c", f"write -P {PATTERN} 1M 64k", "-c", f"read -P {PATTERN} 1M 64k",
              "-c", "read -P 0 0 0", "-c", "flush", timeout=HANG_GUARD)
    assert "failed" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
    # The same disk as on the Unix socket, where plaintext stays.
    res = run("qemu-io", "-f", "raw", "-r", tls_host.host.uri(DISK), "-c", f"read -P {PATTERN} 1M 64k",
              timeout=HANG_GUARD)
    assert "failed" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
    assert "NBD client 'test-client' connected over TLS" in (tls_host.host.home / "daemon.log").read_text()


def test_nbdcopy_in_and_out_over_tls(tls_host: TlsHost, tmp_path: Path) -> None:
    """nbdcopy uses several connections with many requests in flight: replies overtake each other inside TLS."""
    data = random.Random(9).randbytes(DISK_SIZE)
    (tmp_path / "in.raw").write_bytes(data)
    run("nbdcopy", str(tmp_path / "in.raw"), tls_host.uri(), timeout=HANG_GUARD)
    run("nbdcopy", tls_host.uri(), str(tmp_path / "out.raw"), timeout=HANG_GUARD)
    assert (tmp_path / "out.raw").read_bytes() == data


def test_nbdinfo_and_libnbd_over_tls(tls_host: TlsHost) -> None:
    info = json.loads(run("nbdinfo", "--json", tls_host.uri(), timeout=HANG_GUARD).stdout)
    assert info["TLS"] is True
    assert [(e["export-name"], e["export-size"]) for e in info["exports"]] == [(DISK, DISK_SIZE)]
    listed = run("nbdinfo", "--list", "--json", tls_host.uri(disk=""), timeout=HANG_GUARD).stdout
    assert [e["export-name"] for e in json.loads(listed)["exports"]] == [DISK]
    got = libnbd("""
import json, sys
import nbd
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
h.pwrite(b"\\xa5" * 65536, 2 << 20)
h.flush()
back = h.pread(65536, 2 << 20)
print(json.dumps({"tls": h.get_tls_negotiated(), "size": h.get_size(), "back": back == b"\\xa5" * 65536}))
""", tls_host.uri())
    assert got == {"tls": True, "size": DISK_SIZE, "back": True}


def test_a_wildcard_listener_names_the_machines_addresses(make_host: Callable[..., Host], tmp_path: Path) -> None:
    """libnbd checks the URI's host against the server certificate: every address of the machine works."""
    port = free_port()
    host = make_host("office-pc", "--nbd-tcp", f"0.0.0.0:{port}")
    host.cli("disk", "create", DISK, "--size", str(DISK_SIZE))
    t = TlsHost(host, port, tmp_path / "creds")
    host.cli("nbd-client-cert", str(t.creds))
    addresses = ["127.0.0.1", *(a for a in nbd_tls.machine_addresses() if "." in a and a != "127.0.0.1")]
    for address in addresses:
        got = libnbd(LIBNBD_CONNECT, t.uri(address=address))
        assert got == {"error": None, "tls": True}, address
    assert "reachable from the network" in (host.home / "daemon.log").read_text()


# --- refusals ---------------------------------------------------------------------------------------------------


def test_plaintext_on_the_tcp_port_reads_nothing(tls_host: TlsHost) -> None:
    plain = f"nbd://127.0.0.1:{tls_host.port}/{DISK}"
    for cmd in (["nbdinfo", plain], ["nbdinfo", "--list", plain], ["qemu-img", "info", plain],
                ["qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", plain]):
        res = run(*cmd, check=False, timeout=HANG_GUARD)
        assert res.returncode != 0, (cmd, res.stdout)
    # FORCEDTLS, option by option: NBD_REP_ERR_TLS_REQD for all but ABORT; EXPORT_NAME (which cannot be refused)
    # ends the session without a byte of the export.
    c = RawClient(("127.0.0.1", tls_host.port))
    c.handshake()
    name = DISK.encode()
    info = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    meta = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, 15) + b"base:allocation"
    for opt, data in ((nbd.NBD_OPT_LIST, b""), (nbd.NBD_OPT_INFO, info), (nbd.NBD_OPT_GO, info),
                      (nbd.NBD_OPT_STRUCTURED_REPLY, b""), (nbd.NBD_OPT_SET_META_CONTEXT, meta), (0x4242, b"")):
        c.option(opt, data)
        got_opt, rtype, _ = c.option_reply()
        assert (got_opt, rtype) == (opt, nbd.NBD_REP_ERR_TLS_REQD)
    c.option(nbd.NBD_OPT_EXPORT_NAME, name)
    assert c.assert_closed() == b""
    c.close()
    c = RawClient(("127.0.0.1", tls_host.port))
    c.handshake()
    c.option(nbd.NBD_OPT_ABORT)
    assert c.option_reply() == (nbd.NBD_OPT_ABORT, nbd.NBD_REP_ACK, b"")
    c.close()
    assert_served(tls_host)


def test_clients_without_a_certificate_of_this_hosts_nbd_ca_are_refused(
        tls_host: TlsHost, make_host: Callable[..., Host], tmp_path: Path) -> None:
    """No certificate, one of another host's NBD CA, or this host's own swarm certificate: each trusts the server
    (this host's NBD CA) and is refused in the TLS handshake; the daemon goes on serving."""
    ca = tls_host.creds / nbd_tls.CA_CERT_FILE
    no_cert = tmp_path / "no-cert"
    no_cert.mkdir()
    shutil.copy(ca, no_cert)
    other = make_host("home-pc", start=False)  # another swarm, another NBD CA
    other.cli("nbd-client-cert", str(tmp_path / "other"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(ca, foreign)
    for f in (nbd_tls.CLIENT_CERT_FILE, nbd_tls.CLIENT_KEY_FILE):
        shutil.copy(tmp_path / "other" / f, foreign)
    swarm = tmp_path / "swarm"
    swarm.mkdir()
    shutil.copy(ca, swarm)
    shutil.copy(tls_host.host.home / "trust" / "host.pem", swarm / nbd_tls.CLIENT_CERT_FILE)
    shutil.copy(tls_host.host.home / "trust" / "host.key", swarm / nbd_tls.CLIENT_KEY_FILE)
    for creds in (no_cert, foreign, swarm):
        got = libnbd(LIBNBD_CONNECT, tls_host.uri(creds=creds))
        assert got["error"], (creds.name, got)
        res = run("nbdinfo", tls_host.uri(creds=creds), check=False, timeout=HANG_GUARD)
        assert res.returncode != 0, (creds.name, res.stdout)
    # qemu checks its own certificate against the CA before it connects, so only "no certificate" reaches us.
    res = run("qemu-io", *tls_host.qemu_args(creds=no_cert), "-c", "read 0 4k", check=False, timeout=HANG_GUARD)
    assert res.returncode != 0, res.stdout
    log = (tls_host.host.home / "daemon.log").read_text()
    assert log.count("refused: TLS handshake failed") >= 7, tls_host.host.log_tail()
    assert_served(tls_host)


def test_an_nbd_client_certificate_is_no_swarm_member(tls_host: TlsHost) -> None:
    """The peer port trusts the swarm CA only: an NBD client certificate gets no further than the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(tls_host.host.home / "trust" / "ca.pem")
    ctx.load_cert_chain(tls_host.creds / nbd_tls.CLIENT_CERT_FILE, tls_host.creds / nbd_tls.CLIENT_KEY_FILE)
    with socket.create_connection(("127.0.0.1", tls_host.host.port), timeout=HANG_GUARD) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                got = tls.recv(1)  # TLS 1.3: the server's verdict on our certificate arrives after our Finished
        except (ssl.SSLError, ConnectionResetError):
            got = b""
    assert got == b""


def test_starttls_rules_and_option_haggling_inside_tls(tls_host: TlsHost) -> None:
    c = RawClient(("127.0.0.1", tls_host.port))
    c.handshake()
    c.option(nbd.NBD_OPT_STARTTLS, b"data")
    assert c.option_reply()[:2] == (nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ERR_INVALID)  # "MUST NOT send any data"
    c.option(nbd.NBD_OPT_STARTTLS)
    assert c.option_reply() == (nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ACK, b"")
    ctx = ssl.create_default_context(cafile=tls_host.creds / nbd_tls.CA_CERT_FILE)
    ctx.load_cert_chain(tls_host.creds / nbd_tls.CLIENT_CERT_FILE, tls_host.creds / nbd_tls.CLIENT_KEY_FILE)
    c.sock = ctx.wrap_socket(c.sock, server_hostname="127.0.0.1")
    c.option(nbd.NBD_OPT_STARTTLS)
    assert c.option_reply()[:2] == (nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ERR_INVALID)  # TLS runs already
    c.structured_reply()
    size, tflags = c.go()
    assert size == DISK_SIZE and not tflags & nbd.NBD_FLAG_READ_ONLY
    assert c.read(0, 4096) == bytes(4096)
    c.disconnect()
    c.close()
    # Plaintext sent behind STARTTLS never counts as sent inside TLS (a man in the middle could have put it
    # there): the server hangs up without an answer to it.
    c = RawClient(("127.0.0.1", tls_host.port))
    c.handshake()
    c.send(struct.pack(">QII", nbd.NBD_IHAVEOPT, nbd.NBD_OPT_STARTTLS, 0)
           + struct.pack(">QII", nbd.NBD_IHAVEOPT, nbd.NBD_OPT_LIST, 0))
    ack = nbd.option_reply(nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ACK)
    try:
        head = c.recv_exact(len(ack))
    except ServerClosed:
        head = b""  # it saw both options at once and hung up
    if head:  # it read STARTTLS alone first and answered it: the LIST behind it must still get no answer
        assert head == ack
        try:
            c.sock = ctx.wrap_socket(c.sock, server_hostname="127.0.0.1")
            got = c.sock.recv(1)
        except (ssl.SSLError, OSError):
            got = b""
        assert got == b""
    c.close()
    assert_served(tls_host)


def test_tcp_connections_beyond_the_cap_are_closed(tls_host: TlsHost) -> None:
    held = []
    try:
        for _ in range(MAX_TCP_CONNECTIONS):
            c = RawClient(("127.0.0.1", tls_host.port))
            c.greeting()  # served: it holds a slot
            held.append(c)
        extra = RawClient(("127.0.0.1", tls_host.port))
        with pytest.raises(ServerClosed):
            extra.greeting()
        extra.close()
    finally:
        for c in held:
            c.close()
    # Slots come back as the server sees the closes; a client with a certificate is served again.
    deadline = time.monotonic() + HANG_GUARD  # hang guard only
    while (got := libnbd(LIBNBD_CONNECT, tls_host.uri()))["error"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert got == {"error": None, "tls": True}
    assert "TCP connections are open already" in (tls_host.host.home / "daemon.log").read_text()


# --- clients that stall before TLS, on the mock clock ------------------------------------------------------------


def _contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts from a fresh NBD CA in ``tmp_path``."""
    server = nbd_tls.server_ssl_context(tmp_path, "office-pc", "127.0.0.1")
    creds = nbd_tls.write_client_credentials(tmp_path, "office-pc", tmp_path / "creds")
    client = ssl.create_default_context(cafile=creds / nbd_tls.CA_CERT_FILE)
    client.load_cert_chain(creds / nbd_tls.CLIENT_CERT_FILE, creds / nbd_tls.CLIENT_KEY_FILE)
    return server, client


async def _receive_until_eof(stream: trio.abc.Stream) -> bytes:
    got = bytearray()
    while chunk := await stream.receive_some():
        got += chunk
    return bytes(got)


_GREETING = nbd.server_greeting()
_CLIENT_FLAGS = struct.pack(">I", nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES)
_STARTTLS = struct.pack(">QII", nbd.NBD_IHAVEOPT, nbd.NBD_OPT_STARTTLS, 0)
_LIST = struct.pack(">QII", nbd.NBD_IHAVEOPT, nbd.NBD_OPT_LIST, 0)


@pytest.mark.parametrize("stall", ["silent", "after-flags", "in-tls-handshake"])
async def test_a_client_stalling_before_tls_is_closed(tmp_path: Path, autojump_clock: trio.abc.Clock,
                                                      stall: str) -> None:
    server_ctx, _ = _contexts(tmp_path)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handle, server, HookController(), server_ctx, "a stalling client")
        if stall != "silent":
            await client.send_all(_CLIENT_FLAGS)
        if stall == "in-tls-handshake":
            await client.send_all(_STARTTLS)
        got = await _receive_until_eof(client)  # returns only once the server hangs up
    ack = nbd.option_reply(nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ACK)
    assert got == _GREETING + (ack if stall == "in-tls-handshake" else b"")


async def test_an_authenticated_client_may_haggle_at_leisure(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """The deadline bounds the time before TLS only: a client inside TLS is in no more hurry than on the socket."""
    server_ctx, client_ctx = _contexts(tmp_path)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handle, server, HookController(), server_ctx, "a slow client")
        await client.send_all(_CLIENT_FLAGS + _STARTTLS)
        head = b""
        while len(head) < len(_GREETING) + 20:
            head += await client.receive_some()
        tls = trio.SSLStream(client, client_ctx, server_hostname="127.0.0.1")
        await tls.do_handshake()
        await trio.sleep(10 * TLS_SETUP_SECONDS)
        await tls.send_all(_LIST)
        reply = await tls.receive_some()
        assert reply == nbd.option_reply(nbd.NBD_OPT_LIST, nbd.NBD_REP_ACK)  # no exports here: just the ACK
        nursery.cancel_scope.cancel()


# --- the CLI --------------------------------------------------------------------------------------------------


def _p2pvbd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=HANG_GUARD)


@pytest.mark.parametrize("address", ["nonsense", "nbd.example.org:10809", "127.0.0.1:99999", "127.0.0.1:0",
                                     "127.0.0.1:port", "[::1"])
def test_an_unusable_nbd_tcp_address_is_a_one_line_error(tmp_path: Path, address: str) -> None:
    res = _p2pvbd("init", "office-pc", "--nbd-tcp", address, "--home", str(tmp_path / "h"))
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "h" / "config.toml").exists()


def test_init_says_what_the_nbd_listener_opens(tmp_path: Path) -> None:
    port = free_port()
    res = _p2pvbd("init", "office-pc", "--nbd-tcp", f"127.0.0.1:{port}", "--home", str(tmp_path / "a"))
    assert res.returncode == 0 and "NBD over TLS" in res.stdout and "network" not in res.stdout, res.stdout
    res = _p2pvbd("init", "home-pc", "--nbd-tcp", f"0.0.0.0:{port}", "--home", str(tmp_path / "b"))
    assert res.returncode == 0 and "reachable from the network" in res.stdout, res.stdout


def test_a_daemon_whose_nbd_port_is_taken_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        home = tmp_path / "h"
        Host(home, "office-pc", "--nbd-tcp", f"127.0.0.1:{port}")
        res = _p2pvbd("daemon", "--home", str(home), "--log-file", str(tmp_path / "log"))
    assert res.returncode == 1, res
    assert res.stderr.strip() == (f"p2pvbd: error: cannot serve NBD on 127.0.0.1:{port}: Address already in use: "
                                  f"change nbd_tcp in {home / 'config.toml'}")
