"""libvirt migrations of an adopted domain against `virsh migrate --copy-storage-all` on local images, at
100 Mbit/s: move time, the guest's longest stall, bytes on the wire.

Usage: .venv/bin/python bench/libvirt_moves.py [--rate 100mbit] [--disk-mib 256] [--data-mib 64] [--json FILE]

Needs root. office-pc and car-pc each run a p2pvbd daemon and a libvirtd (tests/libvirt_lab.py) in their own
network namespace (tests/netns.py), their links shaped to --rate both ways (tbf). The domain is the tests'
guest (Linux under TCG, 128 MiB, 1 vCPU) writing a 4 KiB record every 20 ms and printing a heartbeat after
each; a thread reads the serial log every 2 ms and notes when each heartbeat appears. The longest gap
between heartbeats across a move, less the 20 ms between records, is the stall the guest saw (memory
downtime, plus the disks' switchover for p2pvbd). The guest's own clock does not show it: it stops while
QEMU pauses the guest. Its disk is --disk-mib with --data-mib of random
(incompressible) data, the rest sparse.

p2pvbd: the domain is adopted at office-pc and moved with `virsh migrate --live --p2p` to car-pc (nothing of
its disk there) and back (office-pc keeps a stale replica). copy-storage-all: the same domain on a raw image,
moved with `virsh migrate --live --p2p --copy-storage-all` to a sparse image at car-pc and back (QEMU copies
the allocated part of the image every time). Bytes on the wire: both hosts' shaped uploads (tbf counters).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from multipeer_pull import machine, tx_bytes  # noqa: E402

from tests.daemons import Host  # noqa: E402
from tests.libvirt_lab import Libvirtd, ensure_libvirt_user  # noqa: E402
from tests.netns import Network, NsHost  # noqa: E402
from tests.test_libvirt import DOMAIN_XML  # noqa: E402
from tests.vm_guest import build_initramfs, guest_kernel, workload_append  # noqa: E402

MiB = 1 << 20
ALIVE = re.compile(rb"^ALIVE (\d+) (\d+)\r?$", re.M)
CRASH = b"Kernel panic"
RECORD_EVERY_MS = 20
# A move over 100 Mbit/s of a 128 MiB guest and a few hundred MiB of disk takes well under this.
MOVE_TIMEOUT = 1800.0


# The serial log is read this often: the resolution of a measured stall.
TAIL_SECONDS = 0.002


class Heartbeats:
    """When (host monotonic time) each heartbeat line showed up in the serial log."""

    def __init__(self, serial: Path) -> None:
        self.serial = serial
        self.times: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pos, rest = 0, b""
        while not self.stop.wait(TAIL_SECONDS):
            try:
                with open(self.serial, "rb") as f:
                    f.seek(pos)
                    data = rest + f.read()
                    pos = f.tell()
            except OSError:
                continue
            now = time.monotonic()
            head, _, rest = data.rpartition(b"\n")
            self.times.extend(now for _ in ALIVE.finditer(head))

    def wait(self, more_than: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.times) <= more_than:
            if time.monotonic() > deadline or CRASH in self.serial.read_bytes():
                raise RuntimeError(f"the guest stopped writing ({self.serial})")
            time.sleep(0.2)


def make_image(path: Path, size: int, data: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(size - data)  # away from the records' slots at the start
        for _ in range(data // (8 * MiB)):
            f.write(os.urandom(8 * MiB))


def move(src: Libvirtd, dst: Libvirtd, dst_ns: NsHost, nss: list[NsHost], beats: Heartbeats, domain: str,
         extra: list[str]) -> dict[str, Any]:
    """One `virsh migrate`, measured: seconds, the guest's longest heartbeat gap, bytes both hosts sent."""
    before_beats = len(beats.times)
    before_bytes = sum(tx_bytes(ns) for ns in nss)
    t0 = time.monotonic()
    src.virsh("migrate", "--live", "--p2p", *extra, domain, dst.uri, "--migrateuri", f"tcp://{dst_ns.address}",
              timeout=MOVE_TIMEOUT)
    seconds = time.monotonic() - t0
    job = {}
    for line in dst.virsh("domjobinfo", "--completed", domain, check=False).stdout.splitlines():
        key, _, value = line.partition(":")
        job[key.strip()] = value.strip()
    beats.wait(len(beats.times) + 20)
    times = beats.times[max(0, before_beats - 1):]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {"seconds": round(seconds, 2),
            "stall_ms": round(max(gaps) * 1000 - RECORD_EVERY_MS, 1) if gaps else None,
            "wire_mib": round((sum(tx_bytes(ns) for ns in nss) - before_bytes) / MiB, 1),
            "libvirt_downtime": job.get("Total downtime", ""), "libvirt_data": job.get("Data processed", ""),
            "crashed": CRASH in beats.serial.read_bytes()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--disk-mib", type=int, default=256)
    p.add_argument("--data-mib", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    ensure_libvirt_user()
    kernel = guest_kernel()
    results: dict[str, Any] = {"machine": machine(), "rate": args.rate, "disk_mib": args.disk_mib,
                               "data_mib": args.data_mib, "memory_mib": 128}
    with tempfile.TemporaryDirectory(prefix="p2pvbd-libvirt-bench-") as tmp_name, Network("10.79.0.0/24") as net:
        tmp = Path(tmp_name)
        initrd = build_initramfs(tmp / "guest", kernel)
        nss = [net.add_host(n, upload=args.rate, download=args.rate) for n in ("office-pc", "car-pc")]
        hosts: list[Host] = []
        lvs: list[Libvirtd] = []
        try:
            for i, ns in enumerate(nss):
                token = hosts[0].cli("invite").stdout.strip() if hosts else None
                host = Host(tmp / ns.name, ns.name, join=token, prefix=ns.exec_prefix(), address=ns.address)
                hosts.append(host)
                host.start()
                lv = Libvirtd(tmp / f"libvirt-{ns.name}", i, prefix=ns.exec_prefix())
                host.cli("libvirt", "install-hook", "--hooks-dir", str(lv.hooks_dir), "--connect", lv.uri,
                         "--peer-uri", lv.uri, "--migrate-uri", f"tcp://{ns.address}")
                lvs.append(lv.start())
            office, car = lvs
            size, data = args.disk_mib * MiB, args.data_mib * MiB
            append = workload_append("write", delay_ms=RECORD_EVERY_MS, alive_every=1)

            def define(name: str, image: Path, serial: Path) -> None:
                xml = tmp / f"{name}.xml"
                xml.write_text(DOMAIN_XML.format(name=name, kernel=kernel, initrd=initrd, fmt="raw", image=image,
                                                 serial=serial, append=append))
                office.virsh("define", str(xml))

            # p2pvbd: adopted, moved with virsh.
            serial = tmp / "p2p-serial.log"
            make_image(tmp / "p2p.raw", size, data)
            define("p2p", tmp / "p2p.raw", serial)
            hosts[0].cli("libvirt", "adopt", "p2p", "--connect", office.uri, "--delete-images")
            office.virsh("start", "p2p")
            beats = Heartbeats(serial)
            beats.wait(20)
            results["p2pvbd"] = {"to car-pc (empty)": move(office, car, nss[1], nss, beats, "p2p", []),
                                 "back (stale replica)": move(car, office, nss[0], nss, beats, "p2p", [])}
            beats.stop.set()
            print(json.dumps(results["p2pvbd"]), flush=True)
            office.virsh("destroy", "p2p")

            # copy-storage-all: local images at each host.
            serial = tmp / "csa-serial.log"
            make_image(tmp / "csa-office.raw", size, data)
            with open(tmp / "csa-car.raw", "wb") as f:
                f.truncate(size)
            define("csa", tmp / "csa-office.raw", serial)
            office.virsh("start", "csa")
            beats = Heartbeats(serial)
            beats.wait(20)
            to_car = tmp / "csa-to-car.xml"
            to_car.write_text(office.virsh("dumpxml", "--migratable", "csa").stdout.replace(str(tmp / "csa-office.raw"),
                                                                            str(tmp / "csa-car.raw")))
            first = move(office, car, nss[1], nss, beats, "csa", ["--copy-storage-all", "--xml", str(to_car)])
            to_office = tmp / "csa-to-office.xml"
            to_office.write_text(car.virsh("dumpxml", "--migratable", "csa").stdout.replace(str(tmp / "csa-car.raw"),
                                                                            str(tmp / "csa-office.raw")))
            back = move(car, office, nss[0], nss, beats, "csa", ["--copy-storage-all", "--xml", str(to_office)])
            beats.stop.set()
            results["copy_storage_all"] = {"to car-pc (empty)": first, "back": back}
            print(json.dumps(results["copy_storage_all"]), flush=True)
        finally:
            for lv in lvs:
                lv.stop()
            for host in hosts:
                host.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
