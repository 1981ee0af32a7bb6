"""The network-namespace harness (tests/netns.py): reachability, isolation, shaping, cuts, loss, cleanup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from tests.netns import (
    PREFIX,
    Network,
    NsHost,
    cleanup_stale,
    list_namespaces,
    parse_rate,
    qdiscs,
    require_nft,
    require_root,
    tbf_params,
)

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Bounds on waits for things that should fail or recover; not speed assertions.
FAIL_TIMEOUT = 1.5
RECOVER_SECONDS = 20.0

ECHO_SERVER = textwrap.dedent("""
    import socket, sys, threading
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen(16)
    print("ready", flush=True)
    def serve(c):
        with c:
            while data := c.recv(65536):
                c.sendall(data)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")

ECHO_CLIENT = textwrap.dedent("""
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
            c.sendall(b"ping")
            sys.exit(0 if c.recv(4) == b"ping" else 3)
    except OSError as e:
        print(type(e).__name__, e)
        sys.exit(1)
""")

PORT = 7000


def echo(host: NsHost, address: str, port: int = PORT, timeout: float = 5.0) -> bool:
    """True when a TCP connect + echo round trip from ``host`` to ``address:port`` works."""
    res = host.run(PY, "-c", ECHO_CLIENT, address, str(port), str(timeout), capture_output=True, text=True)
    assert res.returncode in (0, 1), res
    return res.returncode == 0


def echo_eventually(host: NsHost, address: str, port: int = PORT) -> bool:
    deadline = time.monotonic() + RECOVER_SECONDS
    while time.monotonic() < deadline:
        if echo(host, address, port, timeout=2.0):
            return True
        time.sleep(0.2)
    return False


