"""A new user's first commands, typed as shown: every mistake is one line naming what to change, and a
failed step leaves nothing half done (a join that cannot work keeps its token)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.daemons import BIN, READY_SECONDS, REPO, Host, free_port


def _p2pvbd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})


def _assert_one_line_error(res: subprocess.CompletedProcess[str], words: str) -> None:
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert words in res.stderr, res.stderr


@contextmanager
def _taken(port: int) -> Iterator[None]:
    """Something else listening on TCP ``port`` of loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield


def test_listen_address_is_checked_before_init_and_join(make_host: Callable[..., Host], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    res = _p2pvbd("init", "office-pc", "--listen", "nosuchhost.invalid:7000", "--home", str(bad))
    _assert_one_line_error(res, "cannot listen on nosuchhost.invalid:7000 (no such address on this machine)")
    assert not (bad / "config.toml").exists()

    office = make_host("office-pc")
    token = office.cli("invite").stdout.strip()
    port = free_port()
    joiner = tmp_path / "home-pc"
    with _taken(port):
        res = _p2pvbd("join", token, "home-pc", "--listen", f"127.0.0.1:{port}", "--home", str(joiner))
    _assert_one_line_error(res, f"cannot listen on 127.0.0.1:{port} (address in use): choose another with --listen")
    assert not (joiner / "config.toml").exists()
    # the token was not spent: the same one works once the address does
    res = _p2pvbd("join", token, "home-pc", "--listen", f"127.0.0.1:{port}", "--home", str(joiner))
    assert res.returncode == 0, res.stderr
    assert f"listening on 127.0.0.1:{port} (TLS, this machine only)" in res.stdout


def test_default_listen_is_every_address_behind_tls(tmp_path: Path) -> None:
    res = _p2pvbd("init", "office-pc", "--home", str(tmp_path / "h"))
    if res.returncode == 1 and "address in use" in res.stderr:  # another daemon on this machine has 7420
        _assert_one_line_error(res, "cannot listen on 0.0.0.0:7420 (address in use)")
        return
    assert res.returncode == 0, res.stderr
    assert "listening on 0.0.0.0:7420 (TLS, members only)" in res.stdout
    assert 'listen = "0.0.0.0:7420"' in (tmp_path / "h" / "config.toml").read_text()


def _daemon(home: Path, log_file: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([BIN, "daemon", "--home", str(home), "--log-file", str(log_file), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_daemon_start_failure_is_one_line_in_the_log_too(make_host: Callable[..., Host], tmp_path: Path) -> None:
    h = make_host("office-pc", start=False)
    log_file = tmp_path / "daemon.log"
    with _taken(h.port):
        proc = _daemon(h.home, log_file)
        out, err = proc.communicate(timeout=READY_SECONDS)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    words = f"cannot listen on 127.0.0.1:{h.port} (address in use): change listen in {h.home / 'config.toml'}"
    _assert_one_line_error(res, words)
    assert words in log_file.read_text()
    config = h.home / "config.toml"
    good = config.read_text()
    for listen, problem in (("nosuchhost.invalid:7000", "cannot listen on nosuchhost.invalid:7000 (no such address"),
                            ("127.0.0.1:port", "not a HOST:PORT address: '127.0.0.1:port'")):
        config.write_text(good.replace(f"127.0.0.1:{h.port}", listen))
        res = subprocess.run([BIN, "daemon", "--home", str(h.home)], capture_output=True, text=True, timeout=60)
        _assert_one_line_error(res, f"{problem}")
        assert f"change listen in {config}" in res.stderr
    config.write_text(good)
    h.start()  # nothing was left behind: the same home starts once the port is free


def test_library_logs_stay_quiet_unless_verbose(make_host: Callable[..., Host], tmp_path: Path) -> None:
    h = make_host("office-pc", start=False)
    for verbose, log_file in ((False, tmp_path / "quiet.log"), (True, tmp_path / "verbose.log")):
        proc = _daemon(h.home, log_file, *(["-v"] if verbose else []))
        deadline = time.monotonic() + READY_SECONDS
        while h.cli("disk", "list", check=False).returncode != 0 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        h.cli("stop")
        proc.communicate(timeout=READY_SECONDS)
        text = log_file.read_text()
        assert "daemon of host office-pc ready" in text  # p2pvbd's own INFO lines stay
        assert (" INFO kademlia" in text) == verbose, text


def test_disk_sizes_follow_the_stated_rule(host: Host) -> None:
    help_text = " ".join(host.cli("disk", "create", "--help").stdout.split())
    assert "powers of 1024" in help_text and "bare number is bytes" in help_text
    _assert_one_line_error(host.cli("disk", "create", "vm1", "--size", "512", check=False),
                           "smaller than one block (65536 bytes)")
    ambiguous = host.cli("disk", "create", "vm1", "--size", "10GB", check=False)
    assert ambiguous.returncode == 2 and "'10GB' is ambiguous" in ambiguous.stderr
    assert "Traceback" not in ambiguous.stderr
    assert host.json("disk", "list") == []
    host.cli("disk", "create", "vm1", "--size", "1.5G")
    host.cli("disk", "create", "vm2", "--size", "20GiB")
    assert {d["name"]: d["size"] for d in host.json("disk", "list")} == {"vm1": 3 << 29, "vm2": 20 << 30}


def test_a_disk_larger_than_the_file_system_warns(host: Host) -> None:
    fs = os.statvfs(host.home)
    size_gib = 2 * fs.f_bavail * fs.f_frsize // (1 << 30) + 1  # twice what is free: sparse, so it is made
    res = host.cli("disk", "create", "big", "--size", f"{size_gib}G", "--block-size", "4M")
    assert f"created disk big: {size_gib} GiB" in res.stdout
    assert "p2pvbd: warning: the disk is" in res.stderr and "guest writes fail once it fills" in res.stderr
    small = host.cli("disk", "create", "small", "--size", "64M")
    assert small.stderr == ""


def test_unknown_names_are_refused_at_once(make_host: Callable[..., Host], tmp_path: Path) -> None:
    office = make_host("office-pc")
    home = make_host("home-pc", join=office.cli("invite").stdout.strip())
    office.cli("disk", "create", "vm1", "--size", "1M")
    _assert_one_line_error(office.cli("replicate", "vm1", "--on", "nosuch-pc", check=False),
                           "no host nosuch-pc is known in this swarm")
    assert office.json("status", "vm1")["disks"][0]["replicate"] is None
    _assert_one_line_error(office.cli("revoke", "nosuch-pc", check=False), "nosuch-pc is not a member")
    _assert_one_line_error(home.cli("sync", "nosuch", check=False), "no disk named 'nosuch' is known in this swarm")
    assert home.json("jobs") == []
    assert office.json("replicate", "vm1", "--on", "home-pc")["hosts"] == ["home-pc"]


def test_a_revoked_name_cannot_join_again(make_host: Callable[..., Host], tmp_path: Path) -> None:
    office = make_host("office-pc")
    make_host("car-pc", join=office.cli("invite").stdout.strip(), start=False)
    office.cli("revoke", "car-pc")
    token = office.cli("invite").stdout.strip()
    again = tmp_path / "car-pc-again"
    res = _p2pvbd("join", token, "car-pc", "--listen", f"127.0.0.1:{free_port()}", "--home", str(again))
    _assert_one_line_error(res, "car-pc was revoked; choose another name")
    assert not (again / "config.toml").exists()
    res = _p2pvbd("join", token, "car-pc2", "--listen", f"127.0.0.1:{free_port()}", "--home", str(again))
    assert res.returncode == 0, res.stderr  # the same token: the refusal did not spend it


def test_migrating_the_disk_of_a_running_vm_points_to_the_vm(make_host: Callable[..., Host]) -> None:
    office = make_host("office-pc")
    make_host("car-pc", join=office.cli("invite").stdout.strip())
    office.cli("disk", "create", "vm1disk", "--size", "16M")
    office.cli("vm", "create", "vm1", "--disk", "vm1disk", "--memory", "128M", "--accel", "tcg")
    office.cli("vm", "start", "vm1")  # no kernel: the firmware finds nothing to boot and waits, QEMU runs
    try:
        _assert_one_line_error(office.cli("migrate", "vm1disk", "--to", "car-pc", check=False),
                               "vm1disk is a disk of VM vm1, running here: move them together with "
                               "'p2pvbd migrate vm1 --to car-pc'")
        assert [d["owner"] for d in office.json("disk", "list")] == ["office-pc"]
    finally:
        office.cli("vm", "stop", "vm1")


def test_the_demo_takes_its_ports_and_namespace_names_from_the_environment(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    with _taken(port):
        res = subprocess.run([sys.executable, str(REPO / "demo" / "demo.py"), "--loopback"], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "P2PVBD_DEMO_PORT": str(port)})
    assert res.returncode == 1 and "Traceback" not in res.stderr, res
    assert f"port {port} of P2PVBD_DEMO_PORT={port} cannot be used (address in use)" in res.stdout

    from demo.machines import make_machines
    from tests.netns import list_namespaces, unavailable_reason

    monkeypatch.setenv("P2PVBD_DEMO_PORT", str(port))
    with ExitStack() as stack:
        machines = make_machines(["office-pc", "home-pc"], tmp_path, False, stack)
        assert [m.port for m in machines] == [port, port + 10]
    if (reason := unavailable_reason()) is not None:
        pytest.skip(f"no network namespaces: {reason}")
    monkeypatch.setenv("P2PVBD_DEMO_NETNS_PREFIX", "p2pv-mine")
    with ExitStack() as stack:
        machines = make_machines(["office-pc"], tmp_path, True, stack)
        assert machines[0].port == port
        assert any(ns.startswith("p2pv-mine") and ns.endswith("-office-pc") for ns in list_namespaces())
    assert not any(ns.startswith("p2pv-mine") for ns in list_namespaces())


def _complete(*words: str) -> list[str]:
    """What bash offers after ``p2pvbd WORDS…`` (the last word is the one being typed)."""
    script = _p2pvbd("completion", "bash").stdout
    line = " ".join(f"'{w}'" for w in ("p2pvbd", *words))
    res = subprocess.run(["bash", "-c", f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words)}; '
                          '_p2pvbd_complete; printf "%s\\n" "${COMPREPLY[@]}"'],
                         capture_output=True, text=True, timeout=60, check=True)
    return sorted(res.stdout.split())


def test_version_and_shell_completion() -> None:
    from p2pvbd import __version__

    res = _p2pvbd("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"p2pvbd {__version__}"
    assert _complete("di") == ["disk"]
    assert _complete("disk", "c") == ["claim", "create"]
    assert _complete("disk", "create", "vm1", "--s") == ["--size"]
    assert _complete("--home", "/tmp/h", "disk", "create", "--b") == ["--block-size"]
    assert "--to" in _complete("migrate", "vm1", "--")
