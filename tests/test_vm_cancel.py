"""Ctrl-C in `migrate VM --to HOST`: before QEMU's switchover the move is cancelled (QEMU's migration too)
and the VM runs on at the source, which still owns its disks; from the switchover on it finishes."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from p2pvbd.migration import failpoints
from tests.daemons import BIN, Host
from tests.helpers import as_in_a_terminal, wait_until
from tests.test_vm_move import GUEST_WAIT, acked, define_vm, owner, vm_state

# The failpoint holds the phase this long: polls of `jobs`, the signal and the cancel fit in it.
HOLD_SECONDS = 10.0


def vm_phase(host: Host) -> str | None:
    phases = [j["phase"] for j in host.json("jobs") if j.get("kind") == "vm move"]
    return phases[-1] if phases else None


@pytest.mark.parametrize("phase", ["ram", pytest.param("switchover", marks=pytest.mark.heavy)])
def test_ctrl_c_in_a_vm_move(make_host: Any, guest_files: tuple[Path, Path], tmp_path: Path, phase: str) -> None:
    office = make_host("office-pc", start=False).start({failpoints.ENV: f"vm.{phase}={HOLD_SECONDS}"})
    car = make_host("car-pc", join=office.cli("invite").stdout.strip())
    kernel, initrd = guest_files
    define_vm(office, kernel, initrd, approve_on=(car,))
    office.cli("vm", "start", "vm1")
    wait_until(lambda: acked(office) >= 30, "the guest to write at office-pc", timeout=GUEST_WAIT)
    err = tmp_path / "migrate.err"
    migrate = subprocess.Popen([BIN, "migrate", "vm1", "--to", "car-pc", "--home", str(office.home)],
                               stdout=subprocess.PIPE, stderr=err.open("w"), text=True, preexec_fn=as_in_a_terminal)
    wait_until(lambda: vm_phase(office) == phase or migrate.poll() is not None, f"phase {phase}",
               timeout=GUEST_WAIT, poll=0.05)
    assert vm_phase(office) == phase, err.read_text()
    migrate.send_signal(signal.SIGINT)
    out, _ = migrate.communicate(timeout=GUEST_WAIT)
    lines = err.read_text().splitlines()
    if phase == "ram":
        assert migrate.returncode == 130, (out, lines)
        assert lines == ["p2pvbd: migrate to car-pc: cancelled before the switchover: VM vm1 runs on at office-pc, "
                         "which still owns its disks; car-pc may keep what it pulled as replicas"], lines
        assert owner(office) == ("office-pc", 1)
        assert vm_state(office)["state"] == "running"
        before = acked(office)
        wait_until(lambda: acked(office) >= before + 20, "the guest to go on writing at office-pc",
                   timeout=GUEST_WAIT)
        assert next(j for j in office.json("jobs") if j.get("kind") == "vm move")["phase"] == "cancelled"
    else:
        assert migrate.returncode == 0, (out, lines)
        assert lines == ["p2pvbd: migrate to car-pc: the switchover has started; the VM move will finish"], lines
        assert owner(car) == ("car-pc", 2)
        assert vm_state(car)["state"] == "running"
