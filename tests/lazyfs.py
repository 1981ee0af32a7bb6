"""A FUSE file system that forgets unsynced writes at a simulated power cut, in the manner of LazyFS.

It passes everything through to a backing directory except file data: a ``write`` lands in this process's
memory (page by page) and reaches the backing file only when that file is ``fsync``\\ ed or
``fdatasync``\\ ed. Killing this process with SIGKILL is the power cut: whatever was not synced is gone,
and a new mount over the same backing directory shows exactly what a machine would find after power came
back. Killing a process that writes (kill -9) loses nothing here, as with a real page cache: only a cut does.

Metadata (create, rename, unlink, truncate, mknod, chmod) reaches the backing directory at once, as in
LazyFS's default mode: a missing directory fsync is not caught, a rename of unsynced data is (the file
arrives empty).

It runs under the system Python (Debian's python3-pyfuse3 and python3-trio) as its own process:
``/usr/bin/python3 tests/lazyfs.py BACKING MOUNTPOINT``; it prints ``READY`` once mounted. SIGTERM or
``umount`` is a clean shutdown: everything is written back (which keeps the daemons' logs of a failed test).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from dataclasses import dataclass, field

import pyfuse3
import trio

PAGE = 4096  # the unit of unsynced data kept in memory, like the page cache's


@dataclass
class Unsynced:
    """A file's writes since its last fsync: whole pages, and how far they extend the file."""

    pages: dict[int, bytearray] = field(default_factory=dict)
    end: int = 0


def _errors(fn):  # type: ignore[no-untyped-def]
    """Turn an OSError of the backing directory into the FUSE error the kernel hands to the caller."""
    async def wrapped(*args, **kw):  # type: ignore[no-untyped-def]
        try:
            return await fn(*args, **kw)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
    wrapped.__name__ = fn.__name__
    return wrapped


