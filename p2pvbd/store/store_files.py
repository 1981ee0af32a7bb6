"""The files of a replica store on disk: their names, the meta.bin and state.bin formats, raw I/O helpers.

Split out of replica_store so that module is about the crash rules and the locking, not about byte
layouts, short reads and writes, or hole punching. Nothing here keeps state or takes a lock: each
function works on a path or a file descriptor it is given. Which file holds what, and why a crash leaves
them consistent, is in replica_store's docstring.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pvbd.base.files import fsync_dir
from p2pvbd.store.version_map import HASH_SIZE, blocks_for, check_block_size

DATA_FILE, META_FILE, JOURNAL_FILE, STATE_FILE = "data.raw", "meta.bin", "journal.log", "state.bin"
# What stores of the first format kept their state in (one JSON document, replaced by rename).
LEGACY_STATE_FILE = "state.json"
# A checkpoint renames the active journal to journal.<seq>.log and starts an empty one, so guest writes
# go on while it writes meta.bin; the rotated journals are deleted once meta.bin and state.bin are durable.
ROTATED_JOURNAL_GLOB = "journal.*.log"
# Linux moves at most ~2 GiB per read/write call; 64 MiB also bounds temporary buffers.
IO_CHUNK = 64 * 1024 * 1024
# Zeros per pwrite when the filesystem cannot punch holes.
ZERO_CHUNK = 1024 * 1024
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02  # linux/falloc.h

STATE_FORMAT = 1
# state.bin: two slots written in turn, each magic, CRC32, sequence number, length and a JSON document.
# Rewriting a slot in place and fdatasync-ing it changes no file-system metadata, so it costs one data
# write (a rename and directory sync cost a file-system journal commit: 10-50 ms next to busy disks, on
# the switchover's path). A torn slot fails its CRC and the other one, the previous state, is read.
STATE_SLOT_BYTES = 4096
_STATE_HEAD = struct.Struct("<4sIQI")
STATE_MAGIC = b"P2ST"
META_MAGIC, META_FORMAT = b"P2VBMETA", 1
META_HEADER_SIZE = 64  # magic, format, block size, size, block count; padded so records stay aligned
_META_HEAD = struct.Struct("<8sIIQQ")
META_DTYPE = np.dtype([("version", "<u8"), ("hash", np.uint8, (HASH_SIZE,))])
assert META_DTYPE.itemsize == 24  # ≤ 32 bytes per block is a hard requirement

_fallocate = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


class StoreCorrupt(ValueError):
    """A store file is unreadable or inconsistent with the others."""


# ---- raw I/O ---------------------------------------------------------------------------------------
def pwrite_all(fd: int, buf: Any, offset: int) -> None:
    mv = memoryview(buf).cast("B")
    while mv:
        n = os.pwrite(fd, mv[:IO_CHUNK], offset)
        mv, offset = mv[n:], offset + n


def pread_all(fd: int, length: int, offset: int) -> bytes:
    parts, have = [os.pread(fd, length, offset)], 0
    while (have := have + len(parts[-1])) < length:  # past the file's end reads as zeros, like a hole
        parts.append(os.pread(fd, length - have, offset + have) or bytes(length - have))
    return parts[0] if len(parts) == 1 else b"".join(parts)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range so it reads as zeros; writes zeros where the filesystem cannot punch."""
    if length <= 0:
        return
    if _fallocate is not None and _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    zeros = bytes(min(length, ZERO_CHUNK))
    while length > 0:
        n = os.pwrite(fd, zeros[:length], offset)
        offset, length = offset + n, length - n


def allocated_blocks(fd: int, size: int, block_size: int) -> npt.NDArray[np.bool_]:
    """Blocks with allocated extents in the file, found with SEEK_DATA/SEEK_HOLE without reading."""
    return allocated_in(fd, 0, size, block_size)


