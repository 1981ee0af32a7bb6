"""The failpoints test hook: parsed strictly, so a typo never silently disables a fault test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pvbd.migration import failpoints
from p2pvbd.migration.failpoints import ENV, MAX_PAUSE_SECONDS, FailpointError, configure, parse
from tests.daemons import BIN, Host


def test_parse_names_and_seconds() -> None:
    assert parse("") == {}
    assert parse(" migrate.bulk=1.5 , migrate.commit_answer=3,") == {"migrate.bulk": 1.5,
                                                                      "migrate.commit_answer": 3.0}


@pytest.mark.parametrize("text", ["migrate.bulck=1", "migrate.bulk", "migrate.bulk=", "migrate.bulk=soon",
                                  "migrate.bulk=0", "migrate.bulk=-1", "migrate.bulk=nan", "migrate.bulk=inf",
                                  f"migrate.bulk={MAX_PAUSE_SECONDS + 1}", "migrate.bulk=1,migrate.bulk=2"])
def test_parse_refuses_what_it_cannot_be_sure_of(text: str) -> None:
    with pytest.raises(FailpointError, match=ENV):
        parse(text)


def test_pauses_only_where_configured() -> None:
    async def both() -> tuple[float, float]:
        """(time spent at migrate.mirror, at migrate.bulk), on trio's virtual clock."""
        t0 = trio.current_time()
        await failpoints.pause("migrate.mirror")
        t1 = trio.current_time()
        await failpoints.pause("migrate.bulk")
        return t1 - t0, trio.current_time() - t1

    try:
        configure({ENV: "migrate.bulk=0.5"})
        assert trio.run(both, clock=trio.testing.MockClock(autojump_threshold=0)) == (0, 0.5)
        assert configure({}) == {}
        assert trio.run(both, clock=trio.testing.MockClock(autojump_threshold=0)) == (0, 0)
    finally:
        configure({})


def test_a_daemon_refuses_to_start_on_a_typo(tmp_path: Path) -> None:
    host = Host(tmp_path / "h", "h")
    res = subprocess.run([BIN, "daemon", "--home", str(host.home)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, ENV: "migrate.switchovr=1"})
    assert res.returncode == 1 and "migrate.switchovr" in res.stderr, res.stderr
