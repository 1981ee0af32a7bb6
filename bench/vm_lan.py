"""Helpers of bench/vm_figures.py: the VM's own LAN, a TCP receiver on it, the guest's serial lines over time,
and the move's phases as the source daemon reports them.

The VM LAN is a second L2 segment, apart from the daemons' shaped 100 Mbit/s network: a bridge in its own
namespace with a "server" host (10.78.0.1, tests/netns.py) and, inside each daemon's namespace, a bridge
``vmbr`` joining a veth to that segment and the tap ``vmtap`` the daemon's QEMU opens (QEMU is the daemon's
child, so it runs in the daemon's namespace). The guest (10.78.0.10, one MAC on both hosts) thus sits on the
same segment wherever it runs; after a move QEMU's self-announce makes the bridges relearn its MAC.

    .venv/bin/python bench/vm_lan.py receive ADDRESS PORT OUT.json   # the receiver (run inside the server)
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from p2pvbd.base.control import ControlError, call  # noqa: E402
from p2pvbd.base.home import Home  # noqa: E402
from tests.netns import Network, NsHost, _cmd  # noqa: E402
from tests.vm_guest import QemuGuest, qemu_nbd  # noqa: E402

LAN_SUBNET = "10.78.0.0/24"
GUEST_NET = "10.78.0.10/24"
GUEST_MAC = "52:54:00:78:00:10"
PORT = 5001
BUCKET_S = 0.01  # the receiver counts bytes per 10 ms
GAP_S = 0.02  # ... and notes every pause between two receives longer than this
TAP, VMBR = "vmtap", "vmbr"


def qemu_net_args() -> list[str]:
    """QEMU arguments (for `vm create --qemu-arg=`) putting the guest on the host's tap, the same MAC everywhere."""
    return ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}"]


