from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemons import Host
from tests.vm_guest import build_initramfs, guest_kernel


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    """Create and start hosts; all are stopped at the end of the test."""
    hosts: list[Host] = []

    def make(name: str = "office-pc", *extra_init: str, start: bool = True, join: str | None = None) -> Host:
        h = Host(tmp_path / name, name, *extra_init, join=join)
        hosts.append(h)
        return h.start() if start else h

    yield make
    for h in hosts:
        if h.alive():
            h.stop()


@pytest.fixture
def host(make_host: Callable[..., Host]) -> Host:
    return make_host()


@pytest.fixture
def three_hosts(make_host: Callable[..., Host]) -> list[Host]:
    """office-pc, which creates the swarm, and home-pc and car-pc, joined with its invites."""
    office = make_host("office-pc")
    return [office, make_host("home-pc", join=office.cli("invite").stdout.strip()),
            make_host("car-pc", join=office.cli("invite").stdout.strip())]


@pytest.fixture(scope="session")
def guest_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The test VM's kernel and initramfs (tests/vm_guest.py), built once per run."""
    kernel = guest_kernel()
    return kernel, build_initramfs(tmp_path_factory.mktemp("guest"), kernel)
