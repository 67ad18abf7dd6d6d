"""Cancellation is never lost: shadowctl.aio, and the controller's workers stopping although a library
swallowed their cancellation (what asyncio.wait_for does on Python 3.11, CPython gh-86296)."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
from fake_clock import FakeClock

from shadowctl.aio import cancel_and_wait, cancel_requested
from shadowctl.controller.manager import Manager
from shadowctl.controller.reconciler import TickResult


async def _stubborn(swallow: int, started: asyncio.Event) -> str:
    """Ignores its first `swallow` cancellations, as code behind a lossy wait_for does."""
    started.set()
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if swallow == 0:
                raise
            swallow -= 1


async def test_cancel_and_wait_cancels_again_a_task_that_ignored_it() -> None:
    started = asyncio.Event()
    task = asyncio.create_task(_stubborn(2, started))
    await started.wait()
    stopping = asyncio.ensure_future(cancel_and_wait(task, grace=0.05))
    done, _ = await asyncio.wait({stopping}, timeout=5)  # never cancels what it waits for
    assert stopping in done
    assert task.cancelled()


async def test_cancel_and_wait_does_not_swallow_the_callers_cancellation() -> None:
    started = asyncio.Event()
    stubborn = asyncio.create_task(_stubborn(1, started))
    await started.wait()
    waiting = asyncio.Event()

    async def stopper() -> str:
        waiting.set()
        await cancel_and_wait(stubborn, grace=30)  # stubborn ignores the first cancel: this waits
        return "finished"

    outer = asyncio.create_task(stopper())
    await waiting.wait()
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await outer
    assert outer.cancelled()
    stubborn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stubborn


async def test_cancel_and_wait_takes_none_done_and_failed_tasks() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails())
    done = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    await cancel_and_wait(None, failed, done)  # logs the failure, raises nothing
    assert isinstance(failed.exception(), RuntimeError)


async def test_cancel_requested_sees_a_swallowed_cancellation() -> None:
    """Retry loops around libraries that use wait_for (aiomqtt) check it before they sleep."""

    async def swallowing() -> bool:
        with contextlib.suppress(asyncio.CancelledError):  # lost, as inside aiomqtt's wait_for
            await asyncio.sleep(3600)
        return cancel_requested()

    task = asyncio.create_task(swallowing())
    await asyncio.sleep(0.01)
    task.cancel()
    assert await task is True
    assert not cancel_requested()


class _SwallowingReconciler:
    """A reconciler double whose tick returns normally once when cancelled (the library bug)."""

    def __init__(self) -> None:
        self.analyzer = SimpleNamespace(peers=None)
        self.in_tick = asyncio.Event()
        self.ticks = 0

    async def tick(self, ref: Any, cached: Any = None) -> TickResult:
        self.ticks += 1
        self.in_tick.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        return TickResult(key=str(ref))

    async def abandon(self, obj: Any) -> None:
        return None


async def test_manager_stops_a_worker_whose_tick_lost_the_cancellation() -> None:
    """The controller-process hang seen in CI: a worker that kept running after a lost cancellation
    kept the leader's manager (and the Lease handover) waiting forever."""
    reconciler = _SwallowingReconciler()
    manager = Manager(None, reconciler, FakeClock())  # type: ignore[arg-type]  # no API calls here
    manager._upsert({"metadata": {"name": "chat", "namespace": "llm"}, "spec": {"analysis": {"interval": "10s"}}})
    await reconciler.in_tick.wait()
    # Waited on with asyncio.wait, which never cancels: a timeout here would cancel the awaited task
    # and so hide the bug. 2 s is far below cancel_and_wait's grace: the worker itself notices.
    stopping = asyncio.ensure_future(manager.stop_workers())
    done, _ = await asyncio.wait({stopping}, timeout=2)
    assert stopping in done, "the worker kept running after stop_workers() cancelled it"
    assert not manager.workers
    assert reconciler.ticks == 1
