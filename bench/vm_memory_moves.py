"""What a VM's memory costs on the link, move after move: QEMU's stream against the bytes that crossed.

A guest (tests/vm_guest.py, Linux under TCG) with --memory-mib of memory reads --cache-mib of its
--disk-mib disk of random data into its page cache and holds --random-mib of random data (memory no
compressor shrinks). It moves office-pc -> car-pc (first move: car-pc holds no memory of it, but a
replica of its disk once the disks converged), idles --idle seconds, moves back (office-pc kept the
memory the VM left there), then is kept warm on home-pc (`vm replicate --on home-pc`) for --idle seconds
after home-pc's copy first became current, and moves there. Last, kept warm on car-pc by home-pc, it
moves to laptop, which holds none of its memory: laptop reads the pages from car-pc's copy while the
disks converge (`ram_from_peers`), and home-pc sends what changed since. The daemons run on loopback:
this measures bytes, not time on a slow link (bench/vm_figures.py shapes links). For each move:
`migrate --json`'s ram_bytes (QEMU's stream), ram_wire_bytes (from every host), ram_from_peers (of
them, from warm hosts), pages by reference per source, misses, the pause and the move's duration.

    .venv/bin/python bench/vm_memory_moves.py [--memory-mib 512] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemons import Host  # noqa: E402
from tests.vm_guest import MEMCHECK, build_initramfs, guest_kernel, workload_append  # noqa: E402

BOOT_SECONDS = 600.0  # a hang guard: a 512 MiB TCG guest reading 200 MiB boots in a minute here


def wait(predicate: Any, what: str, timeout: float = BOOT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def serial(host: Host) -> bytes:
    path = host.home / "vms" / "vm1" / "serial.log"
    return path.read_bytes() if path.exists() else b""


def move(on: Host, to: str) -> dict[str, Any]:
    res = on.cli("migrate", "vm1", "--to", to, "--json", check=False, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"migrate failed: {res.stdout}{res.stderr}")
    report: dict[str, Any] = json.loads(res.stdout)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory-mib", type=int, default=512)
    ap.add_argument("--disk-mib", type=int, default=256)
    ap.add_argument("--cache-mib", type=int, default=200)
    ap.add_argument("--random-mib", type=int, default=96)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds the guest runs between moves")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="p2pvbd-vm-memory-") as tmp:
        work = Path(tmp)
        kernel = guest_kernel()
        initrd = build_initramfs(work / "guest", kernel)
        office = Host(work / "office-pc", "office-pc").start()
        car = Host(work / "car-pc", "car-pc", join=office.cli("invite").stdout.strip()).start()
        home = Host(work / "home-pc", "home-pc", join=office.cli("invite").stdout.strip()).start()
        laptop = Host(work / "laptop", "laptop", join=office.cli("invite").stdout.strip()).start()
        try:
            image = work / "disk.img"
            with image.open("wb") as f:
                for _ in range(args.disk_mib):
                    f.write(os.urandom(1 << 20))
            office.cli("disk", "import", "vm1disk", str(image), timeout=600)
            office.cli("vm", "create", "vm1", "--disk", "vm1disk", "--memory", f"{args.memory_mib}M",
                       "--accel", "tcg", "--kernel", str(kernel), "--initrd", str(initrd), "--append",
                       f"console=ttyS0 quiet panic=-1 memfill_mb={args.random_mib} readdisk_mb={args.cache_mib} "
                       + workload_append("write", delay_ms=5, count=100), "--qemu-arg=-no-reboot")
            for h in (car, home, laptop):
                wait(lambda h=h: h.cli("vm", "approve", "vm1", check=False).returncode == 0, f"{h.name} to approve")
            office.cli("vm", "start", "vm1")
            wait(lambda: MEMCHECK.search(serial(office)), "the guest to fill its memory and read its disk")
            rows = []
            for name, on, to, warm_on in (
                    ("first move to car-pc", office, "car-pc", None), ("return to office-pc", car, "office-pc", None),
                    ("to home-pc, kept warm", office, "home-pc", "home-pc"),
                    ("to laptop, car-pc warm", home, "laptop", "car-pc")):
                if warm_on is not None:
                    on.cli("vm", "replicate", "vm1", "--on", warm_on, "--rate", "50M")

                    def warm(on: Host = on, warm_on: str = warm_on) -> bool:
                        vm = next(v for v in on.json("vm", "list") if v["name"] == "vm1")
                        return vm["warm"]["age_s"].get(warm_on) is not None
                    wait(warm, f"{warm_on}'s copy to be current")
                    time.sleep(args.idle)
                r = move(on, to)
                rows.append({"move": name} | {k: r.get(k) for k in ("ram_bytes", "ram_wire_bytes", "ram_from_peers",
                                                                    "ram_pages", "ram_by_ref", "ram_missed_pages",
                                                                    "vm_downtime_ms", "duration_s")})
                print(json.dumps(rows[-1]), flush=True)
                time.sleep(args.idle)
        finally:
            for h in (office, car, home, laptop):
                if h.alive():
                    h.cli("vm", "stop", "vm1", "--timeout", "0", check=False)
                    h.stop()
    print(f"\n{'move':24} {'QEMU stream':>12} {'on the wire':>12} {'share':>6}  by reference")
    for r in rows:
        print(f"{r['move']:24} {r['ram_bytes'] / 1e6:10.1f} MB {r['ram_wire_bytes'] / 1e6:10.1f} MB "
              f"{r['ram_wire_bytes'] / r['ram_bytes']:6.1%}  {r['ram_by_ref']} missed {r['ram_missed_pages']}"
              + (f"; from warm hosts {({h: f'{n / 1e6:.1f} MB' for h, n in r['ram_from_peers'].items()})}"
                 if r["ram_from_peers"] else ""))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "moves": rows}, indent=1))


if __name__ == "__main__":
    main()
