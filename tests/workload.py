"""A verifying guest workload: a real NBD client (libnbd) writing patterned blocks until told to stop.

Run with /usr/bin/python3 (python3-libnbd is a Debian package). Every write carries a pattern naming
its block and sequence number; every acknowledged operation is logged, so a test can rebuild exactly what
the guest was promised (guest_model.apply_to_image) and compare it with whoever owns the disk afterwards.
With ``--mix`` it also writes parts of blocks, zeroes and trims; with ``--stride S`` block b lies at
b x S blocks, spreading a few blocks over a big disk.

usage: workload.py URI STOPFILE LOGFILE [--block 65536] [--blocks 256] [--stride 1] [--mix] [--seed 1]
                   [--flush-every 16] [--pause 0.002] [--ops N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import nbd
from guest_model import PARTIAL, TRIM, WRITE, ZERO, data_of, draw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("stopfile")
    ap.add_argument("logfile")
    ap.add_argument("--block", type=int, default=65536)
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--mix", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--flush-every", type=int, default=16)
    ap.add_argument("--pause", type=float, default=0.002)
    ap.add_argument("--ops", type=int, default=0, help="stop after this many operations (0: at STOPFILE only)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    h = nbd.NBD()
    h.connect_uri(args.uri)
    acked: dict[int, int] = {}  # block -> seq of its last whole-block write
    ops: list[list[object]] = []
    expect: dict[int, bytearray] = {}  # what each touched block must read back
    errors: list[str] = []
    seq = 0
    with open(args.logfile + ".ready", "w"):
        pass
    while not os.path.exists(args.stopfile) and not (args.ops and seq >= args.ops):
        block = rng.randrange(args.blocks)
        seq += 1
        op = draw(rng, block, seq, args.block, args.mix)
        kind, _, off, length, _ = op
        at = block * args.stride * args.block
        try:
            if block not in expect:
                expect[block] = bytearray(h.pread(args.block, at)) if kind in (PARTIAL, ZERO) else bytearray(args.block)
            if kind in (WRITE, PARTIAL):
                h.pwrite(data_of(op), at + off)
            elif kind == ZERO:
                h.zero(length, at + off)
            elif kind == TRIM:
                h.trim(length, at + off)
            expect[block][off:off + length] = data_of(op)
            ops.append(list(op))
            if kind == WRITE:
                acked[block] = seq
            else:
                acked.pop(block, None)
            if seq % args.flush_every == 0:
                h.flush()
        except nbd.Error as e:
            errors.append(f"{kind} {seq} of block {block}: {e}")
        time.sleep(args.pause)
    h.flush()
    reads_ok = all(h.pread(args.block, b * args.stride * args.block) == bytes(want) for b, want in expect.items())
    h.shutdown()
    with open(args.logfile, "w") as f:
        json.dump({"acked": acked, "ops": ops, "writes": seq, "errors": errors, "reads_ok": reads_ok}, f)


if __name__ == "__main__":
    main()