def start_echo_server(host: NsHost, port: int = PORT) -> subprocess.Popen[str]:
    proc = host.popen(PY, "-c", ECHO_SERVER, host.address, str(port), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def our_namespaces(net_prefix: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(net_prefix)]


def tbf_of(ns: str, dev: str) -> dict[str, object] | None:
    for q in qdiscs(ns, dev):
        if q.get("kind") == "tbf" and q.get("root"):
            return q
    return None


# --------------------------------------------------------------------------- pure helpers


def test_parse_rate() -> None:
    assert parse_rate("50mbit") == 50_000_000
    assert parse_rate("1Gbit") == 1_000_000_000
    assert parse_rate("500kbit") == 500_000
    assert parse_rate("2mbps") == 16_000_000  # tc: bps = bytes per second
    assert parse_rate(20_000_000) == 20_000_000
    for bad in ("fast", "", "0mbit", -5):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_tbf_params_cover_timer_slack_and_frames() -> None:
    for rate in ("1mbit", "20mbit", "50mbit", "1gbit"):
        p = tbf_params(rate)
        assert p["burst"] >= p["rate"] / 8 * 0.010
        assert p["burst"] >= 8 * 1514
        assert p["limit"] >= p["burst"] + p["rate"] / 8 * 0.050 - 1


# --------------------------------------------------------------------------- namespaces


@pytest.fixture
def net() -> Iterator[Network]:
    require_root()
    with Network() as n:
        yield n


@pytest.mark.root
def test_hosts_reach_each_other(net: Network) -> None:
    a = net.add_host("a")
    b = net.add_host("b")
    assert a.address != b.address
    assert a.exec_prefix() == ["ip", "netns", "exec", a.ns]
    assert net["a"] is a
    start_echo_server(b)
    assert echo(a, b.address)
    start_echo_server(a, PORT + 1)
    assert echo(b, a.address, PORT + 1)
    # Each host sees its own address on eth0 and a working loopback.
    addrs = json.loads(a.run("ip", "-j", "addr", "show", "dev", "eth0", capture_output=True, text=True).stdout)
    assert a.address in [i["local"] for i in addrs[0]["addr_info"]]
    lo = a.run(
        PY,
        "-c",
        "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
        "socket.create_connection(s.getsockname()).close()",
        capture_output=True,
    )
    assert lo.returncode == 0, lo
    if shutil.which("ping"):  # iputils-ping is optional; the TCP echo above is the real check
        res = a.run("ping", "-c", "1", "-W", "5", b.address, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.root
def test_isolated_from_root_namespace(net: Network) -> None:
    a = net.add_host("a")
    # A service on the root namespace's loopback is invisible from inside a host.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert not echo(a, "127.0.0.1", port, timeout=FAIL_TIMEOUT)
    # No default route out of the host: only the network's own subnet is reachable.
    routes = json.loads(a.run("ip", "-j", "route", "show", capture_output=True, text=True).stdout)
    assert [r["dst"] for r in routes] == [str(net.subnet)]
    # Nothing of the network appears in the root namespace.
    root_addrs = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    assert a.address not in root_addrs
    root_links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout)
    assert not any(link["ifname"] in ("br0", net[a.name].bridge_dev) for link in root_links)


@pytest.mark.root
def test_shaping_installs_tbf(net: Network) -> None:
    a = net.add_host("a", upload="20mbit", download="50mbit")
    b = net.add_host("b")
    up = tbf_of(a.ns, "eth0")
    down = tbf_of(net.ns, a.bridge_dev)
    assert up is not None and up["options"]["rate"] == 20_000_000 // 8  # tc -j reports bytes/s
    assert down is not None and down["options"]["rate"] == 50_000_000 // 8
    assert up["options"]["burst"] == tbf_params("20mbit")["burst"]
    assert tbf_of(b.ns, "eth0") is None and tbf_of(net.ns, b.bridge_dev) is None
    assert (a.upload, a.download) == (20_000_000, 50_000_000)

    net.shape(a, upload="5mbit")  # live change; download unchanged
    up = tbf_of(a.ns, "eth0")
    assert up is not None and up["options"]["rate"] == 5_000_000 // 8
    down = tbf_of(net.ns, a.bridge_dev)
    assert down is not None and down["options"]["rate"] == 50_000_000 // 8

    net.shape("b", download="1gbit")
    down_b = tbf_of(net.ns, b.bridge_dev)
    assert down_b is not None and down_b["options"]["rate"] == 1_000_000_000 // 8

    net.shape(a, upload=None, download=None)  # unshaped again
    assert tbf_of(a.ns, "eth0") is None and tbf_of(net.ns, a.bridge_dev) is None
    assert (a.upload, a.download) == (None, None)

    # Shaped links still carry traffic.
    net.shape(b, upload="10mbit")
    start_echo_server(b)
    assert echo(a, b.address)


@pytest.mark.root
def test_cut_and_restore(net: Network) -> None:
    a = net.add_host("a")
    b = net.add_host("b")
    start_echo_server(b)
    assert echo(a, b.address)
    net.cut(b)
    assert b.is_cut
    assert not echo(a, b.address, timeout=FAIL_TIMEOUT)
    net.restore(b)
    assert echo_eventually(a, b.address)


@pytest.mark.root
def test_loss(net: Network) -> None:
    require_nft()
    a = net.add_host("a")
    b = net.add_host("b")
    start_echo_server(b)
    net.loss(a, 100)
    assert a.loss_percent == 100
    assert not echo(a, b.address, timeout=FAIL_TIMEOUT)
    net.loss(a, 100)  # idempotent
    net.loss(a, 0)
    assert echo_eventually(a, b.address)
    net.loss(a, 0)  # removing twice is fine
    net.loss(b, 2.5)
    rules = b.run("nft", "list", "table", "inet", "p2pv_loss", capture_output=True, text=True).stdout
    assert "numgen random mod 10000 < 250 drop" in rules
    with pytest.raises(ValueError):
        net.loss(a, 101)


@pytest.mark.root
def test_close_removes_everything() -> None:
    require_root()
    with Network() as net:
        a = net.add_host("a")
        net.add_host("b", upload="10mbit")
        server = start_echo_server(a)
        prefix = net.prefix
        assert len(our_namespaces(prefix)) == 3  # bridge + 2 hosts
    assert our_namespaces(prefix) == []
    assert server.poll() is not None  # processes started in hosts are stopped
    net.close()  # idempotent


@pytest.mark.root
def test_close_after_exception_in_with_block() -> None:
    require_root()
    prefix = ""
    with pytest.raises(RuntimeError, match="boom"), Network() as net:
        prefix = net.prefix
        net.add_host("a")
        raise RuntimeError("boom")
    assert prefix and our_namespaces(prefix) == []


@pytest.mark.root
def test_failed_add_host_leaves_nothing(net: Network) -> None:
    with pytest.raises(ValueError):
        net.add_host("a", upload="lightspeed")
    assert "a" not in net.hosts
    assert our_namespaces(net.prefix + "a") == []
    with pytest.raises(ValueError):
        net.add_host("bad name")


_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from tests.netns import Network
    net = Network()
    net.add_host("a"); net.add_host("b", download="5mbit")
    print(net.prefix, flush=True)
    if sys.argv[2] == "hang":
        time.sleep(600)
""")


@pytest.mark.root
def test_atexit_cleans_up_unclosed_network() -> None:
    require_root()
    res = subprocess.run([PY, "-c", _CHILD, ROOT, "exit"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    prefix = res.stdout.strip()
    assert prefix.startswith(PREFIX)
    assert our_namespaces(prefix) == []


@pytest.mark.root
def test_cleanup_stale_removes_leftovers_of_dead_runs() -> None:
    require_root()
    child = subprocess.Popen([PY, "-c", _CHILD, ROOT, "hang"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        prefix = child.stdout.readline().strip()
        assert prefix.startswith(f"{PREFIX}{child.pid}-")
        assert len(our_namespaces(prefix)) == 3
        assert not any(ns.startswith(prefix) for ns in cleanup_stale())
        assert len(our_namespaces(prefix)) == 3  # its run is alive: left alone
    finally:
        child.send_signal(signal.SIGKILL)  # a crash: no close(), no atexit
        child.wait()
    assert len(our_namespaces(prefix)) == 3
    removed = cleanup_stale()
    assert sorted(ns for ns in removed if ns.startswith(prefix)) == sorted([prefix + "br", prefix + "a", prefix + "b"])
    assert our_namespaces(prefix) == []


@pytest.mark.root
def test_cleanup_stale_spares_live_networks_of_this_process(net: Network) -> None:
    net.add_host("a")
    # Same pid but no live Network of that prefix: left by an earlier process that had this pid.
    orphan = f"{PREFIX}{os.getpid()}-0-br"
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    try:
        removed = cleanup_stale()
        assert orphan in removed
        assert not any(ns.startswith(net.prefix) for ns in removed)
        assert len(our_namespaces(net.prefix)) == 2
    finally:
        subprocess.run(["ip", "netns", "del", orphan], capture_output=True)
    assert orphan not in list_namespaces()
