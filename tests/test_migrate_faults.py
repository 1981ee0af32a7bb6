"""Live migration under faults: kill -9 or a link cut of the source, the destination or a helper peer.

Each seed draws a mode (async/sync), a fault, a victim and a moment (a delay after `migrate` started, or
the moment the source's `jobs` reports a given phase), and injects the fault while a guest writes to the
source. The fault is kill -9 then a restart or, when network namespaces can be made here (root), also a
cut of the victim's link for 0.5-4 s: a cut resets nothing, so the hosts must ride it out on their own
timeouts. Then the test checks:

1. exactly one owner: every host's `status` names the same owner and epoch; a write through a new
   connection succeeds there and is refused on every other host holding a replica (a standby export is
   flagged read-only, so qemu-io is refused at open; a connection told otherwise gets EPERM);
2. every write the guest saw acknowledged is at the owner (a write in flight when it broke may be either);
3. an interrupted migration leaves the source the owner, its guest's writes accepted, and `migrate`
   run again succeeds.

With namespaces the hosts sit behind shaped links (the bulk copy of the 8 MiB disk then lasts 1-2 s, so
faults land inside it); without, they share the loopback and only kills are drawn.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import BIN, Host, run, system_python, write_refused
from tests.netns import Network, unavailable_reason
from tests.test_swarm import wait_until
from tests.test_sync import sync, visible

BLOCK = 64 * 1024
BLOCKS = 128  # an 8 MiB disk
PHASES = ("bulk", "mirror", "switchover")
# An 8 MiB migration takes 0.5-1.5 s on loopback and 1-2 s over the shaped links below: strike within
# that, most of the time.
MAX_DELAY = {"loopback": 1.5, "netns": 2.0}
VICTIMS = ("office-pc", "car-pc", "home-pc")  # the source, the destination, a helper peer with a replica
# A cut lasts long enough for TCP's retransmissions to back off (several RTOs) and short enough that no
# request timeout of the daemons (10 s and more) has to expire for the migration to finish.
CUT_SECONDS = (0.5, 4.0)
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
GUEST = r'''
import os, struct, sys, random, time
import nbd
uri, stop, logpath, blocks, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
BS = 65536
rng = random.Random(seed)
log = open(logpath, "w", buffering=1)
h = nbd.NBD()
h.connect_uri(uri)
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
    def __init__(self, uri: str, tmp: Path, seed: int) -> None:
        script = tmp / "guest.py"
        script.write_text(GUEST)
        self.stop_file, self.log = tmp / "guest.stop", tmp / "guest.log"
        self.proc = subprocess.Popen([system_python(), str(script), uri, str(self.stop_file), str(self.log),
                                      str(BLOCKS), str(seed)])
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


def wait_for_moment(rng: random.Random, fault: dict[str, Any], disk: str, source: Host,
                    migrate: subprocess.Popen[str], max_delay: float) -> None:
    """Sleep a drawn delay, or poll the source's jobs until the drawn phase (or past it)."""
    if rng.random() < 0.5:
        delay = rng.uniform(0, max_delay)
        fault["delay_s"] = round(delay, 3)
        time.sleep(delay)
        return
    want = rng.choice(PHASES)
    fault["at_phase"] = want
    deadline = time.monotonic() + 30
    while migrate.poll() is None and time.monotonic() < deadline:
        res = source.cli("jobs", "--json", check=False, timeout=30)
        if res.returncode == 0:
            phases = [j.get("phase") for j in json.loads(res.stdout) if j.get("disk") == disk]
            # At the phase, or already past it (done/failed): strike as soon as we can.
            if phases and (phases[-1] not in PHASES or PHASES.index(phases[-1]) >= PHASES.index(want)):
                return
        time.sleep(0.01)


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


