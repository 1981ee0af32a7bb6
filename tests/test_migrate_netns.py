"""Live migration over real, shaped links: four hosts in network namespaces, one of them lying.

office-pc owns the disk and runs the guest; home-pc holds a partial, partly stale replica; laptop a full
one but serves corrupt blocks; car-pc has nothing and takes the disk over. The bulk pull must use the
honest peers, reject every block from the liar, and the guest must never notice the move.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pvbd.migrate import COMMIT_TIMEOUT
from p2pvbd.migration import failpoints
from tests import test_migrate_faults as faults
from tests.daemons import BIN, Host, run, write_refused
from tests.helpers import MiB, coverage, qemu_io, sync, visible, wait_until
from tests.netns import Network, require_root
from tests.test_migrate import BLOCK, BLOCKS, Guest, model_image, pattern

pytestmark = pytest.mark.root

# Uploads of the hosts holding replicas: car-pc needs 8 MiB that only office-pc (and the liar) holds and
# 6 MiB that home-pc holds too, so at this rate the bulk pull takes ~2 s (less where the guest overwrote
# blocks first: its patterns compress to nothing) and the suite stays quick.
UPLOAD = "40mbit"
# car-pc's own link: faster than any one peer, so pulling from several at once is what pays.
CAR_DOWNLOAD = "100mbit"
# The disk's layout: R1 is random data in the first half (home-pc syncs it), R2 lands in the second half
# afterwards (home-pc lacks it: partial) and R3 overwrites part of R1 (home-pc has it stale).
R1 = (0, 8 * MiB)
R2 = (10 * MiB, 6 * MiB)
R3 = (2 * MiB, 2 * MiB)
SEED = 20240601  # fixes the random disk contents, so a failure can be replayed
# The destination sleeps this long between making a commit durable and answering it (its failpoint
# migrate.commit_answer): the window in which only it knows the outcome; a few polls of `disk list` fit.
COMMIT_STALL_SECONDS = 3
# Partitions: one outlasts the stall, so the destination's answer is held up by the cut and arrives
# late; the other also outlasts the source's commit timeout, so the source must ask for the outcome.
LATE_ANSWER_SECONDS = 6.0
NO_ANSWER_SECONDS = COMMIT_TIMEOUT + 4.0


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Network, list[Host]]]:
    """office-pc, home-pc, laptop and car-pc, each in its own namespace behind a shaped link; shared by
    the module's tests (each migrates its own disk). laptop lies from the start: its own syncs pull
    from honest peers, so it still ends up with a full replica."""
    require_root()
    root = tmp_path_factory.mktemp("swarm")
    with Network() as net:
        made: list[Host] = []
        try:
            for name in ("office-pc", "home-pc", "laptop", "car-pc"):
                if name == "car-pc":
                    ns = net.add_host(name, upload=UPLOAD, download=CAR_DOWNLOAD)
                else:
                    ns = net.add_host(name, upload=UPLOAD)
                token = made[0].cli("invite").stdout.strip() if made else None
                h = Host(root / name, name, join=token, prefix=ns.exec_prefix(), address=ns.address)
                made.append(h.start(liar=name == "laptop"))
            yield net, made
        finally:
            for h in made:
                if h.alive():
                    h.stop()


@pytest.fixture
def hosts(lan: tuple[Network, list[Host]]) -> list[Host]:
    """The four hosts, for tests that leave the links alone."""
    return lan[1]


def write_random(host: Host, disk: str, region: tuple[int, int], rng: random.Random, tmp: Path,
                 image: bytearray) -> None:
    """Write incompressible data (zstd cannot shrink it, so it really crosses the shaped links)."""
    offset, length = region
    data = rng.randbytes(length)
    src = tmp / f"region-{offset}.raw"
    src.write_bytes(data)
    qemu_io(host.uri(disk), f"write -s {src} {offset} {length}", "flush")
    image[offset:offset + length] = data


def read_image(host: Host, disk: str, path: Path) -> bytes:
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", host.uri(disk), str(path))
    return path.read_bytes()


def newest_guest_write(image: bytes) -> int:
    """The highest sequence number among the guest's blocks in ``image`` (0 if none)."""
    newest = 0
    for b in range(BLOCKS):
        block = image[b * BLOCK:(b + 1) * BLOCK]
        seq = int.from_bytes(block[8:16], "big")
        if int.from_bytes(block[:8], "big") == b and block == pattern(b, seq):
            newest = max(newest, seq)
    return newest


