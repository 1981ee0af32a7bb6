"""The NBD export against the spec (doc/proto.md of NetworkBlockDevice/nbd): one table row per statement.

Each row quotes the MUST/SHOULD sentence it checks, what p2pvbd must answer, and a probe that asks the
server. Every row runs the same probe on a real p2pvbd daemon and on qemu-nbd serving a raw file, the
reference: a probe that gets the expected answer from qemu-nbd is known to ask the right question. Where
the spec leaves room, the row says what qemu-nbd does instead. Probes talk raw sockets (the frames of
``tests.test_nbd_bad_input``), libnbd (under the system Python), nbdinfo and qemu-io. Socket timeouts and
start-up deadlines are hang guards, never speed assertions.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pvbd.kernel_hook_ctl import ExportMode, HookController
from p2pvbd.nbd.server import READ_ONLY_FLAGS, TRANSMISSION_FLAGS, export_flags, serve_nbd
from p2pvbd.replica_store import ReplicaStore
from p2pvbd.store.store_files import DATA_FILE
from p2pvbd.wire import nbd_codec as nbd
from tests.daemons import Host, env_without_venv, run, system_python
from tests.helpers import visible, wait_until
from tests.test_nbd_bad_input import RawClient

KiB, MiB = 1 << 10, 1 << 20
DISK = "vm1"
DISK_SIZE = 256 * MiB
BLOCK = 64 * KiB  # the daemon's block size here; qemu-nbd zeroes at any alignment on ext4
ROW_REGION = 2 * MiB  # each row works in its own region of the shared exports: row i at (i + 1) * 2 MiB
BIG_ZERO = (160 * MiB, 40 * MiB)  # a zeroing longer than the 32 MiB maximum payload, away from the rows
HANG_GUARD = 60.0  # seconds; bounds a hung server or tool, not a speed assertion
PATTERN = 0x5A
UNKNOWN_FLAG = 1 << 15  # a command flag no version of the spec defines

# FIEMAP (linux/fs.h, linux/fiemap.h): which extents the file system allocated, written or not. SEEK_DATA
# would not do: it calls allocated-but-unwritten extents (what fallocate makes) holes.
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1  # flush delayed allocations first
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, pad
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical, fe_physical, fe_length, reserved, fe_flags, reserved
FIEMAP_MAX_EXTENTS = 512


def allocated(path: Path, offset: int, length: int) -> int:
    """Bytes of ``[offset, offset + length)`` of ``path`` that the file system has allocated."""
    buf = bytearray(_FIEMAP_HEAD.pack(offset, length, FIEMAP_FLAG_SYNC, 0, FIEMAP_MAX_EXTENTS, 0)
                    + bytes(FIEMAP_MAX_EXTENTS * _FIEMAP_EXTENT.size))
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
    mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
    assert mapped < FIEMAP_MAX_EXTENTS, "more extents than asked for: the count would be short"
    total = 0
    for i in range(mapped):
        logical, _, n, _ = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
        total += max(0, min(logical + n, offset + length) - max(logical, offset))
    return total


# --- the servers -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One NBD export under test: where it listens, its name, and the file that holds its bytes."""

    name: str  # "p2pvbd" or "qemu-nbd"
    socket: str
    export: str  # qemu-nbd's only export is the default one, ""
    data_file: Path

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"


@contextlib.contextmanager
def qemu_nbd(image: Path, sock: Path, *extra: str) -> Iterator[Server]:
    """qemu-nbd serving a new sparse raw file of DISK_SIZE; stopped on exit."""
    with open(image, "wb") as f:
        f.truncate(DISK_SIZE)
    log = open(image.with_suffix(".log"), "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-e", "4", "-k", str(sock), *extra, str(image)],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not _accepts(sock):
            assert proc.poll() is None, image.with_suffix(".log").read_text()
            assert time.monotonic() < deadline, "qemu-nbd did not come up"
            time.sleep(0.02)
        yield Server("qemu-nbd", str(sock), "", image)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def daemon_server(host: Host) -> Server:
    return Server("p2pvbd", host.nbd_socket, DISK, host.home / "disks" / DISK / DATA_FILE)


@pytest.fixture(scope="module")
def rw_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """A writable export on each server: p2pvbd's owner of vm1 (64 KiB blocks), qemu-nbd on a raw file."""
    tmp = tmp_path_factory.mktemp("spec-rw")
    host = Host(tmp / "office-pc", "office-pc")
    try:
        host.start()
        host.cli("disk", "create", DISK, "--size", "256M", "--block-size", "64K")
        with qemu_nbd(tmp / "reference.raw", tmp / "qemu.sock") as reference:
            yield daemon_server(host), reference
        assert host.alive(), host.log_tail()
        log = (host.home / "daemon.log").read_text()
        assert "ERROR p2pvbd.nbd.server" not in log, host.log_tail()  # no probe broke the server
    finally:
        host.stop()


