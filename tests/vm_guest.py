"""A real QEMU guest for tests: Debian's cloud kernel, a busybox initramfs made here without root, and
tests/guest/workload.c writing self-checking records to its virtio disk, which QEMU reaches over NBD.

Why a real guest: only QEMU's own NBD client, migration and virtio path show what a VM sees when the
disk under it moves. The guest talks on its serial port (a file on the host) and QEMU is driven over
QMP. See workload.c for the record format and the console lines parsed here.

    kernel, initrd = guest_kernel(), build_initramfs(tmp)
    guest = QemuGuest(tmp / "g1", kernel, initrd, nbd_sock, "vm1", workload="write").start()
    guest.wait_for(lambda: guest.acked() >= 20, "20 records")
    guest.quit()
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from p2pvbd.vm.definition import TCG_RAM_PAD

WORKLOAD_SRC = Path(__file__).with_name("guest") / "workload.c"
CACHE_DIR = Path(tempfile.gettempdir()) / "p2pvbd-vm-guest"
BUSYBOX = Path("/bin/busybox")
# Loaded in this order with their dependencies first; the cloud kernel builds them as modules. ACPI's
# power button and the event devices busybox acpid reads it from are loaded too, for a guest told to
# honour the button (``powerbutton=1``; without it nothing listens and the button does nothing).
GUEST_MODULES = ("virtio_pci", "virtio_blk", "button", "evdev")
BOOT_TIMEOUT = 300.0  # a hang guard only: TCG boots in seconds, but a loaded 2-core CI machine is slow

T = TypeVar("T")

INIT_SCRIPT = """#!/bin/busybox sh
# p2pvbd test guest: load virtio, read workload=/workload_*= from the kernel command line, run it.
echo  # end SeaBIOS's unterminated screen-clearing line, so the guest's lines start clean
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules); do insmod "/lib/modules/$m.ko" || echo "ERR 0 insmod $m"; done
mode=write
opts=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    workload=*) mode="${arg#workload=}" ;;
    workload_*=*) opts="$opts ${arg#workload_}" ;;
    pingflood=*) pingflood="${arg#pingflood=}" ;;
    memfill_mb=*) memfill="${arg#memfill_mb=}" ;;
    readdisk_mb=*) readdisk="${arg#readdisk_mb=}" ;;
    memchurn_mb=*) memchurn="${arg#memchurn_mb=}" ;;
    powerbutton=*) powerbutton="${arg#powerbutton=}" ;;
  esac
done
if [ -n "$powerbutton" ]; then  # the ACPI power button shuts down: flush, say so, power off
  mkdir -p /etc/acpi/PWRF
  printf '#!/bin/sh\necho "GUEST POWERDOWN" > /dev/console\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
  chmod +x /etc/acpi/PWRF/00000080
  acpid -f -c /etc/acpi -l /dev/null &  # its default log, /var/log/acpid.log, cannot be made here
fi
if [ -n "$pingflood" ]; then  # network load: pings as fast as replies come; PING <replies> every 2 s
  (while :; do echo "PING $(ping -A -q -w 2 "$pingflood" | awk '/packets received/ {print $4}')"; done) &
fi
if [ -n "$memfill" ]; then
  # memory no compressor shrinks, checked every 10 s (seldom: a busy TCG guest meets QEMU's migration
  # bug more often): MEMCHECK <n> OK|BAD
  mount -t tmpfs -o size=90% tmpfs /tmp  # the root file system may take only half the memory
  dd if=/dev/urandom of=/tmp/memfill bs=1M count="$memfill" 2>/dev/null || echo "MEMFILL FAILED"
  sum=$(md5sum /tmp/memfill | cut -c1-32)
  (n=0; while sleep 10; do n=$((n + 1))
     if [ "$(md5sum /tmp/memfill | cut -c1-32)" = "$sum" ]; then echo "MEMCHECK $n OK"; else echo "MEMCHECK $n BAD"; fi
   done) &
