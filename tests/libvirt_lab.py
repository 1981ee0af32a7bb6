"""libvirt hosts on one machine for tests: each `libvirtd` in its own mount namespace, with its own
/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt bind-mounted from a
directory of the test, beside the p2pvbd daemon of the same "host". Migrations between them go over Unix
sockets (``qemu+unix:///system?socket=…``). Needs root, libvirt-daemon-driver-qemu and a libvirt-qemu
user (``ensure_libvirt_user``), as libvirtd refuses to start without it even when QEMU runs as root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

# System paths each instance has its own copy of; the mount points must exist outside the namespaces.
MOUNTS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt",
          "log": "/var/log/libvirt"}
# libvirtd's first QEMU capability probe takes 3-4 s here; this bounds a broken start, not a speed claim.
LIBVIRTD_READY_SECONDS = 60.0
# QEMU's incoming migration ports, a distinct range per instance (two instances on one machine must not
# both pick the same port). The default range is 49152-49215.
MIGRATION_PORT_BASE = 49152
MIGRATION_PORTS_EACH = 16

QEMU_CONF = """user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
stdio_handler = "file"
migration_port_min = {port_min}
migration_port_max = {port_max}
"""

LIBVIRTD_CONF = """host_uuid = "{uuid}"
auth_unix_rw = "none"
auth_unix_ro = "none"
"""


def libvirt_available() -> str | None:
    """Why libvirt hosts cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces)"
    for tool in ("libvirtd", "virsh", "unshare"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (make deps)"
    return None


def ensure_libvirt_user() -> None:
    """libvirtd will not start without a libvirt-qemu user and group (Debian's libvirt-daemon-system makes
    them; the packages the tests install do not)."""
    if subprocess.run(["getent", "group", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", "libvirt-qemu"], check=True)
    if subprocess.run(["id", "libvirt-qemu"], capture_output=True).returncode != 0:
        has_kvm = subprocess.run(["getent", "group", "kvm"], capture_output=True).returncode == 0
        groups = ["-G", "kvm"] if has_kvm else []
        subprocess.run(["useradd", "--system", "-g", "libvirt-qemu", *groups, "libvirt-qemu"], check=True)


class Libvirtd:
    """One libvirtd instance: a "host" of libvirt, reached at ``uri``."""

    def __init__(self, root: Path, index: int, prefix: list[str] | None = None) -> None:
        self.root = root
        self.index = index
        self.prefix = prefix or []  # e.g. ["ip", "netns", "exec", NS]: libvirtd and its QEMUs in a network namespace
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in MOUNTS:
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "etc" / "hooks").mkdir(exist_ok=True)
        port_min = MIGRATION_PORT_BASE + index * MIGRATION_PORTS_EACH
        (root / "etc" / "qemu.conf").write_text(QEMU_CONF.format(port_min=port_min,
                                                                 port_max=port_min + MIGRATION_PORTS_EACH - 1))
        (root / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(uuid=uuid.uuid4()))

    @property
    def hooks_dir(self) -> Path:
        return self.root / "etc" / "hooks"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.root}/run/libvirt-sock"

    def start(self) -> Libvirtd:
        """Start libvirtd in its namespace (the qemu hook, if any, must be in place before: libvirtd looks
        for it once, at start)."""
        for path in MOUNTS.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        binds = " && ".join(f"mount --bind {self.root / sub} {path}" for sub, path in MOUNTS.items())
        log = open(self.root / "libvirtd.out", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [*self.prefix, "unshare", "-m", "--propagation", "private", "sh", "-c",
             f"{binds} && exec libvirtd -p {self.root}/libvirtd.pid"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + LIBVIRTD_READY_SECONDS
        while self.virsh("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"libvirtd in {self.root} did not start: "
                                     f"{(self.root / 'libvirtd.out').read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        return self

    def virsh(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed ({res.returncode}): {res.stdout}{res.stderr}")
        return res

    def domains(self) -> list[str]:
        out = self.virsh("list", "--all", "--name", check=False).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def state(self, domain: str) -> str:
        res = self.virsh("domstate", domain, check=False)
        return res.stdout.strip() if res.returncode == 0 else "absent"

    def qemu_pid(self, domain: str) -> int | None:
        try:
            return int((self.root / "run" / "qemu" / f"{domain}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Destroy every domain (stopping libvirtd leaves QEMU running), then stop libvirtd."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for domain in self.domains():
            self.virsh("destroy", domain, check=False, timeout=60)
        for pidfile in (self.root / "run" / "qemu").glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