def owner_everywhere(hosts: list[Host], disk: str) -> set[tuple[str, int]]:
    """Every (owner, epoch) the hosts' `status` names: one element once they agree."""
    return {(d["owner"], d["epoch"]) for h in hosts for d in h.json("status", disk)["disks"]}


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_migration_over_shaped_links_with_a_lying_peer(hosts: list[Host], tmp_path: Path, mode: str) -> None:
    """The whole user story on real links: pull from several peers, mirror, switch over, forward."""
    office, home, laptop, car = hosts
    disk = f"vm-{mode}"
    rng = random.Random(SEED)
    image = bytearray(BLOCKS * BLOCK)
    office.cli("disk", "create", disk, "--size", str(len(image)))
    write_random(office, disk, R1, rng, tmp_path, image)
    wait_until(lambda: visible(home, disk), "home-pc to see the disk")
    sync(home, disk)
    write_random(office, disk, R2, rng, tmp_path, image)
    write_random(office, disk, R3, rng, tmp_path, image)
    wait_until(lambda: visible(laptop, disk, holders=2), "laptop to see both holders")
    sync(laptop, disk)
    cov = coverage(office, disk)
    assert 0 < cov["home-pc"] < 1 and cov["laptop"] == 1.0, cov
    wait_until(lambda: visible(car, disk, holders=3), "car-pc to see all three holders")

    guest = Guest(office.uri(disk), tmp_path)  # stays connected to office-pc throughout
    res = office.cli("migrate", disk, "--to", "car-pc", "--mode", mode, "--json", timeout=600)
    summary = json.loads(res.stdout)
    assert summary["error"] == "", summary
    assert (summary["disk"], summary["from"], summary["to"], summary["mode"], summary["epoch"]) == \
        (disk, "office-pc", "car-pc", mode, 2), summary
    assert summary["duration_s"] > 0 and summary["downtime_ms"] is not None and summary["downtime_ms"] >= 0, summary
    moved = summary["bytes_from"]
    assert sum(1 for b in moved.values() if b > 0) >= 2, moved  # the pull used several peers at once
    assert moved.get("laptop", 0) == 0, moved  # nothing the liar sent was kept
    assert summary["bytes_on_wire"] >= sum(moved.values()), summary
    assert f"sync of {disk}: dropping laptop" in car.log_tail(1000), "the liar's blocks were never rejected"

    # The guest's old connection goes on, forwarded: its newer writes land at car-pc.
    first = newest_guest_write(read_image(car, disk, tmp_path / "at-switchover.raw"))
    wait_until(lambda: newest_guest_write(read_image(car, disk, tmp_path / "later.raw")) > first,
               "the guest's forwarded writes to reach car-pc")
    report = guest.finish()
    assert report["errors"] == [] and report["reads_ok"], report
    assert max(report["acked"].values()) > first  # type: ignore[attr-defined]

    model = model_image(tmp_path / "model.raw", bytes(image), report["acked"])  # type: ignore[arg-type]
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(model), car.uri(disk))
    assert coverage(car, disk)["car-pc"] == 1.0
    assert car.json("verify", disk)["ok"]
    wait_until(lambda: owner_everywhere(hosts, disk) == {("car-pc", 2)}, "every host to name car-pc the owner")

    # A new connection to office-pc: reads work, writes are refused (standby).
    qemu_io(office.uri(disk), "read 0 64k", read_only=True)
    refused = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", office.uri(disk), check=False)
    assert write_refused(refused), refused.stdout + refused.stderr
    assert {d["name"]: d["mode"] for d in office.json("disk", "list")}[disk] == "standby"


def start_probe(host: Host, disk: str, offset: int) -> subprocess.Popen[str]:
    """A write through a new connection to ``host``, left to run: :func:`acknowledged` looks at it later."""
    return subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {offset} 4k", host.uri(disk)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def acknowledged(probe: subprocess.Popen[str]) -> bool:
    """Whether ``probe`` has exited having written. One still waiting (held) or refused was not accepted,
    however long it has taken."""
    if probe.poll() is None:
        return False
    out, _ = probe.communicate()
    return probe.returncode == 0 and "wrote " in out


