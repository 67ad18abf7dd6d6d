"""Cancellation that is never lost.

Why this module exists: a lost cancellation is a task that never stops, and in a
controller that means a replica that cannot hand over its Lease, a worker that
keeps ticking after its policy is gone, a test that hangs until its timeout. Two
asyncio idioms lose one:

* ``asyncio.wait_for`` on Python 3.11 returns the inner awaitable's result when
  the outer task is cancelled in the same loop iteration as that awaitable
  finishes (CPython gh-86296; 3.12 rebuilt it on ``asyncio.timeout``). The
  cancellation is gone, although ``Task.cancelling()`` still counts it. Use
  ``asyncio.timeout`` (correct on 3.11); ruff bans ``asyncio.wait_for`` in this
  package. Libraries still use it (aiomqtt does): retry loops around them check
  :func:`cancel_requested` before they sleep.
* ``task.cancel(); with suppress(CancelledError): await task`` also swallows a
  cancellation of the task that is waiting, and waits forever on a task that
  lost its own.

:func:`cancel_and_wait` cancels, waits without swallowing the caller's own
cancellation, and cancels again (with a warning) a task that did not stop
within ``grace`` seconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

log = structlog.get_logger(__name__)


def cancel_requested() -> bool:
    """Whether the current task was asked to stop, even if its CancelledError got lost on the way."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None, grace: float = 5.0) -> None:
    """Cancel `tasks` (None entries are skipped) and wait until every one has finished.

    A task still running `grace` seconds after its cancellation is cancelled again, as often as
    needed. The tasks' own exceptions are logged, not raised (they are being stopped); a
    cancellation of the caller propagates at once (the tasks have been cancelled by then).
    """
    futures = [t for t in tasks if t is not None]
    pending = {t for t in futures if not t.done()}
    for t in pending:
        t.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=grace)
        for t in pending:
            log.warning("task.ignored_cancellation", task=_name(t), grace_s=grace)
            t.cancel()
    for t in futures:
        if not t.cancelled() and (exc := t.exception()) is not None:
            log.warning("task.failed_while_stopping", task=_name(t), error=repr(exc))


def _name(fut: asyncio.Future[Any]) -> str:
    return fut.get_name() if isinstance(fut, asyncio.Task) else repr(fut)
