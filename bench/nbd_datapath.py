"""NBD data path: p2pvbd's NBD server against qemu-nbd, with fio and nbdcopy, in one run.

Usage: .venv/bin/python bench/nbd_datapath.py [--quick] [--json FILE] [--repeat N] [--profile DIR]

Both servers serve a 512 MiB disk over a Unix socket from the same temporary directory (so the same
filesystem): a p2pvbd daemon with a fresh home (export ``vm1``), and ``qemu-nbd -f raw -t -e 8 -k
SOCKET FILE`` on a raw file. Both hold the same random data before anything is measured: the raw file
is a copy of a random file, and the same file is copied into the p2pvbd export with nbdcopy (untimed).

Tests, each run against both servers back to back (which goes first alternates between repeats):

* nbdcopy of the random file into the export, then of the export to ``null:``, over one connection
  on both sides (``--connections=1``): p2pvbd advertises multi-conn, qemu-nbd does so only for
  read-only exports, so nbdcopy's default would give p2pvbd four connections and qemu-nbd one;
* fio (``ioengine=nbd``, 512 MiB working set, fixed runtime after a ramp): 1 MiB sequential read and
  write at iodepth 8, 4 KiB random read and write at iodepth 32. Reads run before writes, so they
  read the random file's data. The same fio jobs also run on a third copy of the file itself
  (``ioengine=io_uring``, buffered like both servers): "raw", what the NBD hop costs.

After every write test both exports get an untimed NBD FLUSH (qemu-io), so p2pvbd's background flush
of one test's dirty blocks does not land in the next measurement. Every test runs ``--repeat`` times
per side (default 3, 1 with ``--quick``); the table shows medians. The ratio is the median of
p2pvbd / qemu-nbd over pairs of runs adjacent in time, so load from other processes that drifts
between repeats cancels out (the machine's load average is recorded with every run in the JSON).
"CPU" is the server process's CPU time (all threads) per wall-clock second (1.00 = one core busy),
"us/op" that CPU time per fio request (per MiB for nbdcopy), "s/GiB" per GiB moved, "p99" fio's
completion latency. For the raw file the CPU time is fio's own (user + system: the kernel's work of
the I/O itself, which the servers' figures include too).

Targets (ratio p2pvbd / qemu-nbd): reads, 1 MiB sequential >= 0.8 and 4 KiB random IOPS >= 0.5;
writes (the guest's write path near native speed), both >= 1.0, with p99 latency within 2x of
qemu-nbd's; nbdcopy has no target. The exit status is 0 even when a target is missed (this is a
measurement, not a test).

``--profile DIR`` then runs each p2pvbd fio test once more under py-spy (raw collapsed stacks in
DIR/<test>.txt, one per thread) and prints where the daemon's event-loop thread and its worker
threads spend their time; those runs are not part of the table.

Every process started here is stopped and the temporary directory removed, also on errors and
Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from py_spy_summary import summarize_profile

VENV_BIN = Path(sys.executable).parent
P2PVBD = VENV_BIN / "p2pvbd"
PY_SPY = VENV_BIN / "py-spy"
MiB = 1024 * 1024
DISK_SIZE = 512 * MiB
DISK_NAME = "vm1"
READY_SECONDS = 30.0
STOP_SECONDS = 30.0
# Random data for the disks is written in pieces this large.
FILL_CHUNK = 8 * MiB
LOG_TAIL_LINES = 40
TOOLS = ("fio", "nbdcopy", "qemu-io", "qemu-nbd")
# The same number of connections to both servers: qemu-nbd advertises multi-conn only when read-only.
NBDCOPY_CONNECTIONS = 1


@dataclass(frozen=True)
class Test:
    name: str
    metric: str  # "iops" or "mib_s": what the ratio compares
    target: float | None  # minimum ratio p2pvbd / qemu-nbd, None = no target
    rw: str = ""  # fio rw; "" = an nbdcopy test
    bs: str = ""
    iodepth: int = 0
    writes: bool = False


TESTS = (
    Test("nbdcopy file->export", "mib_s", None, writes=True),
    Test("nbdcopy export->null", "mib_s", None),
    Test("fio seq read 1M qd8", "mib_s", 0.8, "read", "1M", 8),
    Test("fio rand read 4k qd32", "iops", 0.5, "randread", "4k", 32),
    Test("fio seq write 1M qd8", "mib_s", 1.0, "write", "1M", 8, writes=True),
    Test("fio rand write 4k qd32", "iops", 1.0, "randwrite", "4k", 32, writes=True),
)


@dataclass
class Sample:
    mib_s: float
    iops: float | None = None
    lat_mean_us: float | None = None
    lat_p99_us: float | None = None
    seconds: float | None = None
    server_cpu: float | None = None  # CPU time of the server process (all threads) / wall time
    cpu_us_per_op: float | None = None  # server CPU per fio request (per MiB for nbdcopy)
    cpu_s_per_gib: float | None = None  # server CPU per GiB moved
    fio_cpu_s: float | None = None  # fio's own CPU time (user + system), for the raw file's figures
    load1: float | None = None  # the machine's 1-minute load average when the run ended


@dataclass
class Result:
    test: Test
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {"qemu-nbd": [], "p2pvbd": [], "raw": []})

    def median(self, side: str, what: str) -> float | None:
        values = [v for s in self.samples[side] if (v := getattr(s, what)) is not None]
        return statistics.median(values) if values else None

    def ratio(self, against: str = "qemu-nbd", what: str = "") -> float | None:
        """Median over repeats of p2pvbd / ``against`` (of the test's metric, or ``what``), each run paired
        with the other side's run next to it in time, so load from other processes that drifts between
        repeats cancels out."""
        what = what or self.test.metric
        pairs = [getattr(p, what) / getattr(q, what)
                 for q, p in zip(self.samples[against], self.samples["p2pvbd"], strict=False)
                 if getattr(q, what) and getattr(p, what) is not None]
        return statistics.median(pairs) if pairs else None

    def met(self) -> bool | None:
        r = self.ratio()
        return None if self.test.target is None or r is None else r >= self.test.target


# ---- processes ---------------------------------------------------------------------------------------
def run(cmd: list[str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (subprocess.run kills it if we are interrupted); raise on failure."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def stop_process(proc: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM, then SIGKILL; only ever the process we started."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        print(f"warning: {name} ignored SIGTERM; killing it", file=sys.stderr)
        proc.kill()
        proc.wait()


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} before serving")
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, contextlib.suppress(OSError):
                s.connect(os.fspath(path))
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {path} within {READY_SECONDS:.0f} s")


def free_peer_port() -> int:
    """A loopback port P with TCP P, UDP P (the DHT) and TCP P+1 free: the daemon's peer side must not
    collide with other daemons on this machine (the default port is shared by every home)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 60000)
        with contextlib.ExitStack() as stack:
            try:
                for kind, p in ((socket.SOCK_STREAM, port), (socket.SOCK_DGRAM, port), (socket.SOCK_STREAM, port + 1)):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, kind))
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port for the daemon's peer side")