@pytest.mark.parametrize(("unplugged", "outage"), [("office-pc", LATE_ANSWER_SECONDS), ("car-pc", NO_ANSWER_SECONDS)])
def test_partition_while_only_the_destination_knows_the_commit(lan: tuple[Network, list[Host]], tmp_path: Path,
                                                               unplugged: str, outage: float) -> None:
    """The source's or the destination's link goes down after the destination committed but before the
    source heard so.

    Until it hears, the source must take no write (it may be the old owner or not): the guest stalls.
    Afterwards the destination is the one owner and the guest goes on, forwarded, without an error.
    """
    net, hosts = lan
    office, home, _, car = hosts
    disk = f"vm-partition-{unplugged}"
    # One block past the guest's range for the probes. A probe held by the fenced source is abandoned by
    # its client (qemu-io killed before the link comes back): it must never be applied, not even forwarded
    # later.
    probe_offset = faults.BLOCKS * faults.BLOCK
    base = random.Random(SEED + 1).randbytes(probe_offset + faults.BLOCK)
    (tmp_path / "base.raw").write_bytes(base)
    office.cli("disk", "import", disk, str(tmp_path / "base.raw"))
    wait_until(lambda: visible(home, disk), "home-pc to see the disk")
    sync(home, disk)  # a third replica, which must refuse writes throughout
    car.stop()
    car.start(env={failpoints.ENV: f"migrate.commit_answer={COMMIT_STALL_SECONDS}"})
    try:
        wait_until(lambda: visible(car, disk, holders=2), "car-pc to see both holders")
        guest = faults.LoggingGuest(office.uri(disk), tmp_path, SEED)
        wait_until(lambda: guest.acked() >= 5, "the guest to write")
        migrate = subprocess.Popen([*office.prefix, BIN, "migrate", disk, "--to", "car-pc", "--json", "--home",
                                    str(office.home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # car-pc names itself the owner from the moment the commit is durable: the stall has begun.
        wait_until(lambda: faults.disk_mode(car, disk) == "primary" or migrate.poll() is not None,
                   "car-pc to commit", poll=0.05)
        assert migrate.poll() is None, f"migrate ended before the partition: {migrate.communicate()}"
        net.cut(unplugged)
        cut_at = time.monotonic()
        probes: dict[str, subprocess.Popen[str]] = {}
        try:
            held = guest.acked()
            # New writers at the source and at the third replica, for as long as the partition lasts.
            probes = {h.name: start_probe(h, disk, probe_offset) for h in (office, home)}
            source_job = [j for j in office.json("jobs") if j.get("disk") == disk][-1]
            source_mode = faults.disk_mode(office, disk)
            time.sleep(max(0.0, outage - (time.monotonic() - cut_at)))
            # Any probe acknowledged while the partition lasted took a write it must not have.
            takers = [name for name, probe in probes.items() if acknowledged(probe)]
            still_held = guest.acked()
        finally:
            for probe in probes.values():  # still waiting: their clients give up (abandoned)
                if probe.poll() is None:
                    probe.kill()
                probe.communicate()
            net.restore(unplugged)
        out, err = migrate.communicate(timeout=faults.MIGRATE_SECONDS)
        what = f"migrate exited {migrate.returncode}: {out.strip()!r} {err.strip()!r}"
        assert source_job["phase"] == "switchover" and not source_job["done"], source_job
        assert source_mode == "incoming", f"the source was {source_mode} while it could not know the outcome"
        assert takers == [], f"{takers} took a write while car-pc owned {disk}; {what}"
        assert still_held == held, f"the source acknowledged guest writes during the partition; {what}"

        agreed = wait_until(lambda: faults.settled(hosts, disk), "the hosts to agree on the owner",
                            timeout=faults.SETTLE_SECONDS)
        assert agreed == ("car-pc", 2), f"{agreed}; {what}"
        wait_until(lambda: faults.disk_mode(office, disk) == "standby", "office-pc to become a standby",
                   timeout=faults.SETTLE_SECONDS)
        wait_until(lambda: guest.acked() > still_held, "the guest to go on, forwarded to car-pc")
        assert guest.finish(), "the guest hung in a write"
        acked, in_flight, errors = guest.outcome()
        assert errors == [], f"the guest saw errors: {errors}; {what}"
        data, bad = faults.missing_writes(car, disk, base, acked, in_flight, tmp_path / "owner.raw")
        assert bad == [], f"acknowledged writes missing at car-pc (block, acked, in flight, found): {bad[:8]}"
        probe = slice(probe_offset, probe_offset + faults.BLOCK)
        assert data[probe] == base[probe], "a write held for a client that had gone away was applied later"
        refused = faults.write_result(office, disk, 0)
        assert write_refused(refused), refused.stdout + refused.stderr
    finally:
        car.stop()
        car.start()
