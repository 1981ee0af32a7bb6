"""A VM's memory on the move: a guest holding memory no compressor shrinks (random data it checks) moves
there and back; the destination's event loop keeps running while the stream arrives; the host it left
goes on syncing disks, and its jobs tell QEMU's stream from what crossed the link."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from p2pvbd.migration import failpoints
from p2pvbd.swarm.peer_transport import PeerError
from tests.daemons import BIN, Host
from tests.helpers import wait_until
from tests.test_insiders import as_member
from tests.test_vm_move import DISK, GUEST_BROKE, GUEST_WAIT, acked, approve, move, serial, vm_state
from tests.vm_guest import MEMCHECK, workload_append

# The guest's random data: a quarter of its memory, so many 1 MiB pieces of QEMU's stream are incompressible.
MEMFILL_MB = 32
DISK_MB = 16
# The daemon's warning when its event loop ran late, and how long its own thread computed meanwhile: a
# loop that computed that long did memory-sized work itself (a host busy with other work only makes it late).
STALL = re.compile(r"the event loop was blocked for (\d+) ms \(computing for (\d+) ms of it\)")
STALL_MS = 100
# The pause of car-pc's pull from home-pc that home-pc is killed in: within the pull's grace once the disks
# are ready (vm/warm_pull.WARM_PULL_GRACE_SECONDS, 5 s), so the pull goes on to ask the dead host.
PULL_PAUSE_SECONDS = 3


def define_memory_vm(host: Host, kernel: Path, initrd: Path, workdir: Path, memfill_mb: int = MEMFILL_MB) -> None:
    """vm1 on a 16 MiB disk of random data, 128 MiB of memory: reads its whole disk into its page cache,
    writes 100 records, then idles holding ``memfill_mb`` MiB of random data whose checksum it checks
    every 10 s (MEMCHECK lines)."""
    image = workdir / "disk.img"
    image.write_bytes(os.urandom(DISK_MB << 20))
    host.cli("disk", "import", DISK, str(image))
    host.cli("vm", "create", "vm1", "--disk", DISK, "--memory", "128M", "--accel", "tcg",
             "--kernel", str(kernel), "--initrd", str(initrd),
             "--append", f"console=ttyS0 quiet panic=-1 memfill_mb={memfill_mb} readdisk_mb={DISK_MB} "
             + workload_append("write", delay_ms=5, count=100), "--qemu-arg=-no-reboot")


def memchecks(host: Host) -> list[tuple[int, bytes]]:
    return [(int(n), verdict) for n, verdict in MEMCHECK.findall(serial(host))]


def memory_checked_on(host: Host, what: str, seen: int = 0) -> None:
    """Wait for the guest at ``host`` to check its random data more than ``seen`` times (the serial log
    of a host the VM comes back to goes on from its earlier stay); every check there found it intact, and
    its kernel did not break."""
    def checked() -> bool:
        return len(memchecks(host)) > seen or GUEST_BROKE.search(serial(host)) is not None

    wait_until(checked, what, timeout=GUEST_WAIT)
    assert not GUEST_BROKE.search(serial(host)), f"the guest crashed at {host.name}: {serial(host)[-600:]!r}"
    bad = [n for n, v in memchecks(host)[seen:] if v != b"OK"]
    assert not bad, f"the guest found its memory changed at {host.name} (checks {bad})"


def log_size(host: Host) -> int:
    return (host.home / "daemon.log").stat().st_size


def stalls(host: Host, since: int) -> list[str]:
    """The daemon's event loop stalls it logged from byte ``since`` of its log, where its own thread computed."""
    text = (host.home / "daemon.log").read_bytes()[since:].decode(errors="replace")
    return [m.group(0) for m in STALL.finditer(text) if int(m.group(2)) >= STALL_MS]


