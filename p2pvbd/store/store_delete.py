"""Deleting a replica's directory so that a crash midway leaves the whole replica or nothing of it.

The directory is first renamed to a hidden name beside it (one atomic rename, made durable by syncing
the parent directory); only then are its files removed. A crash before the rename leaves the replica
as it was; after it, the disk's name no longer exists (``Home.disk_names`` skips hidden names), so no
half-removed replica is ever opened or served. What a crash left under the hidden name is removed at
the next start (:func:`remove_leftovers`). Nothing of the files is read: a huge, mostly empty disk is
deleted as fast as a small one.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

# A replica being deleted is renamed to this prefix; disk names cannot start with a dot (home.NAME_RE).
DELETED_PREFIX = ".deleted-"


def delete_store(directory: Path) -> int:
    """Remove the replica at ``directory`` (closed by the caller); the bytes its files took on disk."""
    directory = Path(directory)
    used = sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file())
    aside = directory.with_name(f"{DELETED_PREFIX}{directory.name}.{time.time_ns()}")
    directory.rename(aside)
    _sync_dir(directory.parent)
    shutil.rmtree(aside)
    return used


def remove_leftovers(disks_dir: Path) -> list[Path]:
    """Finish the deletions a crash cut short (directories renamed aside, not yet removed)."""
    left = sorted(Path(disks_dir).glob(f"{DELETED_PREFIX}*")) if Path(disks_dir).is_dir() else []
    for aside in left:
        shutil.rmtree(aside, ignore_errors=True)
    return left


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
