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


async def test_a_cancelled_job_says_what_it_left_and_a_committing_one_goes_on() -> None:
    """A cancel before the commit stops the work (its parallel tasks too) and records the state it left,
    before `finished`; from the commit on the request is refused and the job ends as it would have."""
    from p2pvbd.migration.cancel import JobCancel

    async def left() -> str:
        return "cancelled: the source still owns it"

    async def run(phase_when_asked: str) -> tuple[Progress, bool]:
        progress = Progress(phase=phase_when_asked)
        cancel = JobCancel("migration", left)
        reached = trio.Event()

        async def work() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                reached.set()
                await trio.sleep(0.5)  # the job's own pace; cancelled or not, it ends on its own
            progress.phase = "done"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_job, "the test job", progress, work, (ValueError,), cancel)
            await reached.wait()
            accepted = cancel.request(progress.phase)
            await cancel.ended.wait()
        return progress, accepted

    with trio.move_on_after(5) as outer:  # a cancel that did not stop the work would hang here
        cancelled, accepted = await run("bulk")
    assert not outer.cancelled_caught and accepted
    assert cancelled.phase == "cancelled" and cancelled.error == "cancelled: the source still owns it"
    assert cancelled.finished is not None
    cancel = JobCancel("migration", left)
    assert not cancel.request("switchover") and not cancel.requested  # the commit has started
    assert JobCancel("sync", left).request("pulling")  # a sync never commits: always cancellable
