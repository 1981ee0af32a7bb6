"""Whole-VM moves on 100 Mbit/s links: a TCP flow out of the moving VM, a disk benchmark inside it, its pause.

Usage: .venv/bin/python bench/vm_figures.py [--only tcp,disk,pause] [--tcp-runs 3] [--vm-rate 100mbit]
           [--disk-mib 512] [--disk-modes none,async,sync] [--moves 10] [--json FILE] [--plots DIR]
           [--report FILE] [--keep]

Needs root (network namespaces, tc, a tap device). Each part runs in a fresh swarm of two daemons, office-pc
and car-pc, each in its own network namespace (tests/netns.py) with upload and download shaped to 100 Mbit/s
(tbf), the original Xen + DRBD prototype's link. The VM is the test guest of tests/vm_guest.py (Linux under
TCG, 128 MiB) started by office-pc's daemon (`p2pvbd vm create/start`) and moved with
`p2pvbd migrate vm1 --to car-pc`: its disks converge over the link, then its memory streams over it.

tcp (the prototype's figure 4): the VM also has a NIC on its own LAN, apart from the daemons' link
    (bench/vm_lan.py: a bridge in each daemon's namespace joins that host's tap to a segment with a server
    namespace). The guest (workload.c `stream`) sends TCP to a receiver on the server as fast as it can; the
    server's port of the LAN is shaped to --vm-rate so that tbf, not TCG, sets the flow's rate (unshaped, the
    TCG guest sent about 900 Mbit/s here). The receiver counts bytes per 10 ms; reported for each of
    --tcp-runs moves: throughput over time with the move's phases, the longest gap in received data around
    the move, and whether the flow survived it. As many moves of the same guest QEMU to QEMU (no p2pvbd; memory
    over TCP on the same link, with and without QEMU's pause-before-switchover, which p2pvbd's moves use) tell
    p2pvbd's part from QEMU's.
disk (figure 5): office-pc imports a --disk-mib random disk (incompressible: every byte has to cross the
    link), car-pc starts empty. The guest (workload.c `bench`) writes 64 KiB blocks at random offsets with
    O_DIRECT and prints its throughput every 250 ms; `migrate --mode async`, `--mode sync` or nothing (the
    baseline) starts 10 s in, so the bulk copy competes with the guest. Reported: guest MiB/s before, during
    and after the move, and the move's duration.
pause: --moves moves back and forth of the test guest writing a 4 KiB record every 5 ms (bench/vm_moves.py's
    workload): the VM's pause (`migrate --json` vm_downtime_ms) p50/p99, against QEMU's own memory-only
    downtime for the same guest QEMU to QEMU, over TCP on the same shaped link and (bench/vm_moves.py's
    reference) over a local Unix socket.

A guest that crashes after a move (QEMU's lost TCG stores, docs/DESIGN.md "Guests under TCG") is recorded, restarted
where needed, and counted. Namespaces, daemons and QEMUs are removed on exit, also on errors and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import vm_figures_report as report  # noqa: E402
from migration_tools import git_head, loadavg, make_image  # noqa: E402
from multipeer_pull import add_host, machine, wait_for  # noqa: E402
from vm_lan import (  # noqa: E402
    CRASH,
    GUEST_NET,
    PORT,
    PhaseWatch,
    SerialTail,
    VmLan,
    qemu_net_args,
    qemu_stream_reference,
    stop_receiver,
)
from vm_moves import DOWNTIME_LIMIT_MS, RECORDS_BETWEEN, reference  # noqa: E402

from tests.daemons import Host  # noqa: E402
from tests.netns import Network, NsHost, unavailable_reason  # noqa: E402
from tests.vm_guest import QemuGuest, build_initramfs, guest_kernel, qemu_nbd, workload_append  # noqa: E402

MiB = 1 << 20
RATE = "100mbit"
SRC, DST = "office-pc", "car-pc"
APPEND = "console=ttyS0 quiet panic=-1 "
TCP_BEFORE_S, TCP_AFTER_S = 10.0, 10.0
DISK_BEFORE_S, DISK_AFTER_S, DISK_NONE_S = 10.0, 15.0, 60.0
BOOT_S = 300.0  # a hang guard: TCG boots in seconds
STALL_S = 60.0  # a moved guest that wrote no record for this long hangs (it writes one every ~10 ms)


@contextlib.contextmanager
def swarm(tmp: Path, tag: str) -> Iterator[tuple[Network, Host, Host]]:
    """office-pc and car-pc, each in its namespace with 100 Mbit/s up and down; removed on exit."""
    with Network() as net:
        hosts: list[Host] = []
        try:
            office = add_host(net, tmp / tag, SRC, hosts)
            car = add_host(net, tmp / tag, DST, hosts)
            for h in hosts:
                net.shape(h.name, upload=RATE, download=RATE)
            yield net, office, car
        finally:
            for h in hosts:
                with contextlib.suppress(Exception):
                    h.stop()


def serial(host: Host) -> Path:
    return host.home / "vms" / "vm1" / "serial.log"


def text(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def start_vm(host: Host, other: Host, kernel: Path, initrd: Path, workload: str, qemu_args: Sequence[str] = ()) -> None:
    """Define vm1 on ``host`` (its disk vm1disk), approve what it runs on ``other`` (`vm approve`), start it."""
    host.cli("vm", "create", "vm1", "--disk", "vm1disk", "--memory", "128M", "--accel", "tcg",
             "--kernel", str(kernel), "--initrd", str(initrd), "--qemu-arg=-no-reboot",
             *(f"--qemu-arg={a}" for a in qemu_args), "--append", APPEND + workload)
    wait_for(lambda: other.cli("vm", "approve", "vm1", check=False).returncode == 0,
             f"{other.name} to learn vm1 and approve it", 60, 0.5)
    host.cli("vm", "start", "vm1")


def move(src: Host, dest: Host, mode: str = "async") -> dict[str, Any]:
    """`migrate vm1 --json` with the phases' times (time.time()) as the source reports them."""
    with PhaseWatch(src.home) as watch:
        t0 = time.time()
        res = src.cli("migrate", "vm1", "--to", dest.name, "--mode", mode, "--json", timeout=900, check=False)
        t1 = time.time()
    summary = json.loads(res.stdout) if res.stdout.strip() else {"error": res.stderr.strip() or "no output"}
    print(f"  move {src.name} -> {dest.name} ({mode}): {t1 - t0:.1f} s, paused {summary.get('vm_downtime_ms')} "
          f"ms, error {summary['error']!r}", flush=True)
    return {"launched": t0, "returned": t1, "phases": watch.phases, "summary": summary, "load": loadavg()}


