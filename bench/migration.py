"""Live migration at 100 Mbit/s: guest throughput while a disk moves, switchover stalls, time against the bound.

Usage: .venv/bin/python bench/migration.py [--quick] [--json FILE] [--plots DIR] [--only a,b,c]
           [--a-modes none,async,sync] [--downtime-count 20] [--downtime-modes async,sync] [--bound-repeat 2]
           [--profile DIR] [--profile-workload limited|unlimited] [--pythonpath DIR] [--report FILE]

Needs root (network namespaces, tc, FUSE, loop devices). Every case runs in a fresh swarm of three hosts,
each in its own network namespace (tests/netns.py) with its own daemon (tests/daemons.py): office-pc
imports a random image as ``vm1`` (incompressible: zstd gains nothing), home-pc syncs a full replica
over an unshaped link (a helper peer), car-pc joins empty (or also syncs, for the downtime case); then
every host's upload and download are shaped to 100 Mbit/s (tbf) and office-pc migrates vm1 to car-pc.

(a) throughput: vm1 is attached on office-pc (``p2pvbd attach``: nbdfuse + loop), formatted ext4 and
    mounted; fio writes into a file with a 250 ms bandwidth log, rate-limited below the link (and, as a
    second workload, unlimited); ``migrate --mode sync|async`` starts a few seconds in (or nothing: the
    baseline). After ownership moves, the guest's open connection is forwarded to car-pc over the link,
    so throughput is reported for the migration (launch to switchover) and for after it separately.
(b) downtime: car-pc first holds a current replica; ``--downtime-count`` migrations ping-pong between
    office-pc and car-pc while bench/migration_guest.py (libnbd, under /usr/bin/python3) writes 4 KiB
    blocks to the owner and times every request. Its longest request during a migration is the stall it
    saw; the daemon's ``downtime_ms`` is reported next to it.
(c) bound: an idle 512 MiB migration to an empty car-pc. Bound = stale bytes / bottleneck, the
    bottleneck being car-pc's download or the holders' summed uploads, whichever is smaller, at TCP
    goodput (1448/1514 of the link rate, see tests/netns.py). The (a) migrations are shown against the
    same bound.

Namespaces, daemons, mounts and attachments are removed on exit, also on errors. The exit status is 0
even when a target is missed (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import migration_report as report  # noqa: E402
from migration_tools import code_id, detach, git_head, loadavg, make_image, spying  # noqa: E402
from multipeer_pull import add_host, holders, machine, sees_disk, wait_for  # noqa: E402
from py_spy_summary import summarize_profile  # noqa: E402

from p2pvbd.base.control import ControlError, call  # noqa: E402
from p2pvbd.base.home import Home  # noqa: E402
from tests.daemons import BIN, Host, env_without_venv, system_python  # noqa: E402
from tests.netns import Network, unavailable_reason  # noqa: E402

MiB = 1 << 20
DISK = "vm1"
SRC, HELPER, DST = "office-pc", "home-pc", "car-pc"
RATE = "100mbit"  # the original prototype's link (Xen + DRBD between two hosts)
RATE_BYTES = 100e6 / 8
GOODPUT = 1448 / 1514  # TCP payload per byte tbf counts (MTU 1500, TCP timestamps)
DISK_SIZE = {"full": 512 * MiB, "quick": 128 * MiB}  # bulk of tens of seconds at 100 Mbit/s
DOWNTIME_DISK = 64 * MiB  # (b) moves only what the guest wrote since the last hop: size does not matter
MIGRATE_AT_S = 5.0  # fio runs this long before the migration starts
AFTER_S = 12.0  # ... and this long after it ended (the forwarded phase)
NONE_SPAN = 1.8  # the baseline runs this many bulk times: migrations with a rate-limited guest took 1.7x
FIO_RATE = "4m"  # 4 MiB/s: a third of the link's 11.9 MB/s goodput
FIO_FILE_SHARE = 2  # fio's working set is 1/2 of the disk (ext4 and its journal need room too)
FIO_LOG_MS = 250
GUEST_WARMUP_S = 1.0  # (b): the guest writes this long before and after each migration
PHASE_POLL_S = 0.1
MIGRATE_TIMEOUT = 900.0
GUEST = Path(__file__).with_name("migration_guest.py")
DAEMON_ENV: dict[str, str] = {}  # --pythonpath: run the daemons from another copy of the package


# ---- swarm ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def swarm(tmp: Path, image: Path, dest_synced: bool) -> Iterator[tuple[Network, dict[str, Host]]]:
    """office-pc owns ``image``; home-pc (and car-pc if ``dest_synced``) hold a full replica; then every link
    is shaped to 100 Mbit/s both ways. Daemons and namespaces are removed on exit."""
    homes = Path(tempfile.mkdtemp(prefix="homes-", dir=tmp))
    with Network() as net:
        hosts: list[Host] = []
        try:
            office = add_host(net, homes, SRC, hosts, DAEMON_ENV)
            office.cli("disk", "import", DISK, str(image), timeout=600)
            add_host(net, homes, HELPER, hosts, DAEMON_ENV)
            car = add_host(net, homes, DST, hosts, DAEMON_ENV)
            for h in hosts[1:] if dest_synced else hosts[1:2]:
                wait_for(lambda h=h: sees_disk(h), f"{h.name} to see {DISK}")
                res = json.loads(h.cli("sync", DISK, "--from", SRC, "--json", timeout=600).stdout)
                if res["error"]:
                    raise RuntimeError(f"setup sync of {h.name} failed: {res['error']}")
            names = {h.name for h in hosts} if dest_synced else {SRC, HELPER}
            wait_for(lambda: names <= holders(car, DISK), f"{DST} to see the holders {sorted(names)}")
            yield shaped(net, hosts)
        finally:
            stop_all(hosts)


def shaped(net: Network, hosts: list[Host]) -> tuple[Network, dict[str, Host]]:
    """Every host's upload and download shaped to RATE; the swarm as the benchmarks use it."""
    for h in hosts:
        net.shape(h.name, upload=RATE, download=RATE)
    return net, {h.name: h for h in hosts}


