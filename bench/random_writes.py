"""Random 4 KiB writes spread over a small and a large disk: p2pvbd's export against qemu-nbd.

The store's activity log syncs its journal before the first write into each 16 MiB area (see
docs/DESIGN.md): free while a guest's writes stay within 320 areas (5 GiB); spread over a disk much
larger than that, nearly every write needs a sync, shared by the writes in flight. fio (ioengine=nbd,
randwrite, bs 4k, iodepth 32, 8 s after a 1 s ramp) over the whole of a sparse 512 MiB and a sparse
100 GiB disk, on each server in turn.

    .venv/bin/python bench/random_writes.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemons import Host  # noqa: E402

SIZES = ("512M", "100G")


def fio(uri: str, size: str, work: Path) -> dict[str, int]:
    out = work / "fio.json"
    subprocess.run(["fio", "--name=rw", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                    "--iodepth=32", f"--size={size}", "--numjobs=1", "--time_based", "--runtime=8",
                    "--ramp_time=1", "--output-format=json", f"--output={out}"], check=True, capture_output=True)
    job = json.loads(out.read_text())["jobs"][0]["write"]
    return {"iops": round(job["iops"]), "p99_us": round(job["clat_ns"]["percentile"]["99.000000"] / 1000)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    res: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="p2pvbd-randw-") as tmp:
        work = Path(tmp)
        for size in SIZES:
            image = work / "ref.raw"
            subprocess.run(["truncate", "-s", size, str(image)], check=True)
            server = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-e", "4", "-k", str(work / "q.sock"),
                                       "-x", "d", str(image)])
            while not (work / "q.sock").exists():
                time.sleep(0.05)
            try:
                res[f"qemu-nbd {size}"] = fio(f"nbd+unix:///d?socket={work}/q.sock", size, work)
            finally:
                server.kill()
                server.wait()
                image.unlink()
                (work / "q.sock").unlink(missing_ok=True)
        host = Host(work / "h", "office-pc").start()
        try:
            for size in SIZES:
                host.cli("disk", "create", f"d{size}", "--size", size)
                res[f"p2pvbd {size}"] = fio(host.uri(f"d{size}"), size, work)
        finally:
            host.stop()
    for size in SIZES:
        res[f"ratio {size}"] = {"iops": round(res[f"p2pvbd {size}"]["iops"] / res[f"qemu-nbd {size}"]["iops"], 3)}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