# ---- figure 4: a TCP flow across the move ----------------------------------------------------------------
def tcp_run(tmp: Path, kernel: Path, initrd: Path, vm_rate: str) -> dict[str, Any]:
    tmp.mkdir()
    with swarm(tmp, "tcp") as (net, office, car):
        lan = VmLan(vm_rate)
        try:
            lan.attach(net[SRC])
            lan.attach(net[DST])
            out = tmp / "received.json"
            recv = lan.receiver(out)
            office.cli("disk", "create", "vm1disk", "--size", "16M")
            start_vm(office, car, kernel, initrd, workload_append("stream", dst=lan.server.address, port=PORT),
                     qemu_net_args())
            with SerialTail([serial(office), serial(car)]) as tail:
                wait_for(lambda: b"STREAM CONNECTED" in text(serial(office)), "the guest's TCP stream", BOOT_S)
                t_start = time.time()
                time.sleep(TCP_BEFORE_S)
                mig = move(office, car)
                time.sleep(TCP_AFTER_S)
            received = stop_receiver(recv, out)
        finally:
            lan.close()
        return {"kind": "p2pvbd", "vm_rate": vm_rate, "t_start": t_start, "t_end": time.time(), "migration": mig,
                "received": received, "guest_sent": tail.series(), "crashed": tail.crashed(),
                "crash_s": tail.crash_seen - mig["launched"] if tail.crash_seen else None,
                "guest_errors": text(serial(car)).count(b"ERR ") + text(serial(office)).count(b"ERR ")}


