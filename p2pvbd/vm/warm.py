"""Warm memory: hosts the owner names keep a copy of a running VM's memory, brought up to date in the
background, so that a move there sends only what changed since their last update.

``p2pvbd vm replicate NAME --on HOST,… [--rate RATE]`` on the VM's host. Every WARM_PASS_SECONDS the
daemon reads the guest's RAM (the ``pc.ram`` block) without pausing it: QEMU, its child, says where that
block lies in its address space (HMP ``gpa2hva``), and the daemon, root, reads it through
``/proc/PID/mem``. Each page is hashed (BLAKE2b-256, in a worker thread); the pages whose digest differs
from what a warm host last received go to it (``vm_warm``, zstd-packed, at most RATE bytes a second).
The warm host writes them into the same image a VM leaves behind when it moves away
(vm/ram_image.py: 0600 files in HOME/vms/NAME), which a move there then draws on by reference; a page
that changed since fails the digest check there and is sent in full. ``--off`` stops the updates and
has the host delete its copy (``vm_warm_drop``). Only the owner of the VM's first disk may send either.

The policy (hosts, rate) is kept on the host that set it, in HOME/vms/NAME/warm.json, and applies while
the VM runs there.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import zstandard

from p2pvbd.swarm.access import PeerOp
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.vm.ram_image import DIGEST_BYTES, IMAGE, INDEX, LAYOUT, delete_image, page_digest
from p2pvbd.wire.qemu_stream import PAGE_SIZE

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm
    from p2pvbd.vm.book import VmBook
    from p2pvbd.vm.runner import VmRunner

log = logging.getLogger(__name__)

# The guest's RAM block, the one that holds nearly all its memory (ROMs and firmware tables are tiny).
RAM_BLOCK = "pc.ram"
# How often a VM's memory is hashed to find what changed: hashing reads all of it (~1 s of one core per
# GiB), so a pass every 10 s costs a 1 GiB guest's host at most a tenth of a core.
WARM_PASS_SECONDS = 10.0
# ... and for a larger guest, passes start no more often than keeps hashing at this share of the time
# (an 8 GiB guest's ~8 s of hashing: a pass every 80 s, not every 10).
WARM_HASH_SHARE = 0.1
# Pages per vm_warm request: 256 KiB before compression, well inside a peer frame.
WARM_BATCH_PAGES = 64
# Without --rate, a warm host gets at most this many bytes a second: a background trickle next to a
# home uplink (20 Mbit/s), so the guest's own traffic keeps the link.
DEFAULT_WARM_RATE = 1_000_000
WARM_ZSTD_LEVEL = 1
POLICY = "warm.json"
_OFFSET = struct.Struct(">Q")
_ZERO_DIGEST = page_digest(bytes(PAGE_SIZE))


@dataclass
class WarmState:
    """A VM's policy on its host, and per warm host what it last received and when it was last current."""
    hosts: list[str] = field(default_factory=list)
    rate: float = DEFAULT_WARM_RATE
    sent: dict[str, bytearray] = field(default_factory=dict)
    current_at: dict[str, float] = field(default_factory=dict)  # wall-clock time of its last full update


# The guest's RAM is read and hashed this much at a time: the daemon never holds more of it.
READ_BYTES = 16 << 20