@pytest.fixture(scope="module")
def ro_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """An export that refuses writes on each server: a p2pvbd standby replica (home-pc pulled vm1 from its
    owner office-pc), and qemu-nbd -r."""
    tmp = tmp_path_factory.mktemp("spec-ro")
    office = Host(tmp / "office-pc", "office-pc")
    hosts = [office]
    try:
        office.start()
        office.cli("disk", "create", DISK, "--size", "256M")
        run("qemu-io", "-f", "raw", "-c", f"write -P {PATTERN} 0 1M", office.uri(DISK), timeout=HANG_GUARD)
        home = Host(tmp / "home-pc", "home-pc", join=office.cli("invite").stdout.strip())
        hosts.append(home)
        home.start()
        wait_until(lambda: visible(home, DISK), "home-pc to see vm1")
        home.cli("sync", DISK)
        with qemu_nbd(tmp / "reference.raw", tmp / "qemu.sock", "-r") as reference:
            yield daemon_server(home), reference
    finally:
        for h in hosts:
            h.stop()


# --- probes ------------------------------------------------------------------------------------------------


class Client(RawClient):
    """The raw client of the bad-input tests, plus meta contexts and the whole reply of any command."""

    def __init__(self, srv: Server) -> None:
        super().__init__(srv.socket)
        self.export = srv.export
        self.cookie = 0

    def open(self, contexts: Sequence[str] | None = None, structured: bool = True) -> int:
        """Handshake, structured replies, SET_META_CONTEXT (when ``contexts`` is given), GO: the transmission flags."""
        self.handshake()
        if structured:
            self.structured_reply()
        if contexts is not None:
            assert self.meta(nbd.NBD_OPT_SET_META_CONTEXT, contexts)[1] == nbd.NBD_REP_ACK
        return self.go(self.export)[1]

    def meta(self, opt: int, queries: Sequence[str], export: str | None = None) -> tuple[list[tuple[int, str]], int]:
        """LIST or SET_META_CONTEXT: the contexts replied, as (id, name), and the final reply type."""
        def string(text: str) -> bytes:
            return struct.pack(">I", len(text.encode())) + text.encode()
        self.option(opt, string(self.export if export is None else export) + struct.pack(">I", len(queries))
                    + b"".join(map(string, queries)))
        contexts = []
        while True:
            got, rtype, payload = self.option_reply()
            assert got == opt
            if rtype != nbd.NBD_REP_META_CONTEXT:
                return contexts, rtype
            contexts.append((struct.unpack_from(">I", payload)[0], payload[4:].decode()))

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"") -> tuple[int, list[tuple[int, bytes]]]:
        """One request and its whole reply: (error, [(chunk type, chunk payload)] of the non-error chunks)."""
        self.cookie += 1
        self.request(cmd, self.cookie, offset, length, flags, payload)
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == nbd.NBD_SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            assert cookie == self.cookie
            data = self.recv_exact(length) if cmd == nbd.NBD_CMD_READ and not error else b""
            return error, [(nbd.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data)] if data else []
        assert magic == nbd.NBD_STRUCTURED_REPLY_MAGIC and self.structured, hex(magic)
        error, chunks = 0, []
        while True:
            chunk_flags, ctype, cookie, n = struct.unpack(">HHQI", self.recv_exact(16))
            assert cookie == self.cookie
            body = self.recv_exact(n)
            if ctype & (1 << 15):  # an error chunk
                error = struct.unpack_from(">I", body)[0]
            elif ctype != nbd.NBD_REPLY_TYPE_NONE:
                chunks.append((ctype, body))
            if chunk_flags & nbd.NBD_REPLY_FLAG_DONE:
                return error, chunks

    def error(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> int:
        return self.call(cmd, offset, length, flags, payload)[0]

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        return self.error(nbd.NBD_CMD_WRITE, offset, len(data), flags, data)

    def zero(self, offset: int, length: int, flags: int = 0) -> int:
        return self.error(nbd.NBD_CMD_WRITE_ZEROES, offset, length, flags)

    def block_status(self, offset: int, length: int, flags: int = 0) -> tuple[int, list[tuple[int, list[Any]]]]:
        """(error, [(context id, [(extent length, status flags)])]), one entry per BLOCK_STATUS chunk."""
        error, chunks = self.call(nbd.NBD_CMD_BLOCK_STATUS, offset, length, flags)
        out = []
        for ctype, body in chunks:
            assert ctype == nbd.NBD_REPLY_TYPE_BLOCK_STATUS, ctype
            ctx, *rest = struct.unpack(f">{len(body) // 4}I", body)
            out.append((ctx, list(zip(rest[::2], rest[1::2], strict=True))))
        return error, out


@contextlib.contextmanager
def client(srv: Server, contexts: Sequence[str] | None = None, structured: bool = True) -> Iterator[tuple[Client, int]]:
    """A connection in transmission phase and its transmission flags; cleanly disconnected after."""
    c = Client(srv)
    try:
        yield c, c.open(contexts, structured)
        c.disconnect()
    finally:
        c.close()


def content(c: Client, offset: int, length: int, expected: bytes) -> str:
    """How the range reads: "zeros", "unchanged" (equal to ``expected``) or "other"."""
    data = c.read(offset, length)
    return "zeros" if data == bytes(length) else "unchanged" if data == expected else "other"


def libnbd(script: str, *args: str) -> Any:
    """Run a libnbd script under the system Python; it prints one JSON document as its last line."""
    res = run(system_python(), "-c", script, *args, timeout=HANG_GUARD, env=env_without_venv())
    return json.loads(res.stdout.strip().splitlines()[-1])


def nbdinfo(srv: Server) -> dict[str, Any]:
    (export,) = json.loads(run("nbdinfo", "--json", srv.uri, timeout=HANG_GUARD).stdout)["exports"]
    return export


# Capabilities that both servers have a say in (qemu-nbd also offers DF, which p2pvbd does not).
CAPABILITIES = ("is_read_only", "can_cache", "can_fast_zero", "can_flush", "can_fua", "can_multi_conn", "can_trim",
                "can_zero")


def offered(srv: Server, _base: int) -> dict[str, Any]:
    info = nbdinfo(srv)
    return {k: info[k] for k in CAPABILITIES} | {"contexts": info["contexts"]}


def fua_on_every_command(srv: Server, base: int) -> dict[str, Any]:
    with client(srv, ["base:allocation"]) as (c, tflags):
        fua = nbd.NBD_CMD_FLAG_FUA
        return {"SEND_FUA": bool(tflags & nbd.NBD_FLAG_SEND_FUA),
                "READ": c.error(nbd.NBD_CMD_READ, base, 4096, fua),
                "WRITE": c.write(base, b"\x11" * 4096, fua),
                "FLUSH": c.error(nbd.NBD_CMD_FLUSH, 0, 0, fua),
                "TRIM": c.error(nbd.NBD_CMD_TRIM, base + BLOCK, BLOCK, fua),
                "WRITE_ZEROES": c.zero(base + 2 * BLOCK, BLOCK, fua),
                "CACHE": c.error(nbd.NBD_CMD_CACHE, base, BLOCK, fua),
                "BLOCK_STATUS": c.error(nbd.NBD_CMD_BLOCK_STATUS, base, BLOCK, fua)}


def undocumented_flags(srv: Server, base: int) -> dict[str, int]:
    with client(srv, ["base:allocation"]) as (c, _):
        return {"WRITE+NO_HOLE": c.write(base, b"\x22" * 512, nbd.NBD_CMD_FLAG_NO_HOLE),
                "READ+REQ_ONE": c.error(nbd.NBD_CMD_READ, base, 512, nbd.NBD_CMD_FLAG_REQ_ONE),
                "TRIM+FAST_ZERO": c.error(nbd.NBD_CMD_TRIM, base, BLOCK, nbd.NBD_CMD_FLAG_FAST_ZERO),
                "FLUSH+NO_HOLE": c.error(nbd.NBD_CMD_FLUSH, 0, 0, nbd.NBD_CMD_FLAG_NO_HOLE),
                "BLOCK_STATUS+NO_HOLE": c.error(nbd.NBD_CMD_BLOCK_STATUS, base, BLOCK, nbd.NBD_CMD_FLAG_NO_HOLE),
                "WRITE_ZEROES+REQ_ONE": c.zero(base, BLOCK, nbd.NBD_CMD_FLAG_REQ_ONE),
                "READ+bit15": c.error(nbd.NBD_CMD_READ, base, 512, UNKNOWN_FLAG),
                "written": content(c, base, 512, b"\x22" * 512) != "unchanged"}


def cache_flags(srv: Server, base: int) -> dict[str, Any]:
    with client(srv) as (c, tflags):
        return {"SEND_CACHE": bool(tflags & nbd.NBD_FLAG_SEND_CACHE),
                "CACHE": c.error(nbd.NBD_CMD_CACHE, base, MiB),
                "CACHE+NO_HOLE": c.error(nbd.NBD_CMD_CACHE, base, MiB, nbd.NBD_CMD_FLAG_NO_HOLE),
                "CACHE+REQ_ONE": c.error(nbd.NBD_CMD_CACHE, base, MiB, nbd.NBD_CMD_FLAG_REQ_ONE),
                "CACHE+bit15": c.error(nbd.NBD_CMD_CACHE, base, MiB, UNKNOWN_FLAG)}


CACHE_SCRIPT = r"""
import errno, json, sys
import nbd

h = nbd.NBD()
h.set_strict_mode(0)  # send what it is told: a range past the end is the server's to refuse
h.connect_uri(sys.argv[1])
base, MiB = int(sys.argv[2]), 1 << 20
h.pwrite(b"\x3c" * MiB, base)
out = {"can_cache": h.can_cache()}
h.cache(2 * MiB, base)  # raises on an error reply
h.pwrite(b"\xc3" * 4096, base + 4096)  # a write into the cached range is seen by the next read
expected = b"\x3c" * 4096 + b"\xc3" * 4096 + b"\x3c" * (MiB - 8192) + bytes(MiB)
out["reads_as_without_cache"] = h.pread(2 * MiB, base) == expected
try:
    h.cache(4096, h.get_size())
    out["past_end"] = "ok"
except nbd.Error as e:
    out["past_end"] = errno.errorcode.get(e.errno, e.errno)
h.shutdown()
print(json.dumps(out))
"""


def cache_semantics(srv: Server, base: int) -> dict[str, Any]:
    return libnbd(CACHE_SCRIPT, srv.uri, str(base))


def no_hole_provisions(srv: Server, base: int) -> dict[str, Any]:
    with client(srv) as (c, _):
        assert c.write(base, bytes([PATTERN]) * MiB) == 0
        partial = (base + MiB + 1000, 3000)  # inside a block nobody wrote: a hole until now
        errors = [c.zero(base, MiB, nbd.NBD_CMD_FLAG_NO_HOLE), c.zero(*partial, nbd.NBD_CMD_FLAG_NO_HOLE),
                  c.error(nbd.NBD_CMD_FLUSH)]  # p2pvbd settles written blocks at a flush: none may become a hole
        return {"errors": errors, "whole": content(c, base, MiB, b""), "part": content(c, *partial, b""),
                "whole allocated": allocated(srv.data_file, base, MiB),
                "part allocated": allocated(srv.data_file, *partial)}


def may_trim(srv: Server, base: int) -> dict[str, Any]:
    with client(srv) as (c, _):
        assert c.write(base, bytes([PATTERN]) * MiB) == 0
        errors = [c.zero(base, MiB), c.error(nbd.NBD_CMD_FLUSH)]
        return {"errors": errors, "reads": content(c, base, MiB, b""), "allocated": allocated(srv.data_file, base, MiB)}


def fast_zero_whole_blocks(srv: Server, base: int) -> dict[str, Any]:
    with client(srv) as (c, tflags):
        assert c.write(base, bytes([PATTERN]) * MiB) == 0
        return {"SEND_FAST_ZERO": bool(tflags & nbd.NBD_FLAG_SEND_FAST_ZERO),
                "error": c.zero(base, MiB, nbd.NBD_CMD_FLAG_FAST_ZERO), "reads": content(c, base, MiB, b"")}


def fast_zero_part_of_a_block(srv: Server, base: int) -> dict[str, Any]:
    data = bytes([PATTERN]) * BLOCK
    with client(srv) as (c, _):
        assert c.write(base, data) == 0
        error = c.zero(base + 1000, 3000, nbd.NBD_CMD_FLAG_FAST_ZERO)
        return {"error": error, "reads": content(c, base + 1000, 3000, data[:3000]),
                "rest": content(c, base, BLOCK, data) if error else "n/a"}


def zero_without_fast_flag(srv: Server, base: int) -> dict[str, Any]:
    with client(srv) as (c, _):
        assert c.write(base, bytes([PATTERN]) * BLOCK) == 0
        return {"error": c.zero(base + 1000, 3000), "reads": content(c, base + 1000, 3000, b"")}


def fast_zero_longer_than_max_payload(srv: Server, _base: int) -> dict[str, Any]:
    offset, length = BIG_ZERO
    with client(srv) as (c, _):
        for k in range(0, length, 8 * MiB):
            assert c.write(offset + k, bytes([PATTERN]) * 4096) == 0
        error = c.zero(offset, length, nbd.NBD_CMD_FLAG_FAST_ZERO)
        return {"error": error, "reads": sorted({content(c, offset + k, 4096, b"") for k in range(0, length, 8 * MiB)})}


def fast_zero_no_hole(srv: Server, base: int) -> dict[str, Any]:
    with client(srv) as (c, _):
        assert c.write(base, bytes([PATTERN]) * MiB) == 0
        error = c.zero(base, MiB, nbd.NBD_CMD_FLAG_FAST_ZERO | nbd.NBD_CMD_FLAG_NO_HOLE)
        assert c.error(nbd.NBD_CMD_FLUSH) == 0
        return {"error": error, "reads": content(c, base, MiB, b""), "allocated": allocated(srv.data_file, base, MiB)}


REPLY_NAMES = {v: k.removeprefix("NBD_REP_") for k, v in vars(nbd).items() if k.startswith("NBD_REP_")}


def meta_probe(steps: Sequence[tuple[int, Sequence[str], str | None]], status: bool = True
               ) -> Callable[[Server, int], dict[str, Any]]:
    """Send LIST/SET_META_CONTEXT options (option, queries, export name or None for the export), then GO and
    BLOCK_STATUS: what each option answered, and how BLOCK_STATUS went."""
    def probe(srv: Server, base: int) -> dict[str, Any]:
        c = Client(srv)
        try:
            c.handshake()
            c.structured_reply()
            out: dict[str, Any] = {"replies": []}
            set_ids: list[int] = []
            for opt, queries, export in steps:
                contexts, rtype = c.meta(opt, queries, export)
                reply = {"contexts": [name for _, name in contexts], "reply": REPLY_NAMES.get(rtype, hex(rtype))}
                if opt == LIST:  # a SET's ids are the server's choice: BLOCK_STATUS must use them, checked below
                    reply["ids"] = sorted({ctx for ctx, _ in contexts})
                else:
                    set_ids = [ctx for ctx, _ in contexts]
                out["replies"].append(reply)
            c.go(c.export)
            if status:
                error, chunks = c.block_status(base, BLOCK)
                out["block_status"] = error or len(chunks)
                out["chunk uses SET's id"] = bool(chunks) and set_ids == [ctx for ctx, _ in chunks]
            c.disconnect()
            return out
        finally:
            c.close()
    return probe


LIST, SET = nbd.NBD_OPT_LIST_META_CONTEXT, nbd.NBD_OPT_SET_META_CONTEXT
ALLOC = "base:allocation"
REPLY_OK = {"contexts": [ALLOC], "reply": "ACK"}
REPLY_NONE = {"contexts": [], "reply": "ACK"}
LISTED = REPLY_OK | {"ids": [0]}  # a LIST's answer: the context, with the reserved id 0


def block_status_req_one(srv: Server, base: int) -> dict[str, Any]:
    with client(srv, [ALLOC]) as (c, _):
        assert c.write(base, bytes([PATTERN]) * BLOCK) == 0
        error, chunks = c.block_status(base + 1000, 100 * KiB, nbd.NBD_CMD_FLAG_REQ_ONE)
        ((_, extents),) = chunks
        return {"error": error, "descriptors": len(extents), "within request": extents[0][0] <= 100 * KiB}


def read_only(srv: Server, base: int) -> dict[str, Any]:
    with client(srv) as (c, tflags):
        before = c.read(base, 4096)
        out = {"READ_ONLY": bool(tflags & nbd.NBD_FLAG_READ_ONLY),
               "WRITE": c.write(base, b"\x99" * 4096),
               "WRITE+FUA": c.write(base, b"\x99" * 4096, nbd.NBD_CMD_FLAG_FUA),
               "TRIM": c.error(nbd.NBD_CMD_TRIM, base, BLOCK),
               "WRITE_ZEROES": c.zero(base, BLOCK),
               "READ": c.error(nbd.NBD_CMD_READ, base, 4096),
               "FLUSH": c.error(nbd.NBD_CMD_FLUSH),
               "unchanged": c.read(base, 4096) == before}
    res = run("qemu-io", "-f", "raw", "-c", f"write -P 0x77 {base} 4096", srv.uri, check=False, timeout=HANG_GUARD)
    out["qemu-io write refused"] = res.returncode != 0 or "wrote" not in res.stdout
    return out


# --- the table ---------------------------------------------------------------------------------------------

SAME = object()  # qemu-nbd gives the answer the row expects from p2pvbd


@dataclass(frozen=True)
class Row:
    id: str
    spec: str  # the statement checked, quoted (shortened) from proto.md
    expect: Any  # what the probe must return from p2pvbd
    probe: Callable[[Server, int], Any]
    qemu: Any = SAME  # what qemu-nbd returns, where the spec leaves it room to differ
    read_only: bool = False  # runs on the exports that refuse writes


ROWS = [
    Row("offers-what-qemu-nbd-offers",
        "NBD_FLAG_SEND_FAST_ZERO: the server MUST set this transmission flag to 1 if the NBD_CMD_WRITE_ZEROES "
        "request supports the NBD_CMD_FLAG_FAST_ZERO flag; NBD_FLAG_SEND_CACHE documents that the server "
        "understands NBD_CMD_CACHE",
        {"is_read_only": False, "can_cache": True, "can_fast_zero": True, "can_flush": True, "can_fua": True,
         "can_multi_conn": True, "can_trim": True, "can_zero": True, "contexts": [ALLOC]},
        offered),
    Row("fua-accepted-on-every-command",
        "NBD_CMD_FLAG_FUA: valid for all commands, provided NBD_FLAG_SEND_FUA has been negotiated, in which case "
        "the server MUST accept all commands with this bit set (even by ignoring the bit)",
        {"SEND_FUA": True, "READ": 0, "WRITE": 0, "FLUSH": 0, "TRIM": 0, "WRITE_ZEROES": 0, "CACHE": 0,
         "BLOCK_STATUS": 0},
        fua_on_every_command),
    Row("undocumented-flag-einval",
        "The server SHOULD return NBD_EINVAL if it receives an unknown command flag ... or a request with a "
        "flag not explicitly documented as applicable to the given request",
        {"WRITE+NO_HOLE": nbd.NBD_EINVAL, "READ+REQ_ONE": nbd.NBD_EINVAL, "TRIM+FAST_ZERO": nbd.NBD_EINVAL,
         "FLUSH+NO_HOLE": nbd.NBD_EINVAL, "BLOCK_STATUS+NO_HOLE": nbd.NBD_EINVAL,
         "WRITE_ZEROES+REQ_ONE": nbd.NBD_EINVAL, "READ+bit15": nbd.NBD_EINVAL, "written": True},
        undocumented_flags),
    Row("cache-rejects-unknown-flags",
        "NBD_CMD_CACHE: if it advertised the command, the server MUST reject any command flags it does not "
        "recognize",
        {"SEND_CACHE": True, "CACHE": 0, "CACHE+NO_HOLE": nbd.NBD_EINVAL, "CACHE+REQ_ONE": nbd.NBD_EINVAL,
         "CACHE+bit15": nbd.NBD_EINVAL},
        cache_flags),
    Row("cache-changes-no-semantics",
        "NBD_CMD_CACHE: other than any difference in performance, there MUST NOT be any difference in semantics "
        "compared to if the client had not used this command; on an error the server MUST set the error code",
        {"can_cache": True, "reads_as_without_cache": True, "past_end": "EINVAL"},
        cache_semantics),
    Row("write-zeroes-no-hole-provisions",
        "NBD_CMD_WRITE_ZEROES: the client MAY set NBD_CMD_FLAG_NO_HOLE to inform the server that the area MUST be "
        "fully provisioned, ensuring that future writes to the same area will not cause fragmentation or cause "
        "failure due to insufficient space",
        {"errors": [0, 0, 0], "whole": "zeros", "part": "zeros", "whole allocated": MiB, "part allocated": 3000},
        no_hole_provisions),
    Row("write-zeroes-may-trim",
        "By default, the server MAY use trimming to zero out the area ... but it MUST ensure that the data reads "
        "back as zero (both punch a hole: the allocation probe of the NO_HOLE row can tell the difference)",
        {"errors": [0, 0], "reads": "zeros", "allocated": 0},
        may_trim),
    Row("fast-zero-whole-blocks",
        "NBD_CMD_FLAG_FAST_ZERO: MUST fail quickly with NBD_ENOTSUP unless the request can be serviced in less "
        "time than a corresponding NBD_CMD_WRITE (whole blocks are metadata and a hole punch: served)",
        {"SEND_FAST_ZERO": True, "error": 0, "reads": "zeros"},
        fast_zero_whole_blocks),
    Row("fast-zero-part-of-a-block",
        "FAST_ZERO: ... MUST fail quickly with NBD_ENOTSUP unless ... faster than a corresponding NBD_CMD_WRITE, "
        "and SHOULD NOT alter the contents of the export when returning an NBD_ENOTSUP failure (p2pvbd writes "
        "zeros into a partial block: refused; qemu-nbd zeroes any range with fallocate: served)",
        {"error": nbd.NBD_ENOTSUP, "reads": "unchanged", "rest": "unchanged"},
        fast_zero_part_of_a_block,
        qemu={"error": 0, "reads": "zeros", "rest": "n/a"}),
    Row("zero-without-fast-flag-never-enotsup",
        "If the server advertised NBD_FLAG_SEND_FAST_ZERO but NBD_CMD_FLAG_FAST_ZERO is not set, then the server "
        "MUST NOT fail with NBD_ENOTSUP, even if the operation is no faster than a corresponding NBD_CMD_WRITE",
        {"error": 0, "reads": "zeros"},
        zero_without_fast_flag),
    Row("fast-zero-no-eoverflow",
        "if NBD_CMD_FLAG_FAST_ZERO is set, the server SHOULD NOT fail with NBD_EOVERFLOW regardless of the "
        "client length (40 MiB, over the 32 MiB maximum payload)",
        {"error": 0, "reads": ["zeros"]},
        fast_zero_longer_than_max_payload),
    Row("fast-zero-with-no-hole",
        "The server's determination on whether to fail a fast request MAY depend on ... whether the "
        "NBD_CMD_FLAG_NO_HOLE flag was present (both serve it, and keep the area provisioned)",
        {"error": 0, "reads": "zeros", "allocated": MiB},
        fast_zero_no_hole),
    Row("set-ignores-bare-base",
        "base: - the server MUST ignore this form during NBD_OPT_SET_META_CONTEXT; Servers SHOULD reply with "
        "NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS without selecting at least one metadata context",
        {"replies": [REPLY_NONE], "block_status": nbd.NBD_EINVAL, "chunk uses SET's id": False},
        meta_probe([(SET, ["base:"], None)])),
    Row("list-bare-base-is-wildcard",
        "base: - ... MUST support this as a wildcard during NBD_OPT_LIST_META_CONTEXT, in which case the "
        "server's reply will contain a response for each supported metadata context within the base: namespace",
        {"replies": [LISTED]},
        meta_probe([(LIST, ["base:"], None)], status=False)),
    Row("list-without-queries-lists-all",
        "NBD_OPT_LIST_META_CONTEXT: If zero queries are sent, then the server MUST return all the metadata "
        "contexts that are available to the client to select on the given export",
        {"replies": [LISTED]},
        meta_probe([(LIST, [], None)], status=False)),
    Row("list-context-id-zero",
        "NBD_OPT_LIST_META_CONTEXT: The metadata context ID in these replies is reserved and SHOULD be set to "
        "zero; a LIST changes no selection",
        {"replies": [LISTED, REPLY_NONE, LISTED],
         "block_status": nbd.NBD_EINVAL, "chunk uses SET's id": False},
        meta_probe([(LIST, [ALLOC], None), (SET, [], None), (LIST, [ALLOC, "x-unknown:thing"], None)])),
    Row("set-replaces-even-when-failing",
        "NBD_OPT_SET_META_CONTEXT: Issuing this command replaces all previously-set metadata contexts "
        "(including when this command fails)",
        {"replies": [REPLY_OK, {"contexts": [], "reply": "ERR_UNKNOWN"}],
         "block_status": nbd.NBD_EINVAL, "chunk uses SET's id": False},
        meta_probe([(SET, [ALLOC], None), (SET, [ALLOC], "no-such-export")])),
    Row("set-without-queries-selects-none",
        "NBD_OPT_SET_META_CONTEXT: If zero queries are sent, the server MUST select no metadata contexts",
        {"replies": [REPLY_OK, REPLY_NONE], "block_status": nbd.NBD_EINVAL,
         "chunk uses SET's id": False},
        meta_probe([(SET, [ALLOC], None), (SET, [], None)])),
    Row("set-selects-and-block-status-uses-its-id",
        "the server MUST ignore query strings belonging to an unknown namespace ... If a [leaf-name] requested "
        "by the client is not recognized, the server MUST ignore it; BLOCK_STATUS: exactly one chunk of type "
        "NBD_REPLY_TYPE_BLOCK_STATUS per selected context id",
        {"replies": [REPLY_OK], "block_status": 1, "chunk uses SET's id": True},
        meta_probe([(SET, ["x-unknown:thing", "base:", ALLOC, "base:no-such-leaf"], None)])),
    Row("block-status-req-one",
        "NBD_CMD_FLAG_REQ_ONE: each chunk contains exactly one descriptor where the length of the descriptor "
        "MUST NOT be greater than the length of the request",
        {"error": 0, "descriptors": 1, "within request": True},
        block_status_req_one),
    Row("read-only-errors-writes",
        "NBD_FLAG_READ_ONLY: If this flag is set, the server MUST error subsequent write operations to the "
        "export; it SHOULD return NBD_EPERM if it receives a write or trim request on a read-only export",
        {"READ_ONLY": True, "WRITE": nbd.NBD_EPERM, "WRITE+FUA": nbd.NBD_EPERM, "TRIM": nbd.NBD_EPERM,
         "WRITE_ZEROES": nbd.NBD_EPERM, "READ": 0, "FLUSH": 0, "unchanged": True, "qemu-io write refused": True},
        read_only, read_only=True,
        # qemu-nbd -r errors them all, as it MUST, but with EINVAL where EPERM SHOULD be
        qemu={"READ_ONLY": True, "WRITE": nbd.NBD_EINVAL, "WRITE+FUA": nbd.NBD_EINVAL, "TRIM": nbd.NBD_EINVAL,
              "WRITE_ZEROES": nbd.NBD_EINVAL, "READ": 0, "FLUSH": 0, "unchanged": True,
              "qemu-io write refused": True}),
    Row("read-only-offers-no-write-commands",
        "NBD_FLAG_SEND_FAST_ZERO: the server ... MUST set this transmission flag to 0 if "
        "NBD_FLAG_SEND_WRITE_ZEROES is not set (a read-only export offers neither, as qemu-nbd -r)",
        {"is_read_only": True, "can_cache": True, "can_fast_zero": False, "can_flush": True, "can_fua": True,
         "can_multi_conn": True, "can_trim": False, "can_zero": False, "contexts": [ALLOC]},
        offered, read_only=True),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_spec_statement(row: Row, request: pytest.FixtureRequest) -> None:
    p2pvbd, reference = request.getfixturevalue("ro_servers" if row.read_only else "rw_servers")
    base = (ROWS.index(row) + 1) * ROW_REGION
    got, ref = row.probe(p2pvbd, base), row.probe(reference, base)
    assert got == row.expect, f"p2pvbd breaks: {row.spec}"
    assert ref == (row.expect if row.qemu is SAME else row.qemu), f"qemu-nbd (the reference) differs: {row.spec}"


# --- what the table cannot reach from outside a daemon ----------------------------------------------------


def test_only_a_standby_export_is_flagged_read_only() -> None:
    """An incoming export holds writes until ownership arrives: READ_ONLY would wrongly make clients give up."""
    assert export_flags(ExportMode.PRIMARY) == export_flags(ExportMode.INCOMING) == TRANSMISSION_FLAGS
    assert export_flags(ExportMode.STANDBY) == READ_ONLY_FLAGS
    assert TRANSMISSION_FLAGS & nbd.NBD_FLAG_SEND_FAST_ZERO and TRANSMISSION_FLAGS & nbd.NBD_FLAG_SEND_WRITE_ZEROES
    assert READ_ONLY_FLAGS & nbd.NBD_FLAG_READ_ONLY and not TRANSMISSION_FLAGS & nbd.NBD_FLAG_READ_ONLY
    assert not READ_ONLY_FLAGS & (nbd.NBD_FLAG_SEND_WRITE_ZEROES | nbd.NBD_FLAG_SEND_FAST_ZERO | nbd.NBD_FLAG_SEND_TRIM)


async def test_read_only_binds_the_connection_that_was_told(tmp_path: Path) -> None:
    """Spec: with NBD_FLAG_READ_ONLY set "the server MUST error subsequent write operations": a connection opened
    while the export was a standby keeps refusing writes after the disk became ours; a new one writes."""
    store = ReplicaStore.create(tmp_path / DISK, DISK, MiB, BLOCK, owner="home-pc", epoch=1)
    ctl = HookController()
    ctl.add_export(store, ExportMode.STANDBY)
    srv = Server("p2pvbd", str(tmp_path / "nbd.sock"), DISK, tmp_path / DISK / DATA_FILE)

    def before() -> tuple[Client, int]:
        c = Client(srv)
        return c, c.open()

    def write_on(c: Client) -> int:
        return c.write(0, b"\x42" * 4096)

    def fresh_connection() -> tuple[int, int]:
        with client(srv) as (c, tflags):
            return tflags, c.write(0, b"\x42" * 4096)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_nbd, ctl, Path(srv.socket))
            old, old_flags = await trio.to_thread.run_sync(before)
            ctl.set_mode(DISK, ExportMode.PRIMARY)
            try:
                assert old_flags & nbd.NBD_FLAG_READ_ONLY
                assert await trio.to_thread.run_sync(write_on, old) == nbd.NBD_EPERM
                await trio.to_thread.run_sync(old.disconnect)
            finally:
                old.close()
            new_flags, error = await trio.to_thread.run_sync(fresh_connection)
            assert not new_flags & nbd.NBD_FLAG_READ_ONLY and error == 0
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def test_pipelined_writes_into_new_areas_are_each_answered_once(rw_servers: tuple[Server, Server]) -> None:
    """Writes that wait for their area's activation run side by side and their replies go out gathered:
    every request of a pipelined burst (writes into every area of the disk, a FLUSH among them) gets exactly
    one well-framed reply, and every write is there afterwards."""
    srv = rw_servers[0]
    area = 16 * MiB  # replica_store.ACTIVE_AREA_BYTES
    writes = {cookie: (cookie * area + 12345, bytes([cookie]) * 5000) for cookie in range(1, DISK_SIZE // area)}
    c = Client(srv)
    try:
        c.open()
        requests = [_request(nbd.NBD_CMD_WRITE, cookie, off, data) for cookie, (off, data) in writes.items()]
        requests.insert(len(requests) // 2, _request(nbd.NBD_CMD_FLUSH, 1000, 0, b""))
        c.send(b"".join(requests))
        answered = []
        for _ in range(len(writes) + 1):
            (magic,) = struct.unpack(">I", c.recv_exact(4))
            assert magic == nbd.NBD_SIMPLE_REPLY_MAGIC, hex(magic)
            error, cookie = struct.unpack(">IQ", c.recv_exact(12))
            assert error == 0, (cookie, error)
            answered.append(cookie)
        assert sorted(answered) == sorted([*writes, 1000])
        for off, data in writes.values():
            assert c.read(off, len(data)) == data
        c.disconnect()
    finally:
        c.close()


def _request(cmd: int, cookie: int, offset: int, payload: bytes) -> bytes:
    length = len(payload) if cmd == nbd.NBD_CMD_WRITE else 0
    return struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0, cmd, cookie, offset, length) + payload