fi
if [ -n "$memchurn" ]; then
  # memory the guest keeps rewriting: N MiB of random data, one random MiB of it replaced every second
  # (MEMCHURN READY once filled)
  grep -q " /tmp " /proc/mounts || mount -t tmpfs -o size=90% tmpfs /tmp
  dd if=/dev/urandom of=/tmp/memchurn bs=1M count="$memchurn" 2>/dev/null || echo "MEMCHURN FAILED"
  echo "MEMCHURN READY"
  (while sleep 1; do
     dd if=/dev/urandom of=/tmp/memchurn bs=1M count=1 seek=$((RANDOM % memchurn)) conv=notrunc 2>/dev/null
   done) &
fi
if [ "$mode" != idle ]; then
  i=0
  while [ ! -b /dev/vda ] && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
fi
# readdisk_mb=N: the first N MiB of the disk in the page cache, as a guest's files would be
[ -n "$readdisk" ] && dd if=/dev/vda of=/dev/null bs=1M count="$readdisk" 2>/dev/null
/bin/workload "$mode" /dev/vda $opts
echo "WORKLOAD EXIT $?"
reboot -f
"""

# Added to /init by build_initramfs(net=...): the benchmarks' guest on a bridged network (virtio-net).
NET_SETUP = """ip link set lo up
ip addr add {net} dev eth0 && ip link set eth0 up || echo "ERR 0 network setup"
"""


def guest_kernel() -> Path:
    """The newest installed Debian cloud kernel (it boots fast and has virtio as small modules)."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))
    if not kernels:
        raise FileNotFoundError("no /boot/vmlinuz-*-cloud-amd64: install linux-image-cloud-amd64 (make deps)")
    return kernels[-1]


def kernel_modules(kernel: Path, names: Iterable[str] = GUEST_MODULES) -> list[Path]:
    """Module files for ``names`` and their dependencies, in load order (built-in ones are left out)."""
    root = Path("/lib/modules") / kernel.name.removeprefix("vmlinuz-")
    deps: dict[str, list[str]] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    builtin = (root / "modules.builtin").read_text() if (root / "modules.builtin").exists() else ""
    by_name = {_module_name(p): p for p in deps}
    order: list[Path] = []

    def visit(rel: str) -> None:
        if root / rel in order:
            return
        for dep in deps[rel]:
            visit(dep)
        order.append(root / rel)

    for name in names:
        if name in by_name:
            visit(by_name[name])
        elif not re.search(rf"/{name}\.ko\b", builtin):
            raise FileNotFoundError(f"kernel {root.name} has no module {name}")
    return order


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0]


def _module_bytes(path: Path) -> bytes:
    """busybox insmod takes plain ELF only, so unpack .ko.xz/.ko.zst/.ko.gz here."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def build_workload(cache_dir: Path = CACHE_DIR) -> Path:
    """workload.c compiled static (the initramfs has no libc), cached by the source's hash."""
    source = WORKLOAD_SRC.read_bytes()
    out = cache_dir / f"workload-{hashlib.sha256(source).hexdigest()[:16]}"
    if not out.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(tmp), str(WORKLOAD_SRC)], check=True)
        tmp.replace(out)  # atomic, so parallel builders never see half a binary
    return out