def hash_ram(pid: int, hva: int, size: int) -> bytearray:
    """Each page's digest, read from QEMU's address space while the guest runs (blocking: a worker
    thread's; the daemon is root and QEMU its child, so /proc/PID/mem is readable)."""
    out = bytearray(size // PAGE_SIZE * DIGEST_BYTES)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for at in range(0, size, READ_BYTES):
            chunk = os.pread(fd, min(READ_BYTES, size - at), hva + at)
            for i in range(0, len(chunk) // PAGE_SIZE):
                slot = at // PAGE_SIZE + i
                page = chunk[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                out[slot * DIGEST_BYTES:(slot + 1) * DIGEST_BYTES] = page_digest(page)
    finally:
        os.close(fd)
    return out


def read_batch(pid: int, hva: int, pages: list[int]) -> tuple[bytes, list[bytes]]:
    """Those pages now, zstd-packed, and their digests (blocking: a worker thread's)."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        data = [os.pread(fd, PAGE_SIZE, hva + i * PAGE_SIZE) for i in pages]
    finally:
        os.close(fd)
    return zstandard.ZstdCompressor(level=WARM_ZSTD_LEVEL).compress(b"".join(data)), [page_digest(d) for d in data]


def next_round(started: float, hashing: float) -> float:
    """When the next round of warm passes starts: WARM_PASS_SECONDS after this one started (a copy is then
    at most that and one pass behind), or later if hashing would take more than WARM_HASH_SHARE of the time."""
    return started + max(WARM_PASS_SECONDS, hashing / WARM_HASH_SHARE)


def changed_pages(now: bytearray, sent: bytearray) -> list[int]:
    """Pages whose digest differs from what was sent; all-zero pages are left out (QEMU sends those as a
    flag, so a copy gains nothing from them)."""
    n = len(now) // DIGEST_BYTES
    if len(sent) != len(now):
        sent[:] = bytes(len(now))
    out = []
    for i in range(n):
        d = now[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES]
        if d != sent[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] and d != _ZERO_DIGEST:
            out.append(i)
    return out


def write_pages(directory: Path, size: int, offsets: list[int], pages: bytes) -> None:
    """A warm host's side: put the pages into its image of the VM (blocking: a worker thread's). An image
    whose layout does not start with the RAM block of this size is replaced by a new one."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    layout = directory / LAYOUT
    try:
        blocks = json.loads(layout.read_text())["blocks"]
        fits = next(iter(blocks.items()), None) == (RAM_BLOCK, size)
    except (OSError, ValueError, KeyError, TypeError):
        fits = False
    if not fits:
        delete_image(directory)
        for name, data in ((LAYOUT, json.dumps({"blocks": {RAM_BLOCK: size}}).encode()), (IMAGE, b""),
                           (INDEX, bytes(size // PAGE_SIZE * DIGEST_BYTES))):
            fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
    img = os.open(directory / IMAGE, os.O_WRONLY)
    idx = os.open(directory / INDEX, os.O_WRONLY)
    try:
        for i, offset in enumerate(offsets):
            page = pages[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            os.pwrite(img, page, offset)
            os.pwrite(idx, page_digest(page), offset // PAGE_SIZE * DIGEST_BYTES)
    finally:
        os.close(img)
        os.close(idx)


def _unpack_and_write(directory: Path, size: int, offsets: list[int], data: bytes) -> None:
    try:
        if not 0 <= zstandard.frame_content_size(data) <= len(offsets) * PAGE_SIZE:
            raise zstandard.ZstdError("a batch must say its size")
        pages = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as e:
        raise PeerError("bad_request", f"vm_warm: {e}") from None
    if len(pages) != len(offsets) * PAGE_SIZE:
        raise PeerError("bad_request", "vm_warm: as many pages as offsets")
    write_pages(directory, size, offsets, pages)


class WarmMemory:
    """Both sides of warm memory: the VM's host sends changed pages, warm hosts keep them."""

    def __init__(self, swarm: Swarm, runner: VmRunner, book: VmBook) -> None:
        self.swarm, self.runner, self.book = swarm, runner, book
        self.states: dict[str, WarmState] = {}

    def ops(self) -> list[PeerOp]:
        return [PeerOp("vm_warm", self.owner, self._receive), PeerOp("vm_warm_drop", self.owner, self._drop)]

    # ---- policy ------------------------------------------------------------------------------------------
    def _state(self, name: str) -> WarmState:
        state = self.states.get(name)
        if state is None:
            state = self.states[name] = WarmState()
            try:
                saved = json.loads((self.runner.paths(name).directory / POLICY).read_text())
                state.hosts, state.rate = list(saved["hosts"]), float(saved["rate"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return state

    async def set_policy(self, name: str, on: list[str], off: list[str], rate: float | None) -> dict[str, Any]:
        state = self._state(name)
        state.hosts = [h for h in dict.fromkeys([*state.hosts, *on]) if h not in off and h != self.swarm.name]
        if rate is not None:
            state.rate = rate
        directory = self.runner.paths(name).directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / POLICY, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"hosts": state.hosts, "rate": state.rate}).encode())
        finally:
            os.close(fd)
        for host in off:
            state.sent.pop(host, None)
            state.current_at.pop(host, None)
            try:
                conn = await self.swarm.connect(host)
                await conn.request("vm_warm_drop", {"vm": name}, timeout=30)
            except PeerError as e:
                log.warning("VM %s: %s did not confirm deleting its copy of the memory (%s)", name, host, e)
        return self.info(name)

    def info(self, name: str) -> dict[str, Any]:
        """Each warm host and the age in seconds of its copy (None: not yet current)."""
        state = self._state(name)
        now = time.time()
        return {"hosts": list(state.hosts), "rate": state.rate,
                "age_s": {h: round(now - t, 1) if (t := state.current_at.get(h)) else None for h in state.hosts}}

    # ---- the VM's host -----------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            # passes start every WARM_PASS_SECONDS (one hashes all memory): a copy is at most that plus one
            # pass behind, where a pause after each pass would add the pass's own time
            started = trio.current_time()
            hashing = 0.0  # seconds this round spent hashing memory
            for name, rv in list(self.runner.running.items()):
                state = self._state(name)
                if not state.hosts or rv.qmp is None or rv.exited.is_set() or rv.incoming or rv.moving:
                    continue
                try:
                    if await rv.status() == "running":
                        hashing += await self._pass(name, rv, state)
                except Exception as e:  # a warm copy is an optimisation: never stop the daemon for it
                    log.warning("VM %s: updating its warm memory failed: %s", name, e)
            await trio.sleep_until(next_round(started, hashing))

    async def _pass(self, name: str, rv: Any, state: WarmState) -> float:
        """Send each warm host what changed; the seconds spent hashing the guest's memory."""
        out = await rv.qmp.command("human-monitor-command", **{"command-line": "gpa2hva 0"})
        if f"({RAM_BLOCK})" not in out:
            return 0.0
        hva, size = int(out.split()[-1], 16), rv.vm.memory
        hash_started = trio.current_time()
        now = await trio.to_thread.run_sync(hash_ram, rv.pid, hva, size)
        hashed = trio.current_time() - hash_started
        for host in list(state.hosts):
            sent = state.sent.setdefault(host, bytearray())
            pages = await trio.to_thread.run_sync(changed_pages, now, sent)
            conn = await self.swarm.connect(host)
            for at in range(0, len(pages), WARM_BATCH_PAGES):
                if rv.moving:  # the move sends the memory now; what this pass did send stays valid
                    return hashed
                batch = pages[at:at + WARM_BATCH_PAGES]
                started = trio.current_time()
                packed, digests = await trio.to_thread.run_sync(read_batch, rv.pid, hva, batch)
                await conn.request("vm_warm", {"vm": name, "size": size, "data": packed,
                                               "offsets": b"".join(_OFFSET.pack(i * PAGE_SIZE) for i in batch)})
                for i, digest in zip(batch, digests, strict=True):
                    sent[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] = digest
                # paced from when the batch started: its own time on the link counts towards the rate
                await trio.sleep_until(started + len(packed) / state.rate)
            if host in state.hosts:
                state.current_at[host] = time.time()
        return hashed

    # ---- a warm host ---------------------------------------------------------------------------------------
    async def owner(self, swarm: Swarm, peer: str, body: dict[str, Any]) -> str | None:
        """The owner of the VM's first disk, of which this host keeps a replica: as the replica says, or, when
        that is behind (the VM moved on since this host last synced it), as the disk's deeds prove."""
        vm = self.book.get(body.get("vm"))  # type: ignore[arg-type]
        if vm is None:
            return f"no VM {body.get('vm')!r} is known here"
        exp = swarm.ctl.get(vm.disks[0])
        if exp is None or (exp.store.owner != peer and (await swarm.owner_of(vm.disks[0]))[0] != peer):
            return f"{peer} does not own VM {vm.name}'s disk {vm.disks[0]} here"
        return None

    async def _receive(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        size, offsets, data = body.get("size"), body.get("offsets"), body.get("data")
        if (type(size) is not int or not isinstance(offsets, bytes) or not isinstance(data, bytes)
                or size % PAGE_SIZE or len(offsets) % _OFFSET.size or len(offsets) // _OFFSET.size > WARM_BATCH_PAGES):
            raise PeerError("bad_request", "vm_warm needs a size, offsets and data")
        vm = self.book.get(body["vm"])
        assert vm is not None  # the access rule found it
        if size != vm.memory:
            raise PeerError("bad_request", f"vm_warm: VM {vm.name} has {vm.memory} bytes of memory, not {size}")
        at = [_OFFSET.unpack_from(offsets, i)[0] for i in range(0, len(offsets), _OFFSET.size)]
        if any(o % PAGE_SIZE or o + PAGE_SIZE > size for o in at):
            raise PeerError("bad_request", "vm_warm: a page outside the VM's memory")
        if vm.name in self.runner.running:
            return {}  # the VM runs here: its memory is this host's own
        await trio.to_thread.run_sync(_unpack_and_write, self.runner.paths(vm.name).directory, size, at, data)
        return {}

    async def _drop(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        if body["vm"] not in self.runner.running:
            await trio.to_thread.run_sync(delete_image, self.runner.paths(body["vm"]).directory)
        return {}
