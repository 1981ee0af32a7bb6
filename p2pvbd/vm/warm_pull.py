"""A VM's memory from many peers: a move's destination fills its image of the VM's memory from the hosts
that keep it warm, while the disks converge, so that QEMU's stream then sends those pages by reference.

Example: the VM runs at office-pc, home-pc keeps its memory warm (`vm replicate vm1 --on home-pc`), the
VM moves to car-pc, which holds nothing of it. The source (office-pc, the owner of the VM's first disk,
the only host whose word a warm host takes) first tells each warm host that the destination may read its
copy for this move (``vm_warm_grant``); ``vm_incoming`` then names those hosts, and the destination asks
each for the digests of the pages it keeps (``vm_warm_index``) and reads the pages it lacks
(``vm_warm_read``), spread over the hosts that offer them, into the same image files a departing VM
leaves (vm/ram_image.py). Once the disks are ready the source asks which pages the destination holds
(``vm_ram_held``); the destination stops pulling then, after at most WARM_PULL_GRACE_SECONDS more, so
the pull never delays the move by more than that. Each page read is checked against the digest its
holder named, and the move's references are checked again against the source's digests: a stale or
damaged warm copy costs bytes, never a wrong page.

A warm copy is as secret as the VM's disks: a warm host serves it only to a host the owner granted it to,
for WARM_GRANT_SECONDS, and to the owner itself.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import zstandard

from p2pvbd.migration import failpoints
from p2pvbd.swarm.access import PeerOp
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.vm.ram_image import DIGEST_BYTES, IMAGE, INDEX, LAYOUT, PREFIX_BYTES, page_digest
from p2pvbd.vm.warm import RAM_BLOCK, write_pages
from p2pvbd.wire.qemu_stream import PAGE_SIZE

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm
    from p2pvbd.vm.book import VmBook
    from p2pvbd.vm.runner import VmRunner

log = logging.getLogger(__name__)

# Where a page the destination pulled from a warm host was found, as `migrate --json` counts references.
SOURCE_WARM_PEER = "warm-peer"
# A grant lets the destination read for as long as a move's memory copy may take (vm/move.RAM_TIMEOUT).
WARM_GRANT_SECONDS = 3600.0
# Digests per vm_warm_index reply: 512 KiB, well inside a peer frame (8 MiB); a 1 GiB guest takes 16.
WARM_INDEX_PAGES = 16384
# Pages per vm_warm_read: 1 MiB before compression (as one piece of QEMU's stream), inside a peer frame.
WARM_READ_PAGES = 256
# Reads in flight to one warm host: keeps a link with 10-50 ms round trips busy, as the RAM relay does.
WARM_READS_IN_FLIGHT = 4
# Once the disks are ready, the pull gets at most this much longer to finish: the move waits for it.
WARM_PULL_GRACE_SECONDS = 5.0
# Asking a warm host to let the destination read: a message of a few bytes; an unreachable host is skipped.
GRANT_TIMEOUT = 5.0
# One request of the pull: a reply of at most a couple of MiB.
PULL_REQUEST_TIMEOUT = 30.0
WARM_ZSTD_LEVEL = 1
_OFFSET = struct.Struct(">Q")
_EMPTY = bytes(DIGEST_BYTES)
_ZERO_DIGEST = page_digest(bytes(PAGE_SIZE))


def image_takes_pages(directory: Path, size: int) -> bool:
    """Whether pulled pages can go into the image kept in ``directory`` without losing any of it: there is
    none, or it is a warm copy of a RAM block of ``size`` (the image a VM left behind, laid out as QEMU's
    stream was, is kept as it is: the pull is skipped)."""
    if not (directory / LAYOUT).exists() and not (directory / INDEX).exists():
        return True
    try:
        blocks = json.loads((directory / LAYOUT).read_text())["blocks"]
        return bool(next(iter(blocks.items()), None) == (RAM_BLOCK, size))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def read_index(directory: Path, first: int, count: int) -> bytes:
    """Digests of pages ``first``… of the image (all zero: none kept), at most ``count`` (blocking)."""
    try:
        with (directory / INDEX).open("rb") as f:
            f.seek(first * DIGEST_BYTES)
            return f.read(count * DIGEST_BYTES)
    except OSError:
        return b""


def read_pages(directory: Path, slots: list[int]) -> bytes:
    """Those pages of the image, zstd-packed (blocking)."""
    fd = os.open(directory / IMAGE, os.O_RDONLY)
    try:
        data = b"".join(os.pread(fd, PAGE_SIZE, s * PAGE_SIZE).ljust(PAGE_SIZE, b"\0") for s in slots)
    finally:
        os.close(fd)
    return zstandard.ZstdCompressor(level=WARM_ZSTD_LEVEL).compress(data)


def plan_pull(own: bytes, offers: Mapping[str, bytes], on_disk: frozenset[bytes] = frozenset()) -> dict[str, list[int]]:
    """Which pages to read from which warm host: each page whose digest the destination does not hold
    (``own``: its image's index) and some host offers, from the offering host with the fewest assigned so
    far (the first host's digest counts where hosts disagree: either may be stale, and the move's own
    check decides). Zero pages are left out: QEMU sends those as a flag; so are the pages whose digest
    starts as one of ``on_disk`` (PREFIX_BYTES each): the guest's page cache, which the source sends as
    references into the destination's disk replicas."""
    held = {own[i:i + DIGEST_BYTES] for i in range(0, len(own), DIGEST_BYTES)}
    plan: dict[str, list[int]] = {host: [] for host in offers}
    pages = max((len(d) for d in offers.values()), default=0) // DIGEST_BYTES
    for slot in range(pages):
        at = slice(slot * DIGEST_BYTES, (slot + 1) * DIGEST_BYTES)
        wanted: bytes | None = None
        hosts: list[str] = []
        for host, index in offers.items():
            digest = index[at]
            if (len(digest) != DIGEST_BYTES or digest in (_EMPTY, _ZERO_DIGEST) or digest in held
                    or digest[:PREFIX_BYTES] in on_disk):
                continue
            if wanted is None:
                wanted = digest
            if digest == wanted:
                hosts.append(host)
        if hosts:
            plan[min(hosts, key=lambda h: len(plan[h]))].append(slot)
    return {h: slots for h, slots in plan.items() if slots}


def take_pages(directory: Path, size: int, slots: list[int], index: bytes, data: bytes) -> list[bytes]:
    """Put the pages a warm host sent for ``slots`` into the image, each only if it has the digest the host's
    index named for it (blocking). Returns the digests of the pages taken."""
    try:
        if not 0 <= zstandard.frame_content_size(data) <= len(slots) * PAGE_SIZE:
            return []
        pages = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError:
        return []
    if len(pages) != len(slots) * PAGE_SIZE:
        return []
    offsets, good, digests = [], [], []
    for i, slot in enumerate(slots):
        page = pages[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        digest = page_digest(page)
        if digest == index[slot * DIGEST_BYTES:(slot + 1) * DIGEST_BYTES]:
            offsets.append(slot * PAGE_SIZE)
            good.append(page)
            digests.append(digest)
    if offsets:
        write_pages(directory, size, offsets, b"".join(good))
    return digests


@dataclass
class PullStats:
    """What a pull brought: bytes that crossed and pages taken, per warm host; the digests taken."""
    wire_bytes: dict[str, int] = field(default_factory=dict)
    pages: dict[str, int] = field(default_factory=dict)
    digests: list[bytes] = field(default_factory=list)

    def add(self, host: str, wire: int, pages: int = 0) -> None:
        self.wire_bytes[host] = self.wire_bytes.get(host, 0) + wire
        self.pages[host] = self.pages.get(host, 0) + pages


async def pull_warm(swarm: Swarm, vm: str, size: int, hosts: list[str], directory: Path, stats: PullStats,
                    on_disk: frozenset[bytes] = frozenset()) -> None:
    """Fill the image in ``directory`` with the pages of VM ``vm`` (``size`` bytes of memory) that ``hosts``
    keep warm and this host lacks, but those ``on_disk`` (see plan_pull). Cancelling it at any point leaves
    a consistent image (each page is written before its digest)."""
    pages = size // PAGE_SIZE
    offers: dict[str, bytes] = {}

    async def index_of(host: str) -> None:
        try:
            conn = await swarm.connect(host)
            parts = []
            for first in range(0, pages, WARM_INDEX_PAGES):
                reply = await conn.request("vm_warm_index", {"vm": vm, "first": first,
                                                             "count": min(WARM_INDEX_PAGES, pages - first)},
                                           timeout=PULL_REQUEST_TIMEOUT)
                digests = reply.get("digests")
                if not isinstance(digests, bytes):
                    raise PeerError("bad_reply", "vm_warm_index without digests")
                stats.add(host, len(digests))
                parts.append(digests)
                if len(digests) < min(WARM_INDEX_PAGES, pages - first) * DIGEST_BYTES:
                    break  # its copy is shorter: the rest it does not keep
            offers[host] = b"".join(parts)
        except (PeerError, OSError) as e:
            log.info("VM %s: %s's warm copy of its memory is not to be had (%s)", vm, host, e)

    async with trio.open_nursery() as nursery:
        for host in hosts:
            nursery.start_soon(index_of, host)
    own = await trio.to_thread.run_sync(read_index, directory, 0, pages)
    plan = await trio.to_thread.run_sync(plan_pull, own, {h: offers[h] for h in hosts if h in offers}, on_disk)
    await failpoints.pause("vm.warm_pull")

    async def read_from(host: str, slots: list[int]) -> None:
        index = offers[host]
        limit = trio.Semaphore(WARM_READS_IN_FLIGHT)
        conn = await swarm.connect(host)

        async def batch(part: list[int]) -> None:
            try:
                reply = await conn.request("vm_warm_read", {"vm": vm, "offsets": b"".join(
                    _OFFSET.pack(s * PAGE_SIZE) for s in part)}, timeout=PULL_REQUEST_TIMEOUT)
                data = reply.get("data")
                if isinstance(data, bytes):
                    taken = await trio.to_thread.run_sync(take_pages, directory, size, part, index, data)
                    stats.add(host, len(data), len(taken))
                    stats.digests.extend(taken)
            finally:
                limit.release()

        async with trio.open_nursery() as nursery:
            for at in range(0, len(slots), WARM_READ_PAGES):
                await limit.acquire()
                nursery.start_soon(batch, slots[at:at + WARM_READ_PAGES])

    async def guarded(host: str, slots: list[int]) -> None:
        try:
            await read_from(host, slots)
        except (PeerError, OSError) as e:
            log.info("VM %s: reading %s's warm copy of its memory stopped: %s", vm, host, e)

    async with trio.open_nursery() as nursery:
        for host, slots in plan.items():
            nursery.start_soon(guarded, host, slots)


async def grant_warm(swarm: Swarm, vm: str, dest: str, hosts: Sequence[str]) -> list[str]:
    """The source's side: let ``dest`` read VM ``vm``'s memory at each warm host; the hosts that agreed."""
    granted: list[str] = []

    async def grant(host: str) -> None:
        try:
            with trio.fail_after(GRANT_TIMEOUT):
                conn = await swarm.connect(host)
                await conn.request("vm_warm_grant", {"vm": vm, "host": dest}, timeout=GRANT_TIMEOUT)
            granted.append(host)
        except (PeerError, OSError, trio.TooSlowError) as e:
            log.info("VM %s: %s's warm copy of its memory is left out of the move (%s)", vm, host, e)

    async with trio.open_nursery() as nursery:
        for host in dict.fromkeys(hosts):
            if host not in (dest, swarm.name):
                nursery.start_soon(grant, host)
    return granted


class WarmReads:
    """A warm host's side: serves its copy of a VM's memory to the hosts the VM's owner granted it to."""

    def __init__(self, runner: VmRunner, book: VmBook) -> None:
        self.runner, self.book = runner, book
        self.grants: dict[tuple[str, str], float] = {}  # (VM, host) -> monotonic time the grant ends

    def ops(self, owner_rule: Any) -> list[PeerOp]:
        """``owner_rule``: warm.WarmMemory's rule, the owner of the VM's first disk as this host knows it."""
        return [PeerOp("vm_warm_grant", owner_rule, self._grant),
                PeerOp("vm_warm_index", self._granted(owner_rule), self._index),
                PeerOp("vm_warm_read", self._granted(owner_rule), self._read)]

    def _granted(self, owner_rule: Any) -> Any:
        async def rule(swarm: Swarm, peer: str, body: dict[str, Any]) -> str | None:
            vm = self.book.get(body.get("vm"))  # type: ignore[arg-type]
            if vm is None:
                return f"no VM {body.get('vm')!r} is known here"
            if self.grants.get((vm.name, peer), 0.0) > time.monotonic():
                return None
            if await owner_rule(swarm, peer, body) is None:
                return None
            return f"{peer} was not granted VM {vm.name}'s memory by its owner"
        return rule

    async def _grant(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        host = body["host"]
        now = time.monotonic()
        self.grants = {k: t for k, t in self.grants.items() if t > now}  # at most one per (VM, host) lives on
        self.grants[(body["vm"], host)] = now + WARM_GRANT_SECONDS
        return {}

    def _pages(self, body: dict[str, Any]) -> int:
        vm = self.book.get(body["vm"])
        assert vm is not None  # the rule found it
        return int(vm.memory) // PAGE_SIZE

    async def _index(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        first, count = body["first"], body["count"]
        pages = self._pages(body)
        if not (0 <= first < pages and 0 < count <= WARM_INDEX_PAGES):
            raise PeerError("bad_request", f"vm_warm_index: first in [0, {pages}), count in (0, {WARM_INDEX_PAGES}]")
        directory = self.runner.paths(body["vm"]).directory
        digests = await trio.to_thread.run_sync(read_index, directory, first, min(count, pages - first))
        return {"digests": digests}

    async def _read(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        offsets, pages = body["offsets"], self._pages(body)
        if len(offsets) % _OFFSET.size or not 0 < len(offsets) // _OFFSET.size <= WARM_READ_PAGES:
            raise PeerError("bad_request", f"vm_warm_read: 1 to {WARM_READ_PAGES} be64 offsets")
        at = [_OFFSET.unpack_from(offsets, i)[0] for i in range(0, len(offsets), _OFFSET.size)]
        if any(o % PAGE_SIZE or o // PAGE_SIZE >= pages for o in at):
            raise PeerError("bad_request", "vm_warm_read: a page outside the VM's memory")
        directory = self.runner.paths(body["vm"]).directory
        try:
            data = await trio.to_thread.run_sync(read_pages, directory, [o // PAGE_SIZE for o in at])
        except OSError:
            raise PeerError("not_found", f"no copy of VM {body['vm']}'s memory is kept here") from None
        return {"data": data}
