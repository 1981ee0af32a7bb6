"""Cancelling what a person started, as they would: Ctrl-C (SIGINT) in `migrate` and `sync`, and
`jobs cancel ID`. Each job is held at a phase by a failpoint (p2pvbd/migration/failpoints.py) so that
the signal lands in it whatever the machine's load."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2pvbd.migration import failpoints
from tests.daemons import BIN, Host
from tests.helpers import as_in_a_terminal, coverage, invite, qemu_io, sync, visible, wait_until

BLOCK = 64 * 1024
# 16 MiB of random data: 256 blocks, 16 pull requests of 1 MiB; the four workers of a one-peer pull
# stop after their first (failpoint sync.pull), so a cancelled sync holds some of it, never all.
DISK_BYTES = 16 << 20
# Each failpoint holds its phase this long: several polls of `jobs` (a CLI process each, 0.1-0.5 s on a
# loaded machine), the signal and the cancel's round trip fit in it. Not a speed expectation.
HOLD_SECONDS = 10.0


def two_hosts(make_host: Callable[..., Host], tmp_path: Path, office_env: dict[str, str] | None = None,
              home_env: dict[str, str] | None = None) -> tuple[Host, Host]:
    """office-pc owning disk d1 (random data), home-pc in its swarm seeing it; each daemon with its failpoints."""
    office = make_host("office-pc")
    home = make_host("home-pc", join=invite(office), start=False)
    home.start(env=home_env)
    (tmp_path / "d1.raw").write_bytes(os.urandom(DISK_BYTES))
    office.cli("disk", "import", "d1", str(tmp_path / "d1.raw"))
    if office_env:
        office.stop()
        office.start(env=office_env)
    wait_until(lambda: visible(home, "d1"), "home-pc to see d1")
    return office, home


def start_cli(host: Host, tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """A command as a person types it, in the background; its stderr goes to a file read while it runs."""
    err = tmp_path / f"stderr-{args[0]}-{len(list(tmp_path.iterdir()))}"
    proc = subprocess.Popen([BIN, *args, "--home", str(host.home)], stdout=subprocess.PIPE,
                            stderr=err.open("w"), text=True, preexec_fn=as_in_a_terminal)
    return proc, err


def job_at(host: Host, phase: str, **more: Any) -> dict[str, Any]:
    """The host's job once it is in ``phase`` (and its other fields are at least ``more``)."""
    def find() -> dict[str, Any] | None:
        for j in host.json("jobs"):
            if j["phase"] == phase and all(j.get(k, 0) >= v for k, v in more.items()):
                return j
        return None
    return wait_until(find, f"a job of {host.name} in phase {phase}", poll=0.05)


def owner_and_mode(host: Host, disk: str) -> tuple[str, str]:
    d = next(d for d in host.json("disk", "list") if d["name"] == disk)
    return d["owner"], d["mode"]


def test_ctrl_c_in_migrate_before_the_commit_leaves_the_source_the_owner(
        make_host: Callable[..., Host], tmp_path: Path) -> None:
    office, home = two_hosts(make_host, tmp_path, office_env={failpoints.ENV: f"migrate.bulk={HOLD_SECONDS}"})
    proc, err = start_cli(office, tmp_path, "migrate", "d1", "--to", "home-pc")
    job = job_at(office, "bulk")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    lines = err.read_text().splitlines()
    assert proc.returncode == 130, (out, lines)
    assert lines == ["p2pvbd: migrate to home-pc: cancelled before the commit: office-pc still owns d1 and serves "
                     "its guest; home-pc may keep what it pulled as a replica"], lines
    assert owner_and_mode(office, "d1") == ("office-pc", "primary")
    qemu_io(office.uri("d1"), "write -P 7 0 64k")  # the guest's export takes writes, as before
    assert owner_and_mode(home, "d1") == ("office-pc", "standby")
    ended = next(j for j in office.json("jobs") if j["job"] == job["job"])
    assert ended["phase"] == "cancelled" and ended["done"] and "still owns d1" in ended["error"]
    # cancelled is not broken: the same migration, asked again, goes through
    res = office.cli("migrate", "d1", "--to", "home-pc", timeout=300)
    assert "d1: now owned by home-pc" in res.stdout


