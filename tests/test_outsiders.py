"""What an outsider (no certificate of the swarm) can do to a daemon through its ports: a flood of idle
connections, a decompression bomb, garbage. The daemon stays up, its memory bounded, its event loop free,
and its own users (the CLI, NBD clients, members) keep being served. tests/outsider.py is the attacker."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from p2pvbd.base import admission
from p2pvbd.wire import peer_wire
from tests import outsider
from tests.daemons import Host, run

# A systemd service's default soft limit on open descriptors; the daemon is given it as its hard limit too,
# so raising the soft limit (which it does) cannot help and the bounds must.
SERVICE_NOFILE = 1024
# More than the limit: enough to kill a daemon that holds a descriptor for each (the flood that did).
FLOOD_CONNECTIONS = 1100
# Descriptors a daemon with one disk holds of its own, with room: measured ~20.
OWN_DESCRIPTORS = 64
# Local addresses the flood comes from (all of 127/8 is loopback): more sources than the per-source bound
# lets through, so the global bound and the fair share between sources are what hold.
FLOOD_SOURCES = [f"127.0.0.{i}" for i in range(2, 102)]
# What the daemon's event-loop watch logs (daemon.py): a stall of at least 100 ms, and how much of it the
# daemon itself ran (on a machine busy with other work a process is late without having run).
STALL = re.compile(r"the event loop was blocked for (\d+) ms \(computing for (\d+) ms of it\)")
# A stall is the daemon's own when it ran this long during it (daemon.LOOP_STALL_WARNING).
OWN_STALL_MS = 100
# The daemon's resident memory before any outsider: ~60 MB. What an outsider may add on top: each port's
# frames are bounded (peer_wire.JOIN_LIMITS decode to < 100 kB, and at most 4 join connections are open),
# so this leaves room only for the allocator's slack and the TLS sessions of the admitted connections.
RSS_GROWTH_BOUND_MB = 64


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError(f"no VmRSS for {pid}")


def stalls(host: Host) -> list[int]:
    """The event-loop stalls the daemon logged that its own work caused (the CPU it used in each, ms)."""
    return [int(ran) for _, ran in STALL.findall((host.home / "daemon.log").read_text()) if int(ran) >= OWN_STALL_MS]


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def wait_for(check: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_a_flood_of_idle_connections_leaves_the_daemon_serving(make_host: Callable[..., Host]) -> None:
    """Idle TCP connections to the peer port, more than the descriptor limit, from many addresses: the
    daemon (founder, with an invite outstanding, so it reads its invites every few seconds) stays up,
    answers its CLI, serves NBD, and a member that starts meanwhile still connects to it."""
    office = make_host("office-pc", start=False)
    office.start(nofile=SERVICE_NOFILE)
    home = make_host("home-pc", join=office.cli("invite").stdout.strip(), start=False)
    office.cli("invite")  # outstanding: the join port stays open and the invites are read periodically
    office.cli("disk", "create", "vm1", "--size", "4M")
    assert office.proc is not None
    pid = office.proc.pid
    with outsider.held(outsider.flood("127.0.0.1", office.port, FLOOD_CONNECTIONS, FLOOD_SOURCES)) as conns:
        assert len(conns) > SERVICE_NOFILE  # the kernel took them all; the daemon decides what to hold
        time.sleep(3)  # the periodic invites check (every 2 s) ran under the flood
        assert office.alive(), office.log_tail()
        # The gate's bound, besides the daemon's own (~20: its stores, sockets and log, a command or two).
        assert open_fds(pid) <= min(SERVICE_NOFILE - admission.DESCRIPTOR_RESERVE,
                                    admission.MAX_UNAUTHENTICATED + OWN_DESCRIPTORS)
        assert [d["name"] for d in office.json("disk", "list")] == ["vm1"]
        assert "vm1" in office.cli("status").stdout
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k", office.uri("vm1"))
        home.start()  # dials office-pc's peer port from 127.0.0.1, a source the flood does not use
        assert wait_for(lambda: any(p["name"] == "office-pc" and p["reachable"] for p in home.json("peers"))), \
            office.log_tail()
    assert office.alive()


def test_the_nested_maps_bomb_is_refused_on_the_join_port(make_host: Callable[..., Host]) -> None:
    """One 7 MiB frame of empty maps, sent by anyone to the join port while an invite is outstanding, once
    grew the daemon by 500 MB and held its event loop for 1.3 s: now it is refused by its length, unread."""
    office = make_host("office-pc")
    office.cli("invite")
    assert office.proc is not None
    before = rss_mb(office.proc.pid)
    for _ in range(3):
        reply = outsider.send_over_tls("127.0.0.1", office.port + 1, outsider.bomb(7 * 1024 * 1024), wait=2.0)
        assert reply == b""  # no reply: the connection was dropped at the length prefix
        # The same bomb cut to the join port's frame size is decoded, and refused by its element budget.
        small = outsider.bomb(peer_wire.JOIN_LIMITS.frame_bytes - 64)
        assert outsider.send_over_tls("127.0.0.1", office.port + 1, small, wait=2.0) == b""
    assert office.alive()
    assert rss_mb(office.proc.pid) - before < RSS_GROWTH_BOUND_MB
    assert not stalls(office), office.log_tail()
    assert "exceeds the 16384-byte limit" in (office.home / "daemon.log").read_text()


def test_bombs_from_a_member_are_cut_by_the_element_budget() -> None:
    """A member's frames may be 8 MiB, but what they decode to is counted: the bomb, cut to fit the
    limits on list length, stops at the container budget (and any frame's decoded size has a bound)."""
    per_list = peer_wire.MAX_ARRAY_LEN
    lists = b"".join(b"\xdd" + per_list.to_bytes(4, "big") + b"\x80" * per_list for _ in range(200))
    payload = b"\x83\xa2id\x01\xa2op\xaaput_blocks\xa4body\x81\xa1x\xdc" + (200).to_bytes(2, "big") + lists
    with pytest.raises(peer_wire.FrameError, match="lists and maps in one frame"):
        peer_wire.decode_payload(payload)
    deep = b"\x83\xa2id\x01\xa2op\xaaput_blocks\xa4body\x81\xa1x" + b"\x91" * 200 + b"\xc0"
    with pytest.raises(peer_wire.FrameError, match="nested deeper"):
        peer_wire.decode_payload(deep)
    assert peer_wire.PEER_LIMITS.decoded_bytes < 3 * peer_wire.MAX_FRAME_BYTES
    assert peer_wire.JOIN_LIMITS.decoded_bytes < 100_000


def test_a_big_frame_must_be_of_an_op_that_carries_data() -> None:
    """Only block, RAM and relay ops may send frames above SMALL_FRAME_BYTES; any other is dropped from its
    first bytes, before the rest is buffered."""
    dec = peer_wire.FrameDecoder()
    big = peer_wire.SMALL_FRAME_BYTES + 1
    dec.feed(peer_wire.HEADER.pack(big) + b"\x83\xa2id\x01\xa2op\xa5hello\xa4body")
    with pytest.raises(peer_wire.FrameError, match="'hello' request"):
        dec.pending()
    ok = peer_wire.encode_request(1, "put_blocks", {"disk": "d", "blocks": [[0, 1, b"h", b"x" * big, 0]]})
    dec = peer_wire.FrameDecoder()
    dec.feed(ok)
    assert dec.next_frame() is not None


def test_the_gate_bounds_unauthenticated_connections() -> None:
    """Per source, in all (the busiest source's oldest gives way to a quieter one), and the descriptor reserve."""
    evicted: list[str] = []
    gate = admission.Gate(total=4, per_source=2)
    a1 = gate.admit("10.0.0.1", lambda: evicted.append("a1"))
    a2 = gate.admit("10.0.0.1", lambda: evicted.append("a2"))
    with pytest.raises(admission.Refused, match=r"from 10\.0\.0\.1"):
        gate.admit("10.0.0.1", lambda: None)
    v6 = [gate.admit(f"2001:db8::{i}", lambda: evicted.append("v6")) for i in (1, 2)]
    with pytest.raises(admission.Refused, match="from 2001:db8::/64"):  # one end site, one source
        gate.admit("2001:db8::3", lambda: None)
    assert gate.pending == 4 and gate.handshake_timeout(10.0) == admission.PRESSURED_HANDSHAKE_SECONDS
    c = gate.admit("10.0.0.3", lambda: None)  # full: a source holding two gives its oldest up
    gate.admit("::ffff:10.0.0.4", lambda: None)  # and the other one
    assert evicted == ["a1", "v6"] and gate.pending == 4
    with pytest.raises(admission.Refused, match="still in their handshake"):  # everyone holds a fair share
        gate.admit("10.0.0.5", lambda: None)
    for t in (a1, a2, *v6, c):
        gate.release(t)
        gate.release(t)  # twice is harmless
    assert gate.pending == 1 and gate.handshake_timeout(10.0) == 10.0
    used = [0]
    fds = admission.Descriptors(reserve=10, count=lambda: used[0], limit=lambda: 100)
    reserved = admission.Gate(total=1000, per_source=1000, descriptors=fds)

    def connect() -> admission.Ticket:
        used[0] += 1  # the accepted connection's own descriptor
        return reserved.admit("10.0.0.9", lambda: None)

    used[0] = 85
    assert [connect() for _ in range(4)]  # 89 open: 11 free
    with pytest.raises(admission.Refused, match="descriptors"):
        connect()


def test_a_periodic_check_that_cannot_open_its_file_does_not_end_the_daemon(make_host: Callable[..., Host]) -> None:
    """What ended the founder under the flood: its check of the invites (every 2 s while the join port is
    open) failed to open trust/invites.lock (EMFILE then; a directory in its place here, EISDIR)."""
    office = make_host("office-pc")
    office.cli("invite")
    lock = office.home / "trust" / "invites.lock"
    lock.unlink()
    lock.mkdir()
    try:
        assert wait_for(lambda: "cannot read this host's invites" in (office.home / "daemon.log").read_text())
        assert office.alive(), office.log_tail()
        assert office.cli("disk", "list", check=False).returncode == 0
    finally:
        lock.rmdir()
    assert office.alive()
