"""What a verifying guest wrote, as data: its operations, and the disk content they promise.

Shared by the guest program (tests/workload.py, run under the system Python for libnbd) and the tests,
which rebuild the promised disk from the guest's log and compare it with whoever owns the disk. Pure.
"""

from __future__ import annotations

import os
import random
import struct

# An operation: kind, block, offset inside the block, length, sequence number.
Op = tuple[str, int, int, int, int]
WRITE, PARTIAL, ZERO, TRIM = "write", "partial", "zero", "trim"
# Share of each kind in a mixed workload: mostly whole-block writes, as a file system's data; partial
# writes (metadata, logs), zeroes and trims as a guest's file system issues them.
MIX = ((WRITE, 0.70), (PARTIAL, 0.15), (ZERO, 0.10), (TRIM, 0.05))
# Partial writes and zeroes are whole sectors, as every block device client sends them.
SECTOR = 512


def pattern(block: int, seq: int, size: int) -> bytes:
    """Content naming its block and sequence number, so a misplaced or stale block is recognised."""
    head = struct.pack(">QQ", block, seq)
    return (head * (size // len(head) + 1))[:size]


def draw(rng: random.Random, block: int, seq: int, block_size: int, mixed: bool) -> Op:
    """The next operation on ``block``: a whole-block write, or with ``mixed`` any kind of MIX."""
    kind = WRITE
    if mixed:
        r, acc = rng.random(), 0.0
        for kind, share in MIX:  # noqa: B007 - the last kind wins a rounding remainder
            acc += share
            if r < acc:
                break
    if kind in (WRITE, TRIM):
        return kind, block, 0, block_size, seq
    sectors = block_size // SECTOR
    first = rng.randrange(sectors)
    return kind, block, first * SECTOR, rng.randint(1, sectors - first) * SECTOR, seq


def data_of(op: Op) -> bytes:
    """The bytes an operation leaves in its range (trims read back as zeros on this disk)."""
    kind, block, off, length, seq = op
    if kind in (ZERO, TRIM):
        return bytes(length)
    return pattern(block, seq, off + length)[off:]


def apply_to_image(path: str | os.PathLike[str], ops: list[Op], block_size: int, stride: int = 1) -> None:
    """Write the guest's operations, in order, into a (sparse) image file: the disk it was promised."""
    fd = os.open(path, os.O_RDWR)
    try:
        for op in ops:
            _, block, off, _, _ = op
            os.pwrite(fd, data_of(op), block * stride * block_size + off)
    finally:
        os.close(fd)