def test_incompressible_memory_moves_there_and_back(
        make_host: Callable[..., Host], guest_files: tuple[Path, Path], tmp_path: Path) -> None:
    office = make_host("office-pc")
    car = make_host("car-pc", join=office.cli("invite").stdout.strip())
    kernel, initrd = guest_files
    define_memory_vm(office, kernel, initrd, tmp_path)
    approve(car)
    office.cli("vm", "start", "vm1")
    wait_until(lambda: acked(office) >= 100, "the guest to write its records", timeout=GUEST_WAIT)
    wait_until(lambda: memchecks(office), "the guest to check its random data at office-pc", timeout=GUEST_WAIT)
    assert all(v == b"OK" for _, v in memchecks(office)), memchecks(office)

    car_log = log_size(car)
    report = move(office, "car-pc", "async")
    assert report["ram_bytes"] > MEMFILL_MB << 20, report
    # QEMU's passes over the memory, and the pause it was allowed at the end: the asked-for 25 ms or more
    assert report["ram_passes"] >= 1 and report["ram_downtime_limit_ms"] >= 25, report
    assert 0 <= report["ram_throttle_percent"] < 100, report  # auto-converge never stops the vCPUs outright
    # the guest's page cache holds its disk, which car-pc's replica holds too: those pages go by reference
    assert report["ram_by_ref"].get("disk", 0) * 4096 > (DISK_MB << 20) // 2, report
    assert not stalls(car, car_log)
    memory_checked_on(car, "the guest to check its random data at car-pc")

    # The host the VM left still syncs its disks, and its job shows QEMU's stream and what crossed apart.
    res = office.cli("sync", DISK, check=False)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    job = next(j for j in office.json("jobs") if j["kind"] == "vm move")
    disks_sent = sum(d["bytes_on_wire"] for d in job["disks"])
    assert job["bytes_on_wire"] == disks_sent + job["ram_wire_bytes"] and job["ram_bytes"] > 0, job

    office_log, seen = log_size(office), len(memchecks(office))
    car.cli("vm", "allow", "vm1", "office-pc,car-pc")  # the owner lets either host bring the VM to itself
    wait_until(lambda: "office-pc" in vm_state(office).get("allow", []), "office-pc to learn it may pull vm1")
    back = move(office, "office-pc", "async")
    assert back["from"] == "car-pc" and back["ram_bytes"] > MEMFILL_MB << 20, back
    assert not stalls(office, office_log)
    memory_checked_on(office, "the guest to check its random data back at office-pc", seen)
    assert vm_state(office)["state"] == "running"
    # office-pc kept the memory the VM left there: the return move sends what changed since, the rest
    # (its random data among it) by reference
    assert back["ram_by_ref"].get("previous", 0) * 4096 > MEMFILL_MB << 20, back
    assert back["ram_wire_bytes"] < report["ram_wire_bytes"] / 4, (back, report)
    image = office.home / "vms" / "vm1" / "ram.img"
    assert image.stat().st_mode & 0o777 == 0o600

    # car-pc's image of the VM is damaged before the VM goes there again: the pages it no longer holds
    # are sent in full; the rest still goes by reference
    damage(car.home / "vms" / "vm1" / "ram.img")
    seen = len(memchecks(car))
    again = move(car, "car-pc", "async")
    assert again["ram_missed_pages"] > 0 and again["ram_by_ref"].get("previous", 0) > 0, again
    assert again["ram_wire_bytes"] > back["ram_wire_bytes"], (back, again)  # damage costs bytes
    memory_checked_on(car, "the guest to check its random data at car-pc again", seen)


def damage(image: Path) -> None:
    """Overwrite every other MiB of a kept memory image with other bytes."""
    with image.open("r+b") as f:
        for at in range(0, image.stat().st_size, 2 << 20):
            f.seek(at)
            f.write(b"\xa5" * (1 << 20))


def test_a_host_kept_warm_gets_a_move_for_what_changed(
        make_host: Callable[..., Host], guest_files: tuple[Path, Path], tmp_path: Path) -> None:
    """`vm replicate --on car-pc`: car-pc keeps a copy of the running VM's memory (and its disk), brought up
    to date in the background; a first move there then sends little. --off deletes the copy."""
    office = make_host("office-pc")
    car = make_host("car-pc", join=office.cli("invite").stdout.strip())
    mallory = make_host("mallory", join=office.cli("invite").stdout.strip())
    kernel, initrd = guest_files
    define_memory_vm(office, kernel, initrd, tmp_path)
    approve(car)
    office.cli("vm", "start", "vm1")
    wait_until(lambda: memchecks(office), "the guest to fill its memory", timeout=GUEST_WAIT)

    refused = car.cli("vm", "replicate", "vm1", "--on", "office-pc", check=False)
    assert refused.returncode != 0 and "does not run on car-pc" in refused.stderr, refused.stderr
    copy = car.home / "vms" / "vm1" / "ram.img"

    def warm_age() -> float | None:
        age: float | None = vm_state(office)["warm"]["age_s"].get("car-pc")
        return age

    office.cli("vm", "replicate", "vm1", "--on", "car-pc", "--rate", "50M")
    wait_until(lambda: warm_age() is not None, "car-pc's copy of the memory to be current", timeout=GUEST_WAIT)
    assert copy.stat().st_mode & 0o777 == 0o600 and copy.stat().st_blocks * 512 > MEMFILL_MB << 20
    assert next(d for d in car.json("disk", "list") if d["name"] == DISK)  # the disk is kept warm there too
    # Only the owner of the VM's disk writes or deletes the copy: another member is refused.
    before = copy.read_bytes()
    page = {"vm": "vm1", "size": 128 << 20, "offsets": bytes(8), "data": zstandard.compress(b"x" * 4096)}
    for op, body in (("vm_warm", page), ("vm_warm_drop", {"vm": "vm1"})):
        res = as_member(mallory, car, op, body)
        assert isinstance(res, PeerError) and res.code == "forbidden", res
    assert copy.read_bytes() == before

    policy = office.json("vm", "replicate", "vm1", "--off", "car-pc")
    assert policy["hosts"] == [] and not copy.exists()
    office.cli("vm", "replicate", "vm1", "--on", "car-pc", "--rate", "50M")
    wait_until(lambda: warm_age() is not None, "car-pc's copy to be current again", timeout=GUEST_WAIT)

    report = move(office, "car-pc", "async")
    assert report["ram_by_ref"].get("previous", 0) * 4096 > MEMFILL_MB << 20, report
    assert report["ram_wire_bytes"] < report["ram_bytes"] / 5, report


