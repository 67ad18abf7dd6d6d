"""The batching wrapper: requests of one look from many policies become one call to the source."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from controller_helpers import FakeMetricSource

from shadowctl.controller.analysis import BatchingSource
from shadowctl.policy.model import MetricKind
from shadowctl.sources.base import MetricKey, VariantQuery, WindowRequest

END = datetime(2026, 1, 1, tzinfo=UTC)


def request(policy: str, end: datetime = END) -> WindowRequest:
    return WindowRequest(MetricKey(policy, "ttft-p95"), MetricKind.latency_histogram, "vllm-ttft",
                         end - timedelta(minutes=5), end, VariantQuery("p"), VariantQuery("c"))


async def test_concurrent_requests_of_one_look_share_one_call() -> None:
    inner = FakeMetricSource()
    source = BatchingSource(inner, idle=0.02, max_wait=1.0)

    async def late(i: int) -> object:
        await asyncio.sleep(0.005 * (i % 3))  # arrivals spread a little, within the idle time
        return await source.fetch(request(f"ns/p{i}"))

    results = await asyncio.gather(*(late(i) for i in range(50)))
    assert len(results) == 50
    assert inner.calls == 1
    assert len(inner.requests) == 50


async def test_different_looks_are_not_mixed() -> None:
    inner = FakeMetricSource()
    source = BatchingSource(inner, idle=0.02)
    await asyncio.gather(source.fetch(request("ns/a")), source.fetch(request("ns/b", END + timedelta(seconds=10))))
    assert inner.calls == 2


async def test_max_wait_bounds_the_delay() -> None:
    inner = FakeMetricSource()
    source = BatchingSource(inner, idle=0.05, max_wait=0.1)
    stop = asyncio.Event()

    pending: list[asyncio.Task[object]] = []

    async def trickle() -> None:
        i = 0
        while not stop.is_set():
            pending.append(asyncio.create_task(source.fetch(request(f"ns/t{i}"))))
            i += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(trickle())
    await source.fetch(request("ns/first"))  # would wait forever if only idleness flushed
    stop.set()
    await task
    await asyncio.gather(*pending)
    assert inner.calls >= 1


def test_look_end_rounds_to_the_interval_boundary() -> None:
    from shadowctl.controller.analysis import look_end

    assert look_end(1000.004, 900.0, 10.0) == 1000.0
    assert look_end(1009.9, 900.0, 10.0) == 1000.0
    assert look_end(1000.5, 1000.2, 10.0) == 1000.5  # never before the phase started


def test_only_a_persons_change_wakes_a_worker() -> None:
    from shadowctl.controller.manager import _wants_tick

    base = {"metadata": {"generation": 3, "annotations": {}}, "status": {"phase": "Shadowing"}}
    status_write = {"metadata": {"generation": 3, "annotations": {}}, "status": {"phase": "Progressing"}}
    edit = {"metadata": {"generation": 4, "annotations": {}}}
    command = {"metadata": {"generation": 3, "annotations": {"shadowctl.dev/command": '{"id": "x"}'}}}
    assert not _wants_tick(base, status_write)
    assert _wants_tick(base, edit)
    assert _wants_tick(base, command)


class _Gated(FakeMetricSource):
    """Answers only once `release` is set (a slow Prometheus)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def fetch_many(self, requests):  # type: ignore[no-untyped-def]
        self.entered.set()
        await self.release.wait()
        return await super().fetch_many(requests)


async def test_a_tick_during_the_look_fetch_waits_for_it_instead_of_asking_again() -> None:
    inner = _Gated()
    source = BatchingSource(inner, idle=0.01)
    planned = [request(f"ns/p{i}") for i in range(10)]
    look = asyncio.create_task(source.fetch_many(planned))  # the boundary's look, for every rollout
    await inner.entered.wait()  # the look is in flight
    later = asyncio.create_task(source.fetch(planned[7]))
    await asyncio.sleep(0.05)  # longer than `idle`: a new batch would have been sent by now
    inner.release.set()
    answers, b = await asyncio.gather(look, later)
    assert inner.calls == 1
    assert answers[planned[0].key] == (await FakeMetricSource().fetch(planned[0]))
    assert b == (await FakeMetricSource().fetch(planned[7]))


async def test_one_metric_asked_for_two_windows_gets_each_windows_answer() -> None:
    inner = FakeMetricSource()
    source = BatchingSource(inner, idle=0.01)
    long = request("ns/p0")
    short = WindowRequest(long.key, long.kind, long.template, END - timedelta(minutes=1), END,
                          long.primary, long.candidate)  # its phase restarted: a shorter window
    got_long, got_short = await asyncio.gather(source.fetch(long), source.fetch(short))
    reference = FakeMetricSource()
    assert got_long == await reference.fetch(long)
    assert got_short == await reference.fetch(short)
    assert got_long != got_short
