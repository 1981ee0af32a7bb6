"""Random 4 KiB writes spread over a small and a large disk: p2pvbd's export against qemu-nbd and the raw file.

The store's activity log syncs its journal before the first write into each 16 MiB area (see
docs/DESIGN.md): free while a guest's writes stay within 320 areas (5 GiB); spread over a disk much
larger than that, nearly every write needs a sync, shared by the writes in flight. fio (randwrite, bs 4k,
iodepth 32, 8 s after a 1 s ramp) over the whole of a sparse 512 MiB and a sparse 100 GiB disk: through
p2pvbd's export and qemu-nbd's (ioengine=nbd), and on a raw sparse file itself (ioengine=io_uring,
buffered like both servers: what the NBD hop costs). Each size runs ``--repeat`` times, the three sides
back to back, which goes first turning; ratios pair runs adjacent in time, and the median is reported.

"CPU s/GiB" is the server's CPU time (all threads, from /proc) per GiB written; for the raw file, fio's
own (user + system: the kernel's work of the write itself, which the servers' figures include too).

    .venv/bin/python bench/random_writes.py [--json FILE] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemons import Host  # noqa: E402

SIZES = ("512M", "100G")
SIDES = ("qemu-nbd", "p2pvbd", "raw")
GiB = 1024**3
# fio's job, the same for every side: 8 s after a 1 s ramp is long enough for the 512 MiB disk to be
# rewritten many times over (~40k IOPS) and short enough for the whole run to take a few minutes.
FIO_JOB = ["--name=rw", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=1", "--time_based",
           "--runtime=8", "--ramp_time=1", "--output-format=json"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio(target: list[str], size: str, work: Path, pid: int | None) -> dict[str, Any]:
    """One fio run; ``pid`` is the server whose CPU time counts (None: fio's own, for the raw file)."""
    out = work / "fio.json"
    cpu = cpu_seconds(pid) if pid else 0.0
    subprocess.run(["fio", *target, *FIO_JOB, f"--size={size}", f"--output={out}"], check=True, capture_output=True)
    spent = cpu_seconds(pid) - cpu if pid else 0.0
    job = json.loads(out.read_text())["jobs"][0]
    w = job["write"]
    if not pid:  # fio's CPU percentages are of its runtime
        spent = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
    gib = w["io_bytes"] / GiB
    if pid:  # the server also worked during the ramp, whose bytes fio does not count
        gib *= (job["job_runtime"] + 1000) / job["job_runtime"]
    return {"iops": round(w["iops"]), "p99_us": round(w["clat_ns"]["percentile"]["99.000000"] / 1000),
            "cpu_s_per_gib": round(spent / gib, 2) if gib else None, "load1": round(os.getloadavg()[0], 2)}


def run_qemu(size: str, work: Path) -> dict[str, Any]:
    image = work / "ref.raw"
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    server = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-e", "4", "-k", str(work / "q.sock"), "-x", "d",
                               str(image)])
    try:
        while not (work / "q.sock").exists():
            time.sleep(0.05)
        return fio(["--ioengine=nbd", f"--uri=nbd+unix:///d?socket={work}/q.sock"], size, work, server.pid)
    finally:
        server.kill()
        server.wait()
        image.unlink()
        (work / "q.sock").unlink(missing_ok=True)


def run_raw(size: str, work: Path) -> dict[str, Any]:
    image = work / "raw.raw"
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    try:
        return fio(["--ioengine=io_uring", f"--filename={image}"], size, work, None)
    finally:
        image.unlink()


def run_p2pvbd(host: Host, size: str, rep: int, work: Path) -> dict[str, Any]:
    name = f"d{size}-{rep}"  # a fresh, empty disk each time, like the other sides' fresh files
    host.cli("disk", "create", name, "--size", size)
    assert host.proc is not None
    return fio(["--ioengine=nbd", f"--uri={host.uri(name)}"], size, work, host.proc.pid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--repeat", type=int, default=2, help="runs per size and side (default 2)")
    args = ap.parse_args()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {size: {side: [] for side in SIDES} for size in SIZES}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg(),
            "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()}
    with tempfile.TemporaryDirectory(prefix="p2pvbd-randw-") as tmp:
        work = Path(tmp)
        host = Host(work / "h", "office-pc").start()
        try:
            for rep in range(args.repeat):
                for size in SIZES:
                    order = SIDES[rep % 3:] + SIDES[:rep % 3]
                    for side in order:
                        # each side starts with nothing of the one before still being written back: its
                        # syncs would otherwise wait behind the other side's dirty pages
                        os.sync()
                        r = (run_qemu(size, work) if side == "qemu-nbd" else run_raw(size, work) if side == "raw"
                             else run_p2pvbd(host, size, rep, work))
                        runs[size][side].append(r)
                        print(f"[{rep + 1}/{args.repeat}] {size:>5} {side:<8} {r}", flush=True)
        finally:
            host.stop()
    meta["loadavg_end"] = os.getloadavg()
    res: dict[str, Any] = {"meta": meta, "runs": runs, "summary": {}}
    for size in SIZES:
        r = runs[size]
        med = {side: {k: statistics.median(x[k] for x in r[side]) for k in ("iops", "p99_us", "cpu_s_per_gib")}
               for side in SIDES}
        pair = [(q["iops"], p["iops"], f["iops"], q["p99_us"], p["p99_us"])
                for q, p, f in zip(r["qemu-nbd"], r["p2pvbd"], r["raw"], strict=True)]
        res["summary"][size] = {
            **med,
            "ratio vs qemu-nbd": round(statistics.median(p / q for q, p, *_ in pair), 3),
            "ratio vs raw": round(statistics.median(p / f for _, p, f, *_ in pair), 3),
            "qemu-nbd vs raw": round(statistics.median(q / f for q, _, f, *_ in pair), 3),
            "p99 ratio vs qemu-nbd": round(statistics.median(pp / qp for *_, qp, pp in pair), 2),
        }
    print(json.dumps(res["summary"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
