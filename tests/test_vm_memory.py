"""A VM's memory on the move: a guest holding memory no compressor shrinks (random data it checks) moves
there and back; the destination's event loop keeps running while the stream arrives; the host it left
goes on syncing disks, and its jobs tell QEMU's stream from what crossed the link."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.daemons import Host
from tests.helpers import wait_until
from tests.test_vm_move import DISK, GUEST_BROKE, GUEST_WAIT, acked, approve, move, serial, vm_state
from tests.vm_guest import MEMCHECK, workload_append

# The guest's random data: a third of its memory, so most 1 MiB pieces of QEMU's stream are incompressible.
MEMFILL_MB = 48
STALL = "the event loop was blocked"


def define_memory_vm(host: Host, kernel: Path, initrd: Path, memfill_mb: int = MEMFILL_MB) -> None:
    """vm1 on a new 16 MiB disk, 128 MiB of memory: writes 100 records, then idles holding ``memfill_mb``
    MiB of random data whose checksum it checks every few seconds (MEMCHECK lines)."""
    host.cli("disk", "create", DISK, "--size", "16M")
    host.cli("vm", "create", "vm1", "--disk", DISK, "--memory", "128M", "--accel", "tcg",
             "--kernel", str(kernel), "--initrd", str(initrd),
             "--append", f"console=ttyS0 quiet panic=-1 memfill_mb={memfill_mb} "
             + workload_append("write", delay_ms=5, count=100), "--qemu-arg=-no-reboot")


def memchecks(host: Host) -> list[tuple[int, bytes]]:
    return [(int(n), verdict) for n, verdict in MEMCHECK.findall(serial(host))]


def memory_checked_on(host: Host, what: str, seen: int = 0) -> None:
    """Wait for the guest at ``host`` to check its random data more than ``seen`` times (the serial log
    of a host the VM comes back to goes on from its earlier stay); every check there found it intact."""
    def checked() -> bool:
        return len(memchecks(host)) > seen or GUEST_BROKE.search(serial(host)) is not None

    wait_until(checked, what, timeout=GUEST_WAIT)
    assert not GUEST_BROKE.search(serial(host)), f"the guest crashed at {host.name}: {serial(host)[-600:]!r}"
    assert all(v == b"OK" for _, v in memchecks(host)), memchecks(host)


def log_size(host: Host) -> int:
    return (host.home / "daemon.log").stat().st_size


def new_log(host: Host, since: int) -> str:
    return (host.home / "daemon.log").read_bytes()[since:].decode(errors="replace")


def test_incompressible_memory_moves_there_and_back(
        make_host: Callable[..., Host], guest_files: tuple[Path, Path]) -> None:
    office = make_host("office-pc")
    car = make_host("car-pc", join=office.cli("invite").stdout.strip())
    kernel, initrd = guest_files
    define_memory_vm(office, kernel, initrd)
    approve(car)
    office.cli("vm", "start", "vm1")
    wait_until(lambda: acked(office) >= 100, "the guest to write its records", timeout=GUEST_WAIT)
    memory_checked_on(office, "the guest to check its random data at office-pc")

    car_log = log_size(car)
    report = move(office, "car-pc", "async")
    assert report["ram_bytes"] > MEMFILL_MB << 20, report
    assert STALL not in new_log(car, car_log), new_log(car, car_log)
    memory_checked_on(car, "the guest to check its random data at car-pc")

    # The host the VM left still syncs its disks, and its job shows QEMU's stream and what crossed apart.
    res = office.cli("sync", DISK, check=False)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    job = next(j for j in office.json("jobs") if j["kind"] == "vm move")
    disks_sent = sum(d["bytes_on_wire"] for d in job["disks"])
    assert job["bytes_on_wire"] == disks_sent + job["ram_wire_bytes"] and job["ram_bytes"] > 0, job

    office_log, seen = log_size(office), len(memchecks(office))
    back = move(office, "office-pc", "async")
    assert back["from"] == "car-pc" and back["ram_bytes"] > MEMFILL_MB << 20, back
    assert STALL not in new_log(office, office_log), new_log(office, office_log)
    memory_checked_on(office, "the guest to check its random data back at office-pc", seen)
    assert vm_state(office)["state"] == "running"
    # office-pc kept the memory the VM left there: the return move sends what changed since, the rest
    # (its random data among it) by reference
    assert back["ram_by_ref"].get("previous", 0) * 4096 > MEMFILL_MB << 20, back
    assert back["ram_wire_bytes"] < report["ram_wire_bytes"] / 4, (back, report)
    image = office.home / "vms" / "vm1" / "ram.img"
    assert image.stat().st_mode & 0o777 == 0o600

    # car-pc's image of the VM is damaged before the VM goes there again: the pages it no longer holds
    # are sent in full, and the guest's memory is intact
    damage(car.home / "vms" / "vm1" / "ram.img")
    seen = len(memchecks(car))
    again = move(car, "car-pc", "async")
    assert again["ram_missed_pages"] > 0 and again["ram_by_ref"].get("previous", 0) > 0, again
    memory_checked_on(car, "the guest to check its random data at car-pc again", seen)


def damage(image: Path) -> None:
    """Overwrite every other MiB of a kept memory image with other bytes."""
    with image.open("r+b") as f:
        for at in range(0, image.stat().st_size, 2 << 20):
            f.seek(at)
            f.write(b"\xa5" * (1 << 20))
