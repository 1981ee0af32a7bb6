"""How a background job's end is recorded: the user reads why it failed, a bug is logged, nothing escapes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio

from p2pvbd.migration.jobs import run_job
from p2pvbd.wire.peer_wire import PeerError


@dataclass
class Progress:
    error: str = ""
    finished: float | None = None
    phase: str = "running"


async def ends(exc: BaseException | None) -> Progress:
    progress = Progress()

    async def work() -> None:
        await trio.lowlevel.checkpoint()
        if exc is not None:
            raise exc

    await run_job("the test job", progress, work, (ValueError, PeerError))
    assert progress.finished is not None
    return progress


async def test_a_job_records_why_it_failed(caplog: pytest.LogCaptureFixture) -> None:
    assert (await ends(None)).phase == "running" and not (await ends(None)).error
    assert (await ends(ValueError("disk too small"))).error == "disk too small"
    assert (await ends(PeerError("no_disk", "host b holds no replica"))).error == "host b holds no replica"
    group = ExceptionGroup("disks", [KeyError("k"), PeerError("gone", "b went away")])
    failed = await ends(group)
    assert failed.error == "b went away" and failed.phase == "failed"
    assert "the test job failed" in caplog.text  # the KeyError beside it is a bug: logged
    caplog.clear()
    bug = await ends(KeyError("boom"))
    assert bug.error == "internal error: 'boom'" and bug.phase == "failed"
    assert "Traceback" in caplog.text and "KeyError: 'boom'" in caplog.text
