"""A VM's memory over a slow link (20 Mbit/s): what each move sends, against QEMU's best in the same run.

Usage: .venv/bin/python bench/vm_slowlink.py [--memory-mib 1024] [--wait 600] [--qemu xbzrle,multifd-zstd]
           [--json FILE] [--plot FILE]

Needs root (network namespaces, tc, taps). The guest is the tests' (tests/vm_guest.py: Debian's cloud kernel,
busybox, TCG) with --memory-mib of memory. It reads --cache-mib of its disk (random data) into its page
cache, holds --churn-mib of random data of which it replaces a random MiB every second (memchurn_mb), and
keeps one TCP flow to a server on its own LAN (bench/vm_lan.py; the server's download shaped to --vm-rate).

Each daemon (office-pc, car-pc, home-pc) has its own namespace; their links are shaped to --rate up and
down once the disk replicas are in place (the disks are warm on every host before the first move, as
`replicate --on` keeps them). The moves, in the order they run:
  (a) office-pc -> car-pc: car-pc holds the disks, none of the memory;
      then `vm replicate vm1 --on home-pc` on car-pc, and --wait seconds;
  (c) car-pc -> home-pc: kept warm for those --wait seconds;
  (b) home-pc -> office-pc: the return move, --wait seconds (and more) after office-pc last ran the VM.
The references: the same guest QEMU to QEMU over the same link (memory over TCP, the disk one shared
qemu-nbd export), once per variant of --qemu: `plain`, `xbzrle` (cache a quarter of the memory),
`multifd-zstd` (2 channels, level 1), `compress` (QEMU's zlib threads, level 1), each optionally with
`+converge` (QEMU's auto-converge, which p2pvbd's moves use). Every QEMU runs with downtime-limit 50 ms,
p2pvbd's --max-downtime default. `--qemu-from JSON` takes the references of an earlier run (and
`--qemu-also` runs more).

For each move: the memory's bytes on the wire (p2pvbd: `migrate --json` ram_wire_bytes; QEMU: what its
namespace's shaped upload let through during the migration), all bytes the hosts sent meanwhile, QEMU's
stream, the move's time, the VM's pause, and the TCP flow across the move (the original prototype's
Figure 4). The guest's non-zero memory is counted in the source QEMU's RAM (/proc/PID/mem) before (a).
No delay is added to the links: this kernel has no netem.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import vm_figures_report as report  # noqa: E402
from migration_tools import git_head, loadavg  # noqa: E402
from multipeer_pull import add_host, machine, tx_bytes, wait_for  # noqa: E402
from vm_lan import CRASH, GUEST_NET, PORT, PhaseWatch, VmLan, qemu_net_args, stop_receiver  # noqa: E402

from tests.daemons import Host  # noqa: E402
from tests.netns import Network, NsHost  # noqa: E402
from tests.vm_guest import QemuGuest, build_initramfs, guest_kernel, qemu_nbd, workload_append  # noqa: E402

MiB = 1 << 20
PAGE = 4096
DOWNTIME_LIMIT_MS = 50  # p2pvbd's --max-downtime default, given to every QEMU reference too
BOOT_S = 900.0  # hang guard: a 1 GiB TCG guest reading 600 MiB of its disk boots in a few minutes
SETTLE_S = 20.0  # the guest runs this long in its steady state before a move
FLOW_BEFORE_S, FLOW_AFTER_S = 10.0, 10.0  # the TCP flow is shown from this long before a move to after it
MIGRATE_S = 3600.0  # hang guard for one migration at 20 Mbit/s
WARM_FRESH_S = 15.0  # (c) starts once the warm copy's last pass ended less than this ago (passes every 10 s)
QEMU_PORT = 4444
VARIANTS = ("plain", "xbzrle", "multifd-zstd", "compress")
HOSTS = ("office-pc", "car-pc", "home-pc")
TARGETS = {"a": "memory on the wire ≤ ½ of QEMU's best",
           "b": "memory on the wire ≤ 10 % of the non-zero memory and ≤ ⅕ of QEMU's best; move ≤ 60 s",
           "c": "as (b)"}


def guest_append(args: argparse.Namespace, lan_server: str) -> str:
    return (f"console=ttyS0 quiet panic=-1 readdisk_mb={args.cache_mib} memchurn_mb={args.churn_mib} "
            + workload_append("stream", dst=lan_server, port=PORT))


def text(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def qemu_pid_under(directory: Path) -> int:
    """The QEMU whose command line names ``directory`` (a daemon's home, or a reference's work directory)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes()
                if b"qemu-system" in cmd.split(b"\0")[0] and str(directory).encode() in cmd:
                    return int(proc.name)
    raise LookupError(f"no QEMU under {directory}")


