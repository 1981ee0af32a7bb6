"""Live migration between real daemons with a verifying guest writing all the while."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from tests.daemons import Host, env_without_venv, run, system_python, write_refused
from tests.helpers import coverage, qemu_io, sync, visible, wait_until

BLOCK = 64 * 1024
BLOCKS = 256  # a 16 MiB disk
WORKLOAD = Path(__file__).with_name("workload.py")


def pattern(block: int, seq: int) -> bytes:
    head = struct.pack(">QQ", block, seq)
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


class Guest:
    """tests/workload.py in a subprocess: writes until stopped (or, with ``--ops N``, until it did N
    operations), then reports what was acknowledged. ``args`` are more of the workload's options."""

    def __init__(self, uri: str, tmp: Path, seed: int = 1, *args: str) -> None:
        self.stops_itself = "--ops" in args
        self.stop_file, self.log = tmp / f"stop{seed}", tmp / f"log{seed}.json"
        blocks = () if "--blocks" in args else ("--blocks", str(BLOCKS))
        self.proc = subprocess.Popen([system_python(), str(WORKLOAD), uri, str(self.stop_file), str(self.log),
                                      *blocks, "--seed", str(seed), *args])
        wait_until(lambda: Path(str(self.log) + ".ready").exists() or self.proc.poll() is not None,
                   "the guest workload to connect")
        assert self.proc.poll() is None, "the workload could not connect"

    def finish(self, timeout: float = 120) -> dict[str, object]:
        if not self.stops_itself:
            self.stop_file.touch()
        assert self.proc.wait(timeout=timeout) == 0
        return json.loads(self.log.read_text())


def model_image(path: Path, base: bytes, acked: dict[str, int]) -> Path:
    data = bytearray(base)
    for block, seq in acked.items():
        b = int(block)
        data[b * BLOCK:(b + 1) * BLOCK] = pattern(b, seq)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_migration_under_a_writing_guest(three_hosts: list[Host], tmp_path: Path, mode: str) -> None:
    office, home, car = three_hosts
    base = bytes(range(256)) * (BLOCKS * BLOCK // 256)
    (tmp_path / "base.raw").write_bytes(base)
    office.cli("disk", "import", "vm1", str(tmp_path / "base.raw"))
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    sync(home, "vm1")  # a helper peer with a full but soon stale replica
    wait_until(lambda: visible(car, "vm1", holders=2), "car-pc to see both holders")

    guest = Guest(office.uri("vm1"), tmp_path)  # connected to the old owner for the whole test
    res = office.cli("migrate", "vm1", "--to", "car-pc", "--mode", mode, "--json", timeout=600)
    summary = json.loads(res.stdout)
    assert summary["to"] == "car-pc" and summary["epoch"] == 2 and summary["error"] == ""
    assert summary["mode"] == mode and summary["downtime_ms"] is not None
    if mode == "sync":  # every write after the mirror began was shipped before its acknowledgement
        assert summary["switchover_blocks"] <= 1, summary
    # The guest goes on writing through its old connection: forwarded to the new owner.
    before = car.json("status", "vm1")["disks"][0]
    assert before["owner"] == "car-pc"
    qemu_io(car.uri("vm1"), "read 0 64k")
    report = guest.finish()

    assert report["errors"] == [] and report["reads_ok"], report
    model = model_image(tmp_path / "model.raw", base, report["acked"])  # type: ignore[arg-type]
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(model), car.uri("vm1"))
    assert coverage(car, "vm1")["car-pc"] == 1.0
    assert car.json("verify", "vm1")["ok"]
    pulls = [j for j in car.json("jobs") if j["kind"] == "incoming migration pull"]
    assert len(pulls) == 1 and pulls[0]["disk"] == "vm1" and pulls[0]["done"] and not pulls[0]["error"]

    # A new connection to the old owner: reads work, writes are refused (standby).
    qemu_io(office.uri("vm1"), "read 0 64k", read_only=True)
    refused = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", office.uri("vm1"), check=False)
    assert write_refused(refused), refused.stdout + refused.stderr
    assert office.json("disk", "list")[0]["mode"] == "standby"


