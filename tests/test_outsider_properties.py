"""Property tests, one per listening socket (peer, join, DHT, NBD over TCP, control): whatever sequence of
bytes and connections an outsider sends leaves the daemon alive, its memory within RSS_GROWTH_BOUND_MB of
where it started, its event loop never held for 100 ms (the daemon logs each such stall, daemon.py), and
its CLI answering. One daemon serves every example of a module, so what one leaves behind meets the next.
A fixed seed and a small budget keep them in `make test`."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pvbd.base import control
from p2pvbd.base.home import CONTROL_SOCKET
from p2pvbd.wire import peer_wire
from p2pvbd.wire.nbd_codec import NBD_IHAVEOPT
from tests import outsider
from tests.daemons import Host, free_port
from tests.test_outsiders import RSS_GROWTH_BOUND_MB, rss_mb, stalls

# Examples per socket: each holds a few connections for a fraction of a second, so a socket takes ~10-20 s.
EXAMPLES = 20
# How long an action waits for what comes back: long enough to see a reply on loopback, no longer.
WAIT = 0.1
# A trickle's length: a taste of slowloris (a longer one ends at the handshake timeout: 2-10 s, admission.py).
SLOW_SECONDS = 0.2
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# msgpack values of every type, nested a little: what frames and bodies are made of.
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=16)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16)
# Requests as the join port's ops would see them: real op and field names, any values.
join_ops = st.sampled_from(["hello", "join_ca", "join", "cancel"]) | st.text(max_size=8)
join_fields = st.sampled_from(["protocol", "invite_id", "name", "csr", "proof", "id"]) | st.text(max_size=6)
envelopes = st.fixed_dictionaries({"id": st.integers(0, 2**64 - 1), "op": join_ops,
                                   "body": st.dictionaries(join_fields, values, max_size=5)})


def packed(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# Frames of empty maps, up to the one that grew a daemon by 500 MB.
BIG_BOMB = 7 * 1024 * 1024
bombs = (st.integers(1, 64 * 1024) | st.just(BIG_BOMB)).map(outsider.bomb)
# What goes into a TLS session on the join port: frames of envelopes or of anything, bombs, lies about length.
join_payloads = st.one_of(
    envelopes.map(lambda e: outsider.frame(packed(e))),
    values.map(lambda v: outsider.frame(packed(v))),
    bombs,
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=256)).map(lambda t: struct.pack(">I", t[0]) + t[1]),
    st.binary(max_size=512),
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, int]]:
    """office-pc with an invite outstanding (the join port open) and NBD over TCP, and its NBD TCP port."""
    nbd_port = free_port()
    host = Host(tmp_path_factory.mktemp("outsider") / "office-pc", "office-pc", "--nbd-tcp", f"127.0.0.1:{nbd_port}")
    host.start()
    host.cli("invite")
    host.cli("disk", "create", "vm1", "--size", "1M")
    try:
        yield host, nbd_port
    finally:
        host.stop()


class Watch:
    """The checks every example ends with, against where the daemon started."""

    def __init__(self, host: Host) -> None:
        assert host.proc is not None
        self.host, self.pid = host, host.proc.pid
        self.rss = rss_mb(self.pid)
        self.stalls = len(stalls(host))

    def check(self) -> None:
        assert self.host.alive(), self.host.log_tail()
        assert rss_mb(self.pid) - self.rss < RSS_GROWTH_BOUND_MB
        assert stalls(self.host)[self.stalls:] == [], self.host.log_tail()
        disks = control.call(self.host.home / CONTROL_SOCKET, "disk_list", timeout=30)  # what `disk list` asks
        assert [d["name"] for d in disks] == ["vm1"]


@pytest.fixture
def watch(daemon: tuple[Host, int]) -> Iterator[Watch]:
    w = Watch(daemon[0])
    yield w
    w.check()


def attempt(action: Callable[[], object]) -> None:
    """An outsider's action: refusals and resets on the way are the daemon's right."""
    with contextlib.suppress(OSError, ValueError):
        action()


def tcp_actions(payloads: st.SearchStrategy[bytes], tls: bool) -> st.SearchStrategy[tuple[str, Any]]:
    kinds = [st.tuples(st.just("raw"), payloads), st.tuples(st.just("idle"), st.integers(1, 40)),
             st.tuples(st.just("half"), st.binary(min_size=1, max_size=64)),
             st.tuples(st.just("slow"), st.binary(min_size=1, max_size=8))]
    if tls:
        kinds.append(st.tuples(st.just("tls"), payloads))
    return st.one_of(*kinds)


def run_tcp(port: int, actions: list[tuple[str, Any]]) -> None:
    """Carry out ``actions`` against a TCP port; idle connections stay open until the example ends."""
    with outsider.held([]) as idle:
        for kind, arg in actions:
            if kind == "raw":
                attempt(lambda arg=arg: outsider.send_raw("127.0.0.1", port, arg, wait=WAIT))
            elif kind == "tls":
                attempt(lambda arg=arg: outsider.send_over_tls("127.0.0.1", port, arg, wait=WAIT))
            elif kind == "idle":
                idle += outsider.flood("127.0.0.1", port, arg)
            elif kind == "slow":  # a byte at a time (slowloris), over SLOW_SECONDS
                attempt(lambda arg=arg: outsider.slowloris("127.0.0.1", port, arg, SLOW_SECONDS))
            elif kind == "half":  # some bytes, then the connection is reset mid-stream
                with contextlib.suppress(OSError), outsider.tcp("127.0.0.1", port) as s:
                    s.sendall(arg)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@PROPERTY_SETTINGS
@given(actions=st.lists(tcp_actions(st.binary(max_size=2048), tls=True), min_size=1, max_size=4))
def test_the_peer_port(daemon: tuple[Host, int], watch: Watch, actions: list[tuple[str, Any]]) -> None:
    run_tcp(daemon[0].port, actions)
    watch.check()


@PROPERTY_SETTINGS
@given(actions=st.lists(tcp_actions(join_payloads, tls=True), min_size=1, max_size=4))
def test_the_join_port(daemon: tuple[Host, int], watch: Watch, actions: list[tuple[str, Any]]) -> None:
    run_tcp(daemon[0].port + 1, actions)
    watch.check()


# An NBD client's first words (after the server's greeting): flags, then options, any option and length.
nbd_payloads = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
              st.binary(max_size=256)).map(
        lambda t: struct.pack(">IQII", t[0], NBD_IHAVEOPT, t[1], t[2]) + t[3]),
    st.binary(max_size=1024),
)


@PROPERTY_SETTINGS
@given(actions=st.lists(tcp_actions(nbd_payloads, tls=True), min_size=1, max_size=4))
def test_the_nbd_tcp_port(daemon: tuple[Host, int], watch: Watch, actions: list[tuple[str, Any]]) -> None:
    run_tcp(daemon[1], actions)
    watch.check()


@PROPERTY_SETTINGS
@given(datagrams=st.lists(st.binary(max_size=9000) | values.map(packed), min_size=1, max_size=50))
def test_the_dht_port(daemon: tuple[Host, int], watch: Watch, datagrams: list[bytes]) -> None:
    outsider.datagrams("127.0.0.1", daemon[0].port, datagrams)
    watch.check()


# The control socket is its owner's alone (0600), but it must not fall to a malformed request either.
control_requests = st.one_of(
    st.fixed_dictionaries({"op": st.text(max_size=12).filter(lambda op: op != "shutdown"), "args": values}),
    values,
).map(lambda obj: outsider.frame(packed(obj)))


@PROPERTY_SETTINGS
@given(requests=st.lists(control_requests | st.binary(max_size=256) | bombs, min_size=1, max_size=4))
def test_the_control_socket(daemon: tuple[Host, int], watch: Watch, requests: list[bytes]) -> None:
    path = str(daemon[0].home / CONTROL_SOCKET)
    for r in requests:
        attempt(lambda r=r: outsider.send_unix(path, r, wait=WAIT))
    watch.check()


def test_the_bounds_are_stated() -> None:
    """The join port's frames decode to far less than the bound these tests hold the daemon to."""
    assert peer_wire.JOIN_LIMITS.decoded_bytes * 4 < RSS_GROWTH_BOUND_MB * 1024 * 1024
