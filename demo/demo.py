"""`make demo`: the whole user story on this machine, told with real commands.

office-pc, home-pc and car-pc are three machines: network namespaces with 100 Mbit links when run as
root, loopback ports otherwise (or with --loopback). office-pc owns a disk with data; home-pc holds a
partial, partly stale replica; a VM (QEMU, TCG unless KVM works here) runs on office-pc with that disk,
its guest writing and verifying records, while `p2pvbd migrate workvm --to car-pc` moves it, memory and
disk. Then `status`, the VM's return to office-pc (which kept the memory it left with, so only what
changed since crosses), and a summary: the VM's pause, duration, bytes from each peer, what its memory
cost each way, and whether every record the guest saw written is on the disk. Where QEMU or a guest
kernel is missing, a libnbd guest writes to the disk instead while `p2pvbd migrate vm1 --to car-pc`
moves the disk alone, and car-pc's disk must equal exactly what that guest was promised. The exit code
is non-zero when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Any

from machines import (
    BIN,
    LINK_RATE,
    REPO,
    SPREAD_SECONDS,
    DemoError,
    Machine,
    log_tail,
    make_machines,
    network_mode,
    note,
    say,
    wait_until,
)
from rich.console import Console
from rich.table import Table

from p2pvbd.base.units import format_size

MiB = 1 << 20
# The disk: 96 MiB, the first 64 MiB random (incompressible, so it costs its size on the wire) and the
# rest zeros. At 100 Mbit (~11.9 MB/s of TCP goodput) car-pc's 72 MiB of data take about 6 s to pull.
DISK_SIZE = 96 * MiB
FIRST_DATA = 64 * MiB
# After home-pc's sync, office-pc writes new random data over 48..72 MiB: 16 MiB that home-pc now holds
# stale, 8 MiB it never had; the other 48 MiB of data car-pc can pull from either peer.
UPDATE_AT, UPDATE_LEN = 48 * MiB, 24 * MiB
# python3-libnbd is a Debian package: it imports only under the system interpreter.
SYSTEM_PYTHON = "/usr/bin/python3"
WORKLOAD = REPO / "tests" / "workload.py"
# The guest rewrites whole 64 KiB blocks among the first 256 (16 MiB), pausing 5 ms between writes.
GUEST_BLOCK = 64 * 1024
GUEST_BLOCKS = 256
GUEST_PAUSE_S = "0.005"
# The VM: 128 MiB of memory, the test guest (tests/vm_guest.py) writing a 4 KiB record every 5 ms into
# VM_RECORDS slots and checking 8 MiB of its own memory (workload.c mem_mb), without end: it moves while it
# writes, once it wrote VM_RECORDS records on office-pc, and must write VM_RECORDS_AFTER more on car-pc.
VM_NAME = "workvm"
VM_RECORDS = 400
VM_APPEND = ("console=ttyS0 quiet panic=-1 workload=write workload_delay_ms=5 workload_mem_mb=8 "
             f"workload_slots={VM_RECORDS}")
VM_RECORDS_AFTER = 30
# The return move must send less than this fraction of the first move's memory: the guest's 8 MiB of
# checked memory and its kernel stay as they were, so what crosses back is what the guest changed.
RETURN_SHARE = 4
# How often the migration's progress is printed.
PROGRESS_SECONDS = 1.0
# Bounds for a stuck step on a busy machine; normal runs take a fraction of these.
GUEST_SECONDS = 120.0
MIGRATE_SECONDS = 600.0


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    return path


def show_progress(office: Machine, done: threading.Event) -> None:
    """A line a second from `p2pvbd jobs --json`: phase, bytes pulled so far and each peer's rate."""
    last: dict[str, int] = {}
    last_t = 0.0
    while not done.wait(PROGRESS_SECONDS):
        jobs = office.query("jobs") or []
        if not jobs or jobs[-1]["done"]:
            continue
        j = jobs[-1]
        dt = max(j["duration_s"] - last_t, 1e-3)  # a query takes a while on a busy machine: measure
        rates = ", ".join(f"{h} {format_size((b - last.get(h, 0)) / dt)}/s" for h, b in sorted(j["bytes_from"].items()))
        last, last_t = dict(j["bytes_from"]), j["duration_s"]
        total = format_size(j["total_bytes"]) if j["total_bytes"] else "?"
        print(f"  {j['duration_s']:5.1f} s  {j['phase']:<10} {format_size(j['done_bytes'])} of {total}"
              f"{'  from ' + rates if rates else ''}{'  (guest paced)' if j['throttled'] else ''}", flush=True)


