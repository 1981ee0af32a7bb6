"""Live migration under faults: kill -9 or a link cut of the source, the destination or a helper peer.

`make test` runs an explicit schedule: every fault (kill -9 then a restart; when network namespaces can
be made here (root), also a cut of the victim's link for 0.5-4 s) against every victim (source,
destination, helper) in every phase of the migration (bulk, mirror, switchover), once each, with ids
like ``kill-source-switchover``. The source runs with a failpoint (p2pvbd/migration/failpoints.py) that pauses
it at the start of that case's phase, after `jobs` shows the phase: the test polls the source's jobs
through the control socket and strikes inside the pause, and asserts the phase it saw is the one
intended (a migration that got past it first fails the case). `make soak` adds 180 random seeds, each
drawing a mode, a fault, a victim and a moment (a delay after `migrate` started, or the moment the
source's `jobs` reports a phase or a later one), with no failpoint.

A cut resets nothing, so the hosts must ride it out on their own timeouts. After every fault the test
checks:

1. exactly one owner: every host's `status` names the same owner and epoch, no host is left waiting
   for the migration (an incoming replica would hold writers); a write through a new connection
   succeeds at the owner and is refused on every other host holding a replica (a standby export is
   flagged read-only, so qemu-io is refused at open; a connection told otherwise gets EPERM);
2. every write the guest saw acknowledged is at the owner (a write in flight when it broke may be either);
3. an interrupted migration leaves the source the owner, its guest's writes accepted, and `migrate`
   run again succeeds.

With namespaces the hosts sit behind shaped links (the bulk copy of the 8 MiB disk then lasts 1-2 s);
without, they share the loopback and only kills run.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from p2pvbd.base.control import call
from p2pvbd.base.home import CONTROL_SOCKET
from p2pvbd.migration import failpoints
from tests.daemons import BIN, Host, run, system_python, write_refused
from tests.helpers import sync, visible, wait_until
from tests.netns import Network, unavailable_reason

BLOCK = 64 * 1024
BLOCKS = 128  # an 8 MiB disk
PHASES = ("bulk", "mirror", "switchover")
# Every phase a migration's job reports, in order; anything else ("done", "failed") means it ended.
JOB_PHASES = ("prepare", *PHASES)
FAULTS = ("kill", "cut")
# An 8 MiB migration takes 0.5-1.5 s on loopback and 1-2 s over the shaped links below: a random
# soak seed strikes within that, most of the time.
MAX_DELAY = {"loopback": 1.5, "netns": 2.0}
VICTIMS = ("office-pc", "car-pc", "home-pc")
ROLES = {"office-pc": "source", "car-pc": "destination", "home-pc": "helper"}  # home-pc holds a replica
# A cut lasts long enough for TCP's retransmissions to back off (several RTOs) and short enough that no
# request timeout of the daemons (10 s and more) has to expire for the migration to finish.
CUT_SECONDS = (0.5, 4.0)
# A killed host stays down up to this long before it is restarted.
KILL_DOWN_SECONDS = 1.0
# The source's failpoint pause at the start of a scheduled case's phase. The poll sees the phase within
# POLL_SECONDS plus one control round trip (a millisecond or so), and the strike itself is a signal or
# one `ip link` command (~10 ms): a second leaves a wide margin on a loaded 2-core machine, and it is paid
# once per migration (twice when `migrate` runs again).
PHASE_PAUSE_SECONDS = 1.0
# The poll of the source's jobs: through the control socket, not the CLI (a process per poll costs
# ~0.1-0.3 s, longer than a small disk's switchover).
POLL_SECONDS = 0.005
# How long a migration may take to reach the phase a case strikes in: a bound on a broken run (a stuck
# migration), not a speed expectation.
PHASE_WAIT_SECONDS = 60.0
# The destination's download limits the bulk copy: 8 MiB of incompressible data at 40 Mbit/s is ~1.8 s
# (less when the guest overwrites blocks first: its patterns compress to nothing).
DEST_DOWNLOAD = "40mbit"
# Every other direction: a LAN-like rate, so the helper's own sync of the disk stays short.
LINK = "100mbit"
# How long the hosts get to agree after a fault. After a cut, TCP retransmits with exponential backoff
# (a 4 s outage can cost ~13 s) and the daemons' request timeouts (10-60 s) may have to run out: a
# bound on a broken run, not a speed expectation.
SETTLE_SECONDS = 180.0
# `migrate` itself gets the same kind of bound.
MIGRATE_SECONDS = 300.0

# A guest that logs every write before issuing it ("W block seq") and once acknowledged ("A block seq"),
# line by line and flushed: whatever kills its connection, the log says what it was promised.
# The start of every guest program: its arguments, its log (line-buffered) and its connection.
GUEST_HEAD = r'''
import os, struct, sys, random, time
import nbd
uri, stop, logpath, blocks, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
BS = 65536
rng = random.Random(seed)
log = open(logpath, "w", buffering=1)
h = nbd.NBD()
h.connect_uri(uri)
'''
GUEST = GUEST_HEAD + r'''
log.write("READY\n"); log.flush()
seq = 0
while not os.path.exists(stop):
    block = rng.randrange(blocks)
    seq += 1
    head = struct.pack(">QQ", block, seq)
    data = (head * (BS // len(head) + 1))[:BS]
    log.write(f"W {block} {seq}\n"); log.flush()
    try:
        h.pwrite(data, block * BS)
        if seq % 8 == 0:
            h.flush()
    except nbd.Error as e:
        log.write(f"E {block} {seq} {e}\n"); log.flush()
        sys.exit(0)
    log.write(f"A {block} {seq}\n"); log.flush()
    time.sleep(0.003)
log.write("STOPPED\n"); log.flush()
try:
    h.shutdown()
except nbd.Error:
    pass
'''


def pattern(block: int, seq: int) -> bytes:
    head = struct.pack(">QQ", block, seq)
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


class LoggingGuest:
    """A libnbd guest (``script``, GUEST by default) writing to ``blocks`` blocks and logging each step."""

    def __init__(self, uri: str, tmp: Path, seed: int, script: str = GUEST, blocks: int = BLOCKS) -> None:
        path = tmp / "guest.py"
        path.write_text(script)
        self.stop_file, self.log = tmp / "guest.stop", tmp / "guest.log"
        self.proc = subprocess.Popen([system_python(), str(path), uri, str(self.stop_file), str(self.log),
                                      str(blocks), str(seed)])
        wait_until(lambda: self.lines()[:1] == ["READY"] or self.proc.poll() is not None, "the guest to connect")
        assert self.proc.poll() is None, "the guest could not connect"

    def lines(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def acked(self) -> int:
        return sum(1 for ln in self.lines() if ln.startswith("A "))

    def finish(self, timeout: float = 60) -> bool:
        """Stop the guest; False if it was still hung in a write after ``timeout``."""
        self.stop_file.touch()
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False

    def outcome(self) -> tuple[dict[int, int], dict[int, int], list[str]]:
        """(last acknowledged seq per block, the write in flight when it stopped {block: seq}, errors)."""
        acked: dict[int, int] = {}
        pending: dict[int, int] = {}
        errors: list[str] = []
        for ln in self.lines():
            kind, *rest = ln.split(" ", 3)
            if kind == "W":
                pending = {int(rest[0]): int(rest[1])}
            elif kind == "A":
                acked[int(rest[0])] = int(rest[1])
                pending = {}
            elif kind == "E":
                errors.append(ln)
        return acked, pending, errors


def status(host: Host, disk: str) -> dict[str, Any] | None:
    res = host.cli("status", disk, "--json", check=False, timeout=60)
    return json.loads(res.stdout)["disks"][0] if res.returncode == 0 else None


def disk_mode(host: Host, disk: str) -> str | None:
    return next((d["mode"] for d in host.json("disk", "list") if d["name"] == disk), None)


def settled(hosts: list[Host], disk: str) -> tuple[str, int] | None:
    """The (owner, epoch) every host agrees on, once no host has a migration of ``disk`` running."""
    seen = set()
    for h in hosts:
        st = status(h, disk)
        if st is None:
            return None
        seen.add((st["owner"], st["epoch"]))
    for h in hosts:
        if any(j.get("disk") == disk and not j["done"] for j in h.json("jobs")):
            return None
    return seen.pop() if len(seen) == 1 else None


def write_result(host: Host, disk: str, offset: int) -> subprocess.CompletedProcess[str]:
    return run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a {offset} 4k", host.uri(disk), check=False, timeout=60)


def source_phase(source: Host, disk: str) -> str | None:
    """The phase of the source's newest migration of ``disk`` (None before there is one), asked through
    the control socket."""
    jobs = call(source.home / CONTROL_SOCKET, "jobs", timeout=10)
    phases = [j["phase"] for j in jobs if j.get("kind") == "migration" and j.get("disk") == disk]
    return phases[-1] if phases else None


def reached(phase: str | None, want: str) -> bool:
    """Whether a migration job in ``phase`` is at ``want`` or past it (a later phase, or ended)."""
    if phase is None:
        return False
    return phase not in JOB_PHASES or JOB_PHASES.index(phase) >= JOB_PHASES.index(want)


@dataclass
class FaultRun:
    """One migration under one fault: the disk, the mode, who is struck, how and when."""

    disk: str
    seed: int  # the disk's contents and the guest's writes
    mode: str
    fault: str  # "kill" or "cut"
    victim: str
    rng: random.Random  # the strike's own draws: how long a killed host stays down, how long a cut lasts
    phase: str | None = None  # strike once the source's job reports this phase...
    exact: bool = False  # ...and in it (a scheduled case: the source pauses there), else in it or past it
    delay: float = 0.0  # without a phase: strike this long after `migrate` started
    report: dict[str, Any] = field(default_factory=dict)  # what was done, for failure messages


@dataclass(frozen=True)
class Case:
    """A scheduled case: one fault, one victim, one phase."""

    fault: str
    victim: str
    phase: str

    @property
    def id(self) -> str:
        return f"{self.fault}-{ROLES[self.victim]}-{self.phase}"

    @property
    def mode(self) -> str:
        """Alternating, so each (victim, phase) meets both modes: one through its kill, one through its cut."""
        return ("async", "sync")[(FAULTS.index(self.fault) + VICTIMS.index(self.victim) + PHASES.index(self.phase)) % 2]


# Every (fault, victim, phase) once, grouped by phase: the source is restarted with another failpoint
# only when the phase changes.
SCHEDULE = [Case(f, v, p) for p in PHASES for f in FAULTS for v in VICTIMS]


def scheduled(case: Case) -> FaultRun:
    seed = SCHEDULE.index(case)
    return FaultRun(f"vm-{case.id}", seed, case.mode, case.fault, case.victim, random.Random(seed),
                    phase=case.phase, exact=True)


def drawn(seed: int, netns: bool) -> FaultRun:
    """A soak seed's plan: mode, fault, victim and moment drawn at random."""
    rng = random.Random(seed)
    fault = rng.choice(FAULTS) if netns else "kill"
    plan = FaultRun(f"vm{seed}", seed, random.Random(seed * 7919).choice(["async", "sync"]), fault,
                    rng.choice(VICTIMS), rng)
    if rng.random() < 0.5:
        plan.delay = rng.uniform(0, MAX_DELAY["netns" if netns else "loopback"])
    else:
        plan.phase = rng.choice(PHASES)
    return plan


