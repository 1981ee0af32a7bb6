"""Power cuts for tests: a directory on tests/lazyfs.py, and a host whose home lives there.

A power cut stops the processes that write (SIGSTOP: the CPU halts mid-instruction), kills the file
system (its unsynced writes vanish), kills the stopped processes and mounts the file system again over
what was synced. kill -9 alone would not do: the page cache outlives a killed process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.daemons import Host, env_without_venv, run, system_python

LAZYFS = Path(__file__).with_name("lazyfs.py")
MOUNT_SECONDS = 30.0  # a hang guard for mounting; pyfuse3 mounts in well under a second


def unavailable_reason() -> str | None:
    """Why power-cut tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    res = subprocess.run([system_python(), "-c", "import pyfuse3, trio"], capture_output=True, text=True,
                         env=env_without_venv())
    if res.returncode != 0:
        return "python3-pyfuse3 is not installed (make test installs it)"
    return None


def require_lazyfs() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


class LazyMount:
    """``mountpoint`` shows ``backing`` through lazyfs; :meth:`cut` loses what was not synced."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing, self.mountpoint = backing, mountpoint
        backing.mkdir(parents=True, exist_ok=True)
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([system_python(), str(LAZYFS), str(self.backing), str(self.mountpoint)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env_without_venv())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # READY once mounted; EOF if it died
        if line.strip() != "READY":
            self.proc.kill()
            raise AssertionError(f"lazyfs did not mount {self.mountpoint}: {self.proc.communicate()[1]}")

    def cut(self, writers: Iterable[subprocess.Popen[bytes] | subprocess.Popen[str]] = ()) -> None:
        """The power cut: halt the writers, drop the unsynced data, kill the writers, mount again."""
        writers = [w for w in writers if w.poll() is None]
        for w in writers:
            w.send_signal(signal.SIGSTOP)
        self._kill()
        for w in writers:
            w.kill()
            w.wait()
        self.start()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        run("umount", "-l", str(self.mountpoint), check=False)

    def close(self) -> None:
        """A clean shutdown (lazyfs writes everything back on SIGTERM), then the mount goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=MOUNT_SECONDS)
        self._kill()


class PowerHost(Host):
    """A host whose home is on lazyfs: :meth:`power_cut` is the machine losing power, then booting."""

    def __init__(self, root: Path, name: str, *extra: str, join: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.env = env or {}  # the daemon's environment at every start, power cuts included
        self.fs = LazyMount(root / f"{name}.disk", root / name)
        try:
            super().__init__(root / name, name, *extra, join=join)
        except BaseException:
            self.fs.close()
            raise

    def start(self, env: dict[str, str] | None = None) -> PowerHost:
        super().start({**self.env, **(env or {})})
        return self

    def power_cut(self, restart: bool = True) -> None:
        self.fs.cut([self.proc] if self.proc is not None else [])
        if restart:
            self.start()

    def close(self) -> None:
        if self.alive():
            self.stop()
        self.fs.close()