def stop_all(hosts: list[Host]) -> None:
    for h in hosts:
        if h.alive():
            with contextlib.suppress(Exception):
                h.stop()


# ---- one migration -------------------------------------------------------------------------------
def migrate(src: Host, dest: str, mode: str) -> dict[str, Any]:
    """``p2pvbd migrate --json`` on ``src``; meanwhile its job is polled for phase times (time.time())."""
    sock = Home(src.home).control_socket
    known = max((j["job"] for j in call(sock, "jobs", timeout=10)), default=0)
    phases: dict[str, float] = {}
    job: dict[str, Any] = {}
    timeline: list[list[Any]] = []  # [time.time(), phase, done_bytes, mirror_lag_blocks, bytes_on_wire]
    daemon_start: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            with contextlib.suppress(ControlError, OSError):
                mine = [j for j in call(sock, "jobs", timeout=5) if j["job"] > known]
                if mine:
                    now = time.time()
                    job.update(mine[-1])
                    phases.setdefault(job["phase"], now)
                    timeline.append([round(now, 3), job["phase"], job["done_bytes"], job["mirror_lag_blocks"],
                                     job["bytes_on_wire"]])
                    if not daemon_start:
                        daemon_start.append(now - float(job["duration_s"]))
            stop.wait(PHASE_POLL_S)

    code = code_id()
    poller = threading.Thread(target=poll, daemon=True)
    load0, t0 = loadavg(), time.time()
    poller.start()
    try:
        out = src.cli("migrate", DISK, "--to", dest, "--mode", mode, "--json", timeout=MIGRATE_TIMEOUT, check=False)
    finally:
        stop.set()
        poller.join()
    t1 = time.time()
    if not out.stdout.strip():
        raise RuntimeError(f"migrate failed ({out.returncode}): {out.stderr.strip()}\n{src.log_tail()}")
    summary = json.loads(out.stdout)
    if summary["error"]:
        raise RuntimeError(f"migrate failed: {summary['error']}\n{src.log_tail()}")
    start = daemon_start[0] if daemon_start else t0
    end = start + float(summary["duration_s"])
    return {"src": src.name, "dest": dest, "mode": mode, "summary": summary, "launched": t0, "returned": t1,
            "daemon_start": start, "switchover": end - float(summary["downtime_ms"] or 0) / 1000, "end": end,
            "phases": phases, "timeline": timeline, "stale_bytes": int(job.get("total_bytes", 0)),
            "load": [load0, loadavg()], "code": code}