def allocated_in(fd: int, start: int, end: int, block_size: int) -> npt.NDArray[np.bool_]:
    """Which blocks of bytes [start, end) (``start`` a multiple of ``block_size``) have allocated extents. A
    file system without SEEK_DATA reports everything allocated."""
    first = start // block_size
    mask, off = np.zeros(blocks_for(end - start, block_size), np.bool_), start
    while off < end:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            break
        if data >= end:
            break
        off = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        mask[data // block_size - first:-(-off // block_size) - first] = True
    return mask


def rotated_journals(directory: Path) -> list[tuple[int, Path]]:
    """Journals a checkpoint rotated away and did not finish with, oldest first."""
    out = []
    for p in directory.glob(ROTATED_JOURNAL_GLOB):
        seq = p.name.split(".")[1]
        if seq.isdigit():
            out.append((int(seq), p))
    return sorted(out)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


# ---- the store's files -----------------------------------------------------------------------------
def create_store_files(directory: Path, state: dict[str, Any]) -> None:
    """A sparse data.raw, an empty journal, meta.bin of version-0 records, and state.bin last.

    ``state`` holds every state field but the format. A failure removes what was made."""
    size, block_size = state["size"], state["block_size"]
    n = blocks_for(size, block_size)
    if any((directory / f).exists() for f in (STATE_FILE, LEGACY_STATE_FILE, DATA_FILE, META_FILE)):
        raise FileExistsError(f"a disk store already exists in {directory}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    meta_head = _META_HEAD.pack(META_MAGIC, META_FORMAT, block_size, size, n)
    files = ((DATA_FILE, size, b""), (JOURNAL_FILE, 0, b""),
             (META_FILE, META_HEADER_SIZE + n * META_DTYPE.itemsize, meta_head))
    made: list[Path] = []
    try:
        for fname, length, head in files:
            fd = os.open(directory / fname, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            made.append(directory / fname)
            try:
                os.ftruncate(fd, length)  # sparse: never-written blocks are zeros with version-0 records
                pwrite_all(fd, head, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        create_state(directory, state)  # last: marks the store complete
    except BaseException:
        for p in made:
            p.unlink(missing_ok=True)
        raise


def _state_slot(state: dict[str, Any], seq: int) -> bytes:
    payload = json.dumps({"format": STATE_FORMAT, **state}).encode()
    if len(payload) > STATE_SLOT_BYTES - _STATE_HEAD.size:
        raise ValueError(f"store state of {len(payload)} bytes does not fit a {STATE_SLOT_BYTES}-byte slot")
    body = struct.pack("<QI", seq, len(payload)) + payload
    return (STATE_MAGIC + struct.pack("<I", zlib.crc32(body)) + body).ljust(STATE_SLOT_BYTES, b"\0")


def create_state(directory: Path, state: dict[str, Any]) -> None:
    """state.bin with ``state`` as sequence 1 (in slot 1, as write_state places it) and an empty slot 0,
    durable with its directory entry."""
    fd = os.open(directory / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        pwrite_all(fd, bytes(STATE_SLOT_BYTES) + _state_slot(state, 1), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(directory)


def write_state(directory: Path, state: dict[str, Any], seq: int) -> None:
    """Write ``state`` as sequence ``seq`` into its slot (the other one keeps the previous state)."""
    fd = os.open(directory / STATE_FILE, os.O_WRONLY | os.O_CLOEXEC)
    try:
        pwrite_all(fd, _state_slot(state, seq), (seq % 2) * STATE_SLOT_BYTES)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def read_state(directory: Path) -> tuple[dict[str, Any], int]:
    """The newest intact state and its sequence number (0: read from a first-format state.json)."""
    path = directory / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if (directory / LEGACY_STATE_FILE).exists():
            return _checked_state(directory / LEGACY_STATE_FILE, (directory / LEGACY_STATE_FILE).read_bytes()), 0
        raise FileNotFoundError(f"no disk store in {directory} (missing {STATE_FILE})") from None
    slots = []
    for k in range(2):
        slot = raw[k * STATE_SLOT_BYTES:(k + 1) * STATE_SLOT_BYTES]
        if len(slot) < _STATE_HEAD.size:
            continue
        magic, crc, seq, length = _STATE_HEAD.unpack_from(slot)
        body = slot[8:_STATE_HEAD.size + length]
        if magic == STATE_MAGIC and length <= STATE_SLOT_BYTES - _STATE_HEAD.size and zlib.crc32(body) == crc:
            slots.append((seq, slot[_STATE_HEAD.size:_STATE_HEAD.size + length]))
    if not slots:
        raise StoreCorrupt(f"{path}: no intact state slot")
    seq, payload = max(slots)
    return _checked_state(path, payload), seq


def _checked_state(path: Path, payload: bytes) -> dict[str, Any]:
    try:
        state = json.loads(payload)
    except ValueError as e:
        raise StoreCorrupt(f"{path}: {e}") from e
    types = {"format": int, "name": str, "size": int, "block_size": int, "owner": str, "epoch": int,
             "counter": int, "clean": bool}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in types.items()):
        raise StoreCorrupt(f"{path}: missing or mistyped fields (expected {sorted(types)})")
    handed_from = state.get("handed_from", [])  # absent in stores written before it existed
    if not isinstance(handed_from, list) or not all(isinstance(h, str) for h in handed_from):
        raise StoreCorrupt(f"{path}: handed_from must be a list of host names")
    if state["format"] != STATE_FORMAT:
        raise StoreCorrupt(f"{path}: format {state['format']}, this version reads {STATE_FORMAT}")
    check_block_size(state["block_size"])
    return state


def load_meta(path: Path, size: int, block_size: int) -> npt.NDArray[Any]:
    n = blocks_for(size, block_size)
    with open(path, "rb") as f:
        if _META_HEAD.unpack_from(f.read(META_HEADER_SIZE).ljust(META_HEADER_SIZE, b"\0")) != (
                META_MAGIC, META_FORMAT, block_size, size, n):
            raise StoreCorrupt(f"{path}: header does not match a {size}-byte disk of {block_size}-byte blocks")
        if (actual := os.fstat(f.fileno()).st_size) != (expected := META_HEADER_SIZE + n * META_DTYPE.itemsize):
            raise StoreCorrupt(f"{path}: {actual} bytes, expected {expected}")
        return np.fromfile(f, META_DTYPE, count=n)


def write_meta_runs(path: Path, pieces: list[tuple[int, npt.NDArray[Any]]]) -> None:
    """Write (first block, records) pieces into meta.bin and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for first, records in pieces:
            pwrite_all(fd, records.view(np.uint8), META_HEADER_SIZE + first * META_DTYPE.itemsize)
        os.fsync(fd)
    finally:
        os.close(fd)