# ---- figure 5: a disk benchmark in the VM during the move -------------------------------------------------
def disk_run(tmp: Path, kernel: Path, initrd: Path, image: Path, mode: str) -> dict[str, Any]:
    with swarm(tmp, f"disk-{mode}") as (_net, office, car):
        office.cli("disk", "import", "vm1disk", str(image), timeout=600)
        start_vm(office, car, kernel, initrd, workload_append("bench", bs=65536, rand=1))
        mig = None
        with SerialTail([serial(office), serial(car)]) as tail:
            wait_for(lambda: b"BENCH " in text(serial(office)), "the guest's benchmark", BOOT_S)
            t_start = time.time()
            time.sleep(DISK_BEFORE_S)
            if mode == "none":
                time.sleep(DISK_NONE_S)
            else:
                mig = move(office, car, mode)
                time.sleep(DISK_AFTER_S)
            t_end = time.time()
        t0 = mig["launched"] if mig else t_start + DISK_BEFORE_S
        r = {"mode": mode, "t_start": t_start, "t0": t0, "t_end": t_end, "migration": mig, "series": tail.series(),
             "crashed": tail.crashed(), "crash_s": tail.crash_seen - t0 if tail.crash_seen else None,
             "guest_errors": text(serial(office)).count(b"ERR ") + text(serial(car)).count(b"ERR "),
             "disk_bytes": image.stat().st_size}
        print(f"  disk {mode}: {report.disk_line(r)}", flush=True)
        return r


# ---- the VM's pause over repeated moves ------------------------------------------------------------------
def wait_records(log: Callable[[], Path], restart: Callable[[], None], what: str, stall: float = STALL_S) -> bool:
    """Wait for RECORDS_BETWEEN new records in the guest's serial ``log()``. A guest that crashed, or wrote nothing
    for ``stall`` seconds (it hangs), is restarted (``restart``) first. True if it had crashed or hung."""
    crashed = False
    start = text(log()).count(b"REC ")
    deadline = time.monotonic() + stall
    while text(log()).count(b"REC ") < start + RECORDS_BETWEEN:
        hung = time.monotonic() > deadline
        if crashed and hung:
            raise RuntimeError(f"no records from {what}, even after a restart")
        if not crashed and (hung or CRASH.search(text(log())[-4096:])):
            crashed = True
            print(f"  the guest {'hangs' if hung else 'crashed'} ({what}): restarting it", flush=True)
            restart()
            start, deadline = 0, time.monotonic() + BOOT_S
        time.sleep(0.2)
    return crashed


def pause_moves(tmp: Path, kernel: Path, initrd: Path, moves: int) -> dict[str, Any]:
    with swarm(tmp, "pause") as (net, office, car):
        ref, ref_crashes = link_reference(tmp, [net[SRC], net[DST]], kernel, initrd, moves)
        office.cli("disk", "create", "vm1disk", "--size", "16M")
        start_vm(office, car, kernel, initrd, workload_append("write", delay_ms=5))
        hosts, out, crashed = [office, car], [], []
        for n in range(moves):
            here, there = hosts[n % 2], hosts[(n + 1) % 2]

            def restart(here: Host = here) -> None:
                serial(here).write_bytes(b"")
                here.cli("vm", "start", "vm1")

            if wait_records(lambda here=here: serial(here), restart, f"p2pvbd, before move {n + 1}",
                            BOOT_S if n == 0 else STALL_S):
                crashed.append(n)
            m = move(here, there)
            out.append(m)
            if m["summary"]["error"]:
                break
    return {"moves": out, "crashed_before_move": crashed, "link_reference_ms": ref,
            "link_reference_crashes": ref_crashes}


def link_reference(tmp: Path, ns: list[NsHost], kernel: Path, initrd: Path, moves: int) -> tuple[list[float], int]:
    """QEMU to QEMU over TCP between the two namespaces (the same shaped link), one shared qemu-nbd export:
    QEMU's downtime for the memory alone."""
    image = tmp / "linkref.raw"
    image.write_bytes(bytes(16 << 20))
    server = qemu_nbd(image, tmp / "linkref.sock", "vm1")
    guests: list[QemuGuest] = []
    downtimes, crashes = [], 0

    def guest(tag: str, host: NsHost, incoming: str | None = None) -> QemuGuest:
        g = QemuGuest(tmp / f"linkref-{tag}", kernel, initrd, tmp / "linkref.sock", "vm1", memory_mb=128,
                      incoming=incoming)
        g.command = [*host.exec_prefix(), *g.command]
        guests.append(g)
        return g.start()

    try:
        cur = [guest("0", ns[0])]  # the guest that runs now (a restart replaces it)
        for n in range(moves):
            here, there = ns[n % 2], ns[(n + 1) % 2]

            def restart(here: NsHost = here, n: int = n) -> None:
                cur[0].kill()
                cur[0] = guest(f"{n}r", here)

            crashes += wait_records(lambda: cur[0].serial_log, restart, f"the reference, before move {n + 1}",
                                    BOOT_S if n == 0 else STALL_S)
            dst = guest(str(n + 1), there, incoming=f"tcp:{there.address}:{4444 + n}")
            time.sleep(1)  # QEMU listens
            qmp = cur[0].qmp()
            qmp.execute("migrate-set-parameters", **{"downtime-limit": DOWNTIME_LIMIT_MS})
            qmp.execute("migrate", uri=f"tcp:{there.address}:{4444 + n}")
            while (info := qmp.execute("query-migrate"))["status"] not in ("completed", "failed"):
                time.sleep(0.02)
            if info["status"] == "completed":
                downtimes.append(float(info["downtime"]))
            print(f"  reference move {n + 1}: {info['status']}, downtime {info.get('downtime')} ms", flush=True)
            cur[0].kill()
            cur[0] = dst
    finally:
        for g in guests:
            g.kill()
        server.kill()
    return downtimes, crashes