# ---- (a) guest throughput --------------------------------------------------------------------------
def fio_cmd(directory: Path, workload: str, size: int, log_prefix: Path, out: Path) -> list[str]:
    cmd = ["fio", "--name=guest", f"--filename={directory / 'fio.dat'}", f"--size={size}", "--rw=randwrite",
           "--bs=64k", "--direct=1", "--time_based", "--runtime=3600", f"--write_bw_log={log_prefix}",
           f"--log_avg_msec={FIO_LOG_MS}", "--log_unix_epoch=1", "--output-format=json", f"--output={out}"]
    if workload == "limited":
        return [*cmd, "--ioengine=psync", f"--rate={FIO_RATE}"]
    return [*cmd, "--ioengine=libaio", "--iodepth=8"]


def read_bw_log(path: Path) -> list[tuple[float, float]]:
    """fio's bandwidth log as (time.time(), MiB/s) pairs."""
    rows = []
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit():
            rows.append((int(parts[0]) / 1000, int(parts[1]) / 1024))
    return rows


def throughput_run(tmp: Path, image: Path, mode: str, workload: str, expect_s: float,
                   spy_dir: Path | None = None) -> dict[str, Any]:
    """fio on ext4 on the attached disk at office-pc; migrate (unless mode is "none") MIGRATE_AT_S in."""
    with swarm(tmp, image, dest_synced=False) as (_net, hosts):
        office = hosts[SRC]
        home_args = ["--home", str(office.home)]
        mnt = tmp / "mnt"
        mnt.mkdir(exist_ok=True)
        log_prefix, fio_out = tmp / f"bw-{mode}-{workload}", tmp / f"fio-{mode}-{workload}.json"
        attached = mounted = False
        fio: subprocess.Popen[bytes] | None = None
        mig: dict[str, Any] | None = None
        load0 = loadavg()
        try:
            # From the root namespaces: the NBD socket is a file, and the mount must be visible here.
            dev = subprocess.run([BIN, "attach", DISK, *home_args], capture_output=True, text=True, check=True,
                                 timeout=60).stdout.strip()
            attached = True
            subprocess.run(["mkfs.ext4", "-F", "-q", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev],
                           check=True, capture_output=True, timeout=300)  # nodiscard: keep the random data stale
            subprocess.run(["mount", "-o", "nodiscard", dev, str(mnt)], check=True, capture_output=True, timeout=60)
            mounted = True
            fio_size = image.stat().st_size // FIO_FILE_SHARE
            fio = subprocess.Popen(fio_cmd(mnt, workload, fio_size, log_prefix, fio_out), stdout=subprocess.DEVNULL)
            t_fio = time.time()
            time.sleep(MIGRATE_AT_S)
            nominal = time.time()
            if mode != "none":
                with spying(hosts, spy_dir, f"throughput-{mode}-{workload}", (SRC, DST)):
                    mig = migrate(office, DST, mode)
                time.sleep(max(0.0, mig["end"] + AFTER_S - time.time()))
            else:
                time.sleep(NONE_SPAN * expect_s + AFTER_S)  # as long as a migration with a guest takes
            fio.send_signal(signal.SIGINT)  # fio ends its jobs and writes its logs and summary
            fio.wait(timeout=120)
            t_end = time.time()
        finally:
            if fio is not None and fio.poll() is None:
                fio.kill()
                fio.wait()
            if mounted and subprocess.run(["umount", str(mnt)], capture_output=True, timeout=300).returncode:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)
            if attached:
                detach(office, DISK)
        bw = read_bw_log(Path(f"{log_prefix}_bw.1.log"))
        text = fio_out.read_text() if fio_out.exists() else ""
        fio_json = json.loads(text[text.find("{"):]) if "{" in text else {}  # fio may print notes before it
    t0 = mig["launched"] if mig else nominal
    return {"mode": mode, "workload": workload, "t_fio": t_fio - t0, "t_end": t_end - t0,
            "series": [(round(t - t0, 3), round(v, 3)) for t, v in bw], "migration": mig, "load": [load0, loadavg()],
            "fio_write_mib_s": fio_json.get("jobs", [{}])[0].get("write", {}).get("bw", 0) / 1024}


