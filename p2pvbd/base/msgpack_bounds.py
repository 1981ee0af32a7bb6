"""msgpack decoding within stated bounds: what one frame may expand to (lengths, containers, values, depth).

Every socket that takes msgpack from elsewhere (peers, the join port, the index, the control socket)
decodes through here, so a small frame can never grow into a large object graph or a deep recursion.
Pure: no sockets, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

# Legitimate frames nest at most ~6 deep (envelope, body, a VM definition's disks, ...); msgpack's own stack
# stops at 1024, deep enough to break code that walks a body recursively.
MAX_FRAME_DEPTH = 32


class FrameError(Exception):
    """The byte stream is not our protocol; the connection cannot continue."""


@dataclass(frozen=True)
class FrameLimits:
    """What a frame may hold, checked while it is decoded: its bytes, each str/bin/list/map's length, the
    lists and maps in it (containers), the values inside them (elements) and how deep they nest."""

    frame_bytes: int
    str_len: int
    bin_len: int
    array_len: int
    map_len: int
    containers: int
    elements: int
    depth: int

    @property
    def decoded_bytes(self) -> int:
        """A bound on what one decoded frame holds: its str/bin payloads (at most its bytes), each element
        at most a pointer and a small object (64 bytes), each container at most an empty dict or list's
        header and a hash table's growth (256 bytes)."""
        return self.frame_bytes + 64 * self.elements + 256 * self.containers


class _Budget:
    """Counts a frame's containers and elements as msgpack builds them (its list and map hooks run once per
    list or map, innermost first), and their depth; raises FrameError once any exceeds ``limits``. The work
    is one call per container and a look at each element of a list or map holding containers."""

    def __init__(self, limits: FrameLimits) -> None:
        self.limits = limits
        self.containers = 0
        self.elements = 0
        self.depths: dict[int, int] = {}  # id -> depth of each container decoded so far (all alive until the end)

    def _count(self, obj: Any, n: int, children: Any) -> Any:
        self.containers += 1
        self.elements += n
        if self.containers > self.limits.containers:
            raise FrameError(f"more than {self.limits.containers} lists and maps in one frame")
        if self.elements > self.limits.elements:
            raise FrameError(f"more than {self.limits.elements} values in one frame")
        depths, depth = self.depths, 1
        if depths:
            for child in children:
                d = depths.get(id(child))
                if d is not None and d >= depth:
                    depth = d + 1
        if depth > self.limits.depth:
            raise FrameError(f"lists and maps nested deeper than {self.limits.depth}")
        depths[id(obj)] = depth
        return obj

    def list_hook(self, obj: list[Any]) -> list[Any]:
        return self._count(obj, len(obj), obj)  # type: ignore[no-any-return]

    def object_hook(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._count(obj, 2 * len(obj), obj.values())  # type: ignore[no-any-return]


def unpack_bounded(payload: bytes | memoryview, limits: FrameLimits) -> Any:
    """One msgpack value (str keys, no ext types) decoded within ``limits``, or FrameError."""
    budget = _Budget(limits)
    try:
        obj = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, max_str_len=limits.str_len, max_bin_len=limits.bin_len,
            max_array_len=limits.array_len, max_map_len=limits.map_len,
            max_ext_len=0,  # no ext types in this protocol
            list_hook=budget.list_hook, object_hook=budget.object_hook,
        )
    except msgpack.ExtraData:
        raise FrameError("trailing bytes after the frame's message") from None
    except FrameError as e:
        raise FrameError(f"undecodable frame: {e}") from None
    except Exception as e:
        # msgpack raises a zoo of types (OutOfData, FormatError, StackError, ValueError on limits,
        # UnicodeDecodeError, TypeError on unhashable keys...); all mean the same thing here.
        raise FrameError(f"undecodable frame: {type(e).__name__}: {e}") from e
    return obj