def nonzero_memory(pid: int) -> int:
    """Bytes of non-zero 4 KiB pages in the QEMU's guest RAM: its largest private anonymous mapping that is
    not executable (pc.ram; TCG's code buffer, larger still, is rwx)."""
    best = (0, 0)
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 5 and fields[1] == "rw-p":
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            best = max(best, (hi - lo, lo))
    size, at = best
    zero, n = bytes(MiB), 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for off in range(0, size, MiB):
            mem.seek(at + off)
            chunk = mem.read(min(MiB, size - off))
            if chunk == zero[:len(chunk)]:
                continue
            n += sum(chunk[i:i + PAGE] != zero[:PAGE] for i in range(0, len(chunk), PAGE))
    return n * PAGE


def flow_view(received: dict[str, Any], mig: dict[str, Any], crashed: bool) -> dict[str, Any]:
    """One move's window of the TCP flow, shaped as bench/vm_figures_report expects."""
    return {"kind": mig.get("kind", "p2pvbd"), "received": received, "migration": mig,
            "t_start": mig["launched"] - FLOW_BEFORE_S, "t_end": mig["returned"] + FLOW_AFTER_S,
            "crashed": crashed, "crash_s": None}


# ---- QEMU to QEMU ------------------------------------------------------------------------------------------
def qemu_caps(variant: str, memory: int) -> tuple[dict[str, bool], dict[str, Any], dict[str, Any]]:
    """(capabilities on both sides, source parameters, destination parameters) of a reference variant."""
    caps: dict[str, bool] = {"events": True}
    src: dict[str, Any] = {"downtime-limit": DOWNTIME_LIMIT_MS}
    dst: dict[str, Any] = {}
    variant, _, extra = variant.partition("+")
    if extra == "converge":  # QEMU's auto-converge: the guest's vCPUs throttled while passes do not shrink
        caps["auto-converge"] = True
    elif extra:
        raise SystemExit(f"unknown QEMU option +{extra} (+converge)")
    if variant == "xbzrle":
        caps["xbzrle"] = True
        src["xbzrle-cache-size"] = memory // 4
    elif variant == "multifd-zstd":
        caps["multifd"] = True
        both = {"multifd-channels": 2, "multifd-compression": "zstd", "multifd-zstd-level": 1}
        src |= both
        dst |= both
    elif variant == "compress":
        caps["compress"] = True
        src |= {"compress-level": 1, "compress-threads": 2}
        dst |= {"decompress-threads": 2}
    elif variant != "plain":
        raise SystemExit(f"unknown QEMU variant {variant!r} (one of {', '.join(VARIANTS)})")
    return caps, src, dst


def pause_seen(src_events: list[dict[str, Any]], dst_events: list[dict[str, Any]]) -> float | None:
    """The guest's pause from the source QEMU's last STOP event to the destination's RESUME (one host's
    clock): QEMU's own ``downtime`` has been seen to say 0."""
    def at(events: list[dict[str, Any]], name: str) -> float | None:
        found = [e["timestamp"] for e in events if e.get("event") == name]
        return found[-1]["seconds"] + found[-1]["microseconds"] / 1e6 if found else None

    stop, resume = at(src_events, "STOP"), at(dst_events, "RESUME")
    return round((resume - stop) * 1000, 1) if stop is not None and resume is not None else None


