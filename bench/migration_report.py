"""Tables, verdicts and plots of bench/migration.py's results (also re-rendered from its --json)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

MiB = 1 << 20
TARGET_RATIO = 0.9  # async guest throughput during migration / without migration
TARGET_P50_MS, TARGET_P99_MS = 50.0, 200.0
TARGET_BOUND_FACTOR, TARGET_BOUND_SLACK_S = 1.1, 1.0  # time ≤ 1.1 × bound + 1 s
HOLDERS = 2  # office-pc and home-pc hold vm1 when (a) and (c) migrate it


# ---- numbers ---------------------------------------------------------------------------------------
def mean_in(series: list[list[float]], lo: float, hi: float, log_s: float = 0.25) -> float | None:
    """MiB/s the guest wrote in [lo, hi] (seconds from the migration's start): the 250 ms samples' MiB over the
    window's length, so a stall, in which fio logs nothing, counts as zero."""
    if hi <= lo:
        return None
    return sum(v for t, v in series if lo < t <= hi) * log_s / (hi - lo)


def with_gaps(series: list[list[float]], log_s: float = 0.25) -> tuple[list[float], list[float]]:
    """The series for plotting, with zeros where fio logged nothing for a while (the guest was stalled)."""
    xs: list[float] = []
    ys: list[float] = []
    for t, v in series:
        if xs and t - xs[-1] > 2.5 * log_s:
            xs += [xs[-1] + log_s, t - log_s]
            ys += [0.0, 0.0]
        xs.append(t)
        ys.append(v)
    return xs, ys


def windows(r: dict[str, Any]) -> tuple[float, float, float]:
    """(switchover start, migration end, fio end), seconds from the migration's start."""
    m = r["migration"]
    return m["switchover"] - m["launched"], m["end"] - m["launched"], r["t_end"]


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile: p99 of 20 values is the largest."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def bound_s(stale: int, doc: dict[str, Any]) -> float:
    """stale / bottleneck at TCP goodput; bottleneck = min(destination download, holders' summed uploads)."""
    rate = doc["rate_bytes"]
    return stale / (min(rate, HOLDERS * rate) * doc["goodput"])


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


# ---- lines printed as runs finish --------------------------------------------------------------------
def throughput_line(r: dict[str, Any]) -> str:
    s = r["series"]
    if r["migration"] is None:
        return f"mean {fmt(mean_in(s, 0, r['t_end']))} MiB/s (fio {r['fio_write_mib_s']:.2f}), load {r['load']}"
    sw, end, stop = windows(r)
    m = r["migration"]["summary"]
    return (f"during {fmt(mean_in(s, 0, sw))} MiB/s, after {fmt(mean_in(s, end, stop))} MiB/s; migration "
            f"{m['duration_s']} s, downtime {m['downtime_ms']} ms, stale {r['migration']['stale_bytes'] / MiB:.0f} "
            f"MiB, phases {r['migration']['phases']}, load {r['load']}")


def bound_line(r: dict[str, Any], doc: dict[str, Any]) -> str:
    b = bound_s(r["stale_bytes"], doc)
    d = float(r["summary"]["duration_s"])
    return (f"{d:.2f} s (CLI {r['returned'] - r['launched']:.2f}) for {r['stale_bytes'] / MiB:.0f} MiB, bound "
            f"{b:.2f} s, limit {TARGET_BOUND_FACTOR * b + TARGET_BOUND_SLACK_S:.2f} s, from "
            f"{ {h: round(v / MiB, 1) for h, v in r['summary']['bytes_from'].items()} } MiB, "
            f"verified {r.get('verified')}, load {r['load']}")


# ---- tables ----------------------------------------------------------------------------------------
def throughput_table(doc: dict[str, Any]) -> list[str]:
    rows = ["| workload | mode | guest MiB/s during migration | / no migration | guest MiB/s after (forwarded) | "
            "migration s | downtime ms | load avg |", "|---|---|---:|---:|---:|---:|---:|---|"]
    verdict = []
    for workload in ("limited", "unlimited"):
        runs = {r["mode"]: r for r in doc["throughput"] if r["workload"] == workload}
        base = runs.get("none")
        for mode in ("none", "async", "sync"):
            r = runs.get(mode)
            if r is None:
                continue
            if r["migration"] is None:
                rows.append(f"| {workload} | no migration | {fmt(mean_in(r['series'], 0, r['t_end']))} (whole run) "
                            f"| – | – | – | – | {r['load'][0]} → {r['load'][1]} |")
                continue
            sw, end, stop = windows(r)
            during = mean_in(r["series"], 0, sw)
            ref = mean_in(base["series"], 0, min(sw, base["t_end"])) if base else None  # same window, as far as it ran
            ratio = during / ref if during is not None and ref else None
            m = r["migration"]["summary"]
            rows.append(f"| {workload} | {mode} | {fmt(during)} | {fmt(ratio, '.3f')} | "
                        f"{fmt(mean_in(r['series'], end, stop))} | {m['duration_s']:.1f} | {m['downtime_ms']:.0f} | "
                        f"{r['load'][0]} → {r['load'][1]} |")
            if mode == "async" and workload == "limited" and ratio is not None:
                ok = ratio >= TARGET_RATIO
                verdict.append(f"- (a) async / no migration, rate-limited guest: {ratio:.3f} "
                               f"{'≥' if ok else '<'} {TARGET_RATIO}: {'met' if ok else 'MISSED'}")
    return [*rows, "", *verdict]


def downtime_table(doc: dict[str, Any]) -> list[str]:
    rows = ["| mode | migrations | guest stall p50 / p99 / max ms | daemon downtime_ms p50 / p99 / max | "
            "guest's longest request outside the migrations, median / max ms | migration s (median) | guest errors "
            "| load avg |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    verdict = []
    for mode in ("async", "sync"):
        ms = [m for m in doc["downtime"] if m["mode"] == mode]
        if not ms:
            continue
        g = [m["guest_stall_ms"] for m in ms]
        d = [float(m["summary"]["downtime_ms"]) for m in ms]
        loads = [m["load"][0] for m in ms]
        errors = sum(len(m["guest"]["errors"]) for m in ms)
        o = [m.get("guest_outside_ms", 0.0) for m in ms]
        rows.append(f"| {mode} | {len(ms)} | {pct(g, 50):.0f} / {pct(g, 99):.0f} / {max(g):.0f} | "
                    f"{pct(d, 50):.0f} / {pct(d, 99):.0f} / {max(d):.0f} | {pct(o, 50):.0f} / {max(o):.0f} | "
                    f"{statistics.median(float(m['summary']['duration_s']) for m in ms):.2f} | {errors} | "
                    f"{min(loads)}–{max(loads)} |")
        ok50, ok99 = pct(g, 50) <= TARGET_P50_MS, pct(g, 99) <= TARGET_P99_MS
        verdict.append(f"- (b) {mode}: guest-measured p50 {pct(g, 50):.0f} ms (≤ {TARGET_P50_MS:.0f}: "
                       f"{'met' if ok50 else 'MISSED'}), p99 {pct(g, 99):.0f} ms (≤ {TARGET_P99_MS:.0f}: "
                       f"{'met' if ok99 else 'MISSED'})")
    return [*rows, "", *verdict]


def bound_table(doc: dict[str, Any]) -> list[str]:
    rows = ["| migration | stale MiB | duration_s | CLI wall s | bound s | limit 1.1 × bound + 1 s | met | "
            "MiB from office-pc / home-pc | load avg |", "|---|---:|---:|---:|---:|---:|:---:|---|---|"]
    cases = [(f"idle #{i + 1}", r) for i, r in enumerate(doc["bound"])]
    cases += [(f"{r['workload']} guest, {r['mode']}", r["migration"]) for r in doc["throughput"] if r["migration"]]
    met = []
    for name, r in cases:
        b = bound_s(r["stale_bytes"], doc)
        d = float(r["summary"]["duration_s"])
        ok = d <= TARGET_BOUND_FACTOR * b + TARGET_BOUND_SLACK_S
        if name.startswith("idle"):
            met.append(ok)
        frm = r["summary"]["bytes_from"]
        rows.append(f"| {name} | {r['stale_bytes'] / MiB:.0f} | {d:.2f} | {r['returned'] - r['launched']:.2f} | "
                    f"{b:.2f} | {TARGET_BOUND_FACTOR * b + TARGET_BOUND_SLACK_S:.2f} | {'yes' if ok else 'no'} | "
                    f"{frm.get('office-pc', 0) / MiB:.0f} / {frm.get('home-pc', 0) / MiB:.0f} | "
                    f"{r['load'][0]} → {r['load'][1]} |")
    verdict = [f"- (c) idle migrations within 1.1 × bound + 1 s: {sum(met)} of {len(met)}"] if met else []
    return [*rows, "", *verdict]


# ---- plots -----------------------------------------------------------------------------------------
def plot_throughput(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in ("limited", "unlimited") if any(r["workload"] == w for r in doc["throughput"])]
    fig, axes = plt.subplots(len(workloads), 1, figsize=(9, 3.6 * len(workloads)), squeeze=False)
    colours = {"none": "tab:gray", "async": "tab:blue", "sync": "tab:orange"}
    for ax, workload in zip(axes[:, 0], workloads, strict=True):
        for r in (r for r in doc["throughput"] if r["workload"] == workload):
            label = "no migration" if r["mode"] == "none" else r["mode"]
            ax.plot(*with_gaps(r["series"]), lw=1, color=colours[r["mode"]], label=label)
            if r["migration"]:
                sw, end, _ = windows(r)
                ax.axvspan(sw, max(end, sw + 0.2), color=colours[r["mode"]], alpha=0.3)
                ax.axvline(sw, color=colours[r["mode"]], ls="--", lw=0.8)
        ax.axvline(0, color="k", lw=0.8)
        title = f"fio randwrite 64k, --rate={doc['fio_rate']}" if workload == "limited" else "fio randwrite 64k, qd8"
        ax.set_title(f"{title}; migration starts at 0 s, dashed = switchover")
        ax.set_xlabel("seconds since `p2pvbd migrate`")
        ax.set_ylabel("guest writes, MiB/s")
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_downtime(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("async", "sync") if any(x["mode"] == m for x in doc["downtime"])]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes, strict=True):
        ms = [m for m in doc["downtime"] if m["mode"] == mode]
        xs = range(1, len(ms) + 1)
        ax.bar([x - 0.2 for x in xs], [m["guest_stall_ms"] for m in ms], width=0.4, label="guest: longest request")
        ax.bar([x + 0.2 for x in xs], [float(m["summary"]["downtime_ms"]) for m in ms], width=0.4,
               label="daemon: downtime_ms")
        ax.plot(list(xs), [m.get("guest_outside_ms", 0.0) for m in ms], "k_", ms=10,
                label="guest: longest request outside the migration")
        ax.set_xticks(list(xs))
        ax.axhline(TARGET_P50_MS, color="g", ls="--", lw=0.8, label="p50 target")
        ax.axhline(TARGET_P99_MS, color="r", ls="--", lw=0.8, label="p99 target")
        ax.set_title(f"--mode {mode}, office-pc ⇄ car-pc")
        ax.set_xlabel("migration")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("ms")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(doc: dict[str, Any], plots: Path) -> None:
    print(f"\nmachine {doc['machine']}, commit {doc['commit']}, {doc['started']} → {doc.get('finished')}")
    for title, key, table, plot in (("guest throughput", "throughput", throughput_table, plot_throughput),
                                    ("switchover downtime", "downtime", downtime_table, plot_downtime),
                                    ("migration time against the bound", "bound", bound_table, None)):
        if doc[key] or (key == "bound" and doc["throughput"]):
            print(f"\n{title}\n" + "\n".join(table(doc)))
            if plot is not None:
                plots.mkdir(parents=True, exist_ok=True)
                plot(doc, plots / f"migration-{key}.png")
    for name, summary in doc.get("profiles", {}).items():
        print(f"\n== py-spy: {name}")
        for thread, t in summary.items():
            print(f"  thread {thread}: {t['samples']} samples")
            print("    self:      " + "; ".join(f"{f} {p}%" for f, p in t["self_pct"].items()))
            print("    inclusive: " + "; ".join(f"{f} {p}%" for f, p in t["inclusive_pct"].items()))
