"""Faults in a whole-VM move: kill -9 of the source daemon, the destination daemon or the destination QEMU
while QEMU starts sending its memory, while part of it has crossed (the destination's QEMU holds part of
the stream), while the guest is paused before the disks switch over, and after they did. After the disks
switched over, the VM stays where it was on forwarded disk I/O; `migrate` then moves its memory alone.

Each case: the VM keeps running on one host, every disk has exactly one owner, the guest, which keeps
writing and verifying records and checking its memory throughout, loses no record it saw acknowledged,
and a later move takes it to the destination.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from p2pvbd.migration import failpoints
from tests.daemons import BIN, Host
from tests.helpers import wait_until
from tests.test_migrate_faults import settled
from tests.test_vm_move import DISK, GUEST_BROKE, GUEST_WAIT, acked, define_vm, move, serial, vm_state
from tests.vm_guest import ERR, verify_records

# Each failpoint holds its phase this long: time to see the phase and strike inside it.
PHASE_HOLD_SECONDS = 8.0
SETTLE_SECONDS = 120.0
# Records the guest writes in the cases that move its memory a second time, then idles: it writes ~30-50
# a second, so it is still writing through the fault and the restart, and idle a few seconds later.
IDLE_AFTER = 800
CASES = [
    ("ram_crossing", "office-pc"), ("ram_crossing", "car-pc"), ("committed", "car-qemu"),
    pytest.param("ram", "office-pc", marks=pytest.mark.heavy),
    pytest.param("ram", "car-pc", marks=pytest.mark.heavy),
    pytest.param("ram_crossing", "car-qemu", marks=pytest.mark.heavy),
    pytest.param("ram", "car-qemu", marks=pytest.mark.heavy),
    pytest.param("switchover", "office-pc", marks=pytest.mark.heavy),
    pytest.param("switchover", "car-pc", marks=pytest.mark.heavy),
    pytest.param("switchover", "car-qemu", marks=pytest.mark.heavy),
    pytest.param("committed", "office-pc", marks=pytest.mark.heavy),
    pytest.param("committed", "car-pc", marks=pytest.mark.heavy),
]


def vm_phase(host: Host) -> str | None:
    """The phase of the host's last VM move; "ram_crossing" once part of QEMU's memory stream crossed."""
    jobs = [j for j in host.json("jobs") if j.get("kind") == "vm move"]
    if not jobs:
        return None
    last = jobs[-1]
    return "ram_crossing" if last["phase"] == "ram" and last["ram_bytes"] > 0 else str(last["phase"])


def running_on(hosts: list[Host]) -> list[str]:
    return [h.name for h in hosts if h.alive() and vm_state(h)["state"] == "running"]


@pytest.mark.parametrize(("phase", "victim"), CASES)
def test_a_fault_in_a_vm_move_keeps_the_vm_running_and_every_record(
        make_host: Any, guest_files: tuple[Path, Path], tmp_path: Path, phase: str, victim: str) -> None:
    env = {failpoints.ENV: f"vm.{phase}={PHASE_HOLD_SECONDS}"}
    office = make_host("office-pc", start=False).start(env)
    home = make_host("home-pc", join=office.cli("invite").stdout.strip())
    car = make_host("car-pc", join=office.cli("invite").stdout.strip())
    hosts = [office, home, car]
    kernel, initrd = guest_files
    define_vm(office, kernel, initrd, approve_on=(car,), count=IDLE_AFTER if phase == "committed" else 0)
    office.cli("vm", "start", "vm1")
    wait_until(lambda: acked(office) >= 30, "the guest to write at office-pc", timeout=GUEST_WAIT)

    migrate = subprocess.Popen([BIN, "migrate", "vm1", "--to", "car-pc", "--json", "--home", str(office.home)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = wait_until(lambda: vm_phase(office) == phase or migrate.poll() is not None, f"phase {phase}",
                      timeout=GUEST_WAIT)
    assert seen and vm_phase(office) == phase, f"the move never reached {phase}: {migrate.communicate()}"
    if victim == "car-qemu":
        os.kill(int((car.home / "vms" / "vm1" / "qemu.pid").read_text()), signal.SIGKILL)
    else:
        victim_host = office if victim == "office-pc" else car
        victim_host.kill9()
        victim_host.start()  # its QEMU, if it ran one, outlived it: the new daemon adopts it
    out, err = migrate.communicate(timeout=SETTLE_SECONDS)
    what = f"kill of {victim} in phase {phase}; migrate exited {migrate.returncode}: {out!r} {err!r}"

    owner = wait_until(lambda: settled(hosts, DISK), f"the hosts to agree on the owner ({what})",
                       timeout=SETTLE_SECONDS)
    expected_owner = ("car-pc", 2) if phase == "committed" else ("office-pc", 1)
    assert owner == expected_owner, what
    # The move was undone (or, after the commit, the VM stayed where it was on forwarded disk I/O).
    assert wait_until(lambda: running_on(hosts) == ["office-pc"], f"the VM to run on office-pc only ({what})",
                      timeout=SETTLE_SECONDS)
    before = acked(office)
    wait_until(lambda: acked(office) >= before + 20, f"the guest to go on writing ({what})", timeout=GUEST_WAIT)
    if phase == "committed":
        # Its disk is at car-pc already: the same command moves the rest, the memory alone, once the guest
        # idles (QEMU's limitation on a guest writing during its memory's copy: docs/DESIGN.md).
        wait_until(lambda: b"WRITE DONE" in serial(office), f"the guest to finish writing ({what})",
                   timeout=GUEST_WAIT)
        beats = serial(car).count(b"ALIVE")
        report = move(office, "car-pc", "async")
        assert report["disks"] == [] and report["ram_bytes"] > 0, report
        assert running_on(hosts) == ["car-pc"], what
        wait_until(lambda: serial(car).count(b"ALIVE") >= beats + 3, f"the guest to run on at car-pc ({what})",
                   timeout=GUEST_WAIT)
    else:
        # The move that failed left nothing in the way of the next one.
        report = move(office, "car-pc", "async")
        assert report["disks"] and report["ram_bytes"] > 0, report
        assert running_on(hosts) == ["car-pc"], what
        before = acked(car)
        wait_until(lambda: acked(car) >= before + 20, f"the guest to go on writing at car-pc ({what})",
                   timeout=GUEST_WAIT)
    car.cli("vm", "stop", "vm1", "--timeout", "0")
    last = max(acked(office), acked(car))
    for host in (office, car):  # ERR: a failed write, or the guest's memory found changed (mem_mb)
        assert not ERR.findall(serial(host)), f"the guest saw an error at {host.name} ({what})"
        assert not GUEST_BROKE.search(serial(host)), f"the guest broke at {host.name} ({what})"

    result = verify_records(tmp_path / "verify", kernel, initrd, Path(car.nbd_socket), DISK, last)
    assert result["bad"] == 0 and result["stale"] == 0 and result["maxseq"] >= last, (result, what)
    assert json.loads(out or "{}").get("error") != "" or migrate.returncode != 0, f"the move reported success: {what}"