# ---- (b) switchover downtime -----------------------------------------------------------------------
class Guest:
    """bench/migration_guest.py connected to a host's export until finish()."""

    def __init__(self, host: Host, tmp: Path, tag: str, *args: str) -> None:
        self.stop, self.out = tmp / f"stop-{tag}", tmp / f"guest-{tag}.json"
        self.proc = subprocess.Popen([system_python(), str(GUEST), host.uri(DISK), str(self.stop), str(self.out),
                                      *args], env=env_without_venv())
        wait_for(lambda: Path(f"{self.out}.ready").exists() or self.proc.poll() is not None, "the guest", 30, 0.02)
        if self.proc.poll() is not None:
            raise RuntimeError(f"the guest could not connect to {host.uri(DISK)}")

    def finish(self) -> dict[str, Any]:
        self.stop.touch()
        self.proc.wait(timeout=120)
        return json.loads(self.out.read_text())


def downtime_runs(tmp: Path, image: Path, modes: list[str], count: int, spy_dir: Path | None = None
                  ) -> list[dict[str, Any]]:
    """``count`` migrations per mode, ping-pong office-pc ↔ car-pc, each with a fresh guest on the owner."""
    out: list[dict[str, Any]] = []
    with swarm(tmp, image, dest_synced=True) as (_net, hosts), spying(hosts, spy_dir, "downtime", (SRC, DST)):
        owner, other = hosts[SRC], hosts[DST]
        for mode in modes:
            for i in range(count):
                guest = Guest(owner, tmp, f"{mode}{i}")
                try:
                    time.sleep(GUEST_WARMUP_S)
                    mig = migrate(owner, other.name, mode)
                    time.sleep(GUEST_WARMUP_S)
                finally:
                    rep = guest.finish()
                during = [lat for t, lat, *_ in rep["slow"] if mig["launched"] <= t <= mig["returned"]]
                outside = [lat for t, lat, *_ in rep["slow"] if not mig["launched"] <= t <= mig["returned"]]
                mig |= {"guest_stall_ms": round(1000 * max(during, default=0.0), 1), "guest": rep | {"slow": None},
                        "guest_outside_ms": round(1000 * max(outside, default=0.0), 1),
                        "guest_slow": [(round(t - mig["launched"], 3), round(lat * 1000, 1))
                                       for t, lat, *_ in rep["slow"] if lat >= 0.02]}
                print(f"  {mode} #{i + 1} {owner.name} -> {other.name}: daemon {mig['summary']['downtime_ms']} ms, "
                      f"guest {mig['guest_stall_ms']} ms (outside {mig['guest_outside_ms']}), "
                      f"{mig['summary']['duration_s']} s, "
                      f"errors {len(rep['errors'])}, load {mig['load']}", flush=True)
                out.append(mig)
                owner, other = other, owner
    return out


# ---- (c) time against the bound --------------------------------------------------------------------
def bound_run(tmp: Path, image: Path, spy_dir: Path | None = None) -> dict[str, Any]:
    with swarm(tmp, image, dest_synced=False) as (_net, hosts), spying(hosts, spy_dir, "bound", (SRC, DST)):
        mig = migrate(hosts[SRC], DST, "async")
        res = hosts[DST].cli("verify", DISK, "--json", check=False, timeout=600)
        mig["verified"] = res.returncode == 0 and json.loads(res.stdout)["ok"]
    return mig