def holders(machine: Machine, disk: str) -> dict[str, float]:
    """Coverage of each replica of `disk` as `machine` sees it in `status --json`."""
    status = machine.query("status", disk)
    return {r["host"]: r["coverage"] for r in status["disks"][0]["replicas"]} if status else {}


def vm_files(work: Path) -> tuple[Path, Path] | None:
    """The test guest's kernel and initramfs, or None where a VM cannot run here (then the libnbd guest)."""
    if shutil.which("qemu-system-x86_64") is None:
        note("qemu-system-x86_64 is missing: the disk moves under a libnbd guest instead of a VM")
        return None
    sys.path.insert(0, str(REPO))
    from tests.vm_guest import build_initramfs, guest_kernel

    try:
        kernel = guest_kernel()
        return kernel, build_initramfs(work / "guest", kernel)
    except (OSError, subprocess.CalledProcessError) as e:
        note(f"no guest for a VM ({e}): the disk moves under a libnbd guest instead")
        return None


def records(machine: Machine) -> int:
    """The last record the VM's guest saw written and read back, from this machine's serial log."""
    log = machine.home / "vms" / VM_NAME / "serial.log"
    found = [ln for ln in (log.read_bytes().splitlines() if log.exists() else []) if ln.startswith(b"REC ")]
    return int(found[-1].split()[1]) if found else 0


def guest_writes_on(here: Machine, since: int) -> None:
    """Wait for the VM's guest to write VM_RECORDS_AFTER records at ``here`` past record ``since``."""
    try:
        wait_until(lambda: records(here) >= since + VM_RECORDS_AFTER, GUEST_SECONDS,
                   f"the guest to write on at {here.name}")
    except DemoError as e:
        log = here.home / "vms" / VM_NAME / "serial.log"
        tail = log.read_bytes()[-600:].decode(errors="replace") if log.exists() else "(none)"
        raise DemoError(f"{e}; {here.name}'s serial log ends:\n{tail}") from None


def vm_check(at: Machine, machines: list[Machine], files: tuple[Path, Path], work: Path,
             moved_at: int) -> tuple[bool, str]:
    """With the VM stopped at ``at``, a second guest reads every slot back there and finds each record the
    first one saw written; no write or memory check failed on any host it ran on."""
    from tests.vm_guest import ERR, verify_records

    at.run(BIN, "vm", "list")
    at.run(BIN, "vm", "stop", VM_NAME, "--timeout", "0")
    errors = sum(len(ERR.findall((m.home / "vms" / VM_NAME / "serial.log").read_bytes()))
                 for m in machines if (m.home / "vms" / VM_NAME / "serial.log").exists())
    last = max(records(m) for m in machines)
    result = verify_records(work / "verify", *files, at.home / "nbd.sock", "vm1", last, slots=VM_RECORDS)
    ok = errors == 0 and result["bad"] == 0 and result["stale"] == 0 and result["maxseq"] >= last
    detail = (f"{last} records ({moved_at} before the first move), {errors} failed writes; read back on "
              f"{at.name}: {result['bad']} bad, {result['stale']} stale")
    note(f"the guest: {detail}")
    return ok, detail


def move_back(car: Machine, office: Machine) -> dict[str, Any]:
    """`car-pc$ p2pvbd migrate workvm --to office-pc --json`: the VM returns to the host that kept the memory
    it left with, so only what changed since crosses."""
    cmd = (BIN, "migrate", VM_NAME, "--to", "office-pc", "--json")
    car.show(cmd)
    res = subprocess.run(car.argv(cmd), capture_output=True, text=True, env=car.env, timeout=MIGRATE_SECONDS)
    print((res.stdout + res.stderr).rstrip(), flush=True)
    back: dict[str, Any] = json.loads(res.stdout) if res.stdout.strip() else {"error": res.stderr.strip()}
    if res.returncode != 0 and not back.get("error"):
        back["error"] = f"exit code {res.returncode}"
    return back