def await_moment(plan: FaultRun, source: Host, migrate: subprocess.Popen[str]) -> str | None:
    """Sleep the plan's delay, or poll the source's job until it reaches the plan's phase (or ended, or
    the hang guard ran out); returns the phase seen last (None after a delay)."""
    if plan.phase is None:
        time.sleep(plan.delay)
        return None
    deadline = time.monotonic() + PHASE_WAIT_SECONDS
    while True:
        phase = source_phase(source, plan.disk)
        if reached(phase, plan.phase) or migrate.poll() is not None or time.monotonic() > deadline:
            return phase
        time.sleep(POLL_SECONDS)


def inject(plan: FaultRun, cluster: Cluster, migrate: subprocess.Popen[str]) -> None:
    """Strike the plan's victim with its fault at its moment; ``plan.report`` says what was done.

    A scheduled case fails here, before striking, unless the source's job is in the intended phase."""
    hosts = {h.name: h for h in cluster.hosts}
    source, victim = hosts["office-pc"], hosts[plan.victim]
    fault = plan.report
    fault.update(fault=plan.fault, victim=plan.victim, mode=plan.mode)
    if plan.phase is None:
        fault["delay_s"] = round(plan.delay, 3)
    else:
        fault["at_phase"] = plan.phase
    seen = await_moment(plan, source, migrate)
    if plan.phase is None and source.alive():
        seen = source_phase(source, plan.disk)
    fault["phase_seen"] = seen
    fault["migrate_exited_before_fault"] = migrate.poll() is not None
    if plan.exact:
        assert seen == plan.phase and not fault["migrate_exited_before_fault"], \
            f"the strike was meant for phase {plan.phase}, the source's job was in {seen}: {fault}"
    if plan.fault == "kill":
        victim.kill9()
        time.sleep(plan.rng.uniform(0, KILL_DOWN_SECONDS))
        victim.start(env=cluster.envs.get(victim.name))
    else:
        assert cluster.net is not None
        outage = plan.rng.uniform(*CUT_SECONDS)
        fault["cut_s"] = round(outage, 3)
        cluster.net.cut(victim.name)
        try:
            time.sleep(outage)
        finally:
            cluster.net.restore(victim.name)