class VmLan:
    """The VM's LAN: the server's download (the guest's stream) is shaped to ``rate``. Close with close()."""

    def __init__(self, rate: str) -> None:
        self.net = Network(LAN_SUBNET)
        self.server: NsHost = self.net.add_host("server", download=rate)
        self.ports = 0

    def attach(self, host: NsHost) -> None:
        """A bridge with a tap for QEMU inside ``host``'s namespace, plugged into this LAN."""
        self.ports += 1
        port = f"vm{self.ports}"
        _cmd("ip", "-n", self.net.ns, "link", "add", port, "type", "veth", "peer", "name", "vmlan", "netns", host.ns)
        _cmd("ip", "-n", self.net.ns, "link", "set", port, "master", "br0", "up")
        _cmd("ip", "-n", host.ns, "link", "add", VMBR, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _cmd("ip", "-n", host.ns, "tuntap", "add", "dev", TAP, "mode", "tap")
        for dev in (TAP, "vmlan"):
            _cmd("ip", "-n", host.ns, "link", "set", dev, "master", VMBR, "up")
        _cmd("ip", "-n", host.ns, "link", "set", VMBR, "up")

    def receiver(self, out: Path) -> subprocess.Popen[bytes]:
        return self.server.popen(sys.executable, __file__, "receive", self.server.address, str(PORT), str(out))

    def close(self) -> None:
        self.net.close()


# ---- the receiver (inside the server's namespace) -----------------------------------------------------
def receive(address: str, port: int, out: Path) -> None:
    """Accept connections one after another; count bytes per BUCKET_S of time.time() and note the gaps between
    receives. Writes ``out`` on SIGTERM."""
    buckets: dict[int, int] = {}
    gaps: list[list[float]] = []  # [time.time() of the receive that ended the gap, gap s]
    connections: list[float] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv = socket.create_server((address, port), reuse_port=True)
    buf = bytearray(1 << 18)
    try:
        while True:
            conn, _ = srv.accept()
            connections.append(time.time())
            last = time.time()
            with conn:
                while n := conn.recv_into(buf):
                    now = time.time()
                    key = int(now / BUCKET_S)
                    buckets[key] = buckets.get(key, 0) + n
                    if now - last > GAP_S:
                        gaps.append([round(now, 4), round(now - last, 4)])
                    last = now
    finally:
        out.write_text(json.dumps({"bucket_s": BUCKET_S, "buckets": sorted(buckets.items()), "gaps": gaps,
                                   "connections": connections}))


def stop_receiver(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    proc.terminate()
    proc.wait(timeout=30)
    return json.loads(out.read_text())


# ---- the guest's lines, stamped with host time ------------------------------------------------------------
LINE = re.compile(rb"^(BENCH|STREAM) (\d+) (\d+) (\d+)\r?$", re.M)
# A crashed guest, or one whose virtio device state did not survive the move (seen: "output.0:id 0 is not a head!").
CRASH = re.compile(rb"Kernel panic|Fatal exception|general protection fault|BUG: |Oops|soft lockup|is not a head")


class SerialTail:
    """Reads the VM's serial logs (one per host it ran on) every 50 ms while running. A line's time on the host
    is its guest clock plus an offset per log: the smallest (first seen - guest clock) over its lines."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.seen: dict[Path, list[tuple[float, int, int, int]]] = {p: [] for p in paths}
        self.crash_seen: float | None = None  # time.time() a crash message first showed up
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SerialTail:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        pos = dict.fromkeys(self.paths, 0)
        rest = dict.fromkeys(self.paths, b"")
        while not self.stop.wait(0.05):
            for p in self.paths:
                with contextlib.suppress(OSError), open(p, "rb") as f:
                    f.seek(pos[p])
                    data = rest[p] + f.read()
                    pos[p] = f.tell()
                    now = time.time()
                    head, _, rest[p] = data.rpartition(b"\n")
                    for m in LINE.finditer(head):
                        self.seen[p].append((now, int(m[2]), int(m[3]), int(m[4])))
                    if self.crash_seen is None and CRASH.search(head):
                        self.crash_seen = now

    def series(self) -> list[tuple[float, float, float]]:
        """(host time.time() at the end of the interval, interval s, bytes/s) of every BENCH/STREAM line."""
        out = []
        for rows in self.seen.values():
            if rows:
                offset = min(seen - ms / 1000 for seen, ms, _, _ in rows)
                out += [(ms / 1000 + offset, span / 1000, n * 1000 / span) for _, ms, n, span in rows if span]
        return sorted(out)

    def crashed(self) -> bool:
        return any(p.exists() and CRASH.search(p.read_bytes()) for p in self.paths)

    def text(self, path: Path) -> bytes:
        return path.read_bytes() if path.exists() else b""


# ---- the move's phases ------------------------------------------------------------------------------------
class PhaseWatch:
    """Polls the source daemon's jobs every 0.1 s while a move runs: time.time() each phase was first seen."""

    def __init__(self, home: Path) -> None:
        self.sock = Home(home).control_socket
        self.known = max((j["job"] for j in self._jobs()), default=0)
        self.phases: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PhaseWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _jobs(self) -> list[dict[str, Any]]:
        """This daemon's numbered jobs (an incoming move is listed too, under its VM's name)."""
        return [j for j in call(self.sock, "jobs", timeout=5) if isinstance(j.get("job"), int)]

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(ControlError, OSError):
                mine = [j for j in self._jobs() if j["job"] > self.known]
                if mine:
                    now = time.time()
                    self.phases.setdefault(mine[-1]["phase"], now)
                    for d in mine[-1].get("disks", []):  # the disk's own: bulk, mirror, ready, switchover
                        self.phases.setdefault(f"disk {d['phase']}", now)
            self.stop.wait(0.1)


# ---- the same flow, QEMU to QEMU ----------------------------------------------------------------------------
def qemu_stream_reference(work: Path, kernel: Path, initrd: Path, rate: str, vm_rate: str, pbs: bool,
                          before_s: float, after_s: float) -> dict[str, Any]:
    """The stream guest moved QEMU to QEMU, no p2pvbd: the QEMUs in two namespaces linked at ``rate``, memory over
    TCP on that link, the disk one shared qemu-nbd export, the same VM LAN. With ``pbs`` QEMU stops at
    pause-before-switchover, as in p2pvbd's moves, and is continued at once. Shaped like a tcp_run result."""
    work.mkdir(parents=True)
    image = work / "disk.raw"
    image.write_bytes(bytes(16 << 20))
    server = qemu_nbd(image, work / "nbd.sock", "vm1")
    guests: list[QemuGuest] = []
    try:
        with Network() as net:
            a, b = (net.add_host(n, upload=rate, download=rate) for n in ("office-pc", "car-pc"))
            lan = VmLan(vm_rate)
            try:
                lan.attach(a)
                lan.attach(b)
                recv = lan.receiver(work / "received.json")

                def guest(tag: str, host: NsHost, incoming: str | None = None) -> QemuGuest:
                    g = QemuGuest(work / tag, kernel, initrd, work / "nbd.sock", "vm1", workload="stream",
                                  memory_mb=128, incoming=incoming, dst=lan.server.address, port=PORT)  # type: ignore[arg-type]
                    g.command = [*host.exec_prefix(), *g.command, *qemu_net_args()]
                    guests.append(g)
                    return g.start()

                src = guest("src", a)
                with SerialTail([src.serial_log, work / "dst" / "serial.log"]) as tail:
                    src.wait_for(lambda: b"STREAM CONNECTED" in src.serial(), "the guest's TCP stream")
                    t_start = time.time()
                    time.sleep(before_s)
                    guest("dst", b, incoming=f"tcp:{b.address}:4444")
                    time.sleep(1)  # QEMU listens
                    qmp = src.qmp()
                    if pbs:
                        qmp.execute("migrate-set-capabilities",
                                    capabilities=[{"capability": "pause-before-switchover", "state": True}])
                    qmp.execute("migrate-set-parameters", **{"downtime-limit": 50})
                    t0 = time.time()
                    qmp.execute("migrate", uri=f"tcp:{b.address}:4444")
                    while (info := qmp.execute("query-migrate"))["status"] not in ("completed", "failed"):
                        if info["status"] == "pre-switchover":
                            qmp.execute("migrate-continue", state="pre-switchover")
                        time.sleep(0.02)
                    t1 = time.time()
                    time.sleep(after_s)
                received = stop_receiver(recv, work / "received.json")
            finally:
                lan.close()
    finally:
        for g in guests:
            g.kill()
        server.kill()
    summary = {"duration_s": round(t1 - t0, 3), "vm_downtime_ms": info.get("downtime"),
               "error": "" if info["status"] == "completed" else info["status"]}
    return {"kind": "qemu, pause-before-switchover" if pbs else "qemu", "vm_rate": vm_rate, "t_start": t_start,
            "t_end": time.time(), "migration": {"launched": t0, "returned": t1, "phases": {}, "summary": summary},
            "received": received, "guest_sent": tail.series(), "crashed": tail.crashed(),
            "crash_s": tail.crash_seen - t0 if tail.crash_seen else None}


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "receive":
        receive(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit(f"usage: {sys.argv[0]} receive ADDRESS PORT OUT.json")