def start_guest(office: Machine, work: Path, stack: ExitStack) -> subprocess.Popen[bytes] | None:
    """The verifying guest (tests/workload.py on libnbd): it logs every write it was acknowledged."""
    if subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode != 0:
        note("python3-libnbd is missing: the disk moves without a writing guest")
        return None
    guest = office.background(SYSTEM_PYTHON, WORKLOAD, office.uri("vm1"), work / "stop", work / "guest.json",
                              "--blocks", str(GUEST_BLOCKS), "--pause", GUEST_PAUSE_S,
                              start_new_session=True)  # on Ctrl-C the demo stops it, not the terminal
    stack.callback(guest.kill)  # a guest left behind by a failed step would retry its writes forever
    wait_until(lambda: (work / "guest.json.ready").exists(), GUEST_SECONDS, "the guest to connect",
               lambda: guest.poll() is not None)
    return guest


def model_check(car: Machine, guest: subprocess.Popen[bytes] | None, work: Path) -> tuple[bool, bool, str]:
    """Rebuild the disk the guest was promised (before + acknowledged writes) and compare it with car-pc's.

    Returns (car-pc's disk equals the model, the guest saw no error, what the guest did).
    """
    model = bytearray((work / "before.raw").read_bytes())
    detail = "no guest"
    guest_ok = True
    if guest is not None:
        (work / "stop").touch()
        if guest.wait(timeout=GUEST_SECONDS) != 0:
            return False, False, f"the guest failed (exit code {guest.returncode})"
        report = json.loads((work / "guest.json").read_text())
        for block, seq in report["acked"].items():
            head = (int(block)).to_bytes(8, "big") + seq.to_bytes(8, "big")
            model[int(block) * GUEST_BLOCK:(int(block) + 1) * GUEST_BLOCK] = head * (GUEST_BLOCK // len(head))
        guest_ok = not report["errors"] and report["reads_ok"]
        reads = "ok" if report["reads_ok"] else "BAD"
        detail = f"{report['writes']} writes, {len(report['errors'])} errors, reads {reads}"
        note(f"the guest: {detail}")
    (work / "model.raw").write_bytes(bytes(model))
    same = car.run("qemu-img", "compare", "-f", "raw", "-F", "raw", work / "model.raw", car.uri("vm1"),
                   check=False).startswith("Images are identical")
    return same, guest_ok, detail


def story(work: Path, use_netns: bool, why: str, stack: ExitStack) -> bool:
    """Tell the story; True when every check passed. `stack` undoes everything it starts."""
    mode = f"network namespaces, {LINK_RATE} links up and down" if use_netns else "loopback ports, unshaped"
    say(f"Three machines: {mode} ({why})")
    office, home, car = make_machines(["office-pc", "home-pc", "car-pc"], work, use_netns, stack)
    note(f"p2pvbd is {BIN}")
    for m in (office, home, car):
        m.explain()

    say(f"1. office-pc: a new swarm, its daemon, and a {format_size(DISK_SIZE)} disk with "
        f"{format_size(FIRST_DATA)} of data")
    office.init(None)
    office.start()
    image = random_file(work / "vm1.raw", FIRST_DATA)
    with image.open("r+b") as f:
        f.truncate(DISK_SIZE)  # the rest is a hole: zero blocks, which never travel
    office.run(BIN, "disk", "import", "vm1", image)
    uri = office.run(BIN, "nbd-uri", "vm1")
    note(f"a VM would use: qemu-system-x86_64 -drive file={uri},format=raw,if=virtio ...")

    say("2. home-pc joins and pulls a replica; then office-pc writes more, so home-pc's is partly stale")
    home.init(office)
    home.start()
    wait_until(lambda: "office-pc" in holders(home, "vm1"), SPREAD_SECONDS, "home-pc to see vm1")
    home.run(BIN, "sync", "vm1")
    update = random_file(work / "update.raw", UPDATE_LEN)
    office.run("qemu-io", "-f", "raw", "-c", f"write -s {update} {UPDATE_AT // MiB}M {UPDATE_LEN // MiB}M",
               "-c", "flush", uri)

    say("3. car-pc joins: it holds nothing yet")
    car.init(office)
    car.start()
    wait_until(lambda: len(holders(car, "vm1")) >= 2, SPREAD_SECONDS, "car-pc to see both replicas of vm1")
    car.run(BIN, "status")

    files = vm_files(work)
    guest = None
    if files is not None:
        say(f"4. A VM, {VM_NAME}, runs on office-pc with disk vm1; it moves to car-pc, memory and disk, the disk "
            "pulled from office-pc and home-pc")
        office.run(BIN, "vm", "create", VM_NAME, "--disk", "vm1", "--memory", "128M", "--kernel", files[0],
                   "--initrd", files[1], f"--append={VM_APPEND}", "--qemu-arg=-no-reboot")
        # car-pc runs only what it approved of a definition made elsewhere: kernel, initrd, QEMU arguments
        wait_until(lambda: any(v["name"] == VM_NAME for v in car.query("vm", "list") or []), SPREAD_SECONDS,
                   f"car-pc to learn VM {VM_NAME}")
        car.run(BIN, "vm", "approve", VM_NAME)
        office.run(BIN, "vm", "start", VM_NAME)
        wait_until(lambda: records(office) >= VM_RECORDS, GUEST_SECONDS,
                   f"the VM's guest to write {VM_RECORDS} records")
        office.run(BIN, "vm", "list")
    else:
        say("4. A guest writes to vm1 on office-pc while vm1 moves to car-pc, pulled from office-pc and home-pc")
        office.run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, work / "before.raw")
        guest = start_guest(office, work, stack)
    note(f"progress: `office-pc$ p2pvbd jobs --json`, every {PROGRESS_SECONDS:.0f} s")
    done = threading.Event()
    progress = threading.Thread(target=show_progress, args=(office, done), daemon=True)
    progress.start()
    cmd = (BIN, "migrate", VM_NAME if files else "vm1", "--to", "car-pc", "--json")
    office.show(cmd)
    try:
        res = subprocess.run(office.argv(cmd), capture_output=True, text=True, env=office.env,
                             timeout=MIGRATE_SECONDS)
    except subprocess.TimeoutExpired:
        raise DemoError(f"the migration took longer than {MIGRATE_SECONDS:.0f} s") from None
    finally:
        done.set()
        progress.join()
    print((res.stdout + res.stderr).rstrip(), flush=True)
    summary: dict[str, Any] = json.loads(res.stdout) if res.stdout.strip() else {"error": res.stderr.strip()}
    time.sleep(0.5)  # the guest's connection to office-pc is forwarded to car-pc now

    say("5. Afterwards: car-pc owns vm1, holds all of it, and has every write the guest was promised")
    moved_at = records(office)
    if files is not None and not summary.get("error"):
        guest_writes_on(car, moved_at)
    elif files is None:
        model_ok, guest_ok, guest_detail = model_check(car, guest, work)
    car.run(BIN, "status")
    coverage = holders(car, "vm1").get("car-pc", 0.0)
    verified = car.run(BIN, "verify", "vm1", check=False).endswith("match their hashes")
    # A standby export is flagged read-only: qemu-io refuses to open it for writing ("Permission denied").
    attempt = office.run("sh", "-c", f"qemu-io -f raw -c 'write -P 1 0 4k' {shlex.quote(str(uri))} 2>&1", check=False)
    refused = any(m in attempt for m in ("Permission denied", "Operation not permitted"))
    note(f"a new writer on office-pc is refused: {refused}")
    migrated = res.returncode == 0 and not summary.get("error")
    back: dict[str, Any] = {}
    if files is not None:
        if migrated:
            say("6. The VM comes back to office-pc, which kept the memory it left with: only what changed "
                "since crosses")
            back = move_back(car, office)
            if not back.get("error"):
                guest_writes_on(office, records(car))
        at = office if back and not back.get("error") else car
        model_ok, guest_detail = vm_check(at, [office, car], files, work, moved_at) if migrated else (False, "-")
        guest_ok = model_ok
    checks = [("migrate", f"exit code {res.returncode}", migrated),
              ("guest", guest_detail, guest_ok),
              ("model check", "car-pc's disk = what the guest wrote" if model_ok else "car-pc's disk differs",
               model_ok) if files is None else ("VM", "ran on car-pc and back, then stopped", model_ok),
              ("coverage on car-pc", f"{coverage:.3f}", coverage == 1.0),
              ("verify on car-pc", "ok" if verified else "mismatch", verified),
              ("office-pc after", "refuses writes" if refused else "still takes writes", refused)]
    if files is not None:
        sent, first = back.get("ram_wire_bytes", 0), summary.get("ram_wire_bytes", 0)
        checks.append(("memory back to office-pc", back["error"] if back.get("error") else
                       f"{format_size(sent)} sent of QEMU's {format_size(back.get('ram_bytes', 0))} "
                       f"(the first move sent {format_size(first)})",
                       not back.get("error") and 0 < sent < first / RETURN_SHARE))
    print_summary(f"{LINK_RATE} namespaces" if use_netns else "loopback", summary, checks)
    return all(ok for _, _, ok in checks)