def test_migrate_refuses_what_it_cannot_do(three_hosts: list[Host]) -> None:
    office, home, _ = three_hosts
    office.cli("disk", "create", "vm1", "--size", "1M")
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    res = home.cli("migrate", "vm1", "--to", "car-pc", check=False)
    assert res.returncode == 1 and "does not own" in res.stderr and "Traceback" not in res.stderr
    res = office.cli("migrate", "vm1", "--to", "office-pc", check=False)
    assert res.returncode == 1 and "already" in res.stderr
    res = office.cli("migrate", "--to", "nowhere", check=False, timeout=120)
    assert res.returncode == 1 and "nowhere" in res.stderr
    assert office.json("status", "vm1")["disks"][0]["owner"] == "office-pc"  # nothing moved


def test_a_guest_follows_its_disk_around_the_swarm(three_hosts: list[Host], tmp_path: Path) -> None:
    """office -> car -> home -> office with one guest connection open at office all along: its I/O is
    relayed along the chain of hand-overs, served locally again once office owns the disk, never failed."""
    office, home, car = three_hosts
    base = bytes(BLOCKS * BLOCK)
    (tmp_path / "base.raw").write_bytes(base)
    office.cli("disk", "import", "vm1", str(tmp_path / "base.raw"))
    wait_until(lambda: visible(car, "vm1") and visible(home, "vm1"), "car-pc and home-pc to see vm1")
    guest = Guest(office.uri("vm1"), tmp_path)
    epochs = []
    for src, dst in ((office, car), (car, home), (home, office)):
        summary = json.loads(src.cli("migrate", "vm1", "--to", dst.name, "--json", timeout=600).stdout)
        assert summary["error"] == "" and summary["to"] == dst.name, summary
        epochs.append(summary["epoch"])
    assert epochs == [2, 3, 4]
    report = guest.finish()
    assert report["errors"] == [] and report["reads_ok"], report
    assert office.json("disk", "list")[0]["mode"] == "primary"
    model = model_image(tmp_path / "model.raw", base, report["acked"])  # type: ignore[arg-type]
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(model), office.uri("vm1"))


# A client that keeps one connection open and runs the commands it reads, a line each ("write N",
# "flush"), answering "ok" or "error <message>" for each.
STEPPED_CLIENT = r'''
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    cmd, *arg = line.split()
    try:
        if cmd == "write":
            h.pwrite(bytes([int(arg[0])]) * 65536, 0)
        else:
            h.flush()
        print("ok", flush=True)
    except nbd.Error as e:
        print("error", e, flush=True)
'''


def test_a_flush_fails_when_the_owner_restarted_since_it_acknowledged_writes(three_hosts: list[Host],
                                                                             tmp_path: Path) -> None:
    """A guest still connected to office-pc after its disk moved to car-pc writes (car-pc acknowledges
    it, not yet durably), car-pc restarts (a crash or a power cut, which may have lost that write), then
    the guest flushes: the flush must fail rather than vouch for a write car-pc's new run never saw.
    Later writes and flushes succeed."""
    office, _, car = three_hosts
    (tmp_path / "base.raw").write_bytes(bytes(BLOCKS * BLOCK))
    office.cli("disk", "import", "vm1", str(tmp_path / "base.raw"))
    wait_until(lambda: visible(car, "vm1"), "car-pc to see vm1")
    client = subprocess.Popen([system_python(), "-c", STEPPED_CLIENT, office.uri("vm1")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env_without_venv())
    assert client.stdin is not None and client.stdout is not None

    def step(command: str) -> str:
        client.stdin.write(command + "\n")  # type: ignore[union-attr]
        client.stdin.flush()  # type: ignore[union-attr]
        return client.stdout.readline().strip()  # type: ignore[union-attr]

    try:
        assert client.stdout.readline().strip() == "ready"
        summary = json.loads(office.cli("migrate", "vm1", "--to", "car-pc", "--json", timeout=600).stdout)
        assert summary["error"] == "" and summary["epoch"] == 2, summary
        assert step("write 1") == "ok" and step("flush") == "ok"  # forwarded to car-pc, durable there
        assert step("write 2") == "ok"
        car.kill9()
        car.start()
        answer = step("flush")
        assert answer.startswith("error"), answer
        assert "restarted after acknowledging writes" in office.log_tail(200)
        assert step("write 3") == "ok" and step("flush") == "ok"
    finally:
        client.kill()
        client.wait()
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", car.uri("vm1"), str(tmp_path / "after.raw"))
    assert (tmp_path / "after.raw").read_bytes()[:65536] == bytes([3]) * 65536