# ---- main ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB disk, rate-limited workload only, 5 migrations")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write all results and the machine as JSON")
    ap.add_argument("--plots", type=Path, metavar="DIR", help="write migration-*.png here (default: docs/)")
    ap.add_argument("--only", default="a,b,c", help="which parts to run (default a,b,c)")
    ap.add_argument("--a-modes", default="none,async,sync", help="modes of (a); none = no migration")
    ap.add_argument("--downtime-count", type=int, help="migrations per mode in (b) (default 20; --quick 5)")
    ap.add_argument("--downtime-modes", default="async,sync")
    ap.add_argument("--bound-repeat", type=int, default=2, help="idle migrations in (c)")
    ap.add_argument("--profile", type=Path, metavar="DIR", help="re-run (a) async and 6 of (b) under py-spy")
    ap.add_argument("--profile-workload", default="unlimited", choices=("limited", "unlimited"))
    ap.add_argument("--pythonpath", type=Path, metavar="DIR",
                    help="run the daemons with PYTHONPATH=DIR (a modified copy of the package, to try a change)")
    ap.add_argument("--report", type=Path, metavar="FILE", help="only print tables and plots of an earlier --json")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so mounts, attachments, daemons and namespaces are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plots = args.plots or ROOT / "docs"
    if args.report:
        report.render(json.loads(args.report.read_text()), plots)
        return 0
    if (reason := unavailable_reason()) is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    size = DISK_SIZE["quick" if args.quick else "full"]
    if args.pythonpath:
        DAEMON_ENV["PYTHONPATH"] = str(args.pythonpath.resolve())
    parts = set(args.only.split(","))
    count = args.downtime_count or (5 if args.quick else 20)
    modes = [m for m in args.downtime_modes.split(",") if m]
    expect_s = size / (RATE_BYTES * GOODPUT)
    doc: dict[str, Any] = {"machine": machine(), "commit": git_head(), "argv": sys.argv[1:], "disk_bytes": size,
                           "pythonpath": DAEMON_ENV.get("PYTHONPATH"),
                           "rate": RATE, "fio_rate": FIO_RATE, "goodput": GOODPUT, "rate_bytes": RATE_BYTES,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                           "throughput": [], "downtime": [], "bound": [], "profiles": {}}
    print(f"machine: {doc['machine']}; commit {doc['commit']}; disk {size // MiB} MiB; links {RATE}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="p2pvbd-migration-"))
    try:
        image = make_image(tmp / "random.img", size)
        if "a" in parts:
            workloads = ["limited"] if args.quick else ["limited", "unlimited"]
            for workload in workloads:
                for mode in args.a_modes.split(","):
                    r = throughput_run(tmp, image, mode, workload, expect_s)
                    doc["throughput"].append(r)
                    print(f"(a) {workload} {mode}: {report.throughput_line(r)}", flush=True)
        if "b" in parts:
            small = make_image(tmp / "small.img", DOWNTIME_DISK)
            doc["downtime"] = downtime_runs(tmp, small, modes, count)
        if "c" in parts:
            for i in range(args.bound_repeat):
                r = bound_run(tmp, image)
                doc["bound"].append(r)
                print(f"(c) #{i + 1}: {report.bound_line(r, doc)}", flush=True)
        if args.profile:
            r = throughput_run(tmp, image, "async", args.profile_workload, expect_s, args.profile)
            doc["profiled"] = r
            print(f"(profiled) {args.profile_workload} async: {report.throughput_line(r)}", flush=True)
            if "b" in parts:
                downtime_runs(tmp, make_image(tmp / "small.img", DOWNTIME_DISK), modes[:1], 6, args.profile)
            for raw in sorted(args.profile.glob("*.txt")):
                doc["profiles"][raw.stem] = summarize_profile(raw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        if args.json:
            args.json.write_text(json.dumps(doc, indent=1))
    report.render(doc, plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