@pytest.mark.parametrize("again", [False, True], ids=["waits", "interrupted-again"])
def test_ctrl_c_once_the_commit_started_lets_the_migration_finish(
        make_host: Callable[..., Host], tmp_path: Path, again: bool) -> None:
    office, home = two_hosts(make_host, tmp_path, office_env={failpoints.ENV: f"migrate.switchover={HOLD_SECONDS}"})
    proc, err = start_cli(office, tmp_path, "migrate", "d1", "--to", "home-pc")
    job = job_at(office, "switchover")
    if not again:  # `jobs cancel` from elsewhere is refused alike
        refused = office.cli("jobs", "cancel", str(job["job"]), check=False)
        assert refused.returncode == 1
        assert refused.stderr == f"p2pvbd: error: job {job['job']}: the commit has started; migration will finish\n"
    proc.send_signal(signal.SIGINT)
    said = "p2pvbd: migrate to home-pc: the commit has started; migration will finish"
    wait_until(lambda: said in err.read_text(), "migrate to say the commit goes on", poll=0.05)
    if again:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130
        assert err.read_text().splitlines() == [
            said, "p2pvbd: migrate to home-pc goes on in the daemon: see 'p2pvbd jobs'"]
        wait_until(lambda: owner_and_mode(office, "d1")[0] == "home-pc", "the migration to finish")
    else:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.read_text()
        assert err.read_text().splitlines() == [said]
        assert out.startswith("d1: now owned by home-pc (epoch 2)"), out
    assert owner_and_mode(home, "d1") == ("home-pc", "primary")
    assert owner_and_mode(office, "d1")[0] == "home-pc"


def pulling_sync(make_host: Callable[..., Host], tmp_path: Path) -> tuple[Host, Host, subprocess.Popen[str], Path,
                                                                          dict[str, Any]]:
    """home-pc syncing d1, held after its first pulled blocks."""
    office, home = two_hosts(make_host, tmp_path, home_env={failpoints.ENV: f"sync.pull={HOLD_SECONDS}"})
    proc, err = start_cli(home, tmp_path, "sync", "d1")
    return office, home, proc, err, job_at(home, "pulling", blocks_fetched=1)


def test_ctrl_c_in_sync_keeps_the_blocks_it_pulled(make_host: Callable[..., Host], tmp_path: Path) -> None:
    office, home, proc, err, _ = pulling_sync(make_host, tmp_path)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    lines = err.read_text().splitlines()
    assert proc.returncode == 130 and len(lines) == 1, lines
    assert lines[0].startswith("p2pvbd: sync d1: cancelled: d1 keeps the "), lines
    assert lines[0].endswith(" blocks held here, each valid at its version); 'p2pvbd sync' again goes on from there")
    ended = home.json("jobs")[0]
    assert ended["phase"] == "cancelled" and ended["done"]
    assert 0 < ended["blocks_fetched"] < DISK_BYTES // BLOCK  # held by the failpoint: part of it
    assert home.json("verify", "d1")["ok"]  # what it kept is valid
    partly = coverage(office, "d1")["home-pc"]
    assert 0 < partly < 1
    again = sync(home, "d1")  # goes on from there: only what is missing
    assert again["error"] == "" and again["blocks_fetched"] == DISK_BYTES // BLOCK - ended["blocks_fetched"]
    assert coverage(office, "d1")["home-pc"] == 1.0


def test_jobs_cancel(make_host: Callable[..., Host], tmp_path: Path) -> None:
    _office, home, proc, err, job = pulling_sync(make_host, tmp_path)
    res = home.cli("jobs", "cancel", str(job["job"]))
    assert res.stdout.startswith(f"job {job['job']}: cancelled: d1 keeps the "), res.stdout
    proc.communicate(timeout=60)
    # the `sync` that was following it ends as a failed command would, with the same line
    assert proc.returncode == 1
    assert err.read_text().startswith("p2pvbd: error: cancelled: d1 keeps the ")
    assert home.json("jobs")[0]["phase"] == "cancelled"
    # a job that ended, one that never was, a number that is not one
    ended = home.cli("jobs", "cancel", str(job["job"]), check=False)
    assert ended.returncode == 1
    assert ended.stderr == f"p2pvbd: error: job {job['job']} has already ended (cancelled)\n"
    unknown = home.cli("jobs", "cancel", "99", check=False)
    assert unknown.returncode == 1 and unknown.stderr == "p2pvbd: error: no job 99 (see 'p2pvbd jobs')\n"
    assert home.cli("jobs", "cancel", "x", check=False).returncode == 2
    assert "cancelled" in home.cli("jobs").stdout  # the plain listing still works


def test_ctrl_c_while_a_job_is_being_started_is_held_until_its_number_is_known(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pressed before the daemon's answer, Ctrl-C would leave the job running unseen: it is held, and the
    job then cancelled as if pressed a moment later (a second press still interrupts at once)."""
    import argparse

    from p2pvbd.cli import app

    def started(args: argparse.Namespace, op: str, **kwargs: Any) -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGINT)  # delivered here, between bytecodes
        return {"job": 7}

    monkeypatch.setattr(app, "ask", started)
    before = signal.getsignal(signal.SIGINT)
    assert app._start(argparse.Namespace(), "sync", disk="d1") == ({"job": 7}, True)
    assert signal.getsignal(signal.SIGINT) is before

    def pressed_twice(args: argparse.Namespace, op: str, **kwargs: Any) -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return {"job": 8}

    monkeypatch.setattr(app, "ask", pressed_twice)
    with pytest.raises(KeyboardInterrupt):
        app._start(argparse.Namespace(), "sync", disk="d1")
    assert signal.getsignal(signal.SIGINT) is before
