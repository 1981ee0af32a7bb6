"""libvirt through `virsh`: the daemon needs a handful of calls (a domain's XML and state, its job, a
migration), and virsh is in every libvirt installation, with nothing to build into the daemon's Python."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import trio

# A virsh query answers in milliseconds; a libvirtd that takes this long is stuck.
QUERY_SECONDS = 30.0
# The URI of the local system daemon, as virsh and virt-manager use it.
SYSTEM_URI = "qemu:///system"


class VirshError(Exception):
    """virsh failed; the message is its own (one line)."""


@dataclass(frozen=True)
class Virsh:
    uri: str = SYSTEM_URI

    def argv(self, *args: str) -> list[str]:
        return ["virsh", "-q", "-c", self.uri, *args]

    def run(self, *args: str, stdin: str | None = None, timeout: float = QUERY_SECONDS) -> str:
        """Blocking: for the CLI."""
        try:
            res = subprocess.run(self.argv(*args), input=stdin, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise VirshError("virsh is not installed (Debian: libvirt-clients)") from None
        except subprocess.TimeoutExpired:
            raise VirshError(f"virsh {args[0]} did not answer within {timeout:.0f} s") from None
        if res.returncode != 0:
            raise VirshError(_message(res.stderr) or f"virsh {args[0]} failed")
        return res.stdout

    async def arun(self, *args: str, seconds: float = QUERY_SECONDS) -> str:
        """In the daemon: without blocking its event loop; VirshError after ``seconds``."""
        try:
            with trio.fail_after(seconds):
                res = await trio.run_process(self.argv(*args), capture_stdout=True, capture_stderr=True,
                                             check=False)
        except FileNotFoundError:
            raise VirshError("virsh is not installed (Debian: libvirt-clients)") from None
        except trio.TooSlowError:
            raise VirshError(f"virsh {args[0]} did not answer within {seconds:.0f} s") from None
        if res.returncode != 0:
            raise VirshError(_message(res.stderr.decode(errors="replace")) or f"virsh {args[0]} failed")
        return res.stdout.decode(errors="replace")

    async def state(self, domain: str) -> str:
        """The domain's state word here ("running", "paused", "shut off", …; "absent" when unknown)."""
        try:
            return (await self.arun("domstate", domain)).strip() or "absent"
        except VirshError as e:
            if "ailed to get domain" in str(e) or "not found" in str(e):
                return "absent"
            raise

    async def migrating(self, domain: str) -> bool:
        """Whether libvirt runs a job on the domain here (a migration, for an adopted domain that moves);
        VirshError when libvirt cannot say (never taken for "no job": that calls a migration off)."""
        out = await self.arun("domjobinfo", domain)
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
        if info.get("Job type", "None") in ("None", "Completed", "Failed", "Cancelled"):
            return False
        return "migration" in info.get("Operation", "migration").lower()  # libvirt >= 3.3 names the operation


    async def completed_job(self, domain: str) -> dict[str, str]:
        """The statistics of the domain's last completed job here (`domjobinfo --completed`), by name."""
        out = await self.arun("domjobinfo", "--completed", domain)
        return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def parse_ms(text: str) -> float | None:
    """"372 ms" -> 372.0."""
    word = text.split()[0] if text.split() else ""
    try:
        return float(word)
    except ValueError:
        return None


def parse_size(text: str) -> int:
    """"88.032 MiB" -> bytes (virsh's units)."""
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    parts = text.split()
    try:
        return int(float(parts[0]) * units[parts[1]]) if len(parts) == 2 else 0
    except (ValueError, KeyError):
        return 0


def _message(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else ""