class LazyFS(pyfuse3.Operations):
    enable_writeback_cache = False  # every write() must reach this process before it returns

    def __init__(self, backing: str) -> None:
        super().__init__()
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: backing}
        self._inodes: dict[tuple[int, int], int] = {}
        st = os.lstat(backing)
        self._inodes[(st.st_dev, st.st_ino)] = pyfuse3.ROOT_INODE
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._fds: dict[int, tuple[int, int]] = {}  # fh -> (backing fd, inode)
        self._unsynced: dict[int, Unsynced] = {}

    # --- names and attributes -------------------------------------------------------------------------

    def _path(self, inode: int, name: bytes | None = None) -> str:
        try:
            base = self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        return base if name is None else os.path.join(base, os.fsdecode(name))

    def _remember(self, path: str, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino)
        inode = self._inodes.get(key)
        if inode is None:
            inode = self._inodes[key] = self._next_inode
            self._next_inode += 1
        self._paths[inode] = path
        return inode

    def _attr(self, inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_blksize", "st_blocks",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        a.st_size = max(st.st_size, self._unsynced[inode].end) if inode in self._unsynced else st.st_size
        a.generation = 0
        a.entry_timeout = a.attr_timeout = 0  # sizes change here, not in the backing file: always ask
        return a

    def _entry(self, path: str) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        return self._attr(self._remember(path, st), st)

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self._path(parent_inode, name))

    @_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        fd = next((fd for fd, i in self._fds.values() if i == inode), None)
        st = os.fstat(fd) if fd is not None else os.lstat(self._path(inode))
        return self._attr(inode, st)

    @_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        if fields.update_size:
            self._truncate(inode, path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return await self.getattr(inode, ctx)

    def _truncate(self, inode: int, path: str, size: int) -> None:
        """A size change is metadata: it reaches the backing file now; unsynced data past it is dropped."""
        os.truncate(path, size)
        u = self._unsynced.get(inode)
        if u is None:
            return
        u.end = min(u.end, size)
        for p in [p for p in u.pages if p * PAGE >= size]:
            del u.pages[p]
        tail = u.pages.get(size // PAGE)
        if tail is not None:
            tail[size % PAGE:] = bytes(PAGE - size % PAGE)

    # --- directories -----------------------------------------------------------------------------------

    @_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._path(inode)
        return inode

    @_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        base = self._path(fh)
        names = sorted(os.listdir(base))
        for i, name in enumerate(names[start_id:], start_id):
            try:
                attr = self._entry(os.path.join(base, name))
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None  # metadata is durable at once (see the module's docstring)

    @_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(parent_inode, name)
        os.mkdir(path, stat.S_IMODE(mode))
        return self._entry(path)

    @_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(parent_inode, name)  # a Unix socket's bind() arrives here
        os.mknod(path, mode, rdev)
        return self._entry(path)

    @_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(parent_inode, name)
        os.symlink(target, path)
        return self._entry(path)

    @_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink(self._path(inode)))

    @_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(new_parent_inode, new_name)
        os.link(self._path(inode), path)
        return self._attr(inode, os.lstat(path))

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.unlink(self._path(parent_inode, name))

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.rmdir(self._path(parent_inode, name))

    @_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_NOREPLACE / RENAME_EXCHANGE: not needed here
        old, new = self._path(parent_inode_old, name_old), self._path(parent_inode_new, name_new)
        os.rename(old, new)
        for inode, path in list(self._paths.items()):
            if path == old or path.startswith(old + os.sep):
                self._paths[inode] = new + path[len(old):]

    @_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self._paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                     "f_namemax"):
            setattr(out, name, getattr(sv, name))
        return out

    # --- file data: the part that is lazy ------------------------------------------------------------

    def _handle(self, fd: int, inode: int) -> int:
        fh = fd  # backing fds are unique while open
        self._fds[fh] = (fd, inode)
        return fh

    @_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path = self._path(inode)
        if flags & os.O_TRUNC:
            self._truncate(inode, path, 0)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # read-modify-write of partial pages needs both
        return pyfuse3.FileInfo(fh=self._handle(fd, inode))

    @_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._path(parent_inode, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (flags & (os.O_EXCL | os.O_TRUNC)),
                     stat.S_IMODE(mode))
        st = os.fstat(fd)
        inode = self._remember(path, st)
        if flags & os.O_TRUNC:
            self._unsynced.pop(inode, None)
        return pyfuse3.FileInfo(fh=self._handle(fd, inode)), self._attr(inode, st)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        fd, inode = self._fds[fh]
        u = self._unsynced.get(inode)
        end = max(os.fstat(fd).st_size, u.end if u else 0)
        size = max(0, min(size, end - off))
        data = bytearray(os.pread(fd, size, off).ljust(size, b"\0"))
        if u:
            for p in range(off // PAGE, (off + size + PAGE - 1) // PAGE):
                page = u.pages.get(p)
                if page is not None:
                    a, b = max(off, p * PAGE), min(off + size, (p + 1) * PAGE)
                    data[a - off:b - off] = page[a - p * PAGE:b - p * PAGE]
        return bytes(data)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        fd, inode = self._fds[fh]
        u = self._unsynced.setdefault(inode, Unsynced())
        for p in range(off // PAGE, (off + len(buf) + PAGE - 1) // PAGE):
            page = u.pages.get(p)
            if page is None:  # start from what is durable, as a page cache reads a page in
                page = u.pages[p] = bytearray(os.pread(fd, PAGE, p * PAGE).ljust(PAGE, b"\0"))
            a, b = max(off, p * PAGE), min(off + len(buf), (p + 1) * PAGE)
            page[a - p * PAGE:b - p * PAGE] = buf[a - off:b - off]
        u.end = max(u.end, off + len(buf))
        return len(buf)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        fd, inode = self._fds[fh]
        self._write_back(inode, fd)

    def _write_back(self, inode: int, fd: int) -> None:
        u = self._unsynced.pop(inode, None)
        if u is None:
            return
        end = max(os.fstat(fd).st_size, u.end)
        for p in sorted(u.pages):
            os.pwrite(fd, u.pages[p][:max(0, min(PAGE, end - p * PAGE))], p * PAGE)

    def write_back_all(self) -> None:
        """A clean unmount is a clean shutdown: everything still in memory reaches the backing files."""
        for inode in list(self._unsynced):
            path = self._paths.get(inode)
            if path is None or not os.path.exists(path):
                continue
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                self._write_back(inode, fd)
            finally:
                os.close(fd)

    async def flush(self, fh: int) -> None:
        return None  # close() makes nothing durable

    @_errors
    async def release(self, fh: int) -> None:
        fd, _ = self._fds.pop(fh)
        os.close(fd)


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")  # root runs everything here; the backing dir checks modes itself
    options |= {"fsname=lazyfs", "allow_other"}
    fs = LazyFS(os.path.abspath(backing))
    pyfuse3.init(fs, mountpoint, options)
    print("READY", flush=True)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    fs.write_back_all()


async def _serve() -> None:
    """Serve until unmounted or told SIGTERM: both are a clean shutdown (a power cut is SIGKILL)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_sigterm)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _on_sigterm() -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


if __name__ == "__main__":
    main()
