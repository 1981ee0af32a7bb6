"""Does a moved guest crash, and why: p2pvbd's VM moves against QEMU-to-QEMU controls that differ from them in one
respect at a time. The qemu* variants run no p2pvbd code: they reproduce QEMU's own defect on their own.

The guest is the tests' (tests/vm_guest.py: Debian's cloud kernel, busybox, workload.c, 128 MiB, TCG) writing a
4 KiB record every 5 ms. After each move the destination is watched for ``--watch`` seconds: a kernel message
of vm_lan.CRASH, or no new record, counts as a crash (the guest is then restarted where it is).

Variants (``--variants``, comma-separated):
  qemu              QEMU to QEMU over a Unix socket, both on one qemu-nbd export, downtime-limit 25 ms (what
                    p2pvbd gives QEMU at its default --max-downtime), pause-before-switchover and a 0.3 s pause
                    before migrate-continue (as p2pvbd's moves do)
  qemu-dl300        the same with QEMU's default downtime-limit, 300 ms
  qemu-dl100        the same with downtime-limit 100 ms
  qemu-nopbs        the same without pause-before-switchover
  qemu-single       the same with single-threaded TCG (-accel tcg,thread=single)
  qemu-reconnect    the same with the NBD client's reconnect-delay (as p2pvbd's QEMUs have)
  qemu-m8k          the same with 8 KiB more RAM (128 MiB + 8 KiB): QEMU then collects dirty pages page by page
                    and resets TCG's TLB as it does (see p2pvbd/vm/definition.py TCG_RAM_PAD)
  qemu-p2pvbd-disk  the same, the disk on a p2pvbd daemon's export instead of qemu-nbd
  qemu-p2pvbd-argv  the same, each QEMU started with p2pvbd's own command line for the VM (vm/definition.py)
  p2pvbd            `p2pvbd migrate vm1 --to HOST` between two daemons on loopback

    PYTHONPATH=. .venv/bin/python bench/vm_crash_controls.py --moves 10 --variants qemu,qemu-m8k [--bandwidth 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from vm_lan import CRASH  # noqa: E402

from tests.vm_guest import REC_OK, QemuGuest, build_initramfs, guest_kernel, qemu_nbd, workload_append  # noqa: E402

MEMORY_MB = 128  # the tests' VM (tests/test_vm_move.py define_vm)
APPEND = "console=ttyS0 quiet panic=-1 " + workload_append("write", delay_ms=5)
RECORDS_BEFORE = 20  # records the guest writes at a host before it moves on (bench/vm_moves.py)
PBS_PAUSE_S = 0.3  # the disks' switchover of a slow move takes about this inside the pause
BOOT_S = 300.0  # hang guard: TCG boots in seconds
MIGRATE_S = 600.0


def records(log: Path) -> int:
    found = REC_OK.findall(log.read_bytes()) if log.exists() else []
    return int(found[-1]) if found else 0


def crashed(log: Path) -> bool:
    return log.exists() and CRASH.search(log.read_bytes()) is not None


def watch(log: Path, seconds: float, alive: Callable[[], bool]) -> str:
    """"ok", or why the guest counts as crashed: a kernel message, no new record, or QEMU gone."""
    base = records(log)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        if crashed(log):
            return "crash: " + CRASH.findall(log.read_bytes())[0].decode()
        if not alive():
            return "QEMU exited"
    if records(log) <= base:
        return "hang: no record written"
    return "ok"


# ---- QEMU to QEMU -----------------------------------------------------------------------------------------
def qemu_moves(work: Path, kernel: Path, initrd: Path, moves: int, watch_s: float, bandwidth: float,
               pbs: bool = True, reconnect: bool = False, disk: str = "qemu-nbd",
               p2pvbd_argv: bool = False, downtime_ms: int = 25, accel: str = "tcg",
               memory: str = f"{MEMORY_MB}M") -> list[str]:
    """Moves QEMU to QEMU over a Unix socket; the outcome of each."""
    work.mkdir(parents=True)
    outcomes: list[str] = []
    with disk_server(work, disk) as (nbd_sock, export):
        n = 0
        src = start_qemu(work, n, kernel, initrd, nbd_sock, export, reconnect, p2pvbd_argv, accel, memory)
        try:
            src.wait_for(lambda: records(src.serial_log) >= RECORDS_BEFORE, "the guest to write", BOOT_S)
            for n in range(1, moves + 1):
                uri = f"unix:{work}/in{n}.sock"
                dst = start_qemu(work, n, kernel, initrd, nbd_sock, export, reconnect, p2pvbd_argv, accel, memory,
                                 incoming=uri)
                wait_socket(work / f"in{n}.sock")
                qmp = src.qmp()
                qmp.execute("migrate-set-capabilities",
                            capabilities=[{"capability": "pause-before-switchover", "state": pbs},
                                          {"capability": "events", "state": True}])
                params: dict[str, Any] = {"downtime-limit": downtime_ms}
                if bandwidth:
                    params["max-bandwidth"] = int(bandwidth * (1 << 20))
                qmp.execute("migrate-set-parameters", **params)
                qmp.execute("migrate", uri=uri)
                deadline = time.monotonic() + MIGRATE_S
                while (info := qmp.execute("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
                    if info["status"] == "pre-switchover":
                        time.sleep(PBS_PAUSE_S)
                        qmp.execute("migrate-continue", state="pre-switchover")
                    if time.monotonic() > deadline:
                        raise TimeoutError("migration did not complete")
                    time.sleep(0.02)
                if info["status"] != "completed":
                    raise RuntimeError(f"migration {info['status']}: {info}")
                src.kill()
                src = dst
                outcome = watch(src.serial_log, watch_s, lambda g=src: g.proc is not None and g.proc.poll() is None)
                outcomes.append(outcome)
                ram = info.get("ram", {})
                print(f"  move {n}: {outcome} ({info.get('total-time')} ms, downtime {info.get('downtime')} ms, "
                      f"{ram.get('dirty-sync-count')} dirty syncs, {ram.get('transferred', 0) >> 20} MiB)", flush=True)
                if outcome != "ok":
                    src.kill()
                    src = start_qemu(work, n, kernel, initrd, nbd_sock, export, reconnect, p2pvbd_argv, accel, memory,
                                     tag="re")
                src.wait_for(lambda g=src: records(g.serial_log) >= RECORDS_BEFORE, "the guest to write", BOOT_S)
        finally:
            src.kill()
    return outcomes


def start_qemu(work: Path, n: int, kernel: Path, initrd: Path, nbd_sock: Path, export: str, reconnect: bool,
               p2pvbd_argv: bool, accel: str, memory: str, incoming: str | None = None, tag: str = "") -> QemuGuest:
    g = QemuGuest(work / f"q{n}{tag}", kernel, initrd, nbd_sock, export, memory_mb=MEMORY_MB, incoming=incoming,
                  reconnect_delay=120 if reconnect else None, delay_ms=5)
    if p2pvbd_argv:  # exactly what a p2pvbd daemon runs for the tests' VM
        from p2pvbd.vm.definition import RunPaths, qemu_argv
        from p2pvbd.wire.vm_definition import VmDefinition

        vm = VmDefinition("vm1", (export,), MEMORY_MB << 20, accel="tcg", kernel=str(kernel), initrd=str(initrd),
                          append=APPEND, qemu_args=("-no-reboot",))
        paths = RunPaths(g.workdir)
        g.command = qemu_argv(vm, paths, nbd_sock, "tcg", incoming=False)
        if incoming:
            g.command += ["-incoming", incoming]
        g.qmp_socket = paths.qmp
    g.command[g.command.index("-accel") + 1] = accel
    if not p2pvbd_argv:  # QemuGuest pads the RAM as p2pvbd does: the controls say how much themselves
        g.command[g.command.index("-m") + 1] = memory
    return g.start()


def wait_socket(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


@contextlib.contextmanager
def disk_server(work: Path, kind: str) -> Iterator[tuple[Path, str]]:
    """A 16 MiB disk "vm1disk" over NBD: a qemu-nbd export or a p2pvbd daemon's."""
    if kind == "qemu-nbd":
        image = work / "disk.raw"
        image.write_bytes(bytes(16 << 20))
        server = qemu_nbd(image, work / "nbd.sock", "vm1disk")
        try:
            yield work / "nbd.sock", "vm1disk"
        finally:
            server.kill()
            server.wait()
        return
    from tests.daemons import Host

    host = Host(work / "office-pc", "office-pc").start()
    try:
        host.cli("disk", "create", "vm1disk", "--size", "16M")
        yield Path(host.nbd_socket), "vm1disk"
    finally:
        host.stop()


