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

log = logging.getLogger(__name__)


class JobProgress(Protocol):
    error: str
    finished: float | None
    phase: str


async def run_job(what: str, progress: JobProgress, work: Callable[[], Awaitable[None]],
                  expected: tuple[type[Exception], ...]) -> None:
    """Run ``work``, then record its end in ``progress``. An ``expected`` failure's message becomes the
    job's error (a PeerError's ``message``); in a group of them (a job's parallel tasks), the first one's.
    Anything else is an internal error, logged with its traceback as failing ``what``."""
    try:
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
        progress.finished = time.monotonic()
        if progress.error:
            progress.phase = "failed"


def _reason(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
