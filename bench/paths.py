"""Pull and migration time through each kind of path (direct, reversed, punched, relayed), against direct.

Usage: .venv/bin/python bench/paths.py [--mib 128] [--rate 100mbit] [--json FILE]

Needs root (network namespaces, tc, nftables). Each path kind runs in a fresh swarm, every host in its
own namespace (tests/netns.py) with its own daemon, every link shaped to ``--rate`` both ways (a NATed
host's router ports are shaped: its only way out):

* ``direct``: ``src`` and ``dst`` reach each other;
* ``inbound``: ``src`` is behind NAT: ``dst`` reaches it over the link ``src`` holds open to it;
* ``punched``: both behind their own NAT, which keeps ports: a link punched through both (swarm/punch.py);
* ``relayed``: both behind their own NAT, which picks a new port per connection (punching fails); ``rel``,
  which both reach, carries their TLS session.

``src`` imports ``--mib`` MiB of random data as ``vm1`` and ``vm2``; ``dst`` runs ``sync vm1`` (the timed
pull: its ``duration_s``), then ``src`` runs ``migrate vm2 --to dst`` (its ``duration_s``: the bulk pull,
the mirror and the switchover). For ``relayed`` the relay daemon's CPU (user + system, /proc) during the
pull, per MiB carried, is reported too. Ratios are each path's time over ``direct``'s in the same run.
Exit status 0 even when slow: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.daemons import PEER_PORT_IN_NAMESPACE, Host  # noqa: E402
from tests.netns import Network, unavailable_reason  # noqa: E402

MiB = 1 << 20
LINK_SECONDS = 120.0  # a bound on a broken setup: standing links form within a publish round (15 s)
WILDCARD = ["--listen", f"0.0.0.0:{PEER_PORT_IN_NAMESPACE}"]


def wait(predicate: Any, what: str, timeout: float = LINK_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def path_to(host: Host, peer: str) -> str:
    info = next((p for p in host.json("peers") if p["name"] == peer), None)
    return info["path"] if info is not None and info["reachable"] else ""


def visible(host: Host, disk: str) -> bool:
    res = host.cli("status", disk, "--json", check=False)
    return res.returncode == 0 and bool(json.loads(res.stdout)["disks"][0]["replicas"])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(kind: str, mib: int, rate: str, tmp: Path) -> dict[str, Any]:
    with Network() as net:
        hosts: list[Host] = []
        try:
            def add(name: str, nat: str | None, join: Host | None, ports: str = "kept") -> Host:
                if nat is None:
                    ns = net.add_host(name, upload=rate, download=rate)
                    extra: list[str] = []
                else:
                    ns = net.add_nat_host(name, nat, ports=ports)
                    net.shape(f"{name}-nat", upload=rate, download=rate)
                    extra = WILDCARD
                token = join.cli("invite").stdout.strip() if join else None
                h = Host(tmp / kind / name, name, *extra, join=token, prefix=ns.exec_prefix(), address=ns.address)
                hosts.append(h.start())
                return h

            if kind == "direct":
                dst = add("dst", None, None)
                src = add("src", None, dst)
                rel = None
            elif kind == "inbound":
                dst = add("dst", None, None)
                src = add("src", "10.88.1.0/24", dst)
                rel = None
            else:
                ports = "kept" if kind == "punched" else "random"
                rel = add("rel", None, None)
                src = add("src", "10.88.1.0/24", rel, ports)
                dst = add("dst", "10.88.2.0/24", rel, ports)
            image = tmp / f"{kind}.raw"
            image.write_bytes(os.urandom(mib * MiB))
            for disk in ("vm1", "vm2"):
                src.cli("disk", "import", disk, str(image))
            wait(lambda: visible(dst, "vm1") and visible(dst, "vm2"), "dst to see the disks")
            expected = {"direct": "outbound", "inbound": "inbound", "punched": "punched",
                        "relayed": "relayed via rel"}[kind]
            wait(lambda: path_to(dst, "src") == expected, f"dst to reach src {expected}")
            relayed = kind == "relayed" and rel is not None and rel.proc is not None
            relay_cpu0 = cpu_seconds(rel.proc.pid) if relayed else 0.0  # type: ignore[union-attr]
            pull = json.loads(dst.cli("sync", "vm1", "--json", timeout=3600).stdout)
            relay_cpu = (cpu_seconds(rel.proc.pid) - relay_cpu0) if relayed else None  # type: ignore[union-attr]
            if pull["error"]:
                raise SystemExit(f"{kind}: sync failed: {pull['error']}")
            moved = json.loads(src.cli("migrate", "vm2", "--to", "dst", "--json", timeout=3600).stdout)
            if moved["error"]:
                raise SystemExit(f"{kind}: migrate failed: {moved['error']}")
            return {"path": kind, "pull_s": pull["duration_s"], "pull_wire_mib": pull["bytes_on_wire"] / MiB,
                    "migrate_s": moved["duration_s"], "downtime_ms": moved["downtime_ms"],
                    "relay_cpu_s_per_mib": None if relay_cpu is None else relay_cpu / (pull["bytes_on_wire"] / MiB)}
        finally:
            for h in hosts:
                if h.alive():
                    h.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if (reason := unavailable_reason()) is not None:
        raise SystemExit(f"cannot run: {reason}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="p2pvbd-paths-") as tmp:
        for kind in ("direct", "inbound", "punched", "relayed"):
            rows.append(run_case(kind, args.mib, args.rate, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print(f"\n{args.mib} MiB over {args.rate} links, {platform.node()}, {time.strftime('%Y-%m-%d')}")
    print(f"{'path':<9} {'pull s':>7} {'x direct':>8} {'migrate s':>9} {'x direct':>8} {'downtime ms':>11} "
          f"{'relay CPU s/MiB':>15}")
    for r in rows:
        cpu = "" if r["relay_cpu_s_per_mib"] is None else f"{r['relay_cpu_s_per_mib']:.4f}"
        print(f"{r['path']:<9} {r['pull_s']:>7.1f} {r['pull_s'] / base['pull_s']:>8.2f} {r['migrate_s']:>9.1f} "
              f"{r['migrate_s'] / base['migrate_s']:>8.2f} {r['downtime_ms']:>11.1f} {cpu:>15}")
    if args.json:
        args.json.write_text(json.dumps({"mib": args.mib, "rate": args.rate, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
