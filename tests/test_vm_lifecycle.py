"""A running VM seen from every host, the commands that cannot act on it while it runs, and `p2pvbd stop`
(or SIGTERM) shutting guests down: the real test guest under TCG, honouring the ACPI power button or
ignoring it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.daemons import Host
from tests.helpers import invite, wait_until
from tests.vm_guest import REC_OK, workload_append

GUEST_WAIT = 300.0  # a hang guard only: TCG boots in seconds, a loaded CI machine is slower
# What the test guest prints when the power button made it shut down (tests/vm_guest.py, powerbutton=1).
POWERDOWN = b"GUEST POWERDOWN"
# Long enough for the guest to power off on a loaded machine: only a guest that ignores the button waits it out.
HONOURED_TIMEOUT = "120"
# A guest that ignores the button is killed after this: short, so the test does not wait.
IGNORED_TIMEOUT = "2"


def serial(host: Host, vm: str) -> bytes:
    path = host.home / "vms" / vm / "serial.log"
    return path.read_bytes() if path.exists() else b""


def records(host: Host, vm: str) -> int:
    return len(REC_OK.findall(serial(host, vm)))


def define(host: Host, vm: str, disk: str, guest_files: tuple[Path, Path], powerbutton: bool) -> None:
    kernel, initrd = guest_files
    host.cli("disk", "create", disk, "--size", "16M")
    host.cli("vm", "create", vm, "--disk", disk, "--memory", "128M", "--accel", "tcg", "--kernel", str(kernel),
             "--initrd", str(initrd), "--qemu-arg=-no-reboot",
             "--append", "console=ttyS0 quiet panic=-1 " + workload_append("write", delay_ms=5)
             + (" powerbutton=1" if powerbutton else ""))


def start(host: Host, vm: str) -> None:
    before = records(host, vm)
    host.cli("vm", "start", vm)
    wait_until(lambda: records(host, vm) >= before + 5, f"{vm} to write at {host.name}", timeout=GUEST_WAIT)


def exited(host: Host) -> None:
    """The daemon `p2pvbd stop` stopped is gone (it exits just after it gave up its home's lock)."""
    assert host.proc is not None and host.proc.wait(timeout=60) == 0  # a hang guard, not a speed check


def refused(res: object, message: str) -> None:
    rc, err = res.returncode, res.stderr  # type: ignore[attr-defined]
    assert rc != 0 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (rc, err)


def test_a_running_vm_is_seen_everywhere_and_shut_down_with_its_daemon(
        make_host: Callable[..., Host], guest_files: tuple[Path, Path]) -> None:
    office = make_host("office-pc")
    car = make_host("car-pc", join=invite(office))
    define(office, "vm1", "d1", guest_files, powerbutton=True)
    start(office, "vm1")

    # Every host shows where it runs, and a command for it elsewhere names that host.
    def seen_from_car() -> dict[str, object] | None:
        return next((v for v in car.json("vm", "list") if v["name"] == "vm1"), None)

    wait_until(lambda: (v := seen_from_car()) is not None and v["host"] == "office-pc", "car-pc to see vm1 run")
    assert seen_from_car()["state"] == "running on office-pc"  # type: ignore[index]
    refused(car.cli("vm", "stop", "vm1", check=False), "vm1 runs on office-pc: run `p2pvbd vm stop vm1` there")
    refused(car.cli("vm", "delete", "vm1", check=False), "vm1 runs on office-pc: stop it first")
    refused(car.cli("migrate", "vm1", "--to", "home-pc", check=False),
            "vm1 runs on office-pc: run `p2pvbd migrate vm1 --to home-pc` there")
    refused(office.cli("vm", "delete", "vm1", check=False), "vm1 runs on office-pc: stop it first")
    refused(office.cli("disk", "delete", "d1", "--force", check=False), "d1 is in use: VM vm1 runs on it here")
    res = office.cli("vm", "set", "vm1", "--memory", "160M")
    assert "it runs on office-pc with the old definition until its next start" in res.stdout, res.stdout

    # `p2pvbd stop`: the guest honours the power button and shuts down by itself.
    res = office.cli("stop", check=False, timeout=300)
    assert res.returncode == 0 and res.stdout.splitlines() == ["VM vm1 shut down", "daemon stopped"], res
    assert POWERDOWN in serial(office, "vm1")
    exited(office)

    # A guest that ignores the button is killed after --vm-timeout, and the CLI says so.
    office.start()
    define(office, "vm2", "d2", guest_files, powerbutton=False)
    start(office, "vm2")
    res = office.cli("stop", "--vm-timeout", IGNORED_TIMEOUT, check=False, timeout=300)
    assert res.returncode == 0, res
    assert res.stdout.splitlines() == [f"VM vm2 killed: it did not power off within {IGNORED_TIMEOUT} s",
                                       "daemon stopped"], res.stdout
    assert POWERDOWN not in serial(office, "vm2")
    exited(office)

    # SIGTERM, as systemd stops the unit, shuts guests down the same way.
    office.start(vm_timeout=float(HONOURED_TIMEOUT))
    start(office, "vm1")
    assert office.stop() == 0
    assert serial(office, "vm1").count(POWERDOWN) == 2
    assert "VM vm1 shut down" in office.log_tail(200)
