"""The shapes of version-map messages between hosts: block lists, records and digests as compact bytes.

Hosts compare maps through their summaries (map_tree): a root, node digests under differing nodes, the
records of differing leaves, a change feed. This module turns those arrays into msgpack ``bin`` values
and back, and checks everything a peer sends against the limits below before anything is allocated.
Pure: no sockets, no trio.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from p2pvbd.store.map_tree import FANOUT, NODE_DIGEST_SIZE, RECORD_DTYPE, ROOT_DIGEST_SIZE
from p2pvbd.wire.peer_wire import MAX_FRAME_BYTES, FrameError

# Parents per map_nodes request: their children are at most 64 Ki digests, 1 MiB in the reply.
MAX_NODE_PARENTS = 1024
# Blocks per map_entries request or change-feed page: 1 MiB of indexes before compression and 3 MiB of
# records in the reply, inside one 8 MiB peer frame even when nothing compresses.
MAX_ENTRY_BLOCKS = 1 << 17
# zstd level 1: sorted index deltas and sparse records shrink 5-50x at hundreds of MB/s.
_ZSTD_LEVEL = 1
# zstd's worst case adds well under 1 % to incompressible input; the rest of a frame is envelope.
assert MAX_ENTRY_BLOCKS * (RECORD_DTYPE.itemsize + 8) * 1.01 < MAX_FRAME_BYTES - 64 * 1024

Blocks = npt.NDArray[np.int64]
Records = npt.NDArray[Any]


def _compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)


def _decompress(data: Any, expected: int, what: str) -> bytes:
    if not isinstance(data, bytes):
        raise FrameError(f"{what} must be bytes")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected) if expected else b""
    except zstandard.ZstdError as e:
        raise FrameError(f"undecodable {what}: {e}") from e
    if len(out) != expected:
        raise FrameError(f"{what}: {len(out)} bytes, expected {expected}")
    return out


def pack_blocks(blocks: Blocks) -> dict[str, Any]:
    """Sorted unique block indexes as {count, deltas}: the gaps between neighbours, zstd-compressed."""
    blocks = np.asarray(blocks, np.int64)
    deltas = np.diff(blocks, prepend=np.int64(-1)).astype("<u8")
    return {"count": int(blocks.size), "deltas": _compress(deltas.tobytes())}


def unpack_blocks(value: Any, n_blocks: int, limit: int = MAX_ENTRY_BLOCKS) -> Blocks:
    """Inverse of pack_blocks; FrameError unless sorted, unique, inside the disk and at most ``limit``."""
    if not isinstance(value, dict) or not isinstance(value.get("count"), int) or isinstance(value["count"], bool):
        raise FrameError("a block list must be {count, deltas}")
    count = value["count"]
    if not 0 <= count <= limit:
        raise FrameError(f"{count} blocks in one message; at most {limit}")
    deltas = np.frombuffer(_decompress(value.get("deltas"), 8 * count, "block list"), "<u8")
    if count and (deltas[0] > np.uint64(n_blocks) or (deltas[1:] == 0).any() or (deltas > np.uint64(n_blocks)).any()):
        raise FrameError("block list is not sorted and unique inside the disk")
    blocks = np.cumsum(deltas.astype(np.int64)) - 1
    if count and (blocks[0] < 0 or blocks[-1] >= n_blocks):
        raise FrameError("block list reaches outside the disk")
    return blocks


def pack_records(records: Records) -> bytes:
    return _compress(np.ascontiguousarray(records, RECORD_DTYPE).tobytes())


def unpack_records(value: Any, count: int) -> Records:
    """``count`` (version, hash) records, as a fresh array."""
    return np.frombuffer(_decompress(value, count * RECORD_DTYPE.itemsize, "records"), RECORD_DTYPE).copy()


def pack_parents(parents: npt.NDArray[np.int64]) -> bytes:
    return np.asarray(parents, "<i8").tobytes()


def unpack_parents(value: Any, bound: int) -> npt.NDArray[np.int64]:
    """Parent node indexes of a map_nodes request: at most MAX_NODE_PARENTS, each in 0..bound-1."""
    if not isinstance(value, bytes) or len(value) % 8 or len(value) > 8 * MAX_NODE_PARENTS:
        raise FrameError(f"parents must be at most {MAX_NODE_PARENTS} little-endian int64 values")
    parents = np.frombuffer(value, "<i8").astype(np.int64)
    if parents.size and (parents.min() < 0 or parents.max() >= bound):
        raise FrameError(f"a parent index is outside 0..{bound - 1}")
    return parents


def unpack_digests(value: Any, count: int) -> npt.NDArray[np.uint8]:
    if not isinstance(value, bytes) or len(value) != count * NODE_DIGEST_SIZE:
        raise FrameError(f"expected {count} node digests")
    return np.frombuffer(value, np.uint8).reshape(count, NODE_DIGEST_SIZE)


def check_root(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != ROOT_DIGEST_SIZE:
        raise FrameError(f"a map root is {ROOT_DIGEST_SIZE} bytes")
    return value


assert MAX_NODE_PARENTS * FANOUT * NODE_DIGEST_SIZE <= MAX_FRAME_BYTES // 4
