"""The replica store's redo journals: 48-byte CRC-checked records, and replaying them over the metadata.

Split out of replica_store so the record format and the recovery rules read on their own, apart from
locking and file handling. Everything here works on bytes and numpy arrays: replica_store appends the
records, reads the data replay asks about, and punches the holes replay decides on. The crash rule the
records implement (intent before data, SYNC vouching for what precedes it) is in replica_store's docstring.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from p2pvbd.store.version_map import NO_HASH, zero_hash

# Journal record: crc32 of the rest, kind, first block (SYNC: covered offset), count, version, hash.
_CRC, _REC_BODY = struct.Struct("<I"), struct.Struct("<B3xQQQ16s")
REC_SIZE = _CRC.size + _REC_BODY.size  # 48
DIRTY, ZERO, SETTLE, PUT, SYNC, ACTIVE, RETIRE = 1, 2, 3, 4, 5, 6, 7
# What an ACTIVE record says is about to be written in its area (its version field, a bit mask).
GUEST_WRITES, PEER_BLOCKS = 1, 2
# Replay verdicts per block (0: metadata already right).
KEEP, FRESH, CHECK_SETTLE, CHECK_PUT, REDO_ZERO, CHECK_GUEST_AREA, CHECK_PEER_AREA = 1, 2, 3, 4, 5, 6, 7

# A parsed record: end offset in the journal, kind, first block, count, version, hash.
JournalRecord = tuple[int, int, int, int, int, bytes]


def journal_record(kind: int, first: int, count: int = 1, version: int = 0, digest: bytes = NO_HASH) -> bytes:
    body = _REC_BODY.pack(kind, first, count, version, digest)
    return _CRC.pack(zlib.crc32(body)) + body


def parse_journal(buf: bytes, n_blocks: int) -> list[JournalRecord]:
    """(end offset, kind, first, count, version, hash) up to the first torn, corrupt or nonsensical record."""
    out = []
    for off in range(0, len(buf) - REC_SIZE + 1, REC_SIZE):
        body = buf[off + _CRC.size:off + REC_SIZE]
        if _CRC.unpack_from(buf, off)[0] != zlib.crc32(body):
            break
        kind, first, count, version, digest = _REC_BODY.unpack(body)
        if kind == SYNC:
            if first > off:  # a SYNC vouches only for records before itself
                break
        elif kind not in (DIRTY, ZERO, SETTLE, PUT, ACTIVE, RETIRE) or not 0 < count <= n_blocks - first or (
                kind in (SETTLE, PUT) and count != 1):
            break
        out.append((off + REC_SIZE, kind, first, count, version, digest))
    return out


def records_end(buf: bytes, n_blocks: int) -> int:
    """Where a journal's records end: its file goes on with zeros written ahead of them."""
    recs = parse_journal(buf, n_blocks)
    return recs[-1][0] if recs else 0


def set_zero_hashes(hashes: npt.NDArray[np.uint8], a: int, b: int, block_size: int, tail: int) -> None:
    """Give blocks [a, b) the hash of zero data; the disk's last block, ``tail`` bytes long, its own."""
    if b > a:
        hashes[a:b] = np.frombuffer(zero_hash(block_size), np.uint8)
        if b == len(hashes):
            hashes[b - 1] = np.frombuffer(zero_hash(tail), np.uint8)