def kill_qemus_under(directory: Path) -> None:
    """SIGKILL the QEMUs whose command line names a file under ``directory`` (this run's, by their pid)."""
    mark = str(directory).encode() + b"/"
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and mark in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)


# ---- main ------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="tcp,disk,pause", help="parts to run (default tcp,disk,pause)")
    ap.add_argument("--disk-modes", default="none,async,sync")
    ap.add_argument("--disk-mib", type=int, default=512, help="the disk part's disk size (default 512)")
    ap.add_argument("--vm-rate", default="100mbit", help="the VM LAN's rate towards the receiver")
    ap.add_argument("--tcp-runs", type=int, default=3,
                    help="moves of the TCP part, each in a fresh swarm (and as many QEMU to QEMU, with and without "
                         "pause-before-switchover)")
    ap.add_argument("--moves", type=int, default=10)
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--plots", type=Path, metavar="DIR", help="default docs/")
    ap.add_argument("--report", type=Path, metavar="FILE", help="only print and plot an earlier --json")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (daemon logs, serial logs)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: daemons, QEMUs, namespaces go
    plots = args.plots or ROOT / "docs"
    if args.report:
        report.render(json.loads(args.report.read_text()), plots)
        return 0
    if (reason := unavailable_reason()) is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    parts = set(args.only.split(","))
    doc: dict[str, Any] = {"machine": machine(), "commit": git_head(), "argv": sys.argv[1:], "rate": RATE,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load": [loadavg()]}
    print(f"machine: {doc['machine']}; commit {doc['commit']}; load {loadavg()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="p2pvbd-vmfig-"))
    try:
        kernel = guest_kernel()
        initrd = build_initramfs(tmp / "guest", kernel)
        if "tcp" in parts:
            net_initrd = build_initramfs(tmp / "guest-net", kernel, extra_modules=("virtio_net",), net=GUEST_NET)
            doc["tcp"] = []
            for i in range(args.tcp_runs):
                doc["tcp"].append(tcp_run(tmp / f"tcp{i}", kernel, net_initrd, args.vm_rate))
                print(f"tcp #{i + 1}: {report.tcp_line(doc['tcp'][-1])}", flush=True)
            for pbs in (False, True):
                for i in range(args.tcp_runs):
                    doc["tcp"].append(qemu_stream_reference(tmp / f"tcpref{int(pbs)}{i}", kernel, net_initrd, RATE,
                                                            args.vm_rate, pbs, TCP_BEFORE_S, TCP_AFTER_S))
                    print(f"tcp {doc['tcp'][-1]['kind']} #{i + 1}: {report.tcp_line(doc['tcp'][-1])}", flush=True)
        if "disk" in parts:
            image = make_image(tmp / "random.img", args.disk_mib * MiB)
            doc["disk"] = [disk_run(tmp, kernel, initrd, image, mode) for mode in args.disk_modes.split(",")]
            image.unlink()
        if "pause" in parts:
            doc["pause"] = pause_moves(tmp, kernel, initrd, args.moves)
            (tmp / "unixref").mkdir()
            try:
                doc["pause"]["unix_reference_ms"] = reference(tmp / "unixref", kernel, initrd, args.moves)
            except AssertionError as e:  # the reference guest crashed (QEMU/TCG): no numbers from it
                doc["pause"]["unix_reference_error"] = str(e)[:2000]
            finally:
                kill_qemus_under(tmp / "unixref")  # reference() leaves its guests running when it fails
        doc["load"].append(loadavg())
    finally:
        if args.keep:
            print(f"work directory kept: {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        if args.json:
            args.json.write_text(json.dumps(doc, indent=1))
    report.render(doc, plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