# ---- p2pvbd -----------------------------------------------------------------------------------------------
def p2pvbd_moves(work: Path, kernel: Path, initrd: Path, moves: int, watch_s: float) -> list[str]:
    from tests.daemons import Host

    work.mkdir(parents=True)
    office = Host(work / "office-pc", "office-pc").start()
    hosts = [office]
    outcomes: list[str] = []
    try:
        car = Host(work / "car-pc", "car-pc", join=office.cli("invite").stdout.strip()).start()
        hosts.append(car)
        office.cli("disk", "create", "vm1disk", "--size", "16M")
        office.cli("vm", "create", "vm1", "--disk", "vm1disk", "--memory", f"{MEMORY_MB}M", "--accel", "tcg",
                   "--kernel", str(kernel), "--initrd", str(initrd), "--qemu-arg=-no-reboot", "--append", APPEND)
        while car.cli("vm", "approve", "vm1", check=False).returncode:
            time.sleep(0.5)
        office.cli("vm", "start", "vm1")

        def log(h: Host) -> Path:
            return h.home / "vms" / "vm1" / "serial.log"

        wait_records(log(office), RECORDS_BEFORE)
        for n in range(moves):
            here, there = hosts[n % 2], hosts[(n + 1) % 2]
            res = here.cli("migrate", "vm1", "--to", there.name, "--json", timeout=MIGRATE_S)
            report = json.loads(res.stdout)
            assert not report["error"], report
            mark = log(there).stat().st_size
            outcome = watch(log(there), watch_s, lambda h=there: vm_runs(h))
            if outcome == "ok" and CRASH.search(log(there).read_bytes()[mark:]):
                outcome = "crash"
            outcomes.append(outcome)
            print(f"  move {n + 1}: {here.name} -> {there.name}: {outcome} (paused {report['vm_downtime_ms']} ms, "
                  f"{report['duration_s']} s)", flush=True)
            if outcome != "ok":
                there.cli("vm", "stop", "vm1", "--timeout", "0", check=False)
                log(there).rename(log(there).with_suffix(f".crash{n}"))
                there.cli("vm", "start", "vm1")
            wait_records(log(there), records(log(there)) + RECORDS_BEFORE)
    finally:
        for h in hosts:
            h.stop()
    return outcomes