def replay(journals: list[bytes], versions: npt.NDArray[np.uint64], hashes: npt.NDArray[np.uint8],
           changed: npt.NDArray[np.bool_], block_size: int, tail: int) -> tuple[npt.NDArray[np.uint8], int]:
    """Redo the journals' records, oldest journal first, over the metadata arrays in place, marking the
    blocks they touch ``changed``.

    Returns a verdict per block (an empty array without records) on what the data must still confirm,
    and the newest version the metadata or the journals name. Records a SYNC vouches for are trusted: a
    SYNC vouches for the records before it in its own journal and, since the data sync before it covered
    everything written earlier, for every record of the older journals a checkpoint had rotated away.

    An area still active at the end (an ACTIVE record no RETIRE followed) may hold data whose own record
    never became durable: each of its blocks no other record accounts for is re-checked against its data
    too (CHECK_GUEST_AREA, or CHECK_PEER_AREA where only peers' blocks were written there)."""
    parsed = [parse_journal(j, len(versions)) for j in journals]
    newest = max([int(versions.max(initial=0)), *(r[4] for recs in parsed for r in recs if r[1] != ACTIVE)])
    verdicts = np.zeros(len(versions) if any(parsed) else 0, np.uint8)
    still_active: list[tuple[int, int, int]] = []  # (first block, blocks, what was written there)
    for k, recs in enumerate(parsed):
        # A RETIRE vouches only for records of its own journal: an older journal's tail may not be durable.
        active: dict[int, tuple[int, int]] = {}
        later_sync = any(r[1] == SYNC for later in parsed[k + 1:] for r in later)
        trusted_end = float("inf") if later_sync else max((r[2] for r in recs if r[1] == SYNC), default=0)
        for end, kind, first, count, version, digest in recs:
            if kind == SYNC:
                continue
            if kind == ACTIVE:
                active[first] = (count, version)
                continue
            if kind == RETIRE:
                active.pop(first, None)
                continue
            trusted, sl = end <= trusted_end, slice(first, first + count)
            versions[sl] = version
            changed[sl] = True
            if kind == DIRTY:
                verdicts[sl] = KEEP if trusted else FRESH
            elif kind == ZERO:
                set_zero_hashes(hashes, first, first + count, block_size, tail)
                verdicts[sl] = 0 if trusted else REDO_ZERO
            else:
                hashes[first] = np.frombuffer(digest, np.uint8)
                verdicts[first] = 0 if trusted else CHECK_SETTLE if kind == SETTLE else CHECK_PUT
        still_active += [(first, count, written) for first, (count, written) in active.items()]
    for first, count, written in still_active:
        sl = slice(first, first + count)
        area = verdicts[sl]
        if written & GUEST_WRITES:  # guest data wins: it is new content, where a peer's block can be fetched again
            area[(area == 0) | (area == CHECK_PEER_AREA)] = CHECK_GUEST_AREA
        else:
            area[area == 0] = CHECK_PEER_AREA
        changed[sl] = True
    return verdicts, newest


def check_against_data(verdicts: npt.NDArray[np.uint8], versions: npt.NDArray[np.uint64],
                       hashes: npt.NDArray[np.uint8], counter: int,
                       data_hash: Callable[[int], tuple[bytes, bool]]) -> tuple[int, list[int]]:
    """Settle the blocks with a verdict other than REDO_ZERO against ``data_hash(i)``: the hash of their data,
    and whether it is all zeros.

    Unvouched guest data is new content: it gets one new version past ``counter``. A replicated block whose
    data did not land drops to version 0, missing. Returns the counter and those missing blocks, whose data
    the caller punches out so they can be fetched again."""
    fresh, missing = 0, []
    for i in np.flatnonzero((verdicts != 0) & (verdicts != REDO_ZERO)).tolist():
        digest, is_zero = data_hash(i)
        if verdicts[i] == KEEP or digest == hashes[i].tobytes():
            hashes[i] = np.frombuffer(digest, np.uint8)
        elif verdicts[i] in (CHECK_GUEST_AREA, CHECK_PEER_AREA) and versions[i] == 0 and is_zero:
            continue  # never written, and still zeros
        elif verdicts[i] in (FRESH, CHECK_SETTLE, CHECK_GUEST_AREA):  # unvouched guest data: new content, new version
            counter = fresh = fresh or counter + 1
            hashes[i] = np.frombuffer(digest, np.uint8)
            versions[i] = fresh
        else:
            versions[i], hashes[i] = 0, 0
            missing.append(i)
    return counter, missing
