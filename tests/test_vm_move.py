"""Whole-VM moves: a real QEMU guest (TCG) writing and verifying records on its p2pvbd disk moves, memory
and disk, from office-pc to car-pc and back with one `p2pvbd migrate VM --to HOST` each way."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pvbd.vm.definition import TCG_RAM_PAD, RunPaths, qemu_argv
from p2pvbd.wire.vm_definition import VmDefinition
from tests.daemons import Host
from tests.helpers import wait_until
from tests.vm_guest import ERR, PING, REC_OK, QemuGuest, build_initramfs, verify_records, workload_append

DISK = "vm1disk"
GUEST_WAIT = 300.0  # a hang guard only: TCG boots in seconds, a loaded CI machine is slower


# What a guest prints when its kernel broke (a VM move must never do that) or its own memory checks failed
# (workload.c mem_mb): either fails the test at once.
GUEST_BROKE = re.compile(rb"Kernel panic|Fatal exception|general protection fault|BUG: |Oops|is not a head|"
                         rb"ERR 0 memory")
# The guest's own memory checks (workload.c mem_mb): 4 MiB compared against their checksum once a second,
# 4 MiB stamped anew as it writes. Small next to its 128 MiB, large enough to span many TLB entries.
GUEST_MEM_MB = 8


# The soak: moves back and forth of a guest under disk, network and memory load, each followed by this many
# records (a few seconds of writing under TCG) and a ping reply. `make test` runs the short form.
SOAK_MOVES_SHORT = 3
SOAK_MOVES = 50
SOAK_RECORDS_BETWEEN = 30
# The soak guest's network: QEMU's user-mode network, restricted (nothing leaves QEMU), whose gateway
# answers the guest's pings.
SOAK_NET = ("-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0")
SOAK_GUEST_ADDR = "10.0.2.15/24"  # QEMU's user-mode network: the guest's usual address and its gateway
SOAK_GATEWAY = "10.0.2.2"
# QEMU's dirty-page fast path takes RAM blocks of whole 64-bit words of its dirty bitmap: 64 pages of 4 KiB.
QEMU_DIRTY_WORD_BYTES = 64 * 4096


def serial(host: Host, vm: str = "vm1") -> bytes:
    path = host.home / "vms" / vm / "serial.log"
    return path.read_bytes() if path.exists() else b""


def heartbeats(host: Host) -> int:
    """ALIVE lines the guest printed at ``host``: an idle guest (define_vm's ``count`` done) still does."""
    return serial(host).count(b"ALIVE ")


def acked(host: Host) -> int:
    found = REC_OK.findall(serial(host))
    return int(found[-1]) if found else 0


def vm_state(host: Host, vm: str = "vm1") -> dict[str, str]:
    return next(v for v in host.json("vm", "list") if v["name"] == vm)


def owner(host: Host, disk: str = DISK) -> tuple[str, int]:
    d = next(d for d in host.json("disk", "list") if d["name"] == disk)
    return d["owner"], d["epoch"]


def move(on: Host, dest: str, mode: str) -> dict[str, object]:
    res = on.cli("migrate", "vm1", "--to", dest, "--mode", mode, "--json", check=False, timeout=600)
    assert res.returncode == 0, f"migrate exited {res.returncode}: {res.stdout}{res.stderr}\n{on.log_tail()}"
    report = json.loads(res.stdout)
    assert report["error"] == "" and report["vm"] == "vm1" and report["to"] == dest, report
    return report


def define_vm(host: Host, kernel: Path, initrd: Path, approve_on: tuple[Host, ...] = (), count: int = 0) -> None:
    """vm1 on a new 16 MiB disk: the test guest writing and verifying records (``count`` of them, then
    idling; 0: without end), 128 MiB of memory, TCG. Its kernel, initrd and QEMU argument are approved on
    ``approve_on`` (the hosts it may move to)."""
    host.cli("disk", "create", DISK, "--size", "16M")
    host.cli("vm", "create", "vm1", "--disk", DISK, "--memory", "128M", "--accel", "tcg",
             "--kernel", str(kernel), "--initrd", str(initrd),
             "--append", "console=ttyS0 quiet panic=-1 "
             + workload_append("write", delay_ms=5, count=count, mem_mb=GUEST_MEM_MB),
             "--qemu-arg=-no-reboot")
    for other in approve_on:
        approve(other)


def approve(host: Host, vm: str = "vm1") -> None:
    """`vm approve` on ``host``, once the definition has reached it through the index."""
    wait_until(lambda: host.cli("vm", "approve", vm, check=False).returncode == 0,
               f"{host.name} to learn VM {vm} and approve it", timeout=60)


@dataclass
class MovingGuest:
    """vm1's guest (define_vm) as it moves between ``hosts``: the records it writes are checked on the
    disk of the host it lives at."""
    hosts: tuple[Host, ...]
    kernel: Path
    initrd: Path
    workdir: Path

    def writes_on(self, host: Host, at_least: int, what: str) -> None:
        """Wait until the guest, running at ``host``, has written ``at_least`` records (see goes_on)."""
        self.goes_on(host, lambda: acked(host) >= at_least, what)

    def goes_on(self, host: Host, progressed: Callable[[], bool], what: str) -> None:
        """Wait until the guest, running at ``host``, shows ``progressed``. A guest whose kernel broke or
        whose memory checks failed (GUEST_BROKE), anywhere, fails the test."""
        try:
            wait_until(lambda: progressed() or self.broke(), what, timeout=GUEST_WAIT)
        except AssertionError as e:
            raise AssertionError(f"{e}: the VM at {host.name} is {vm_state(host)}; the last of its serial "
                                 f"output: {serial(host)[-600:]!r}") from None
        assert not self.broke(), f"the guest broke after its move: {self.broke()!r}"
        state = vm_state(host)
        assert state["state"] == "running" and state["host"] == host.name, state

    def broke(self) -> bytes:
        """The first line showing that the guest broke, on any host it ran on (b"": none)."""
        for h in self.hosts:
            text = serial(h)
            if m := GUEST_BROKE.search(text):
                return text[text.rfind(b"\n", 0, m.start()) + 1:text.find(b"\n", m.end())]
        return b""

    def stop_and_verify(self, at: Host) -> None:
        """Stop the VM at ``at``; a second guest finds every record the first saw written, on any host."""
        at.cli("vm", "stop", "vm1", "--timeout", "0")
        last = max(acked(h) for h in self.hosts)
        assert not any(ERR.findall(serial(h)) for h in self.hosts), "the guest saw a failed write"
        result = verify_records(self.workdir / "verify", self.kernel, self.initrd, Path(at.nbd_socket), DISK, last)
        assert result["bad"] == 0 and result["stale"] == 0 and result["maxseq"] >= last, result


def test_a_running_vm_moves_with_its_memory_and_disk_and_back(
        three_hosts: list[Host], guest_files: tuple[Path, Path], tmp_path: Path) -> None:
    office, home, car = three_hosts
    kernel, initrd = guest_files
    guest = MovingGuest((office, car), kernel, initrd, tmp_path)
    define_vm(office, kernel, initrd)
    office.cli("vm", "start", "vm1")
    wait_until(lambda: acked(office) >= 30, "the guest to write at office-pc", timeout=GUEST_WAIT)
    # home-pc holds a stale replica (the guest goes on writing after this sync); car-pc holds nothing
    wait_until(lambda: home.cli("sync", DISK, check=False).returncode == 0, "home-pc to sync", timeout=60)

    # car-pc has not approved what vm1 runs there (its kernel, initrd and QEMU argument): the move is
    # refused before anything changes, and the VM runs on at office-pc.
    refused = office.cli("migrate", "vm1", "--to", "car-pc", check=False, timeout=600)
    assert refused.returncode != 0 and "p2pvbd vm approve vm1" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert owner(office) == ("office-pc", 1) and vm_state(office)["state"] == "running"
    approve(car)
    assert next(v for v in car.json("vm", "list") if v["name"] == "vm1")["approved"] is True

    report = move(office, "car-pc", "async")
    assert report["vm_downtime_ms"] is not None and report["ram_bytes"] > 0, report
    assert owner(car) == ("car-pc", 2)
    assert vm_state(office)["state"] != "running"
    guest.writes_on(car, acked(office) + 30, "the guest to go on writing at car-pc")
    # A QEMU opened on home-pc's stale standby replica cannot take it for current: the export says it is
    # read-only (NBD_FLAG_READ_ONLY), so a read-write disk does not even open.
    stale = QemuGuest(tmp_path / "stale", kernel, initrd, Path(home.nbd_socket), DISK, workload="verify",
                      memory_mb=128)
    stale.start()
    assert stale.wait_exit() != 0 and b"Permission denied" in (stale.workdir / "qemu.stderr").read_bytes()
    assert stale.verify_result() is None

    # Asked for on the destination, the request goes to car-pc, which moves the VM only to a host its
    # owner allows (car-pc itself now: the definition, allow-list included, moved with the VM).
    res = office.cli("migrate", "vm1", "--to", "office-pc", check=False, timeout=600)
    assert res.returncode != 0 and "p2pvbd vm allow vm1 office-pc" in res.stderr, res.stderr
    car.cli("vm", "allow", "vm1", "office-pc")
    wait_until(lambda: vm_state(office)["allow"] == ["office-pc"], "office-pc to learn it may pull vm1")
    report = move(office, "office-pc", "sync")
    assert report["from"] == "car-pc" and report["vm_downtime_ms"] is not None, report
    assert owner(office) == ("office-pc", 3)
    assert vm_state(car)["state"] != "running"
    guest.writes_on(office, acked(car) + 30, "the guest to go on writing at office-pc again")
    # Every record the guest saw acknowledged, anywhere, is on the disk where it now lives.
    guest.stop_and_verify(office)
    # `vm list` says where the VM went: office-pc stopped it, car-pc saw it move to office-pc
    assert vm_state(office)["state"] == "stopped here", vm_state(office)
    assert vm_state(car)["state"] == "moved away" and vm_state(car)["host"] == "office-pc", vm_state(car)


def test_vm_commands_refuse_what_cannot_work(make_host: Callable[..., Host], guest_files: tuple[Path, Path]) -> None:
    office = make_host("office-pc")
    kernel, initrd = guest_files
    office.cli("disk", "create", DISK, "--size", "16M")
    cases = [
        (("vm", "create", "vm1", "--disk", "nosuchdisk"), "does not own disk 'nosuchdisk'"),
        (("vm", "create", "vm1", "--disk", DISK, "--memory", "1K"), "memory must be whole MiB"),
        (("vm", "create", "vm1", "--disk", DISK, "--kernel", "/nonexistent"), "is not a file"),
        (("vm", "start", "vm2"), "no VM named 'vm2'"),
        (("migrate", "vm1", "--to", "car-pc"), "does not own"),
    ]
    for args, message in cases:
        res = office.cli(*args, check=False)
        assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    office.cli("vm", "create", "vm1", "--disk", DISK, "--kernel", str(kernel), "--initrd", str(initrd))
    res = office.cli("vm", "create", "vm2", "--disk", DISK, check=False)
    assert res.returncode != 0 and "already belongs to VM 'vm1'" in res.stderr
    res = office.cli("migrate", "vm1", "--to", "car-pc", check=False)
    assert res.returncode != 0 and "is not running on office-pc" in res.stderr, res.stderr
    listed = office.json("vm", "list")
    assert [(v["name"], v["state"], v["disks"]) for v in listed] == [("vm1", "stopped here", [DISK])]


def test_an_approval_covers_everything_that_decides_what_runs() -> None:
    """A definition that takes nothing from the host needs no approval; any change to what runs (kernel,
    initrd, QEMU arguments, command line, memory, CPUs; or a VM of another name) needs a new one; who may
    pull it, or when it was set, does not."""
    plain = VmDefinition("vm1", (DISK,))
    assert plain.approval_digest() is None
    booted = VmDefinition("vm1", (DISK,), kernel="/boot/k", initrd="/boot/i", qemu_args=("-no-reboot",))
    digest = booted.approval_digest()
    assert digest is not None
    same = VmDefinition("vm1", (DISK,), kernel="/boot/k", initrd="/boot/i", qemu_args=("-no-reboot",),
                        set_at=booted.set_at + 60, allow=("car-pc", "home-pc"))
    assert same.approval_digest() == digest
    others = [VmDefinition("vm1", (DISK,), kernel="/boot/k", initrd="/etc/shadow", qemu_args=("-no-reboot",)),
              VmDefinition("vm1", (DISK,), kernel="/boot/k", initrd="/boot/i",
                           qemu_args=("-no-reboot", "-netdev", "tap,id=n,script=/tmp/x")),
              VmDefinition("vm2", (DISK,), kernel="/boot/k", initrd="/boot/i", qemu_args=("-no-reboot",)),
              VmDefinition("vm1", (DISK,), kernel="/boot/k", initrd="/boot/i", qemu_args=("-no-reboot",),
                           append="init=/bin/sh"),
              VmDefinition("vm1", (DISK,), 16 << 20, kernel="/boot/k", initrd="/boot/i", qemu_args=("-no-reboot",)),
              VmDefinition("vm1", (DISK,), cpus=64, kernel="/boot/k", initrd="/boot/i", qemu_args=("-no-reboot",)),
              VmDefinition("vm1", (DISK, "other"), kernel="/boot/k", initrd="/boot/i", qemu_args=("-no-reboot",))]
    assert len({o.approval_digest() for o in others} | {digest}) == len(others) + 1



def pings(host: Host) -> list[int]:
    """Ping replies per 2 s the soak guest printed at ``host`` (PING lines)."""
    return [int(n or 0) for n in PING.findall(serial(host))]


@pytest.mark.parametrize("moves", [pytest.param(SOAK_MOVES_SHORT, id="short"),
                                   pytest.param(SOAK_MOVES, id="long", marks=pytest.mark.heavy)])
def test_a_vm_under_disk_network_and_memory_load_survives_every_move(
        make_host: Callable[..., Host], guest_files: tuple[Path, Path], tmp_path: Path, moves: int) -> None:
    """The guest writes and reads back a record every few ms, pings its gateway as fast as replies come
    (virtio-net) and stamps and checks its own memory (workload.c mem_mb), while it moves back and forth:
    after every move it goes on writing, its pings are answered, its kernel did not break and its memory
    checks found nothing; at the end every record it saw written is on the disk."""
    office = make_host("office-pc")
    car = make_host("car-pc", join=office.cli("invite").stdout.strip())
    kernel = guest_files[0]
    initrd = build_initramfs(tmp_path / "guest", kernel, ("virtio_net",), net=SOAK_GUEST_ADDR)
    office.cli("disk", "create", DISK, "--size", "16M")
    office.cli("vm", "create", "vm1", "--disk", DISK, "--memory", "128M", "--accel", "tcg",
               "--kernel", str(kernel), "--initrd", str(initrd), "--qemu-arg=-no-reboot",
               *(f"--qemu-arg={a}" for a in SOAK_NET),
               "--append", "console=ttyS0 quiet panic=-1 " + workload_append("write", delay_ms=5, mem_mb=GUEST_MEM_MB)
               + f" pingflood={SOAK_GATEWAY}")
    approve(car)
    guest = MovingGuest((office, car), kernel, initrd, tmp_path)
    office.cli("vm", "start", "vm1")
    guest.goes_on(office, lambda: acked(office) >= SOAK_RECORDS_BETWEEN and any(pings(office)),
                  "the guest to write and ping at office-pc")
    hosts = (office, car)
    for n in range(moves):
        here, there = hosts[n % 2], hosts[(n + 1) % 2]
        records, replies = acked(here), len(pings(there))
        move(here, there.name, ("async", "sync")[n % 2])
        guest.goes_on(there, lambda: acked(there) >= records + SOAK_RECORDS_BETWEEN  # noqa: B023
                      and any(pings(there)[replies:]), f"the guest to go on after move {n + 1}")  # noqa: B023
        assert b"MEM OK" in serial(there)[-20_000:], "the guest's memory checks do not run"
    guest.stop_and_verify(hosts[moves % 2])


def test_a_tcg_guest_gets_ram_that_qemu_tracks_page_by_page(tmp_path: Path) -> None:
    """QEMU before 9.0 loses a TCG guest's stores from a live migration when its RAM is a whole number of
    64-page words (docs/DESIGN.md, "Guests under TCG"): p2pvbd's command line gives a TCG guest 8 KiB
    more, on the source and the destination alike; KVM guests get exactly what their definition says."""
    vm = VmDefinition("vm1", (DISK,), 128 << 20, accel="tcg")
    paths = RunPaths(tmp_path)
    for accel, wanted in (("tcg", (128 << 20) + TCG_RAM_PAD), ("kvm", 128 << 20)):
        argv = qemu_argv(vm, paths, tmp_path / "nbd.sock", accel)
        size = argv[argv.index("-m") + 1]
        ram = int(size[:-1]) << {"K": 10, "M": 20}[size[-1]]
        assert ram == wanted, (accel, size)
        assert (ram % QEMU_DIRTY_WORD_BYTES != 0) == (accel == "tcg"), (accel, size)
        incoming = qemu_argv(vm, paths, tmp_path / "nbd.sock", accel, incoming=True)
        assert incoming[:-2] == argv and incoming[-2] == "-incoming", incoming
