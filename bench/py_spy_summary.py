"""Shares of time per function and thread from py-spy's raw output, for the benchmarks' profiles."""

from __future__ import annotations

import collections
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

# py-spy writes its profile on Ctrl-C; a big raw profile takes a few seconds to write out.
SPY_STOP_SECONDS = 60


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive shares per function and thread from py-spy's raw output (--threads --idle)."""
    threads: dict[str, dict[str, collections.Counter[str]]] = {}
    totals: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = re.sub(r"^thread \(0x[0-9A-Fa-f]+\): ", "", frames[0]) if frames[0].startswith("thread") else "all"
        thread = re.sub(r"^thread \(\d+\): ", "", thread)
        thread = "worker threads" if thread.startswith("Trio thread") else thread
        funcs = [re.sub(r":\d+\)$", ")", f.strip()) for f in frames[1:]] or ["?"]
        c = threads.setdefault(thread, {"self": collections.Counter(), "incl": collections.Counter()})
        k = int(count)
        totals[thread] += k
        c["self"][funcs[-1]] += k
        for f in set(funcs):
            c["incl"][f] += k
    out: dict[str, Any] = {}
    for thread, c in sorted(threads.items(), key=lambda kv: -totals[kv[0]]):
        total = totals[thread]
        out[thread] = {
            "samples": total,
            "self_pct": {f: round(100 * v / total, 1) for f, v in c["self"].most_common(top)},
            "inclusive_pct": {f: round(100 * v / total, 1) for f, v in c["incl"].most_common(4 * top)
                              if "p2pvbd/" in f or "trio/_" in f or "ssl" in f.lower()},
        }
    return out


def stop_spies(spies: list[subprocess.Popen[Any]]) -> None:
    """Stop py-spy recorders so that each writes its output (SIGINT, as Ctrl-C would)."""
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        try:
            spy.wait(timeout=SPY_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
