"""What a disk of a given size costs the host that stores it, and whether this host can back it.

A store is sparse: ``data.raw`` grows as blocks are written, so a disk larger than the file system's
free space is created at once and fails writes only when it fills. Its metadata (``meta.bin``, 24 bytes
a block) is read whole into memory when the daemon opens it: 384 MiB per TiB at 64 KiB blocks. Both are
worth a warning at ``disk create``, not a refusal: thin provisioning is a deliberate choice. Pure: the
caller measures free space and memory.
"""

from __future__ import annotations

from p2pvbd.base.units import format_size
from p2pvbd.store.store_files import META_DTYPE
from p2pvbd.store.version_map import blocks_for


def metadata_bytes(size: int, block_size: int) -> int:
    """Bytes of version and hash records for a disk: on disk once written, in memory while open."""
    return blocks_for(size, block_size) * META_DTYPE.itemsize


def capacity_warnings(size: int, block_size: int, free_disk: int, free_memory: int | None) -> list[str]:
    """One line per way this host cannot back a disk of ``size`` bytes in full."""
    meta = metadata_bytes(size, block_size)
    out = []
    if size + meta > free_disk:
        out.append(f"the disk is {format_size(size)} (and {format_size(meta)} of metadata) but its file system has "
                   f"{format_size(free_disk)} free: guest writes fail once it fills")
    if free_memory is not None and meta > free_memory:
        out.append(f"its metadata takes {format_size(meta)} of memory while the daemon runs, more than the "
                   f"{format_size(free_memory)} available (larger blocks take less: --block-size)")
    return out