def qemu_reference(work: Path, kernel: Path, initrd: Path, image: Path, variant: str,
                   args: argparse.Namespace) -> dict[str, Any]:
    """The guest moved once QEMU to QEMU over a link shaped like p2pvbd's, with ``variant``'s options."""
    work.mkdir(parents=True)
    server = qemu_nbd(image, work / "nbd.sock", "vm1")
    guests: list[QemuGuest] = []
    caps, src_params, dst_params = qemu_caps(variant, args.memory_mib * MiB)
    try:
        with Network() as net:
            a, b = (net.add_host(n, upload=args.rate, download=args.rate) for n in ("office-pc", "car-pc"))
            lan = VmLan(args.vm_rate)
            try:
                lan.attach(a)
                lan.attach(b)
                recv = lan.receiver(work / "received.json")

                def guest(tag: str, host: NsHost, incoming: str | None = None) -> QemuGuest:
                    g = QemuGuest(work / tag, kernel, initrd, work / "nbd.sock", "vm1", workload="stream",
                                  memory_mb=args.memory_mib, incoming=incoming)
                    g.command[g.command.index("-append") + 1] = guest_append(args, lan.server.address)
                    g.command = [*host.exec_prefix(), *g.command, *qemu_net_args()]
                    guests.append(g)
                    return g.start()

                src = guest("src", a)
                src.wait_for(lambda: b"STREAM CONNECTED" in src.serial(), "the guest's TCP stream", BOOT_S)
                time.sleep(SETTLE_S)
                nonzero = nonzero_memory(qemu_pid_under(work / "src"))
                dst = guest("dst", b, incoming="defer")
                dst.wait_for(lambda: (work / "dst" / "qmp.sock").exists(), "the destination QEMU", BOOT_S)
                time.sleep(1)
                qs, qd = src.qmp(), dst.qmp()
                for q, params in ((qs, src_params), (qd, dst_params)):
                    q.execute("migrate-set-capabilities",
                              capabilities=[{"capability": c, "state": on} for c, on in caps.items()])
                    if params:
                        q.execute("migrate-set-parameters", **params)
                uri = f"tcp:{b.address}:{QEMU_PORT}"
                qd.execute("migrate-incoming", uri=uri)
                time.sleep(0.5)
                sent0 = tx_bytes(a)
                t0 = time.time()
                qs.execute("migrate", uri=uri)
                deadline = time.monotonic() + MIGRATE_S
                while (info := qs.execute("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"QEMU {variant}: the migration did not end")
                    time.sleep(0.05)
                t1 = time.time()
                wire = tx_bytes(a) - sent0
                time.sleep(1)
                qd.execute("query-status")  # takes the destination's events in
                paused_ms = pause_seen(qs.events, qd.events)
                time.sleep(FLOW_AFTER_S)
                crashed = CRASH.search(text(work / "dst" / "serial.log")) is not None
                received = stop_receiver(recv, work / "received.json")
            finally:
                lan.close()
    finally:
        for g in guests:
            g.kill()
        server.kill()
    ram = info.get("ram", {})
    mig = {"kind": f"qemu {variant}", "launched": t0, "returned": t1, "phases": {},
           "summary": {"duration_s": round(t1 - t0, 1), "vm_downtime_ms": paused_ms}}
    row = {"move": f"QEMU {variant}", "status": info["status"], "wire_bytes": wire, "mem_wire_bytes": wire,
           "stream_bytes": ram.get("transferred"), "nonzero_bytes": nonzero, "duration_s": round(t1 - t0, 1),
           "downtime_ms": paused_ms, "qemu_downtime_ms": info.get("downtime"), "crashed": crashed,
           "dirty_syncs": ram.get("dirty-sync-count"),
           "xbzrle": info.get("xbzrle-cache"), "flow": report.tcp_numbers(flow_view(received, mig, crashed)),
           "load": loadavg()}
    print(f"  {row['move']}: {info['status']}, {wire / 1e6:.1f} MB on the link, {row['duration_s']} s, "
          f"paused {row['downtime_ms']} ms (QEMU says {row['qemu_downtime_ms']}), "
          f"non-zero memory {nonzero / 1e6:.1f} MB", flush=True)
    return {"row": row, "flow": flow_view(received, mig, crashed)}


# ---- p2pvbd ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def swarm(work: Path) -> Iterator[tuple[Network, dict[str, Host]]]:
    with Network() as net:
        hosts: list[Host] = []
        try:
            for name in HOSTS:
                add_host(net, work, name, hosts)
            yield net, {h.name: h for h in hosts}
        finally:
            for h in hosts:
                with contextlib.suppress(Exception):
                    h.cli("vm", "stop", "vm1", "--timeout", "0", check=False)
                with contextlib.suppress(Exception):
                    h.stop()


def serial(host: Host) -> Path:
    return host.home / "vms" / "vm1" / "serial.log"


def p2pvbd_move(net: Network, hosts: dict[str, Host], src: str, dst: str, tag: str) -> dict[str, Any]:
    """`migrate vm1 --to dst --json` from ``src``, with what every host's link carried meanwhile."""
    sent0 = {n: tx_bytes(net[n]) for n in hosts}
    with PhaseWatch(hosts[src].home) as watch:
        t0 = time.time()
        res = hosts[src].cli("migrate", "vm1", "--to", dst, "--json", timeout=MIGRATE_S, check=False)
        t1 = time.time()
    sent = {n: tx_bytes(net[n]) - sent0[n] for n in hosts}
    if res.returncode != 0:
        raise SystemExit(f"move ({tag}) failed: {res.stdout}{res.stderr}")
    r = json.loads(res.stdout)
    row = {"move": tag, "from": src, "to": dst, "mem_wire_bytes": r["ram_wire_bytes"], "wire_bytes": sum(sent.values()),
           "sent_by": sent, "stream_bytes": r["ram_bytes"], "ram_pages": r["ram_pages"], "by_ref": r["ram_by_ref"],
           "missed_pages": r["ram_missed_pages"], "duration_s": round(t1 - t0, 1),
           "downtime_ms": r["vm_downtime_ms"], "disk_switchover_ms": r["disk_switchover_ms"],
           "passes": r.get("ram_passes"), "downtime_limit_ms": r.get("ram_downtime_limit_ms"),
           "from_peers": r.get("ram_from_peers", {}), "load": loadavg()}
    print(f"  ({tag}) {src} -> {dst}: memory {r['ram_wire_bytes'] / 1e6:.1f} MB on the wire of a "
          f"{r['ram_bytes'] / 1e6:.1f} MB stream, links {row['wire_bytes'] / 1e6:.1f} MB, {row['duration_s']} s, "
          f"pause {r['vm_downtime_ms']} ms, by reference {r['ram_by_ref']}", flush=True)
    mig = {"kind": "p2pvbd", "launched": t0, "returned": t1, "phases": watch.phases,
           "summary": {"duration_s": row["duration_s"], "vm_downtime_ms": r["vm_downtime_ms"],
                       "disk_switchover_ms": r["disk_switchover_ms"]}}
    return {"row": row, "mig": mig}


def warm_age(host: Host, on: str) -> float | None:
    vm = next(v for v in host.json("vm", "list") if v["name"] == "vm1")
    age: float | None = vm.get("warm", {}).get("age_s", {}).get(on)
    return age


def p2pvbd_run(work: Path, kernel: Path, initrd: Path, image: Path, args: argparse.Namespace) -> dict[str, Any]:
    work.mkdir(parents=True)
    moves: list[dict[str, Any]] = []
    with swarm(work) as (net, hosts):
        office, car, home = (hosts[n] for n in HOSTS)
        lan = VmLan(args.vm_rate)
        try:
            for n in HOSTS:
                lan.attach(net[n])
            recv = lan.receiver(work / "received.json")
            office.cli("disk", "import", "vm1disk", str(image), timeout=1800)
            office.cli("replicate", "vm1disk", "--on", "car-pc,home-pc")
            for h in (car, home):
                h.cli("sync", "vm1disk", timeout=1800)
            office.cli("vm", "create", "vm1", "--disk", "vm1disk", "--memory", f"{args.memory_mib}M",
                       "--accel", "tcg", "--kernel", str(kernel), "--initrd", str(initrd), "--qemu-arg=-no-reboot",
                       *(f"--qemu-arg={a}" for a in qemu_net_args()),
                       "--append", guest_append(args, lan.server.address))
            for h in (car, home):
                wait_for(lambda h=h: h.cli("vm", "approve", "vm1", check=False).returncode == 0,
                         f"{h.name} to learn vm1 and approve it", 120, 0.5)
            office.cli("vm", "start", "vm1")
            wait_for(lambda: b"STREAM CONNECTED" in text(serial(office)), "the guest's TCP stream", BOOT_S, 1)
            for n in HOSTS:
                net.shape(n, upload=args.rate, download=args.rate)
            time.sleep(SETTLE_S)
            nonzero = nonzero_memory(qemu_pid_under(office.home))
            print(f"  the guest's non-zero memory: {nonzero / 1e6:.1f} MB", flush=True)

            a = p2pvbd_move(net, hosts, "office-pc", "car-pc", "a")
            moves.append(a)
            car.cli("vm", "replicate", "vm1", "--on", "home-pc", "--rate", args.warm_rate)
            warm_since = time.time()
            wait_for(lambda: warm_age(car, "home-pc") is not None, "home-pc's warm copy to be current", BOOT_S, 2)
            print(f"  home-pc's warm copy current after {time.time() - warm_since:.0f} s", flush=True)
            time.sleep(max(0.0, args.wait - (time.time() - a["mig"]["returned"])))
            # kept warm, not just copied once: its latest pass ended moments ago (a first copy of a GiB takes
            # minutes at 2 MB/s, and the pages the guest changed meanwhile follow in the next passes)
            wait_for(lambda: (age := warm_age(car, "home-pc")) is not None and age < WARM_FRESH_S,
                     "home-pc's warm copy to be fresh", BOOT_S, 1)
            c = p2pvbd_move(net, hosts, "car-pc", "home-pc", "c")
            c["row"]["warm_since_s"] = round(c["mig"]["launched"] - warm_since, 1)
            moves.append(c)
            time.sleep(SETTLE_S)
            b = p2pvbd_move(net, hosts, "home-pc", "office-pc", "b")
            b["row"]["since_last_here_s"] = round(b["mig"]["launched"] - a["mig"]["returned"], 1)
            moves.append(b)
            time.sleep(FLOW_AFTER_S)
            logs = [serial(h) for h in hosts.values()]
            crashed = any(CRASH.search(text(p)) for p in logs)
            received = stop_receiver(recv, work / "received.json")
        finally:
            lan.close()
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for h in hosts.values():
                    with contextlib.suppress(OSError):
                        shutil.copy(h.home / "daemon.log", args.logs / f"{h.name}.log")
    for m in moves:
        m["row"]["nonzero_bytes"] = nonzero
        m["row"]["crashed"] = crashed
        m["flow"] = flow_view(received, m["mig"], crashed)
        m["row"]["flow"] = report.tcp_numbers(m["flow"])
    return {"nonzero_bytes": nonzero, "moves": moves}


# ---- the report --------------------------------------------------------------------------------------------
def verdicts(rows: dict[str, dict[str, Any]], best: float | None) -> dict[str, str]:
    """Each target, met or not, with its numbers."""
    out = {}
    for tag, r in rows.items():
        share = r["mem_wire_bytes"] / best if best else None
        of_nonzero = r["mem_wire_bytes"] / r["nonzero_bytes"]
        if tag == "a":
            ok = share is not None and share <= 0.5
        else:
            ok = share is not None and share <= 0.2 and of_nonzero <= 0.1 and r["duration_s"] <= 60
        out[tag] = "met" if ok else "missed"
    return out


def table(result: dict[str, Any]) -> list[str]:
    refs = [r["row"] for r in result["qemu"] if r["row"]["status"] == "completed"]
    best_row = min(refs, key=lambda r: r["wire_bytes"], default=None)
    best = best_row["wire_bytes"] if best_row else None
    # the pause target: QEMU's shortest memory-only pause among its variants (each measured STOP to RESUME)
    qemu_downtime = min((r["downtime_ms"] for r in refs if r["downtime_ms"] is not None), default=None)
    rows = {m["row"]["move"]: m["row"] for m in result["p2pvbd"]["moves"]}
    met = verdicts(rows, best)
    lines = ["| move | memory on the wire | of QEMU's best | of non-zero memory | all links | QEMU's stream "
             "| move | pause | by reference (pages) | TCP flow before / during / after, longest gap | target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in refs:
        f = r["flow"]
        lines.append(f"| {r['move']} | {r['wire_bytes'] / 1e6:.1f} MB | {r['wire_bytes'] / best:.2f} | "
                     f"{r['wire_bytes'] / r['nonzero_bytes']:.2f} | {r['wire_bytes'] / 1e6:.1f} MB | "
                     f"{(r['stream_bytes'] or 0) / 1e6:.1f} MB | {r['duration_s']} s | {r['downtime_ms']} ms | – | "
                     f"{report.fmt(f['mbit_before'])} / {report.fmt(f['mbit_during'])} / {report.fmt(f['mbit_after'])}"
                     f" Mbit/s, {f['longest_gap_ms']:.0f} ms | – |")
    names = {"a": "(a) first move, disks warm", "b": "(b) return move", "c": "(c) to a host kept warm"}
    for tag in ("a", "b", "c"):
        r = rows[tag]
        f = r["flow"]
        share = f"{r['mem_wire_bytes'] / best:.3f}" if best else "–"
        pause_ok = qemu_downtime is not None and r["downtime_ms"] <= qemu_downtime + 50
        lines.append(f"| {names[tag]} {r['from']} → {r['to']} | {r['mem_wire_bytes'] / 1e6:.1f} MB | {share} | "
                     f"{r['mem_wire_bytes'] / r['nonzero_bytes']:.3f} | {r['wire_bytes'] / 1e6:.1f} MB | "
                     f"{r['stream_bytes'] / 1e6:.1f} MB | {r['duration_s']} s | {r['downtime_ms']:.0f} ms"
                     f"{'' if pause_ok else ' (over QEMU + 50 ms)'} | {r['by_ref']}, missed {r['missed_pages']} | "
                     f"{report.fmt(f['mbit_before'])} / {report.fmt(f['mbit_during'])} / {report.fmt(f['mbit_after'])}"
                     f" Mbit/s, {f['longest_gap_ms']:.0f} ms | {met[tag]}: {TARGETS[tag]} |")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r["flow"] for r in result["qemu"]] + [m["flow"] for m in result["p2pvbd"]["moves"]]
    titles = [r["row"]["move"] for r in result["qemu"]] + [f"p2pvbd ({m['row']['move']}) {m['row']['from']} → "
                                                           f"{m['row']['to']}" for m in result["p2pvbd"]["moves"]]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.2 * len(shown) + 0.5), squeeze=False)
    for ax, r, title in zip(axes[:, 0], shown, titles, strict=True):
        xs, ys = report.tcp_bins(r)
        ax.step(xs, ys, where="post", lw=0.8, color="tab:blue")
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.axvline(r["migration"]["returned"] - r["migration"]["launched"], color="grey", lw=0.8, ls="--")
        n = report.tcp_numbers(r)
        ax.set_title(f"{title}: move {n['move_s']} s, pause {report.fmt(n['vm_downtime_ms'], '.0f')} ms, "
                     f"longest gap {n['longest_gap_ms']:.0f} ms", fontsize=9)
        ax.set_ylabel("Mbit/s")
        ax.set_ylim(bottom=0)
    axes[-1, 0].set_xlabel("seconds from the move's start (dashed: start and end)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory-mib", type=int, default=1024)
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--cache-mib", type=int, default=600)
    ap.add_argument("--churn-mib", type=int, default=200)
    ap.add_argument("--rate", default="20mbit", help="every daemon's link, up and down")
    ap.add_argument("--vm-rate", default="4mbit",
                    help="the TCP flow's server download (its buffers dirty the guest's memory at that rate)")
    ap.add_argument("--warm-rate", default="16mbit", help="vm replicate --rate")
    ap.add_argument("--wait", type=float, default=600.0, help="seconds from move (a) to move (c)")
    ap.add_argument("--qemu", default="xbzrle,multifd-zstd,multifd-zstd+converge",
                    help=f"QEMU variants: {','.join(VARIANTS)}, each optionally +converge")
    ap.add_argument("--qemu-from", type=Path, metavar="JSON",
                    help="take the QEMU references from an earlier --json of this benchmark instead")
    ap.add_argument("--qemu-also", default="", metavar="VARIANTS", help="with --qemu-from: run these too")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--logs", type=Path, metavar="DIR", help="keep every daemon's log here")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--render", type=Path, metavar="JSON", help="print the table (and --plot) of an earlier --json")
    args = ap.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        print("\n".join(table(result)))
        if args.plot:
            plot(result, args.plot)
        return 0
    result: dict[str, Any] = {"machine": machine(), "commit": git_head(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                              time.gmtime()), "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="p2pvbd-slowlink-") as tmp:
        work = Path(tmp)
        kernel = guest_kernel()
        initrd = build_initramfs(work / "guest", kernel, extra_modules=("virtio_net",), net=GUEST_NET)
        image = work / "disk.img"
        with image.open("wb") as f:
            for _ in range(args.cache_mib):
                f.write(os.urandom(MiB))
            f.truncate(args.disk_mib * MiB)
        result["qemu"] = []
        if args.qemu_from:
            result["qemu"] = json.loads(args.qemu_from.read_text())["qemu"]
            result["qemu_from"] = str(args.qemu_from)
        variants = args.qemu_also if args.qemu_from else args.qemu
        result["qemu"] += [qemu_reference(work / f"qemu-{v}", kernel, initrd, image, v, args)
                           for v in filter(None, variants.split(","))]
        result["p2pvbd"] = p2pvbd_run(work / "p2pvbd", kernel, initrd, image, args)
    lines = table(result)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result | {"table": lines}, indent=1, default=str))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up namespaces and daemons on kill too
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