def missing_writes(owner: Host, disk: str, base: bytes, acked: dict[int, int], in_flight: dict[int, int],
                   image: Path) -> tuple[bytes, list[tuple[int, int | None, int | None, str]]]:
    """The owner's contents (copied to ``image``) and its blocks that hold neither the guest's last
    acknowledged write nor the write it had in flight (block, acked seq, in-flight seq, what is there)."""
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", owner.uri(disk), str(image))
    data = image.read_bytes()
    bad = []
    for b in range(min(BLOCKS, len(data) // BLOCK)):
        got = data[b * BLOCK:(b + 1) * BLOCK]
        ok = [pattern(b, acked[b]) if b in acked else base[b * BLOCK:(b + 1) * BLOCK]]
        if b in in_flight:
            ok.append(pattern(b, in_flight[b]))
        if got not in ok:
            bad.append((b, acked.get(b), in_flight.get(b), got[:16].hex()))
    return data, bad


def migrate_faults(plan: FaultRun, cluster: Cluster, tmp_path: Path) -> None:
    hosts3 = cluster.hosts
    office, home, car = hosts3
    hosts = {h.name: h for h in hosts3}
    disk, mode = plan.disk, plan.mode
    base = random.Random(plan.seed * 7919).randbytes(BLOCKS * BLOCK)  # incompressible: it really crosses the links
    (tmp_path / "base.raw").write_bytes(base)
    office.cli("disk", "import", disk, str(tmp_path / "base.raw"))
    wait_until(lambda: visible(home, disk), f"home-pc to see {disk}")
    sync(home, disk)  # the helper peer's replica
    wait_until(lambda: visible(car, disk, holders=2), "car-pc to see both holders")

    guest = LoggingGuest(office.uri(disk), tmp_path, plan.seed)
    wait_until(lambda: guest.acked() >= 5 or guest.proc.poll() is not None, "the guest to write")
    migrate = subprocess.Popen([*office.prefix, BIN, "migrate", disk, "--to", "car-pc", "--mode", mode, "--json",
                                "--home", str(office.home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fault = plan.report
    inject(plan, cluster, migrate)
    try:
        out, err = migrate.communicate(timeout=MIGRATE_SECONDS)
    except subprocess.TimeoutExpired:
        migrate.kill()
        out, err = migrate.communicate()
        pytest.fail(f"migrate hung after {fault}")
    fault["migrate_rc"] = migrate.returncode
    what = f"{disk}: {fault}; migrate said {out.strip()[-400:]!r} {err.strip()[-300:]!r}"

    agreed: list[tuple[str, int]] = []

    def agree() -> bool:
        s = settled(hosts3, disk)
        if s is not None:
            agreed.append(s)
        return s is not None
    wait_until(agree, f"the hosts to agree on the owner ({what})", timeout=SETTLE_SECONDS)
    owner_name, epoch = agreed[-1]
    # A destination whose source stopped migrating (it restarted, or its abort was lost) drops the migration.
    wait_until(lambda: all(disk_mode(h, disk) != "incoming" for h in hosts3),
               f"no host to be left waiting for the migration ({what})", timeout=SETTLE_SECONDS)
    stopped = guest.finish()
    assert stopped, f"the guest hung in a write after the fault: {what}"
    acked, in_flight, errors = guest.outcome()
    what += f"; owner {owner_name} epoch {epoch}; guest acked {len(acked)} blocks, errors {errors}"
    assert owner_name in ("office-pc", "car-pc"), what
    assert epoch == (1 if owner_name == "office-pc" else 2), what
    if migrate.returncode == 0:
        assert owner_name == "car-pc", what  # exit 0 only when ownership moved
    owner = hosts[owner_name]

    # 2. every acknowledged write is at the owner.
    image = tmp_path / "owner.raw"
    data, bad = missing_writes(owner, disk, base, acked, in_flight, image)
    assert len(data) == len(base), what
    assert not bad, f"acknowledged writes missing at the owner (block, acked seq, in flight, found): {bad[:8]}; {what}"

    # 1. exactly one writer: the owner takes a write on a new connection, every other replica refuses it.
    res = write_result(owner, disk, 0)
    assert res.returncode == 0 and not write_refused(res), f"{res.stdout}; {what}"
    for h in hosts3:
        if h is owner or disk_mode(h, disk) is None:
            continue
        res = write_result(h, disk, BLOCK)
        assert write_refused(res), \
            f"{h.name} ({disk_mode(h, disk)}) took a write while {owner_name} owns {disk}: {res.stdout}; {what}"

    # 3. an interrupted migration: the source still owns the disk, its guest was not failed, migrate works again.
    if owner_name == "office-pc":
        if fault["fault"] == "cut" or fault["victim"] != "office-pc":
            assert not errors, f"the source's guest saw errors though the source stayed the owner: {what}"
        res = office.cli("migrate", disk, "--to", "car-pc", "--json", check=False, timeout=MIGRATE_SECONDS)
        assert res.returncode == 0, f"migrate again failed: {res.stdout} {res.stderr}; {what}"
        assert status(car, disk)["owner"] == "car-pc", what  # type: ignore[index]
        expect = bytearray(data)
        expect[0:4096] = b"\x5a" * 4096
        image.write_bytes(bytes(expect))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), car.uri(disk))


class Cluster:
    """Three hosts shared by the runs of a module (starting them costs more than a run); each run
    migrates its own disk. In network namespaces behind shaped links when this machine allows it, else
    on the loopback. A failed run leaves the cluster to be rebuilt for the next one."""

    def __init__(self, root: Path) -> None:
        self.root, self.generation = root, 0
        self.hosts: list[Host] = []
        self.net: Network | None = None
        self.use_netns = unavailable_reason() is None
        self.envs: dict[str, dict[str, str]] = {}  # what each daemon was started with (a restart keeps it)

    def get(self, source_env: dict[str, str]) -> list[Host]:
        """The hosts, office-pc (the source) running with ``source_env``: restarted if it ran with another."""
        if not self.hosts:
            self.generation += 1
            base = self.root / f"gen{self.generation}"
            self.envs = {"office-pc": source_env}
            try:
                if self.use_netns:
                    self.net = Network()
                for name in ("office-pc", "home-pc", "car-pc"):
                    token = self.hosts[0].cli("invite").stdout.strip() if self.hosts else None
                    if self.net is None:
                        host = Host(base / name, name, join=token)
                    else:
                        ns = self.net.add_host(name, upload=LINK,
                                               download=DEST_DOWNLOAD if name == "car-pc" else LINK)
                        host = Host(base / name, name, join=token, prefix=ns.exec_prefix(), address=ns.address)
                    self.hosts.append(host.start(env=self.envs.get(name)))
            except BaseException:
                self.drop()
                raise
        elif self.envs.get("office-pc") != source_env:
            office = self.hosts[0]
            office.stop()
            self.envs["office-pc"] = source_env
            office.start(env=source_env)
        return self.hosts

    def drop(self) -> None:
        for h in self.hosts:
            if h.alive():
                h.stop()
        self.hosts = []
        if self.net is not None:
            self.net.close()
            self.net = None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.drop()


def run_faults(plan: FaultRun, cluster: Cluster, tmp_path: Path, source_env: dict[str, str]) -> None:
    hosts = cluster.get(source_env)
    try:
        migrate_faults(plan, cluster, tmp_path)
    except BaseException:
        for h in hosts:
            print(f"--- {h.name} daemon.log (tail)\n{h.log_tail(60)}")
        cluster.drop()
        raise


@pytest.mark.parametrize("case", SCHEDULE, ids=[c.id for c in SCHEDULE])
def test_migration_survives_a_fault(case: Case, cluster: Cluster, tmp_path: Path) -> None:
    """One scheduled case: the source pauses at the start of the case's phase, and the fault strikes then."""
    if case.fault == "cut" and not cluster.use_netns:
        pytest.skip(f"a link cut needs network namespaces: {unavailable_reason()}")
    run_faults(scheduled(case), cluster, tmp_path,
               source_env={failpoints.ENV: f"migrate.{case.phase}={PHASE_PAUSE_SECONDS}"})


@pytest.mark.heavy
@pytest.mark.parametrize("seed", range(20, 200))
def test_migration_survives_a_fault_soak(seed: int, cluster: Cluster, tmp_path: Path) -> None:
    """A random run, with no failpoint: the moment is wherever the drawn delay or phase falls."""
    run_faults(drawn(seed, cluster.use_netns), cluster, tmp_path, source_env={})
