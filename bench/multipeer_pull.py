"""Multi-peer pull: how fast an empty host pulls a disk from N full replicas over shaped links.

Usage: .venv/bin/python bench/multipeer_pull.py [--quick] [--json FILE] [--repeat R] [--ns 1,2,3,4]
           [--no-half-zero] [--profile DIR] [--profile-ns 1,4] [--pythonpath DIR] [--report FILE]

Needs root (network namespaces, tc). Every case runs in a fresh swarm of its own, with every host in
its own network namespace (tests/netns.py) and its own daemon (tests/daemons.py):

* ``owner`` imports a 256 MiB random image (``p2pvbd disk import``; ``--quick``: 64 MiB) as ``vm1``;
* N sources hold a full replica: the owner plus N-1 peers ``peer1`` … that first synced it from the
  owner (``sync --from owner``) over unshaped links;
* then every source's upload is shaped to 50 Mbit/s (tbf, ``Network.shape(host, upload="50mbit")``),
  and an empty, unshaped ``target`` joins and, once it sees every source as a holder, runs
  ``p2pvbd sync vm1 --from <the N sources> --json`` — the timed part (wall clock of the command, and
  the daemon's own ``duration_s``, from the request to the last block stored).

The bound is ``missing_bytes / (N × 6.25 MB/s)``: the links' raw rate. tbf counts Ethernet frames, so
TCP can carry at most 1448/1514 of it (MTU 1500, timestamps): the goodput bound is the same divided by
that factor, and 0.956 is the best efficiency any TCP transfer can reach against the raw bound.
Efficiency = bound / duration_s. ``wire / stale`` is the sync's ``bytes_on_wire`` (block payloads
received, endgame duplicates included) over the bytes it had to fetch; ``link / stale`` uses the
sources' tbf byte counters instead (everything they sent while the sync ran and until the bench read
the counters: Ethernet/IP/TCP/TLS headers, msgpack, duplicates, also replies nobody waits for any
more; 1514/1448 = 1.046 is the floor).

A half-zero case: ``vm1`` is 256 MiB whose second half was never written (the image's zero half is
left sparse by ``disk import``), N = 2: only the non-zero half may travel.

While a sync runs, the bench polls the target's job over its control socket every 0.2 s (as often
as the CLI itself does) and reads each source's eth0 counter from /proc/PID/net/dev. From that:
``setup`` (daemon time before the first block request: owner lookup, maps, plan), ``last block``
(when the last needed block arrived), ``tail`` (the time the sync ran after that, waiting for
requests still in flight), ``link use`` (link bytes / (N × rate × (duration - setup))). CPU is each
daemon's user+system time during the sync (all threads); ``target CPU wait`` is the time the target
daemon's event-loop thread was runnable but waiting for a CPU (schedstat run delay); ``other load``
is the share of all CPUs busy with anything but the daemons (other users of the machine, and the
kernel's softirq work for these links).

``--profile DIR`` afterwards re-runs the N of ``--profile-ns`` once more with py-spy recording the
target daemon and the owner's daemon (raw collapsed stacks with --threads --idle in DIR) and prints
where their time goes; those runs are not part of the table. ``--pythonpath DIR`` runs the daemons
from another copy of the package (to measure a changed constant); ``--report FILE`` re-prints the
table of an earlier ``--json FILE``.

Namespaces and daemons are removed on exit, also on errors and Ctrl-C (the harness' context manager);
the exit status is 0 even when a target is missed (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from py_spy_summary import stop_spies, summarize_profile  # noqa: E402

from p2pvbd.base.control import ControlError, call  # noqa: E402
from p2pvbd.base.home import Home  # noqa: E402
from tests.daemons import Host  # noqa: E402
from tests.netns import Network, NsHost, qdiscs, unavailable_reason  # noqa: E402

PY_SPY = Path(sys.executable).parent / "py-spy"
MiB = 1 << 20
DISK = "vm1"
FULL_SIZE = 256 * MiB
QUICK_SIZE = 64 * MiB
BLOCK = 64 * 1024  # p2pvbd's default block size, what `disk import` uses
RATE = "50mbit"
RATE_BYTES = 50e6 / 8  # 6.25 MB/s
GOODPUT = 1448 / 1514  # TCP payload per byte tbf counts (MTU 1500, TCP timestamps)
TARGET_EFFICIENCY = 0.9
TARGET_WIRE_RATIO = 1.02
# Generous bounds for setup steps; none of them is a speed assertion.
VISIBLE_SECONDS = 60.0
SYNC_TIMEOUT = 1800.0
POLL_SECONDS = 0.2


# ---- results -------------------------------------------------------------------------------------
@dataclass
class Sample:
    case: str  # "random" or "half-zero"
    n: int
    disk_bytes: int
    missing_bytes: int  # what the planner fetches (the job's total_bytes)
    wall_s: float
    duration_s: float
    setup_s: float | None  # daemon time before the first block request went out (maps, lookups)
    blocks_fetched: int
    zero_blocks: int
    bytes_on_wire: int
    link_bytes: int  # the sources' tbf byte counters during the sync
    bytes_from: dict[str, int]
    peer_last_byte_s: dict[str, float | None]  # daemon time of each source's last byte
    cpu_s: dict[str, float]  # daemon CPU seconds during the sync
    verified: bool
    load_before: float
    link_busy: dict[str, float] = field(default_factory=dict)  # share of the pull its link ran >= half rate
    link_last_s: dict[str, float] = field(default_factory=dict)  # job time of the source's last sent bytes
    run_delay_s: dict[str, float] = field(default_factory=dict)  # event-loop thread runnable but not running
    others_cpu_share: float = 0.0  # share of all CPUs busy with anything but the daemons (other load, softirq)
    timeline: list[Point] = field(default_factory=list)

    @property
    def pull_end_s(self) -> float:
        """Job time when the last block the sync needed had arrived."""
        return max((t for t in self.peer_last_byte_s.values() if t is not None), default=self.duration_s)

    @property
    def tail_s(self) -> float:
        """Time the sync ran after its last needed block arrived (waiting for endgame duplicates)."""
        return max(0.0, self.duration_s - self.pull_end_s)

    @property
    def link_util(self) -> float:
        """The sources' links' use after setup: link bytes / (N × rate × (duration - setup))."""
        return self.link_bytes / (self.n * RATE_BYTES * max(1e-9, self.duration_s - (self.setup_s or 0.0)))

    @property
    def bound_s(self) -> float:
        return self.missing_bytes / (self.n * RATE_BYTES)

    @property
    def goodput_bound_s(self) -> float:
        return self.bound_s / GOODPUT

    @property
    def efficiency(self) -> float:
        return self.bound_s / self.duration_s

    @property
    def wall_efficiency(self) -> float:
        return self.bound_s / self.wall_s

    @property
    def wire_ratio(self) -> float:
        return self.bytes_on_wire / self.missing_bytes if self.missing_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"bound_s": self.bound_s, "goodput_bound_s": self.goodput_bound_s,
                               "efficiency": self.efficiency, "wall_efficiency": self.wall_efficiency,
                               "wire_ratio": self.wire_ratio, "tail_s": self.tail_s, "link_util": self.link_util,
                               "pull_end_s": self.pull_end_s}


@dataclass
class Point:
    at: float  # bench clock (time.monotonic)
    job_s: float  # the job's duration_s at that moment (daemon clock from the sync request)
    phase: str
    done: int
    good: dict[str, int]  # bytes_from: accepted bytes per source
    tx: dict[str, int]  # each source's eth0 tx byte counter (frames, headers included)


@dataclass
class Timeline:
    """The target's job and the sources' link counters, polled during the sync."""

    points: list[Point] = field(default_factory=list)

    def setup_s(self) -> float | None:
        """Daemon time before the first block request went out: owner lookup, maps, plan."""
        return next((p.job_s for p in self.points if p.phase in ("pulling", "done") or p.done > 0), None)

    def last_byte_s(self, peer: str, final: int) -> float | None:
        return next((p.job_s for p in self.points if p.good.get(peer, 0) >= final), None)

    def link_busy(self, peer: str, start: float, end: float) -> tuple[float, float]:
        """(share of [start, end] (job time) the source's link ran at >= half the rate, job time of the
        source's last sent byte)."""
        busy, last = 0.0, 0.0
        for a, b in zip(self.points, self.points[1:], strict=False):
            sent = b.tx.get(peer, 0) - a.tx.get(peer, 0)
            if sent > 32 * 1024:
                last = b.job_s
            lo, hi = max(a.job_s, start), min(b.job_s, end)
            if hi > lo and b.job_s > a.job_s and sent >= 0.5 * RATE_BYTES * (b.job_s - a.job_s):
                busy += hi - lo
        return (busy / (end - start) if end > start else 0.0), last


# ---- hosts ---------------------------------------------------------------------------------------
def wait_for(predicate: Any, what: str, timeout: float = VISIBLE_SECONDS, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(poll)


def holders(host: Host, disk: str) -> set[str]:
    res = host.cli("status", disk, "--json", check=False)
    if res.returncode != 0:
        return set()
    return {r["host"] for r in json.loads(res.stdout)["disks"][0]["replicas"]}


def sees_disk(host: Host) -> bool:
    res = host.cli("status", DISK, "--json", check=False)
    return res.returncode == 0 and bool(json.loads(res.stdout)["disks"])


def add_host(net: Network, homes: Path, name: str, hosts: list[Host], env: dict[str, str] | None = None) -> Host:
    ns = net.add_host(name)
    token = hosts[0].cli("invite").stdout.strip() if hosts else None
    host = Host(homes / name, name, join=token, prefix=ns.exec_prefix(), address=ns.address)
    hosts.append(host)  # before start(): stopped by the caller even if start() fails half-way
    return host.start(env)


def tx_bytes(ns: NsHost) -> int:
    """Bytes the host's shaped upload let through so far (its tbf's counter)."""
    return sum(int(q.get("bytes", 0)) for q in qdiscs(ns.ns, ns.dev) if q.get("kind") == "tbf")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_delay_s(pid: int) -> float:
    """Seconds the process's main thread (the daemon's event loop) waited for a CPU while runnable."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def busy_cpu_s() -> float:
    """CPU seconds all CPUs spent on anything but idle and iowait since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def daemon_pid(host: Host) -> int:
    # `ip netns exec` execs the command, so the Popen's pid is the daemon's.
    assert host.proc is not None
    return host.proc.pid


# ---- one case ------------------------------------------------------------------------------------
@contextlib.contextmanager
def swarm(tmp: Path, image: Path, n: int, env: dict[str, str] | None) -> Iterator[tuple[Network, list[Host], Host]]:
    """A fresh swarm: the owner of ``image`` as vm1, N-1 peers with full replicas, shaped uploads and an
    empty target that sees them all. Everything is stopped and removed on exit."""
    homes = tmp / "homes"
    shutil.rmtree(homes, ignore_errors=True)
    homes.mkdir()
    with Network() as net:
        hosts: list[Host] = []
        try:
            owner = add_host(net, homes, "owner", hosts, env)
            owner.cli("disk", "import", DISK, str(image), timeout=600)
            for i in range(1, n):
                peer = add_host(net, homes, f"peer{i}", hosts, env)
                wait_for(lambda p=peer: sees_disk(p), f"peer{i} to see {DISK}")
                res = json.loads(peer.cli("sync", DISK, "--from", "owner", "--json", timeout=SYNC_TIMEOUT).stdout)
                if res["error"]:
                    raise RuntimeError(f"setup sync of peer{i} failed: {res['error']}")
            sources = list(hosts)
            for h in sources:
                net.shape(h.name, upload=RATE)
            target = add_host(net, homes, "target", hosts, env)
            names = {h.name for h in sources}
            try:
                wait_for(lambda: names <= holders(target, DISK), "the target to see every source")
            except RuntimeError:
                res = target.cli("status", DISK, "--json", check=False)
                raise RuntimeError(f"the target does not see every source of {sorted(names)}: status says "
                                   f"{res.stdout.strip() or res.stderr.strip()}") from None
            yield net, sources, target
        finally:
            for h in hosts:
                if h.alive():
                    with contextlib.suppress(Exception):
                        h.stop()


def eth0_tx(pid: int) -> int:
    """tx bytes of eth0 in the network namespace of process ``pid`` (read from the root namespace)."""
    with open(f"/proc/{pid}/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "eth0":
                return int(rest.split()[8])
    return 0


def poll_job(target: Host, sources: dict[str, int], stop: threading.Event, timeline: Timeline) -> None:
    sock = Home(target.home).control_socket
    while not stop.is_set():
        try:
            jobs = call(sock, "jobs", timeout=5)
        except (ControlError, OSError):
            jobs = []
        tx = {name: eth0_tx(pid) for name, pid in sources.items()}
        if jobs:
            j = jobs[-1]
            timeline.points.append(Point(time.monotonic(), float(j["duration_s"]), j["phase"], int(j["done_bytes"]),
                                         {h: int(b) for h, b in j["bytes_from"].items()}, tx))
        stop.wait(POLL_SECONDS)


def timed_sync(net: Network, sources: list[Host], target: Host, case: str, disk_bytes: int,
               profile_to: Path | None = None) -> Sample:
    names = [h.name for h in sources]
    tx0 = {h.name: tx_bytes(net[h.name]) for h in sources}
    pids = {h.name: daemon_pid(h) for h in [target, *sources]}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wait0 = {name: run_delay_s(pid) for name, pid in pids.items()}
    busy0 = busy_cpu_s()
    load = os.getloadavg()[0]
    timeline, stop = Timeline(), threading.Event()
    poller = threading.Thread(target=poll_job, args=(target, {h.name: pids[h.name] for h in sources}, stop,
                                                     timeline), daemon=True)
    spies: list[subprocess.Popen[bytes]] = []
    if profile_to is not None:
        profile_to.mkdir(parents=True, exist_ok=True)
        for role, host in (("target", target), ("source-owner", sources[0])):
            spies.append(subprocess.Popen(
                [str(PY_SPY), "record", "--pid", str(daemon_pid(host)), "--rate", "200", "--format", "raw",
                 "--threads", "--idle", "--output", str(profile_to / f"{case}-n{len(sources)}-{role}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # py-spy attaches
    poller.start()
    try:
        t0 = time.monotonic()
        out = target.cli("sync", DISK, "--from", ",".join(names), "--json", timeout=SYNC_TIMEOUT, check=False)
        wall = time.monotonic() - t0
    finally:
        stop.set()
        poller.join()
        stop_spies(spies)
    cpu = {name: round(cpu_seconds(pid) - cpu0[name], 2) for name, pid in pids.items()}
    waited = {name: round(run_delay_s(pid) - wait0[name], 2) for name, pid in pids.items()}
    others = busy_cpu_s() - busy0 - sum(cpu.values())
    link = sum(tx_bytes(net[h.name]) - tx0[h.name] for h in sources)
    if not out.stdout.strip():
        raise RuntimeError(f"sync failed ({out.returncode}): {out.stderr.strip()}\ntarget's log:\n"
                           f"{target.log_tail()}")
    res = json.loads(out.stdout)
    if res["error"]:
        raise RuntimeError(f"sync failed: {res['error']}\ntarget's log:\n{target.log_tail()}")
    job = target.json("jobs")[-1]
    verify = target.cli("verify", DISK, "--json", check=False, timeout=600)
    verified = verify.returncode == 0 and json.loads(verify.stdout)["ok"]
    bytes_from = {h: int(b) for h, b in res["bytes_from"].items()}
    duration = float(res["duration_s"])
    last_good = {h: timeline.last_byte_s(h, b) for h, b in bytes_from.items()}
    setup = timeline.setup_s()
    pull_end = max((t for t in last_good.values() if t is not None), default=duration)
    busy = {h: timeline.link_busy(h, setup or 0.0, pull_end) for h in names}
    return Sample(case=case, n=len(sources), disk_bytes=disk_bytes, missing_bytes=int(job["total_bytes"]),
                  wall_s=round(wall, 3), duration_s=duration, setup_s=setup,
                  blocks_fetched=int(res["blocks_fetched"]), zero_blocks=int(res["zero_blocks"]),
                  bytes_on_wire=int(res["bytes_on_wire"]), link_bytes=link, bytes_from=bytes_from,
                  peer_last_byte_s=last_good, cpu_s=cpu, verified=verified, load_before=round(load, 2),
                  link_busy={h: round(b[0], 3) for h, b in busy.items()},
                  link_last_s={h: b[1] for h, b in busy.items()}, run_delay_s=waited,
                  others_cpu_share=round(others / wall / (os.cpu_count() or 1), 3), timeline=timeline.points)


def run_case(tmp: Path, image: Path, case: str, n: int, disk_bytes: int, env: dict[str, str] | None,
             profile_to: Path | None = None) -> Sample:
    with swarm(tmp, image, n, env) as (net, sources, target):
        return timed_sync(net, sources, target, case, disk_bytes, profile_to)


# ---- images --------------------------------------------------------------------------------------
def make_images(tmp: Path, size: int) -> tuple[Path, Path]:
    """A random image, and one whose second half is zero (a sparse tail: never written on import)."""
    rand, half = tmp / "random.img", tmp / "half-zero.img"
    with open(rand, "wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(os.urandom(8 * MiB))
    with open(rand, "rb") as src, open(half, "wb") as dst:
        dst.write(src.read(size // 2))
        dst.truncate(size)
    return rand, half


def nonzero_bytes(image: Path) -> int:
    n = 0
    with open(image, "rb") as f:
        while block := f.read(BLOCK):
            n += len(block) if block.count(0) != len(block) else 0
    return n


# ---- profile -------------------------------------------------------------------------------------
# ---- report --------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem / 2**20, 1), "kernel": platform.release(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d", time.gmtime())}


def load_samples(path: Path) -> tuple[dict[str, Any], dict[tuple[str, int], list[Sample]]]:
    """The document a --json run wrote, and its samples grouped by case (for --report)."""
    doc = json.loads(path.read_text())
    names = set(Sample.__dataclass_fields__)
    groups: dict[tuple[str, int], list[Sample]] = {}
    for raw in doc["samples"]:
        kw = {k: v for k, v in raw.items() if k in names}
        kw["timeline"] = [Point(**p) for p in kw.get("timeline", [])]
        groups.setdefault((raw["case"], raw["n"]), []).append(Sample(**kw))
    return doc, groups


def med(samples: list[Sample], attr: str) -> float:
    return statistics.median(float(getattr(s, attr)) for s in samples)


def fmt_mib(b: float) -> str:
    return f"{b / MiB:.1f}"


def table(groups: dict[tuple[str, int], list[Sample]], t1: float | None) -> list[str]:
    rows = ["| case | N | missing MiB | duration_s | wall s | bound s | goodput bound s | efficiency (wall) | speedup "
            "| wire / stale | link / stale | setup s | last block s | tail s | link use | MiB from each host "
            "| CPU s target / sources | target CPU wait s | other load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (case, n), ss in groups.items():
        dur = med(ss, "duration_s")
        s = min(ss, key=lambda x: abs(x.duration_s - dur))  # the median run's details
        speed = f"{t1 / dur:.2f}" if t1 and case == "random" else "-"
        runs = "" if len(ss) == 1 else " (" + ", ".join(f"{x.duration_s:.2f}" for x in ss) + ")"
        src_cpu = ", ".join(f"{s.cpu_s[h]:.1f}" for h in sorted(s.bytes_from))
        setup = "?" if s.setup_s is None else f"{s.setup_s:.2f}"
        rows.append(
            f"| {case} | {n} | {fmt_mib(s.missing_bytes)} | {dur:.2f}{runs} | {med(ss, 'wall_s'):.2f} | "
            f"{s.bound_s:.2f} | {s.goodput_bound_s:.2f} | {s.bound_s / dur:.3f} ({s.bound_s / med(ss, 'wall_s'):.3f}) "
            f"| {speed} | {s.wire_ratio:.3f} | {s.link_bytes / s.missing_bytes:.3f} | {setup} | {s.pull_end_s:.2f} "
            f"| {s.tail_s:.2f} | {s.link_util:.3f} | "
            + ", ".join(f"{h} {fmt_mib(b)}" for h, b in sorted(s.bytes_from.items()))
            + f" | {s.cpu_s['target']:.1f} / {src_cpu} | {s.run_delay_s.get('target', 0.0):.2f} "
            f"| {s.others_cpu_share:.2f} |")
    return rows


def verdicts(groups: dict[tuple[str, int], list[Sample]], half_nonzero: int) -> list[str]:
    """One line per case: each target met or missed, on the medians over the runs (worst run in brackets)."""
    out = []
    for (case, n), ss in groups.items():
        eff, worst = ss[0].bound_s / med(ss, "duration_s"), min(s.efficiency for s in ss)
        ok_eff = eff >= TARGET_EFFICIENCY
        wire, wire_worst = med(ss, "wire_ratio"), max(s.wire_ratio for s in ss)
        ok_wire = wire <= TARGET_WIRE_RATIO
        checked = "" if all(s.verified for s in ss) else "; VERIFY FAILED"
        line = (f"- {case}, N={n}: efficiency {eff:.3f} (worst run {worst:.3f}) "
                f"{'>=' if ok_eff else '<'} {TARGET_EFFICIENCY}: {'met' if ok_eff else 'MISSED'}; ")
        if case == "random":
            line += (f"bytes on the wire {wire:.3f} x stale (worst {wire_worst:.3f}) "
                     f"{'<=' if ok_wire else '>'} {TARGET_WIRE_RATIO}: {'met' if ok_wire else 'MISSED'}")
        else:
            planned = max(s.missing_bytes for s in ss)
            ok_plan = planned <= half_nonzero
            line += (f"planned {fmt_mib(planned)} MiB for {fmt_mib(half_nonzero)} MiB of non-zero data, so no block "
                     f"of the zero half was asked for: {'met' if ok_plan else 'MISSED'}; on the wire {wire:.3f} x "
                     f"the non-zero half (worst {wire_worst:.3f}): {'met' if ok_wire else 'MISSED'}")
        out.append(line + checked)
    return out


def print_report(groups: dict[tuple[str, int], list[Sample]], half_nonzero: int, profiles: dict[str, Any]) -> None:
    t1 = med(groups[("random", 1)], "duration_s") if ("random", 1) in groups else None
    print()
    print("\n".join(table(groups, t1)))
    print()
    print("\n".join(verdicts(groups, half_nonzero)))
    for name, summary in profiles.items():
        print(f"\n== py-spy: {name}")
        for thread, t in summary.items():
            print(f"  thread {thread}: {t['samples']} samples")
            print("    self:      " + "; ".join(f"{f} {p}%" for f, p in t["self_pct"].items()))
            print("    inclusive: " + "; ".join(f"{f} {p}%" for f, p in t["inclusive_pct"].items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 64 MiB disk instead of 256 MiB")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write all samples and the machine as JSON")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the table shows the median")
    ap.add_argument("--ns", default="1,2,3,4", help="source counts to measure (default 1,2,3,4)")
    ap.add_argument("--no-half-zero", action="store_true", help="skip the half-zero case")
    ap.add_argument("--profile", type=Path, metavar="DIR", help="afterwards profile target and owner with py-spy")
    ap.add_argument("--profile-ns", default="1,4", help="the N re-run under py-spy (default 1,4)")
    ap.add_argument("--report", type=Path, metavar="FILE", help="only print the table of an earlier --json FILE")
    ap.add_argument("--pythonpath", type=Path, metavar="DIR",
                    help="run the daemons with PYTHONPATH=DIR (a modified copy of the package, to try changes)")
    args = ap.parse_args()
    if args.report:
        doc, groups = load_samples(args.report)
        print_report(groups, doc["half_zero_nonzero_bytes"], doc.get("profiles", {}))
        return 0
    if (reason := unavailable_reason()) is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    size = QUICK_SIZE if args.quick else FULL_SIZE
    env = {"PYTHONPATH": str(args.pythonpath.resolve())} if args.pythonpath else None
    ns_list = [int(x) for x in args.ns.split(",") if x]
    info = machine()
    print(f"machine: {info['nproc']} CPU {info['cpu']}, {info['ram_gib']} GiB, kernel {info['kernel']}; "
          f"disk {size // MiB} MiB, sources' upload {RATE}, {args.repeat} run(s) per case", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="p2pvbd-multipeer-"))
    groups: dict[tuple[str, int], list[Sample]] = {}
    profiles: dict[str, Any] = {}
    try:
        rand, half = make_images(tmp, size)
        half_nonzero = nonzero_bytes(half)
        cases = [("random", n, rand) for n in ns_list]
        if not args.no_half_zero:
            cases.append(("half-zero", 2, half))
        for rep in range(args.repeat):
            for case, n, image in cases:
                s = run_case(tmp, image, case, n, size, env)
                groups.setdefault((case, n), []).append(s)
                print(f"[{rep + 1}/{args.repeat}] {case} N={n}: {s.duration_s:.2f} s (wall {s.wall_s:.2f}, setup "
                      f"{s.setup_s}, last block {s.pull_end_s:.2f}, tail {s.tail_s:.2f}), bound {s.bound_s:.2f} s, "
                      f"efficiency {s.efficiency:.3f}, wire {s.wire_ratio:.4f} x, link "
                      f"{s.link_bytes / max(1, s.missing_bytes):.4f} x, link use {s.link_util:.3f}, busy "
                      f"{s.link_busy}, last sent {s.link_last_s}, from "
                      f"{ {h: fmt_mib(b) for h, b in s.bytes_from.items()} }, last block {s.peer_last_byte_s}, "
                      f"cpu {s.cpu_s}, run delay {s.run_delay_s}, other load {s.others_cpu_share}, "
                      f"load {s.load_before}, verified {s.verified}", flush=True)
        if args.profile:
            for n in [int(x) for x in args.profile_ns.split(",") if x]:
                s = run_case(tmp, rand, "random", n, size, env, profile_to=args.profile)
                print(f"profiled run random N={n}: {s.duration_s:.2f} s (not in the table)", flush=True)
                for role in ("target", "source-owner"):
                    raw = args.profile / f"random-n{n}-{role}.txt"
                    if raw.exists():
                        profiles[f"N={n} {role}"] = summarize_profile(raw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print_report(groups, half_nonzero, profiles)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "disk_bytes": size, "rate": RATE, "half_zero_nonzero_bytes": half_nonzero,
            "samples": [s.as_dict() for ss in groups.values() for s in ss], "profiles": profiles}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
