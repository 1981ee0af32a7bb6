"""A guest that times every request: small sequential writes until told to stop, for switchover stalls.

Run with /usr/bin/python3 (python3-libnbd is a Debian package). A stall of the export shows up as one
request that takes as long as the stall, so the longest request is the downtime the guest saw, whatever
the daemon reports. Writes are sequential 4 KiB, the pattern of a guest appending to a log: 16 of them
dirty one 64 KiB block, so at this pace the guest dirties far less than a 100 Mbit/s link carries and the
migration converges without pacing it.

usage: migration_guest.py URI STOPFILE OUTFILE [--block 4096] [--region 67108864] [--pause 0.002]
                          [--run 16 --jump 1073745920]
With ``--run N --jump J`` the guest writes N requests in sequence, then jumps J bytes ahead (modulo the
region): a file system's pattern of short sequential runs spread over a big disk.
Writes OUTFILE (JSON): requests, errors, latency percentiles, and every request slower than
``--slow-ms`` as [start (time.time()), latency s, "write" or "flush"], so the caller can line stalls up
with its own clock.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import nbd

# Requests slower than this are logged one by one; the rest only count towards the percentiles.
SLOW_MS = 2.0
# Flushes as an ext4 journal commit would issue them, every so many writes.
FLUSH_EVERY = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("stopfile")
    ap.add_argument("outfile")
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--region", type=int, default=64 << 20, help="bytes written over and over, from offset 0")
    ap.add_argument("--run", type=int, default=0, help="sequential writes before each jump (0: never jump)")
    ap.add_argument("--jump", type=int, default=0, help="bytes skipped after each run")
    ap.add_argument("--pause", type=float, default=0.002, help="seconds between requests")
    ap.add_argument("--slow-ms", type=float, default=SLOW_MS)
    args = ap.parse_args()
    h = nbd.NBD()
    h.connect_uri(args.uri)
    buf = os.urandom(args.block)
    latencies: list[float] = []
    slow: list[tuple[float, float, str]] = []
    errors: list[str] = []
    offset = seq = 0
    with open(args.outfile + ".ready", "w"):
        pass
    while not os.path.exists(args.stopfile):
        seq += 1
        wall, t0 = time.time(), time.perf_counter()
        try:
            if seq % FLUSH_EVERY == 0:
                h.flush()
            else:
                h.pwrite(buf, offset)
                offset = (offset + args.block) % args.region
                if args.run and seq % args.run == 0:
                    offset = (offset + args.jump) // args.block * args.block % args.region
        except nbd.Error as e:
            errors.append(f"request {seq}: {e}")
        dt = time.perf_counter() - t0
        latencies.append(dt)
        if dt * 1000 >= args.slow_ms:
            slow.append((wall, dt, "flush" if seq % FLUSH_EVERY == 0 else "write"))
        time.sleep(args.pause)
    h.shutdown()
    latencies.sort()
    n = len(latencies)
    pct = {str(p): latencies[min(n - 1, int(p / 100 * n))] if n else None for p in (50, 99, 99.9, 100)}
    with open(args.outfile, "w") as f:
        json.dump({"requests": n, "errors": errors, "latency_s": pct, "slow": slow}, f)


if __name__ == "__main__":
    main()