@contextlib.contextmanager
def p2pvbd_host(tmp: Path) -> Iterator[tuple[str, int]]:
    """A p2pvbd daemon with one primary disk; yields (NBD URI, daemon pid)."""
    home = tmp / "p2pvbd-home"
    run([str(P2PVBD), "init", "bench", "--listen", f"127.0.0.1:{free_peer_port()}", "--home", str(home)])
    log, out = home / "d.log", home / "d.out"
    with open(out, "wb") as out_f:  # stderr catches what happens before logging is set up
        proc = subprocess.Popen([str(P2PVBD), "daemon", "--home", str(home), "--log-file", str(log)],
                                stdin=subprocess.DEVNULL, stdout=out_f, stderr=out_f, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"p2pvbd daemon exited ({proc.returncode}); see {log}")
            if subprocess.run([str(P2PVBD), "disk", "list", "--home", str(home)], capture_output=True).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"p2pvbd daemon did not come up within {READY_SECONDS:.0f} s")
            time.sleep(0.1)
        run([str(P2PVBD), "disk", "create", DISK_NAME, "--size", f"{DISK_SIZE // MiB}M", "--home", str(home)])
        uri = run([str(P2PVBD), "nbd-uri", DISK_NAME, "--home", str(home)]).stdout.strip()
        yield uri, proc.pid
    except BaseException:
        for path in (log, out):  # both go with the temporary directory: show their ends now
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
                print(f"--- end of {path.name} (daemon exit status {proc.poll()}):", *tail, "---",
                      sep="\n", file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            with contextlib.suppress(Exception):
                run([str(P2PVBD), "stop", "--home", str(home)], timeout=STOP_SECONDS + 10)
        stop_process(proc, "p2pvbd daemon")


@contextlib.contextmanager
def qemu_nbd(tmp: Path, source: Path) -> Iterator[tuple[str, int]]:
    """qemu-nbd serving a raw file written once with ``source``'s data; yields (NBD URI, pid)."""
    image, sock = tmp / "qemu.raw", tmp / "qemu.sock"
    shutil.copyfile(source, image)  # written once: fully allocated, same data as the p2pvbd disk
    with open(tmp / "qemu-nbd.log", "wb") as log:
        proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-e", "8", "-k", str(sock), str(image)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_for_socket(sock, proc, "qemu-nbd")
        yield f"nbd+unix:///?socket={sock}", proc.pid
    finally:
        stop_process(proc, "qemu-nbd")


def make_random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // FILL_CHUNK):
            f.write(os.urandom(FILL_CHUNK))


def nbd_flush(uri: str) -> None:
    run(["qemu-io", "-f", "raw", "-c", "flush", uri])


# ---- measurements ------------------------------------------------------------------------------------
def run_nbdcopy(test: Test, uri: str, source: Path) -> Sample:
    cmd = ["nbdcopy", f"--connections={NBDCOPY_CONNECTIONS}", *((str(source), uri) if test.writes else (uri, "null:"))]
    t = time.perf_counter()
    run(cmd)
    seconds = time.perf_counter() - t
    return Sample(mib_s=DISK_SIZE / MiB / seconds, seconds=seconds)


def fio_cmd(test: Test, uri: str, runtime: int, ramp: int, output: Path) -> list[str]:
    """fio's job against an NBD URI, or (any other ``uri``) a file through io_uring."""
    nbd = uri.startswith("nbd")
    engine = ["--ioengine=nbd", f"--uri={uri}"] if nbd else ["--ioengine=io_uring", f"--filename={uri}"]
    return ["fio", f"--name={test.rw}-{test.bs}", *engine, f"--rw={test.rw}",
            f"--bs={test.bs}", f"--iodepth={test.iodepth}", f"--size={DISK_SIZE // MiB}M", "--numjobs=1",
            "--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}", "--output-format=json",
            f"--output={output}"]


def run_fio(test: Test, uri: str, runtime: int, ramp: int, tmp: Path) -> Sample:
    out = tmp / "fio.json"
    run(fio_cmd(test, uri, runtime, ramp, out), timeout=runtime + ramp + 120)
    job = json.loads(out.read_text())["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio {test.name} against {uri}: error {job['error']}")
    d = job["write" if test.writes else "read"]
    if not d["io_bytes"]:
        raise RuntimeError(f"fio {test.name} against {uri} did no I/O")
    p99 = d.get("clat_ns", {}).get("percentile", {}).get("99.000000")
    return Sample(mib_s=d["bw_bytes"] / MiB, iops=d["iops"], lat_mean_us=d["lat_ns"]["mean"] / 1000,
                  lat_p99_us=p99 / 1000 if p99 is not None else None,
                  fio_cpu_s=(job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(test: Test, uri: str, pid: int | None, source: Path, runtime: int, ramp: int, tmp: Path) -> Sample:
    """One run against a server (``pid``: whose CPU time counts) or, with no pid, the raw file."""
    cpu, t = cpu_seconds(pid) if pid else 0.0, time.perf_counter()
    sample = run_nbdcopy(test, uri, source) if not test.rw else run_fio(test, uri, runtime, ramp, tmp)
    if pid:
        sample.server_cpu = (cpu_seconds(pid) - cpu) / (time.perf_counter() - t)
    elif sample.fio_cpu_s is not None:
        sample.server_cpu = sample.fio_cpu_s / runtime
    rate = sample.iops if sample.iops is not None else sample.mib_s
    if sample.server_cpu is not None and rate:
        sample.cpu_us_per_op = sample.server_cpu / rate * 1e6
        sample.cpu_s_per_gib = sample.server_cpu / (sample.mib_s / 1024) if sample.mib_s else None
    sample.load1 = os.getloadavg()[0]
    if test.writes and pid:
        nbd_flush(uri)  # untimed: the next test starts with nothing dirty
    return sample


# ---- profile -----------------------------------------------------------------------------------------
def profile(tests: list[Test], uri: str, pid: int, runtime: int, ramp: int, tmp: Path, outdir: Path) -> dict[str, Any]:
    outdir.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, Any] = {}
    for test in tests:
        if not test.rw:
            continue
        raw = outdir / (re.sub(r"[^A-Za-z0-9]+", "_", test.name).strip("_") + ".txt")
        fio = subprocess.Popen(fio_cmd(test, uri, runtime, ramp, tmp / "fio-profile.json"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(ramp + 0.5)
            run([str(PY_SPY), "record", "--pid", str(pid), "--duration", str(max(1, runtime - 1)), "--rate", "200",
                 "--format", "raw", "--threads", "--idle", "--output", str(raw)], timeout=runtime + 60)
            fio.wait(timeout=runtime + ramp + 120)
        finally:
            stop_process(fio, "fio")
        if test.writes:
            nbd_flush(uri)
        summaries[test.name] = summarize_profile(raw)
        print(f"\n== profile of the p2pvbd daemon during {test.name} ({raw}) ==")
        for thread, s in summaries[test.name].items():
            print(f"  [{thread}] {s['samples']} samples; self time:")
            for f, pct in s["self_pct"].items():
                print(f"    {pct:5.1f}%  {f}")
    return summaries


# ---- report ------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    versions = {}
    for tool, arg in (("fio", "--version"), ("qemu-nbd", "--version"), ("nbdcopy", "--version")):
        with contextlib.suppress(Exception):
            versions[tool] = run([tool, arg]).stdout.splitlines()[0].strip()
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "ram_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "tools": versions}


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[Result]) -> str:
    head = (f"{'test':<24} {'qemu':>10} {'p2p':>10} {'raw':>10} {'ratio':>6} {'target':>7} {'met':>4} {'vs raw':>6}  "
            f"{'p99 us qemu/p2p':>17} {'CPU qemu/p2p/raw':>16} {'us/op qemu/p2p':>15} {'s/GiB qemu/p2p/raw':>18}")
    lines = [head, "(IOPS for 4k tests, MiB/s for the others)", "-" * len(head)]
    q, p, f = "qemu-nbd", "p2pvbd", "raw"
    for r in results:
        met = {None: "-", True: "yes", False: "NO"}[r.met()]
        target = "-" if r.test.target is None else f">={r.test.target:g}"
        m = r.test.metric
        spec = ",.0f"
        lines.append(
            f"{r.test.name:<24} {fmt(r.median(q, m), spec):>10} {fmt(r.median(p, m), spec):>10} "
            f"{fmt(r.median(f, m), spec):>10} {fmt(r.ratio(), '.2f'):>6} {target:>7} {met:>4} "
            f"{fmt(r.ratio(f), '.2f'):>6}  "
            f"{fmt(r.median(q, 'lat_p99_us'), ',.0f') + '/' + fmt(r.median(p, 'lat_p99_us'), ',.0f'):>17} "
            f"{'/'.join(fmt(r.median(x, 'server_cpu'), '.2f') for x in (q, p, f)):>16} "
            f"{fmt(r.median(q, 'cpu_us_per_op'), ',.1f') + '/' + fmt(r.median(p, 'cpu_us_per_op'), ',.1f'):>15} "
            f"{'/'.join(fmt(r.median(x, 'cpu_s_per_gib'), '.2f') for x in (q, p, f)):>18}")
    return "\n".join(lines)


def to_json(results: list[Result], meta: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for r in results:
        sides = {side: {"iops": r.median(side, "iops"), "mib_s": r.median(side, "mib_s"),
                        "lat_mean_us": r.median(side, "lat_mean_us"), "lat_p99_us": r.median(side, "lat_p99_us"),
                        "server_cpu": r.median(side, "server_cpu"),
                        "cpu_us_per_op": r.median(side, "cpu_us_per_op"),
                        "cpu_s_per_gib": r.median(side, "cpu_s_per_gib"),
                        "runs": [s.__dict__ for s in r.samples[side]]}
                 for side in ("qemu-nbd", "p2pvbd", "raw")}
        rows.append({"test": r.test.name, "metric": r.test.metric, "target": r.test.target,
                     "ratio": r.ratio(), "met": r.met(), "ratio_vs_raw": r.ratio("raw"),
                     "p99_ratio": r.ratio(what="lat_p99_us"), **sides})
    return {**meta, "results": rows}


# ---- main --------------------------------------------------------------------------------------------
def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s per fio job after a 1 s ramp (default 10 s + 2 s)")
    ap.add_argument("--runtime", type=int, help="seconds per fio job (overrides --quick)")
    ap.add_argument("--repeat", type=int, help="runs per test and side (default 3, 1 with --quick)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="afterwards profile the p2pvbd daemon with py-spy during each fio test; raw stacks to DIR")
    ap.add_argument("--tmpdir", type=Path, help="where the disks go (default: the system temp dir)")
    args = ap.parse_args()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (make deps installs them)", file=sys.stderr)
        return 2
    runtime = args.runtime or (3 if args.quick else 10)
    args.repeat = args.repeat or (1 if args.quick else 3)
    ramp = 1 if args.quick else 2
    signal.signal(signal.SIGTERM, _interrupt)
    commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit, "machine": machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "config": {"disk_mib": DISK_SIZE // MiB, "fio_runtime_s": runtime, "fio_ramp_s": ramp,
                       "repeat": args.repeat, "qemu_nbd": "qemu-nbd -f raw -t -e 8 -k SOCKET FILE",
                       "nbdcopy": f"--connections={NBDCOPY_CONNECTIONS}, 64 requests of 256 KiB"},
            "loadavg_start": os.getloadavg()}
    results = [Result(t) for t in TESTS]
    tmp = Path(tempfile.mkdtemp(prefix="p2pvbd-bench-", dir=args.tmpdir))
    try:
        print(f"writing {DISK_SIZE // MiB} MiB of random data in {tmp} ...", flush=True)
        source = tmp / "random.img"
        make_random_file(source, DISK_SIZE)
        with p2pvbd_host(tmp) as (p2p_uri, pid), qemu_nbd(tmp, source) as (qemu_uri, qemu_pid):
            run(["nbdcopy", str(source), p2p_uri])  # the same data on both sides before anything is timed
            nbd_flush(p2p_uri)
            raw = tmp / "raw.raw"
            shutil.copyfile(source, raw)
            uris = {"qemu-nbd": qemu_uri, "p2pvbd": p2p_uri, "raw": str(raw)}
            pids: dict[str, int | None] = {"qemu-nbd": qemu_pid, "p2pvbd": pid, "raw": None}
            for rep in range(args.repeat):
                order = ("qemu-nbd", "p2pvbd") if rep % 2 == 0 else ("p2pvbd", "qemu-nbd")
                for r in results:
                    for side in (*order, "raw") if r.test.rw else order:
                        s = measure(r.test, uris[side], pids[side], source, runtime, ramp, tmp)
                        r.samples[side].append(s)
                        shown = f"{s.iops:,.0f} IOPS, " if s.iops is not None else ""
                        print(f"[{rep + 1}/{args.repeat}] {r.test.name:<24} {side:<8} {shown}{s.mib_s:,.0f} MiB/s, "
                              f"server CPU {s.server_cpu:.2f} cores", flush=True)
            meta["loadavg_end"] = os.getloadavg()
            out = to_json(results, meta)
            if args.profile:
                out["profile"] = profile([r.test for r in results], p2p_uri, pid, runtime, ramp, tmp, args.profile)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(results))
    print()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
