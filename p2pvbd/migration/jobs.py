"""Background jobs (a sync, a disk migration, a VM move): how one ends is recorded the same way for all.

A job runs in a daemon's nursery and is followed through its progress object (``jobs``, ``job``, the
source of a migration polling its destination): it must end with ``finished`` set and, when it failed,
an ``error`` a person can read, whatever went wrong, and never take the daemon down with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from p2pvbd.migration.cancel import JobCancel

log = logging.getLogger(__name__)


class JobProgress(Protocol):
    error: str
    finished: float | None
    phase: str


async def run_job(what: str, progress: JobProgress, work: Callable[[], Awaitable[None]],
                  expected: tuple[type[Exception], ...], cancel: JobCancel | None = None) -> None:
    """Run ``work``, then record its end in ``progress``. An ``expected`` failure's message becomes the
    job's error (a PeerError's ``message``); in a group of them (a job's parallel tasks), the first one's.
    Anything else is an internal error, logged with its traceback as failing ``what``.

    With ``cancel``, the work runs in its cancel scope; a cancelled job ends in phase "cancelled" with the
    state it left as its error, recorded before ``finished`` so a follower never sees it end otherwise."""
    scope = cancel.scope if cancel is not None else trio.CancelScope()
    try:
        with scope:
            await work()
    except expected as e:
        progress.error = _reason(e)
    except BaseExceptionGroup as eg:
        if not isinstance(eg, ExceptionGroup):
            raise  # cancelled with the daemon: not a failure of the job
        matched, other = eg.split(expected)
        first = _first_leaf(matched or eg)
        progress.error = _reason(first) if matched is not None else f"internal error: {first}"
        if other is not None:
            log.error("%s failed", what, exc_info=other)
    except Exception as e:
        log.exception("%s failed", what)
        progress.error = f"internal error: {e}"
    finally:
        if cancel is not None and cancel.requested and progress.phase != "done":
            with trio.CancelScope(shield=True):
                progress.error = await _describe(what, cancel)
            progress.phase = "cancelled"
        progress.finished = time.monotonic()
        if progress.error and progress.phase != "cancelled":
            progress.phase = "failed"
        if cancel is not None:
            cancel.ended.set()


async def _describe(what: str, cancel: JobCancel) -> str:
    try:
        return await cancel.describe()
    except Exception:
        log.exception("%s was cancelled; telling in what state failed", what)
        return "cancelled"


def _reason(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
