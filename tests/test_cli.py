"""The CLI as a user meets it: clear one-line errors, JSON schemas, the daemon's lifecycle."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.daemons import BIN, Host, run


def _p2pvbd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=60)


def _assert_user_error(res: subprocess.CompletedProcess[str], words: str) -> None:
    assert res.returncode == 1, res
    assert words in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_commands_without_a_daemon_say_so(tmp_path: Path) -> None:
    home = tmp_path / "h"
    _assert_user_error(_p2pvbd("status", "--home", str(home)), "not a p2pvbd home")
    assert _p2pvbd("init", "office-pc", "--home", str(home)).returncode == 0
    _assert_user_error(_p2pvbd("init", "office-pc", "--home", str(home)), "already initialised")
    for cmd in (["status"], ["disk", "list"], ["disk", "create", "vm1", "--size", "1G"], ["nbd-uri", "vm1"]):
        _assert_user_error(_p2pvbd(*cmd, "--home", str(home)), "no daemon is running")


def test_home_from_environment(tmp_path: Path) -> None:
    env_home = tmp_path / "env-home"
    res = subprocess.run([BIN, "init", "car-pc"], capture_output=True, text=True,
                         env={"P2PVBD_HOME": str(env_home), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "name = \"car-pc\"" in (env_home / "config.toml").read_text()


def test_invalid_names_and_sizes(host: Host) -> None:
    _assert_user_error(host.cli("disk", "create", "../evil", "--size", "1M", check=False), "invalid disk name")
    _assert_user_error(host.cli("disk", "create", "vm1", "--size", "1000", check=False), "multiple of 512")
    _assert_user_error(host.cli("disk", "create", "vm1", "--size", "1M", "--block-size", "3K", check=False),
                       "block size")
    host.cli("disk", "create", "vm1", "--size", "1M")
    _assert_user_error(host.cli("disk", "create", "vm1", "--size", "1M", check=False), "already exists")
    _assert_user_error(host.cli("nbd-uri", "nope", check=False), "no disk named 'nope'")
    _assert_user_error(host.cli("disk", "import", "vm2", "/nonexistent.raw", check=False), "not a file")
    bad = host.cli("disk", "create", "vm1", "--size", "lots", check=False)
    assert bad.returncode == 2 and "not a size" in bad.stderr


def test_status_and_list_json(host: Host) -> None:
    host.cli("disk", "create", "vm1", "--size", "20G")
    host.cli("disk", "create", "vm2", "--size", "1M", "--block-size", "4K")
    status = host.json("status")
    assert status["host"] == "office-pc"
    vm1 = next(d for d in status["disks"] if d["name"] == "vm1")
    assert vm1 == {"name": "vm1", "size": 20 << 30, "block_size": 65536, "owner": "office-pc", "epoch": 1,
                   "owner_reachable": True, "owner_error": "",
                   "replicas": [{"host": "office-pc", "coverage": 1.0, "current_blocks": 327680,
                                 "total_blocks": 327680, "lag_blocks": 0}],
                   "replicate": None, "migration": None, "conflicts": []}
    assert [d["name"] for d in host.json("status", "vm2")["disks"]] == ["vm2"]
    listed = host.json("disk", "list")
    assert {(d["name"], d["block_size"], d["mode"]) for d in listed} == {("vm1", 65536, "primary"),
                                                                          ("vm2", 4096, "primary")}
    assert "vm1" in host.cli("status").stdout  # the human table


def test_nbd_uri_is_accepted_by_real_clients(host: Host) -> None:
    host.cli("disk", "create", "vm1", "--size", "4M")
    uri = host.cli("nbd-uri", "vm1").stdout.strip()
    assert uri == host.uri("vm1")
    assert "4194304" in run("qemu-img", "info", "-f", "raw", "--output=json", uri).stdout
    assert run("nbdinfo", "--size", uri).stdout.strip() == "4194304"


def test_verify_detects_corruption(host: Host) -> None:
    host.cli("disk", "create", "vm1", "--size", "4M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "flush", host.uri("vm1"))
    assert host.json("verify", "vm1")["ok"]
    host.stop()
    data = host.home / "disks" / "vm1" / "data.raw"
    with open(data, "r+b") as f:  # bit rot behind the store's back
        f.seek(70_000)
        f.write(b"\x00\xff")
    host.start()
    res = host.cli("verify", "vm1", "--json", check=False)
    assert res.returncode == 1
    assert '"mismatched_blocks": [\n    1\n  ]' in res.stdout


def test_one_daemon_per_home(host: Host) -> None:
    second = subprocess.run([BIN, "daemon", "--home", str(host.home)], capture_output=True, text=True, timeout=60)
    _assert_user_error(second, "already running")
    assert host.alive()


def test_stop_waits_for_a_clean_shutdown(make_host: Callable[..., Host]) -> None:
    h = make_host("home-pc")
    h.cli("disk", "create", "vm1", "--size", "8M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 2M", h.uri("vm1"))
    assert h.cli("stop").stdout.strip() == "daemon stopped"
    assert h.proc is not None and h.proc.wait(timeout=10) == 0
    h.start()
    run("qemu-io", "-f", "raw", "-c", "read -P 0x22 0 2M", h.uri("vm1"))
