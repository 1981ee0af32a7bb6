"""Real disk sizes: switchover stall, migration time, status time, daemon memory and idle warm-replica CPU
for sparse disks of 1 GiB, 100 GiB and 1 TiB holding the same 1 GiB of data.

Usage: .venv/bin/python bench/scale.py [--sizes 1G,100G,1T] [--data 1G] [--migrations 10] [--idle 60]
           [--json FILE] [--plot FILE] [--profile DIR] [--report FILE]

Needs root (network namespaces, tc). Per size, a fresh swarm of three hosts, each in its own namespace
with its own daemon:

1. office-pc creates ``vm1`` and writes DATA of random 64 KiB blocks spread evenly over the whole disk
   (bench/scale_writer.py on libnbd); home-pc syncs a replica over an unshaped link; office-pc then
   rewrites 1/16 of those blocks, so home-pc's replica is partly stale; car-pc joins empty. Every link
   is then shaped to 100 Mbit/s each way.
2. ``status`` on every host, timed as the user sees it (the CLI, start to exit).
3. A guest (bench/migration_guest.py: 4 KiB writes in runs of 16, one 64 KiB block per run, runs spread
   over the whole disk) writes to the owner while office-pc migrates vm1 to car-pc (all of DATA moves,
   from office-pc and home-pc at once), then MIGRATIONS - 1 more times back and forth between car-pc and
   office-pc (each moves what the guest wrote since). The guest's longest request during a migration is
   the stall it saw. The first migration is compared with its bound: the bytes that had to cross
   car-pc's 100 Mbit/s download (the bulk's stale bytes plus what the mirror shipped) at TCP goodput.
4. ``status`` again; then ``replicate vm1 --on home-pc``: once home-pc is current and the guest has
   stopped, the CPU time of home-pc's (the warm replica's) and the owner's daemons over IDLE seconds.
5. The peak RSS (VmHWM) of every daemon.

Targets at 1 TiB (the same as at 64 MiB): guest stall p50 <= 50 ms and p99 <= 200 ms, status <= 1 s,
largest RSS <= 600 MiB, idle warm replica <= 1 % of a core, migration <= 1.1 x bound + 1 s. With
--profile DIR, the last size's migrations and idle period run under py-spy (raw stacks in DIR).
Namespaces and daemons are removed on exit, also on errors; the exit status is 0 even when a target is
missed (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from migration import GOODPUT, RATE, RATE_BYTES, Guest, migrate, shaped, stop_all  # noqa: E402
from migration_tools import git_head, loadavg, spying  # noqa: E402
from multipeer_pull import add_host, cpu_seconds, daemon_pid, holders, machine, sees_disk, wait_for  # noqa: E402
from py_spy_summary import summarize_profile  # noqa: E402

from p2pvbd.base.units import format_size, parse_size  # noqa: E402
from tests.daemons import Host, env_without_venv, system_python  # noqa: E402
from tests.netns import Network, unavailable_reason  # noqa: E402

DISK = "vm1"
SRC, HELPER, DST = "office-pc", "home-pc", "car-pc"
BLOCK = 64 * 1024
WRITER = Path(__file__).with_name("scale_writer.py")
REWRITE_SHARE = 16  # office-pc rewrites 1/16 of the data after home-pc synced: 64 MiB of 1 GiB
GUEST_RUN = 16  # 4 KiB writes per 64 KiB block before the guest jumps elsewhere
GUEST_PAUSE_S = 0.004  # ~250 writes/s: ~16 dirty blocks/s, 1 MiB/s, well below the link
GUEST_WARMUP_S = 1.0
# The switchover's start and end come from the daemon's timings placed on the bench's clock by polling
# its job every 0.1 s: a guest request overlapping the switchover within this margin counts as its stall.
SWITCHOVER_MARGIN_S = 0.2
MIGRATE_TIMEOUT = 1800.0
SYNC_TIMEOUT = 1800.0
WARM_TIMEOUT = 300.0
TARGETS = {"stall_p50_ms": 50.0, "stall_p99_ms": 200.0, "status_s": 1.0, "rss_mib": 600.0,
           "idle_cpu_pct": 1.0, "bound_factor": 1.1, "bound_slack_s": 1.0}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed_status(host: Host) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = host.cli("status", DISK, "--json", timeout=120, check=False)
    dt = time.perf_counter() - t0
    view = json.loads(res.stdout)["disks"][0] if res.returncode == 0 else {}
    return {"host": host.name, "seconds": round(dt, 3), "ok": res.returncode == 0,
            "coverage": {r["host"]: round(r["coverage"], 5) for r in view.get("replicas", [])}}


def spread_guest(host: Host, tmp: Path, tag: str, size: int) -> Guest:
    """bench/migration_guest.py writing runs spread over the whole disk of ``size`` bytes."""
    jump = size // 7 + 4096 * 13  # coprime-ish with the disk: runs land all over it
    return Guest(host, tmp, tag, "--region", str(size), "--run", str(GUEST_RUN), "--jump", str(jump),
                 "--pause", str(GUEST_PAUSE_S))


def write_data(host: Host, size: int, data: int, offset: int = 0, every: int = 1) -> None:
    count = data // BLOCK
    stride = size // BLOCK // count
    subprocess.run([*host.prefix, system_python(), str(WRITER), host.uri(DISK), "--count", str(count // every),
                    "--stride", str(stride * every), "--offset", str(offset)], check=True, timeout=1800,
                   env=env_without_venv())


@contextlib.contextmanager
def swarm(tmp: Path, size: int, data: int, logs: Path | None) -> Iterator[tuple[Network, dict[str, Host]]]:
    """The three hosts, set up as the module docstring says; their logs go to ``logs`` at the end (also
    when something failed)."""
    homes = Path(tempfile.mkdtemp(prefix="homes-", dir=tmp))
    with Network() as net:
        hosts: list[Host] = []
        try:
            office = add_host(net, homes, SRC, hosts)
            office.cli("disk", "create", DISK, "--size", str(size))
            write_data(office, size, data)
            home = add_host(net, homes, HELPER, hosts)
            wait_for(lambda: sees_disk(home), f"{HELPER} to see {DISK}")
            res = json.loads(home.cli("sync", DISK, "--json", timeout=SYNC_TIMEOUT).stdout)
            if res["error"]:
                raise RuntimeError(f"setup sync of {HELPER} failed: {res['error']}")
            write_data(office, size, data, every=REWRITE_SHARE)  # home-pc's replica goes partly stale
            car = add_host(net, homes, DST, hosts)
            wait_for(lambda: {SRC, HELPER} <= holders(car, DISK), f"{DST} to see both holders")
            yield shaped(net, hosts)
        finally:
            stop_all(hosts)
            for h in hosts:
                if logs is not None:
                    logs.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(OSError):
                        shutil.copy(h.home / "daemon.log", logs / f"{format_size(size).replace(' ', '')}-{h.name}.log")


def one_size(tmp: Path, size: int, data: int, migrations: int, idle_s: float, spy_dir: Path | None,
             logs: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {"size": size, "data": data, "migrations": [], "load": [loadavg()]}
    with swarm(tmp, size, data, logs) as (_net, hosts):
        out["status_before"] = [timed_status(h) for h in hosts.values()]
        owner, other = hosts[SRC], hosts[DST]
        with spying(hosts, spy_dir, f"scale-{format_size(size)}-migrate", (SRC, DST)):
            for i in range(migrations):
                guest = spread_guest(owner, tmp, f"{size}-{i}", size)
                try:
                    time.sleep(GUEST_WARMUP_S)
                    mig = migrate(owner, other.name, "async")
                    time.sleep(GUEST_WARMUP_S)
                finally:
                    rep = guest.finish()
                during = [(lat, op) for t, lat, op in rep["slow"] if mig["launched"] <= t <= mig["returned"]]
                # the switchover's stall: requests overlapping it, with the margin of the phase clock
                lo, hi = mig["switchover"] - SWITCHOVER_MARGIN_S, mig["end"] + SWITCHOVER_MARGIN_S
                stall = [lat for t, lat, _ in rep["slow"] if t <= hi and t + lat >= lo]
                longest = max(during, default=(0.0, "-"))
                s = mig["summary"]
                row = {"from": owner.name, "to": other.name, "duration_s": s["duration_s"],
                       "downtime_ms": s["downtime_ms"], "switchover_ms": s["switchover_ms"],
                       "guest_stall_ms": round(1000 * max(stall, default=0.0), 1),
                       "guest_longest_ms": round(1000 * longest[0], 1), "guest_longest_op": longest[1],
                       "guest_errors": len(rep["errors"]),
                       "bytes_on_wire": s["bytes_on_wire"], "map_bytes": s["map_bytes"],
                       "stale_bytes": mig["stale_bytes"], "throttled": s["throttled"], "load": mig["load"]}
                if i == 0:
                    moved = mig["stale_bytes"] + max(0, s["bytes_on_wire"] - sum(s["bytes_from"].values()))
                    row["bound_s"] = round(moved / (RATE_BYTES * GOODPUT), 2)
                out["migrations"].append(row)
                print(f"  {format_size(size)} #{i + 1} {owner.name} -> {other.name}: {s['duration_s']} s"
                      + (f" (bound {row['bound_s']} s)" if i == 0 else "")
                      + f", guest stall {row['guest_stall_ms']} ms (longest request during the migration "
                      f"{row['guest_longest_ms']} ms, a {row['guest_longest_op']}), daemon {s['downtime_ms']} ms "
                      f"{s['switchover_ms']}, map {format_size(s['map_bytes'])}"
                      + (", guest throttled" if s["throttled"] else "") + f", load {mig['load']}", flush=True)
                owner, other = other, owner
        out["status_after"] = [timed_status(h) for h in hosts.values()]
        out.update(idle_warm(hosts, owner, idle_s, spy_dir, size))
        out["rss_mib"] = {name: round(peak_rss_mib(daemon_pid(h)), 1) for name, h in hosts.items()}
    out["load"].append(loadavg())
    return out


def idle_warm(hosts: dict[str, Host], owner: Host, idle_s: float, spy_dir: Path | None, size: int) -> dict[str, Any]:
    """CPU of an idle warm replica (home-pc) and of the owner it checks, once home-pc is current."""
    home = hosts[HELPER]
    owner.cli("replicate", DISK, "--on", HELPER)
    deadline = time.monotonic() + WARM_TIMEOUT
    while timed_status(owner)["coverage"].get(HELPER) != 1.0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{HELPER} did not become current within {WARM_TIMEOUT} s")
        time.sleep(1.0)
    time.sleep(5.0)  # past the pull that made it current
    pids = {HELPER: daemon_pid(home), "owner": daemon_pid(owner)}
    with spying(hosts, spy_dir, f"scale-{format_size(size)}-idle", (HELPER,)):
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        time.sleep(idle_s)
        after = {k: cpu_seconds(p) for k, p in pids.items()}
    return {"idle_s": idle_s, "idle_cpu_pct": {k: round(100 * (after[k] - before[k]) / idle_s, 2) for k in pids}}


# ---- report ----------------------------------------------------------------------------------------
def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


def summary_row(r: dict[str, Any]) -> dict[str, Any]:
    stalls = [m["guest_stall_ms"] for m in r["migrations"]]
    first = r["migrations"][0]
    return {"size": format_size(r["size"]), "stall_p50_ms": pct(stalls, 50), "stall_p99_ms": pct(stalls, 99),
            "daemon_downtime_max_ms": max(m["downtime_ms"] or 0 for m in r["migrations"]),
            "migration_s": first["duration_s"], "bound_s": first["bound_s"],
            "status_s": max(s["seconds"] for s in r["status_before"] + r["status_after"]),
            "rss_mib": max(r["rss_mib"].values()), "idle_cpu_pct": r["idle_cpu_pct"][HELPER],
            "owner_idle_cpu_pct": r["idle_cpu_pct"]["owner"],
            "map_bytes_first": first["map_bytes"], "guest_errors": sum(m["guest_errors"] for m in r["migrations"]),
            "guest_longest_ms": max(m.get("guest_longest_ms", 0.0) for m in r["migrations"])}


def verdicts(row: dict[str, Any]) -> list[str]:
    t = TARGETS
    checks = [("stall p50", row["stall_p50_ms"] <= t["stall_p50_ms"]),
              ("stall p99", row["stall_p99_ms"] <= t["stall_p99_ms"]),
              ("status", row["status_s"] <= t["status_s"]),
              ("RSS", row["rss_mib"] <= t["rss_mib"]),
              ("idle CPU", row["idle_cpu_pct"] <= t["idle_cpu_pct"]),
              ("migration time", row["migration_s"] <= t["bound_factor"] * row["bound_s"] + t["bound_slack_s"])]
    return [f"{name} {'met' if ok else 'MISSED'}" for name, ok in checks]


def render(doc: dict[str, Any], plot: Path | None) -> None:
    rows = [summary_row(r) for r in doc["sizes"]]
    print("\n| disk | guest stall p50 / p99 | daemon downtime max | migration (bound) | status | largest RSS "
          "| idle warm replica CPU (owner) | map data, 1st migration |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['size']} | {row['stall_p50_ms']:.0f} / {row['stall_p99_ms']:.0f} ms | "
              f"{row['daemon_downtime_max_ms']:.0f} ms | {row['migration_s']:.1f} s ({row['bound_s']:.1f} s) | "
              f"{row['status_s']:.2f} s | {row['rss_mib']:.0f} MiB | {row['idle_cpu_pct']:.2f} % "
              f"({row['owner_idle_cpu_pct']:.2f} %) | {format_size(row['map_bytes_first'])} |")
    for row in rows:
        print(f"{row['size']}: " + ", ".join(verdicts(row)))
    if plot is not None and rows:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sizes = [r["size"] for r in doc["sizes"]]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for key, label in (("stall_p50_ms", "p50"), ("stall_p99_ms", "p99")):
            ax.plot(sizes, [row[key] for row in rows], marker="o", label=f"guest stall {label}")
        ax.axhline(TARGETS["stall_p99_ms"], color="grey", linestyle=":", label="p99 target")
        ax.axhline(TARGETS["stall_p50_ms"], color="grey", linestyle="--", label="p50 target")
        ax.plot(sizes, [row["daemon_downtime_max_ms"] for row in rows], marker="s", linestyle="-.",
                label="daemon downtime, max")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [row["size"] for row in rows])
        ax.minorticks_off()
        ax.set_xlabel(f"disk size, same {format_size(doc['sizes'][0]['data'])} of data")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Switchover stall against disk size ({doc['machine']['date']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"plot: {plot}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1G,100G,1T")
    ap.add_argument("--data", default="1G", help="random data spread over each disk")
    ap.add_argument("--migrations", type=int, default=10, help="migrations per size")
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle warm replica measured")
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "scale-stall.png")
    ap.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the last size's migrations and idle period")
    ap.add_argument("--report", type=Path, metavar="FILE", help="only print the table and plot of an earlier --json")
    ap.add_argument("--logs", type=Path, metavar="DIR", help="keep every daemon's log (event-loop stall warnings)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report:
        render(json.loads(args.report.read_text()), args.plot)
        return 0
    if (reason := unavailable_reason()) is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    data = parse_size(args.data)
    doc: dict[str, Any] = {"machine": machine(), "commit": git_head(), "argv": sys.argv[1:], "rate": RATE,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "sizes": [],
                           "profiles": {}}
    print(f"machine: {doc['machine']}; commit {doc['commit']}; data {format_size(data)}; links {RATE}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="p2pvbd-scale-"))
    try:
        for k, size in enumerate(sizes):
            spy = args.profile if args.profile and k == len(sizes) - 1 else None
            print(f"{format_size(size)} disk:", flush=True)
            doc["sizes"].append(one_size(tmp, size, data, args.migrations, args.idle, spy, args.logs))
            if args.json:
                args.json.write_text(json.dumps(doc, indent=1))
        if args.profile:
            for raw in sorted(args.profile.glob("*.txt")):
                doc["profiles"][raw.stem] = summarize_profile(raw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        if args.json:
            args.json.write_text(json.dumps(doc, indent=1))
    render(doc, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