class _Cpio:
    """Writes the newc cpio format by hand, so device nodes such as /dev/console need no root."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        nlink = 2 if mode & 0o040000 else 1
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.parts += [head, b"\0" * (-len(head) % 4), data, b"\0" * (-len(data) % 4)]

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def build_initramfs(workdir: Path, kernel: Path | None = None, extra_modules: Sequence[str] = (),
                    net: str | None = None) -> Path:
    """A gzip'd cpio with busybox, the virtio modules for ``kernel``, /init and the workload.

    The tests' guest takes the defaults. Benchmarks add ``extra_modules`` (e.g. ``("virtio_net",)``) and
    ``net``, an address with prefix length (``"10.78.0.10/24"``) that /init gives eth0 before the workload."""
    kernel = kernel or guest_kernel()
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"no {BUSYBOX}: install busybox-static (make deps)")
    modules = kernel_modules(kernel, (*GUEST_MODULES, *extra_modules))
    init = INIT_SCRIPT
    if net is not None:
        if not re.fullmatch(r"[0-9.]+/[0-9]+", net):
            raise ValueError(f"net must be an IPv4 address with prefix length, not {net!r}")
        marker = "mode=write\n"
        init = init.replace(marker, NET_SETUP.format(net=net) + marker, 1)
    cpio = _Cpio()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cpio.file("bin/workload", build_workload().read_bytes(), 0o755)
    cpio.file("init", init.encode(), 0o755)
    for mod in modules:
        cpio.file(f"lib/modules/{_module_name(mod.name)}.ko", _module_bytes(mod))
    cpio.file("etc/modules", "".join(_module_name(m.name) + "\n" for m in modules).encode())
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "initramfs.cpio.gz"
    out.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    return out


def workload_append(mode: str = "write", **options: int | str) -> str:
    """Kernel command line words selecting the workload: mode write|verify|idle, options slots=,
    delay_ms=, count=, alive_every=, acked=, mem_mb=, mem_churn=; for benchmarks mode stream (dst=, port=)
    or bench (bs=, rand=, span_mb=, every_ms=, dsync=). See workload.c. A guest built with ``net`` (see
    build_initramfs) also takes ``pingflood=ADDR`` on its command line: it pings ADDR as fast as replies
    come and prints ``PING <replies>`` every 2 s."""
    return " ".join([f"workload={mode}", *(f"workload_{k}={v}" for k, v in options.items())])


def qemu_command(kernel: Path, initrd: Path, nbd_socket: Path, export: str, serial_log: Path, qmp_socket: Path,
                 memory_mb: int = 256, append_extra: str = "", incoming: str | None = None,
                 reconnect_delay: int | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    """qemu-system-x86_64 under TCG (KVM hangs here) with the NBD export as its virtio disk /dev/vda, and
    ``memory_mb`` of RAM plus TCG_RAM_PAD, as p2pvbd runs a TCG guest (docs/DESIGN.md, "Guests under TCG").

    ``incoming`` is a migration URI (``-incoming``); ``reconnect_delay`` is QEMU's NBD client
    reconnect-delay in seconds (default: none, so a lost server is an I/O error at once)."""
    nbd = f"driver=nbd,server.type=unix,server.path={nbd_socket},export={export},node-name=disk0"
    if reconnect_delay is not None:
        nbd += f",reconnect-delay={reconnect_delay}"
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-nographic", "-display", "none",
        "-m", f"{(memory_mb << 10) + (TCG_RAM_PAD >> 10)}K", "-smp", "1", "-no-reboot",
        "-serial", f"file:{serial_log}",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
        "-blockdev", nbd, "-device", "virtio-blk-pci,drive=disk0,id=vda",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"console=ttyS0 quiet panic=-1 {append_extra}".strip(),
    ]
    if incoming:
        cmd += ["-incoming", incoming]
    return cmd + list(extra_args)


class Qmp:
    """A minimal QMP client: JSON lines over QEMU's unix socket; events are kept in ``events``."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP socket closed")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command and return its ``return`` value; a QMP error raises RuntimeError."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            else:
                return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


REC_OK = re.compile(rb"^REC (\d+) OK\r?$", re.M)
VERIFY = re.compile(rb"^VERIFY ((?:\w+=\d+ ?)+)\r?$", re.M)
ALIVE = re.compile(rb"^ALIVE (\d+) (\d+)\r?$", re.M)
PING = re.compile(rb"^PING (\d*)\r?$", re.M)
ERR = re.compile(rb"^ERR .*$", re.M)
# memfill_mb=N on the kernel command line: the guest holds N MiB of random data and checks it (INIT_SCRIPT);
# memchurn_mb=N: it holds N MiB of random data and replaces a random MiB of it every second.
MEMCHECK = re.compile(rb"^MEMCHECK (\d+) (OK|BAD)\r?$", re.M)