def vm_runs(h: Any) -> bool:
    listed = h.json("vm", "list")
    return any(v["name"] == "vm1" and v["state"] == "running" and v["host"] == h.name for v in listed)


def wait_records(log: Path, at_least: int) -> None:
    deadline = time.monotonic() + BOOT_S
    while records(log) < at_least:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guest did not reach record {at_least}")
        time.sleep(0.25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=10)
    ap.add_argument("--variants", default="qemu,p2pvbd")
    ap.add_argument("--watch", type=float, default=10.0, help="seconds each destination is watched")
    ap.add_argument("--bandwidth", type=float, default=0, help="QEMU's max-bandwidth in MiB/s (0: QEMU's default)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (serial logs)")
    args = ap.parse_args()
    kernel = guest_kernel()
    work = Path(tempfile.mkdtemp(prefix="p2pvbd-crash-controls-"))
    print(f"work directory: {work}", flush=True)
    initrd = build_initramfs(work / "guest", kernel)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "moves": args.moves,
                               "bandwidth_mib_s": args.bandwidth, "variants": {}}
    for v in args.variants.split(","):
        print(f"{v}:", flush=True)
        if v == "p2pvbd":
            out = p2pvbd_moves(work / v, kernel, initrd, args.moves, args.watch)
        else:
            opts = {"qemu": {}, "qemu-nopbs": {"pbs": False}, "qemu-reconnect": {"reconnect": True},
                    "qemu-p2pvbd-disk": {"disk": "p2pvbd"}, "qemu-p2pvbd-argv": {"p2pvbd_argv": True},
                    "qemu-dl300": {"downtime_ms": 300}, "qemu-dl100": {"downtime_ms": 100},
                    "qemu-single": {"accel": "tcg,thread=single"}, "qemu-nopbs-dl25": {"pbs": False},
                    "qemu-m8k": {"memory": f"{(MEMORY_MB << 10) + 8}K"}}[v]
            out = qemu_moves(work / v, kernel, initrd, args.moves, args.watch, args.bandwidth, **opts)
        results["variants"][v] = {"crashes": sum(o != "ok" for o in out), "outcomes": out}
        print(f"{v}: {results['variants'][v]['crashes']} of {len(out)} moves crashed", flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
