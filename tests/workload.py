"""A verifying guest workload: a real NBD client (libnbd) writing patterned blocks until told to stop.

Run with /usr/bin/python3 (python3-libnbd is a Debian package). Every write carries a pattern naming
its block and sequence number; every acknowledged write is logged, so a test can rebuild exactly what
the guest was promised and compare it with whoever owns the disk afterwards.

usage: workload.py URI STOPFILE LOGFILE [--block 65536] [--blocks 256] [--seed 1] [--flush-every 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import time

import nbd


def pattern(block: int, seq: int, size: int) -> bytes:
    head = struct.pack(">QQ", block, seq)
    return (head * (size // len(head) + 1))[:size]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("stopfile")
    ap.add_argument("logfile")
    ap.add_argument("--block", type=int, default=65536)
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--flush-every", type=int, default=16)
    ap.add_argument("--pause", type=float, default=0.002)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    h = nbd.NBD()
    h.connect_uri(args.uri)
    acked: dict[int, int] = {}
    errors: list[str] = []
    seq = 0
    with open(args.logfile + ".ready", "w"):
        pass
    while not os.path.exists(args.stopfile):
        block = rng.randrange(args.blocks)
        seq += 1
        try:
            h.pwrite(pattern(block, seq, args.block), block * args.block)
            acked[block] = seq
            if seq % args.flush_every == 0:
                h.flush()
        except nbd.Error as e:
            errors.append(f"write {seq} of block {block}: {e}")
        time.sleep(args.pause)
    h.flush()
    reads_ok = all(h.pread(args.block, b * args.block) == pattern(b, s, args.block) for b, s in acked.items())
    h.shutdown()
    with open(args.logfile, "w") as f:
        json.dump({"acked": acked, "writes": seq, "errors": errors, "reads_ok": reads_ok}, f)


if __name__ == "__main__":
    main()