class QemuGuest:
    """One QEMU process running the test guest, with its serial log and QMP socket in ``workdir``."""

    def __init__(self, workdir: Path, kernel: Path, initrd: Path, nbd_socket: Path, export: str,
                 workload: str = "write", memory_mb: int = 256, incoming: str | None = None,
                 reconnect_delay: int | None = None, **options: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.serial_log, self.qmp_socket = workdir / "serial.log", workdir / "qmp.sock"
        self.command = qemu_command(kernel, initrd, nbd_socket, export, self.serial_log, self.qmp_socket,
                                    memory_mb, workload_append(workload, **options), incoming, reconnect_delay)
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self.started = 0.0

    def start(self) -> QemuGuest:
        self.serial_log.unlink(missing_ok=True)
        self.qmp_socket.unlink(missing_ok=True)
        with (self.workdir / "qemu.stderr").open("wb") as err:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        self.started = time.monotonic()
        return self

    def serial(self) -> bytes:
        return self.serial_log.read_bytes() if self.serial_log.exists() else b""

    def ready(self) -> bool:
        return b"GUEST READY" in self.serial()

    def acked(self) -> int:
        """The highest record the guest saw acknowledged and read back (0: none)."""
        found = REC_OK.findall(self.serial())
        return int(found[-1]) if found else 0

    def errors(self) -> list[str]:
        return [m.decode(errors="replace") for m in ERR.findall(self.serial())]

    def alive(self) -> list[tuple[int, int]]:
        """(record, guest monotonic ms) heartbeats: gaps show how long the guest stalled."""
        return [(int(k), int(ms)) for k, ms in ALIVE.findall(self.serial())]

    def verify_result(self) -> dict[str, int] | None:
        m = VERIFY.search(self.serial())
        if not m:
            return None
        return {k: int(v) for k, v in (w.split("=") for w in m.group(1).decode().split())}

    def wait_for(self, predicate: Callable[[], T | None], what: str, timeout: float = BOOT_TIMEOUT) -> T:
        """Poll until ``predicate`` is truthy; fail at once if QEMU exits, and after ``timeout`` (a hang guard)."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            exited = self.proc is not None and self.proc.poll() is not None
            if exited or time.monotonic() > deadline:
                why = f"QEMU exited with {self.proc.returncode}" if exited and self.proc else "timed out"
                raise AssertionError(f"{why} waiting for {what}\n{self.diagnostics()}")
            time.sleep(0.2)

    def diagnostics(self) -> str:
        err = self.workdir / "qemu.stderr"
        stderr = err.read_text(errors="replace")[-2000:] if err.exists() else ""
        return f"--- serial (tail) ---\n{self.serial()[-3000:].decode(errors='replace')}\n--- qemu stderr ---\n{stderr}"

    def qmp(self) -> Qmp:
        if self._qmp is None:
            self._qmp = Qmp(self.qmp_socket)
        return self._qmp

    def wait_exit(self, timeout: float = BOOT_TIMEOUT) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def quit(self, timeout: float = 60.0) -> None:
        """Stop QEMU the way a user would, over QMP; kill it if that fails."""
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            return
        try:
            self.qmp().execute("quit")
        except (OSError, ConnectionError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None


def qemu_nbd(image: Path, socket_path: Path, export: str, *args: str) -> subprocess.Popen[bytes]:
    """qemu-nbd serving a raw ``image`` on a unix socket to up to 4 clients, persisting between them."""
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-e", "4", "-k", str(socket_path), "-x", export,
                             *args, str(image)], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"qemu-nbd did not start (exit {proc.poll()})")
        time.sleep(0.05)
    return proc


def verify_records(workdir: Path, kernel: Path, initrd: Path, nbd_socket: Path, export: str,
                   acked: int, **options: int) -> dict[str, int]:
    """Boot a second guest on the export (the first one stopped) that reads every slot back: its VERIFY
    counts, with ``stale`` the slots missing a record up to ``acked`` that the first guest saw written.
    ``options`` are the workload's (slots=, as the writing guest had them)."""
    checker = QemuGuest(workdir, kernel, initrd, nbd_socket, export, workload="verify", memory_mb=128,
                        acked=acked, **options).start()
    try:
        return checker.wait_for(checker.verify_result, "the verifying guest")
    finally:
        checker.kill()
