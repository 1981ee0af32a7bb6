"""Random data spread over a disk: COUNT blocks of BLOCK bytes, block i at (OFFSET + i x STRIDE) x BLOCK.

Run with /usr/bin/python3 (python3-libnbd is a Debian package). Writes are pipelined (libnbd aio) and
end with a flush. Random bytes do not compress, so every one of them crosses a link when replicated.

usage: scale_writer.py URI --count N --stride S [--offset K] [--block 65536]
"""

from __future__ import annotations

import argparse
import os

import nbd

# Writes in flight at once: enough to keep the daemon busy, few enough to bound memory (x BLOCK bytes).
IN_FLIGHT = 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--stride", type=int, required=True, help="blocks between two written blocks")
    ap.add_argument("--offset", type=int, default=0, help="block of the first write")
    ap.add_argument("--block", type=int, default=65536)
    args = ap.parse_args()
    h = nbd.NBD()
    h.connect_uri(args.uri)
    for i in range(args.count):
        while h.aio_in_flight() >= IN_FLIGHT:
            h.poll(-1)
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(os.urandom(args.block))),
                     (args.offset + i * args.stride) * args.block)
    while h.aio_in_flight():
        h.poll(-1)
    h.flush()
    h.shutdown()


if __name__ == "__main__":
    main()
