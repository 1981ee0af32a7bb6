"""Small files replaced whole: config, keys, certificates, policies, address books.

One way to write them, so each gets the same guarantees: a crash leaves the old file or the new one,
never a mix (temp file, fsync, rename, fsync of the directory), and the temp file is created with the
final mode, so a private key is never briefly readable by others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

# Owner-only unless a caller says otherwise: most of these files are nobody else's business.
PRIVATE_FILE_MODE = 0o600


def fsync_dir(directory: Path) -> None:
    """Make renames, creations and deletions in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace ``path`` by ``data`` with mode ``mode``: a crash leaves the old or the new file whole."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover would keep its own mode through O_TRUNC
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json_file(path: Path, kind: type, log: logging.Logger) -> Any:
    """A small state file written by :func:`atomic_write`, or None when missing, unreadable or not a
    ``kind``: such a file only ever holds what can be learned again, so it is logged and ignored."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None
    if not isinstance(raw, kind):
        log.warning("ignoring %s: not a JSON %s", path, "object" if kind is dict else "list")
        return None
    return raw