def print_summary(mode: str, summary: dict[str, Any], checks: list[tuple[str, str, bool]]) -> None:
    table = Table("", "", "", title=f"vm1: office-pc → car-pc ({mode})", title_justify="left", box=None,
                  show_header=False)
    if not summary.get("error") and "vm" in summary:
        table.add_row("VM paused", f"{summary['vm_downtime_ms']:.0f} ms (memory and disk switch-over)")
        table.add_row("duration", f"{summary['duration_s']:.1f} s")
        table.add_row("memory moved", f"QEMU's stream {format_size(summary['ram_bytes'])}, "
                      f"{format_size(summary['ram_wire_bytes'])} on the wire (pages the disk replica holds "
                      "go by reference)")
        for disk in summary["disks"]:
            for host, n in sorted(disk["bytes_from"].items()):
                table.add_row(f"{disk['disk']} from {host}", f"{format_size(n)} ({n} bytes)")
            table.add_row("epoch", str(disk["epoch"]))
    elif not summary.get("error"):
        table.add_row("downtime", f"{summary['downtime_ms']:.0f} ms (the guest's writes were held)")
        table.add_row("duration", f"{summary['duration_s']:.1f} s")
        for host, n in sorted(summary["bytes_from"].items()):
            table.add_row(f"from {host}", f"{format_size(n)} ({n} bytes)")
        table.add_row("on the wire", f"{format_size(summary['bytes_on_wire'])}"
                      f"{', guest writes paced to the link' if summary['throttled'] else ''}")
        table.add_row("epoch", str(summary["epoch"]))
    else:
        table.add_row("migration", summary["error"])
    for what, value, ok in checks:
        table.add_row(what, value, "[green]PASS[/]" if ok else "[red]FAIL[/]")
    print()
    Console().print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loopback", action="store_true", default=bool(os.environ.get("P2PVBD_DEMO_LOOPBACK")),
                    help="use loopback ports even as root (also: P2PVBD_DEMO_LOOPBACK=1)")
    args = ap.parse_args()
    for tool in ("qemu-io", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"the demo needs {tool} (apt-get install qemu-utils)")
    use_netns, why = network_mode(args.loopback)

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C does

    signal.signal(signal.SIGTERM, interrupted)
    verdict = "Some check FAILED (see the summary)."
    try:
        with ExitStack() as stack:
            work = Path(tempfile.mkdtemp(prefix="p2pvbd-demo-"))
            stack.callback(shutil.rmtree, work, ignore_errors=True)  # last: after daemons and namespaces
            try:
                if story(work, use_netns, why, stack):
                    verdict = ""
            except DemoError as e:
                verdict = f"The demo stopped: {e}."
                for name in ("office-pc", "home-pc", "car-pc"):
                    if (work / name / "daemon.log").exists():
                        print(f"--- {name}: end of daemon.log\n{log_tail(work / name)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted: daemons stopped, namespaces and files removed", file=sys.stderr)
        raise SystemExit(130) from None
    say(verdict or "Done: every check passed. Daemons stopped, namespaces and files removed.")
    raise SystemExit(1 if verdict else 0)

if __name__ == "__main__":
    main()
