"""Numbers, tables and plots of bench/vm_figures.py's results (also re-rendered from its --json)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

MiB = 1 << 20
BIN_S = 0.1  # the TCP flow's throughput is plotted per 100 ms
GAP_MARGIN_S = (1.0, 3.0)  # "around the move": from 1 s before its launch to 3 s after it returned


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p99 of 10 values is the largest)."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)] if s else None


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


# ---- figure 4 ----------------------------------------------------------------------------------------------
def tcp_bins(r: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(seconds from the move's launch, Mbit/s received) per BIN_S, zeros included."""
    rec, t0 = r["received"], r["migration"]["launched"]
    per = round(BIN_S / rec["bucket_s"])
    bins: dict[int, int] = {}
    for key, n in rec["buckets"]:
        bins[key // per] = bins.get(key // per, 0) + n
    lo, hi = int(r["t_start"] / BIN_S), int(r["t_end"] / BIN_S)
    return [k * BIN_S - t0 for k in range(lo, hi)], [bins.get(k, 0) * 8 / BIN_S / 1e6 for k in range(lo, hi)]


def tcp_numbers(r: dict[str, Any]) -> dict[str, Any]:
    m = r["migration"]
    lo, hi = m["launched"] - GAP_MARGIN_S[0], m["returned"] + GAP_MARGIN_S[1]
    gaps = r["received"]["gaps"]
    around = [(t, g) for t, g in gaps if t >= lo and t - g <= hi]
    before = [g for t, g in gaps if t < lo]
    xs, ys = tcp_bins(r)

    def mean(a: float, b: float) -> float | None:
        sel = [y for x, y in zip(xs, ys, strict=True) if a <= x < b]
        return statistics.fmean(sel) if sel else None

    longest = max(around, key=lambda tg: tg[1], default=None)
    last = max((k for k, n in r["received"]["buckets"]), default=None)
    sw = phases(m).get("switchover")
    after = mean(m["returned"] - m["launched"] + 1, math.inf)  # from 1 s after the move returned
    # during: until the move returned, or until the last data if the flow stopped (it did at the switchover)
    survived = bool(after and after > 1.0)
    stopped = last * r["received"]["bucket_s"] - m["launched"] if last is not None and not survived else None
    return {"mbit_before": mean(-math.inf, 0),
            "mbit_during": mean(0, min(m["returned"] - m["launched"], stopped - BIN_S if stopped else math.inf)),
            "mbit_after": after, "flow_survived": survived,
            # of a flow that stopped for good: the longest gap before it stopped
            "longest_gap_ms": round(longest[1] * 1000, 1) if longest else 0.0,
            "longest_gap_ends_s": round(longest[0] - m["launched"], 2) if longest else None,
            "switchover_seen_s": round(sw - m["launched"], 2) if sw else None,
            "longest_gap_before_ms": round(max(before, default=0.0) * 1000, 1),
            "gaps_over_100ms_around": sum(g > 0.1 for _, g in around), "move_s": m["summary"].get("duration_s"),
            "last_data_s": round(last * r["received"]["bucket_s"] - m["launched"], 2) if last is not None else None,
            "crash_s": r.get("crash_s"),
            "vm_downtime_ms": m["summary"].get("vm_downtime_ms"), "connections": len(r["received"]["connections"])}


def tcp_line(r: dict[str, Any]) -> str:
    n = tcp_numbers(r)
    return (f"[{r.get('kind', 'p2pvbd')}] "
            f"{fmt(n['mbit_before'])} / {fmt(n['mbit_during'])} / {fmt(n['mbit_after'])} Mbit/s before / during / "
            f"after; longest gap around the move {n['longest_gap_ms']} ms (ends {n['longest_gap_ends_s']} s after "
            f"launch, switchover seen at {n['switchover_seen_s']} s), before it {n['longest_gap_before_ms']} ms; "
            f"move {n['move_s']} s, paused {n['vm_downtime_ms']} ms; connections {n['connections']}, "
            f"crashed {r['crashed']} (seen {fmt(n['crash_s'], '.2f')} s), last data {n['last_data_s']} s after launch")


# ---- figure 5 ----------------------------------------------------------------------------------------------
def disk_t0(r: dict[str, Any]) -> float:
    """The move's launch, or where it would have been (the baseline)."""
    return float(r["t0"])


def mib_s(series: list[list[float]], lo: float, hi: float) -> float | None:
    """MiB/s the guest wrote in [lo, hi] (time.time()): the bytes of the intervals ending in it over its length,
    so a stall, which prints nothing, counts as zero."""
    if hi <= lo:
        return None
    return sum(rate * span for t, span, rate in series if lo < t <= hi) / (hi - lo) / MiB


def disk_numbers(r: dict[str, Any]) -> dict[str, Any]:
    s, m = r["series"], r["migration"]
    if m is None:
        return {"before": mib_s(s, r["t_start"], r["t_end"]), "during": None, "after": None, "move_s": None}
    return {"before": mib_s(s, r["t_start"], m["launched"]), "during": mib_s(s, m["launched"], m["returned"]),
            "after": mib_s(s, m["returned"], r["t_end"]), "move_s": m["summary"].get("duration_s"),
            "vm_downtime_ms": m["summary"].get("vm_downtime_ms"), "error": m["summary"].get("error"),
            "ram_mib": round(m["summary"].get("ram_bytes", 0) / MiB, 1),
            # the guest while the bulk copy runs, and while what it wrote meanwhile is mirrored
            "bulk": mib_s(s, m["phases"]["disk bulk"], m["phases"]["disk mirror"])
            if {"disk bulk", "disk mirror"} <= m["phases"].keys() else None,
            "mirror": mib_s(s, m["phases"]["disk mirror"], m["phases"].get("ram", m["returned"]))
            if "disk mirror" in m["phases"] else None,
            "bulk_s": round(m["phases"]["disk mirror"] - m["phases"]["disk bulk"], 1)
            if {"disk bulk", "disk mirror"} <= m["phases"].keys() else None,
            "ram_s": round(phases(m)["switchover"] - phases(m)["ram"], 2)
            if {"ram", "switchover"} <= phases(m).keys() else None}


def disk_line(r: dict[str, Any]) -> str:
    n = disk_numbers(r)
    return (f"{fmt(n['before'])} / {fmt(n['during'])} / {fmt(n['after'])} MiB/s before / during / after; move "
            f"{n['move_s']} s (memory {n.get('ram_s')} s), paused {n.get('vm_downtime_ms')} ms, crashed "
            f"{r['crashed']}, guest errors {r['guest_errors']}")


# ---- pause -------------------------------------------------------------------------------------------------
def pause_numbers(p: dict[str, Any]) -> dict[str, Any]:
    ours = [m["summary"]["vm_downtime_ms"] for m in p["moves"] if m["summary"].get("vm_downtime_ms") is not None]
    sw = [m["summary"]["disk_switchover_ms"] for m in p["moves"] if m["summary"].get("disk_switchover_ms")]
    out = {"moves": len(p["moves"]), "failed": sum(bool(m["summary"]["error"]) for m in p["moves"]),
           "crashed": len(p["crashed_before_move"]), "link_ref_crashed": p["link_reference_crashes"]}
    for name, vals in (("p2pvbd", ours), ("disks", sw), ("link_ref", p["link_reference_ms"]),
                       ("unix_ref", p.get("unix_reference_ms", []))):
        out[name] = {"p50": pct(vals, 50), "p99": pct(vals, 99), "n": len(vals)}
    out["move_s_median"] = statistics.median(m["summary"]["duration_s"] for m in p["moves"]) if p["moves"] else None
    return out


# ---- output ------------------------------------------------------------------------------------------------
def render(doc: dict[str, Any], plots: Path) -> None:
    if doc.get("tcp"):
        print(f"\nTCP flow from the VM ({doc['tcp'][0]['vm_rate']} VM LAN):")
        print("| move | Mbit/s before | during | after | longest gap around the move (until it stopped) ms | pause "
              "ms | flow after the move | guest |")
        print("|---|---:|---:|---:|---:|---:|:---:|---|")
        for r in doc["tcp"]:
            n = tcp_numbers(r)
            print(f"| {r.get('kind', 'p2pvbd')} | {fmt(n['mbit_before'])} | {fmt(n['mbit_during'])} | "
                  f"{fmt(n['mbit_after'])} | {fmt(n['longest_gap_ms'], '.0f')} | {fmt(n['vm_downtime_ms'], '.0f')} | "
                  f"{'yes' if n['flow_survived'] else 'stopped at ' + fmt(n['last_data_s'], '.1f') + ' s'} | "
                  f"{'error seen ' + fmt(n['crash_s'], '.1f') + ' s in' if r['crashed'] else 'no error printed'} |")
    if doc.get("disk"):
        print("\n| mode | guest MiB/s before | during the move | … bulk copy | … mirror | after | bulk s | move s | "
              "memory s | pause ms | crashed |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
        for r in doc["disk"]:
            n = disk_numbers(r)
            print(f"| {r['mode']} | {fmt(n['before'])} | {fmt(n['during'])} | {fmt(n.get('bulk'))} | "
                  f"{fmt(n.get('mirror'))} | {fmt(n['after'])} | {fmt(n.get('bulk_s'))} | "
                  f"{fmt(n['move_s'])} | {fmt(n.get('ram_s'))} | {fmt(n.get('vm_downtime_ms'), '.0f')} | "
                  f"{'yes' if r['crashed'] else 'no'} |")
    if "pause" in doc:
        n = pause_numbers(doc["pause"])
        print(f"\npause over {n['moves']} moves ({n['failed']} failed; the guest crashed or hung after {n['crashed']} "
              f"of the first {n['moves'] - 1}, QEMU to QEMU on the link after {n['link_ref_crashed']}):")
        for key, label in (("p2pvbd", "p2pvbd migrate VM, vm_downtime_ms"), ("disks", "… disks' switchover"),
                           ("link_ref", "QEMU to QEMU, TCP on the same link"),
                           ("unix_ref", "QEMU to QEMU, local Unix socket")):
            print(f"  {label}: p50 {fmt(n[key]['p50'])} ms, p99 {fmt(n[key]['p99'])} ms (n={n[key]['n']})")
    plots.mkdir(parents=True, exist_ok=True)
    if doc.get("tcp"):  # p2pvbd's first move; below it QEMU to QEMU without pause-before-switchover
        shown = [r for r in doc["tcp"] if r.get("kind", "p2pvbd") == "p2pvbd"][:1]
        plain = [r for r in doc["tcp"] if r.get("kind") == "qemu"]
        shown += [next((r for r in plain if tcp_numbers(r)["flow_survived"]), plain[0])] if plain else []
        plot_tcp(shown, doc["tcp"], plots / "vm-tcp-across-move.png")
    if doc.get("disk"):
        plot_disk(doc["disk"], plots / "vm-disk-bench.png")


def phases(m: dict[str, Any]) -> dict[str, float]:
    """The move's phases (time.time()); a switchover shorter than the 0.1 s poll is placed from the summary."""
    ph = dict(m["phases"])
    if "switchover" not in ph and "committed" in ph:
        ph["switchover"] = ph["committed"] - (m["summary"].get("disk_switchover_ms") or 0) / 1000
    return ph


def _phases(ax: Any, m: dict[str, Any], t0: float) -> None:
    ph = phases(m)
    spans = [("disks", "ram", "tab:orange", "disks converge"), ("ram", "switchover", "tab:green", "memory"),
             ("switchover", "done", "tab:red", "pause")]
    for a, b, colour, label in spans:
        if a in ph:
            end = ph.get(b, m["returned"])
            ax.axvspan(ph[a] - t0, max(end, ph[a] + 0.05) - t0, color=colour, alpha=0.15, label=label)
    if "disk mirror" in ph:
        ax.axvline(ph["disk mirror"] - t0, color="tab:orange", lw=0.8, ls=":", label="bulk copy done")
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.axvline(m["returned"] - t0, color="grey", lw=0.8, ls="--")


def plot_tcp(shown: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.8 * len(shown) + 0.5), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], shown, strict=True):
        kind = r.get("kind", "p2pvbd")
        same = [x for x in runs if x.get("kind", "p2pvbd") == kind]
        broke = sum(not tcp_numbers(x)["flow_survived"] for x in same)
        xs, ys = tcp_bins(r)
        n = tcp_numbers(r)
        ax.step(xs, ys, where="post", lw=0.9, color="tab:blue", label="received, per 100 ms")
        _phases(ax, r["migration"], r["migration"]["launched"])
        if r["crashed"] and r.get("crash_s") is not None:
            ax.axvline(r["crash_s"], color="black", lw=1.2, label="guest's error seen")
        who = "p2pvbd migrate VM" if kind == "p2pvbd" else "QEMU to QEMU" + kind.removeprefix("qemu")
        gap = (f"longest gap {n['longest_gap_ms']:.0f} ms" if n["longest_gap_ms"] else "no gap over 20 ms") + (
            "" if n["flow_survived"] else " until the flow stopped")
        ax.set_title(f"{who}: {gap}, pause {fmt(n['vm_downtime_ms'], '.0f')} ms; "
                     f"flow stopped after {broke} of {len(same)} such moves", fontsize=9)
        ax.set_ylabel("Mbit/s")
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower left", fontsize=7)
    axes[-1, 0].set_xlabel("seconds from the move's start (dashed: start and end)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_disk(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.2 * len(runs) + 0.6), sharex=True, squeeze=False)
    top = max((rate / MiB for r in runs for _, _, rate in r["series"]), default=1.0)
    for ax, r in zip(axes[:, 0], runs, strict=True):
        t0 = disk_t0(r)
        ax.step([t - t0 for t, _, _ in r["series"]], [rate / MiB for _, _, rate in r["series"]], where="pre",
                lw=0.8, color="tab:blue", label="guest writes, per 250 ms")
        if r["migration"]:
            _phases(ax, r["migration"], t0)
        n = disk_numbers(r)
        title = f"{r['mode']}: " + (f"{fmt(n['before'])} MiB/s" if not r["migration"] else
                                    f"{fmt(n['before'])} / {fmt(n['during'])} / {fmt(n['after'])} MiB/s before / "
                                    f"during / after, move {fmt(n['move_s'])} s")
        ax.set_title(title + (" (guest crashed)" if r["crashed"] else ""), fontsize=9)
        ax.set_ylabel("MiB/s")
        ax.set_ylim(0, top * 1.05)
        ax.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds from `p2pvbd migrate` (none: the same point of the run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