def test_a_move_reads_memory_from_the_host_kept_warm(
        make_host: Callable[..., Host], guest_files: tuple[Path, Path], tmp_path: Path) -> None:
    """The VM runs at office-pc, home-pc keeps its memory warm, and it moves to car-pc, which holds none of
    it: car-pc reads the pages from home-pc while the disks converge, and office-pc sends little. Only a
    host the owner granted may read home-pc's copy."""
    office = make_host("office-pc")
    home = make_host("home-pc", join=office.cli("invite").stdout.strip())
    car = make_host("car-pc", join=office.cli("invite").stdout.strip())
    mallory = make_host("mallory", join=office.cli("invite").stdout.strip())
    kernel, initrd = guest_files
    define_memory_vm(office, kernel, initrd, tmp_path)
    approve(car)
    office.cli("vm", "start", "vm1")
    wait_until(lambda: memchecks(office), "the guest to fill its memory", timeout=GUEST_WAIT)
    office.cli("vm", "replicate", "vm1", "--on", "home-pc", "--rate", "50M")
    wait_until(lambda: vm_state(office)["warm"]["age_s"].get("home-pc") is not None,
               "home-pc's copy of the memory to be current", timeout=GUEST_WAIT)

    # A member the owner did not grant it to reads nothing of home-pc's copy, nor grants it to itself.
    for op, body in (("vm_warm_index", {"vm": "vm1", "first": 0, "count": 16}),
                     ("vm_warm_read", {"vm": "vm1", "offsets": bytes(8)}),
                     ("vm_warm_grant", {"vm": "vm1", "host": "mallory"})):
        res = as_member(mallory, home, op, body)
        assert isinstance(res, PeerError) and res.code == "forbidden", (op, res)

    seen = len(memchecks(car))
    report = move(office, "car-pc", "async")
    from_peers: dict[str, int] = report["ram_from_peers"]  # type: ignore[assignment]
    by_ref: dict[str, int] = report["ram_by_ref"]  # type: ignore[assignment]
    assert list(from_peers) == ["home-pc"] and from_peers["home-pc"] > MEMFILL_MB << 20, report
    assert by_ref.get("warm-peer", 0) * 4096 > MEMFILL_MB << 20, report
    # the guest's page cache is its disk, which car-pc's replica holds: those pages are not read from home-pc
    assert by_ref.get("disk", 0) * 4096 > (DISK_MB << 20) // 2, report
    from_office = int(report["ram_wire_bytes"]) - sum(from_peers.values())  # type: ignore[call-overload]
    assert 0 < from_office < int(report["ram_bytes"]) / 5, report  # type: ignore[call-overload]
    memory_checked_on(car, "the guest to check its random data at car-pc", seen)
    assert vm_state(car)["state"] == "running"
    print("bytes by source:", {"office-pc": from_office, **from_peers}, "of", report["ram_bytes"],
          "pages by reference:", by_ref)


@pytest.mark.heavy
def test_a_warm_host_lost_during_the_pull_costs_only_bytes(
        make_host: Callable[..., Host], guest_files: tuple[Path, Path], tmp_path: Path) -> None:
    """kill -9 of the warm host once car-pc has its index, before any page came: car-pc's reads fail (or wait
    for the dead host until the pull's time is up), and the move goes on, the VM's host sending what the
    warm copy would have covered."""
    office = make_host("office-pc")
    home = make_host("home-pc", join=office.cli("invite").stdout.strip())
    car = make_host("car-pc", join=office.cli("invite").stdout.strip(), start=False).start(
        {failpoints.ENV: f"vm.warm_pull={PULL_PAUSE_SECONDS}"})
    kernel, initrd = guest_files
    define_memory_vm(office, kernel, initrd, tmp_path)
    approve(car)
    office.cli("vm", "start", "vm1")
    wait_until(lambda: memchecks(office), "the guest to fill its memory", timeout=GUEST_WAIT)
    office.cli("vm", "replicate", "vm1", "--on", "home-pc", "--rate", "50M")
    wait_until(lambda: vm_state(office)["warm"]["age_s"].get("home-pc") is not None,
               "home-pc's copy of the memory to be current", timeout=GUEST_WAIT)

    car_log = log_size(car)
    migrate = subprocess.Popen([BIN, "migrate", "vm1", "--to", "car-pc", "--json", "--home", str(office.home)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: b"failpoint vm.warm_pull: pausing" in (car.home / "daemon.log").read_bytes()[car_log:],
               "car-pc to have home-pc's index", timeout=GUEST_WAIT)
    home.kill9()
    out, err = migrate.communicate(timeout=600)
    assert migrate.returncode == 0, (out, err, office.log_tail())
    report = json.loads(out)
    assert report["ram_from_peers"].get("home-pc", 0) > 0 and not report["ram_by_ref"].get("warm-peer"), report
    assert report["ram_wire_bytes"] > MEMFILL_MB << 20, report  # office-pc sent the random data itself
    memory_checked_on(car, "the guest to check its random data at car-pc")