def inject(seed: int, disk: str, hosts: dict[str, Host], migrate: subprocess.Popen[str],
           net: Network | None) -> dict[str, Any]:
    """Strike the drawn victim with the drawn fault at the drawn moment; returns what was done."""
    rng = random.Random(seed)
    kind = rng.choice(("kill", "cut")) if net is not None else "kill"
    victim = hosts[rng.choice(VICTIMS)]
    source = hosts["office-pc"]
    fault: dict[str, Any] = {"fault": kind, "victim": victim.name}
    wait_for_moment(rng, fault, disk, source, migrate, MAX_DELAY["netns" if net is not None else "loopback"])
    res = source.cli("jobs", "--json", check=False, timeout=10) if source.alive() else None
    if res is not None and res.returncode == 0:
        phases = [j.get("phase") for j in json.loads(res.stdout) if j.get("disk") == disk]
        fault["phase_seen"] = phases[-1] if phases else None
    fault["migrate_exited_before_fault"] = migrate.poll() is not None
    if kind == "kill":
        victim.kill9()
        time.sleep(rng.uniform(0, 1))
        victim.start()
    else:
        assert net is not None
        outage = rng.uniform(*CUT_SECONDS)
        fault["cut_s"] = round(outage, 3)
        net.cut(victim.name)
        try:
            time.sleep(outage)
        finally:
            net.restore(victim.name)
    return fault


def migrate_faults(seed: int, hosts3: list[Host], net: Network | None, tmp_path: Path) -> None:
    office, home, car = hosts3
    hosts = {h.name: h for h in hosts3}
    disk = f"vm{seed}"
    rng = random.Random(seed * 7919)
    mode = rng.choice(["async", "sync"])
    base = rng.randbytes(BLOCKS * BLOCK)  # incompressible: the bulk copy really crosses the links
    (tmp_path / "base.raw").write_bytes(base)
    office.cli("disk", "import", disk, str(tmp_path / "base.raw"))
    wait_until(lambda: visible(home, disk), f"home-pc to see {disk}")
    sync(home, disk)  # the helper peer's replica
    wait_until(lambda: visible(car, disk, holders=2), "car-pc to see both holders")

    guest = LoggingGuest(office.uri(disk), tmp_path, seed)
    wait_until(lambda: guest.acked() >= 5 or guest.proc.poll() is not None, "the guest to write")
    migrate = subprocess.Popen([*office.prefix, BIN, "migrate", disk, "--to", "car-pc", "--mode", mode, "--json",
                                "--home", str(office.home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fault = inject(seed, disk, hosts, migrate, net)
    fault["mode"] = mode
    try:
        out, err = migrate.communicate(timeout=MIGRATE_SECONDS)
    except subprocess.TimeoutExpired:
        migrate.kill()
        out, err = migrate.communicate()
        pytest.fail(f"migrate hung after {fault}")
    fault["migrate_rc"] = migrate.returncode
    what = f"seed {seed}: {fault}; migrate said {out.strip()[-400:]!r} {err.strip()[-300:]!r}"

    agreed: list[tuple[str, int]] = []

    def agree() -> bool:
        s = settled(hosts3, disk)
        if s is not None:
            agreed.append(s)
        return s is not None
    wait_until(agree, f"the hosts to agree on the owner ({what})", timeout=SETTLE_SECONDS)
    owner_name, epoch = agreed[-1]
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
    """Three hosts shared by the seeds of a module (starting them costs more than a run); each seed
    migrates its own disk. In network namespaces behind shaped links when this machine allows it, else
    on the loopback. A failed run leaves the cluster to be rebuilt for the next one."""

    def __init__(self, root: Path) -> None:
        self.root, self.generation = root, 0
        self.hosts: list[Host] = []
        self.net: Network | None = None
        self.use_netns = unavailable_reason() is None

    def get(self) -> list[Host]:
        if not self.hosts:
            self.generation += 1
            base = self.root / f"gen{self.generation}"
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
                    self.hosts.append(host.start())
            except BaseException:
                self.drop()
                raise
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


def run_seed(seed: int, cluster: Cluster, tmp_path: Path) -> None:
    hosts = cluster.get()
    try:
        migrate_faults(seed, hosts, cluster.net, tmp_path)
    except BaseException:
        for h in hosts:
            print(f"--- {h.name} daemon.log (tail)\n{h.log_tail(60)}")
        cluster.drop()
        raise


@pytest.mark.parametrize("seed", range(20))
def test_migration_survives_a_fault(seed: int, cluster: Cluster, tmp_path: Path) -> None:
    run_seed(seed, cluster, tmp_path)


@pytest.mark.heavy
@pytest.mark.parametrize("seed", range(20, 200))
def test_migration_survives_a_fault_soak(seed: int, cluster: Cluster, tmp_path: Path) -> None:
    run_seed(seed, cluster, tmp_path)
