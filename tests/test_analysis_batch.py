"""The look's vectorized judge pass: same verdicts as judging each rollout alone, used only where it fits."""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Sequence
from typing import Any, cast

from controller_helpers import LE, policy_doc
from fake_clock import FakeClock

from shadowctl.aio import cancel_and_wait
from shadowctl.controller.analysis import Analyzer, Look
from shadowctl.controller.manager import Manager
from shadowctl.controller.reconciler import Reconciler
from shadowctl.controller.status import parse_policy, read_state
from shadowctl.kube import KubeClient
from shadowctl.machine import RolloutState
from shadowctl.policy.status import Phase
from shadowctl.routers.factory import router_for
from shadowctl.sources.base import (
    CountWindow,
    HistogramWindow,
    MetricKey,
    SourceUnavailable,
    Unavailability,
    VariantPair,
    WindowRequest,
    WindowResult,
)
from shadowctl.sources.prometheus import build_requests

END = 1_800_000_000.0  # a 10 s boundary
NOW = END + 3.7  # a staggered tick of that look
N = 40


def _cdf(x: float, median: float, sigma: float = 0.5) -> float:
    return 1.0 if math.isinf(x) else 0.5 * (1 + math.erf(math.log(x / median) / (sigma * math.sqrt(2))))


class VariedSource:
    """Different data per rollout (so that verdicts differ), a function of the request only."""

    plan = staticmethod(build_requests)  # requests as the Prometheus source makes them

    def __init__(self) -> None:
        self.calls = 0

    async def fetch(self, request: WindowRequest) -> WindowResult:
        return (await self.fetch_many([request]))[request.key]

    async def fetch_many(self, requests: Sequence[WindowRequest]) -> dict[MetricKey, WindowResult]:
        self.calls += 1
        return {r.key: self.answer(r) for r in requests}

    @staticmethod
    def answer(r: WindowRequest) -> WindowResult:
        i = int(r.key.policy.rsplit("/p", 1)[1])
        n = (0.2 + 3.0 * (i % 7)) * (r.end - r.start).total_seconds()  # from too few samples to plenty
        if i == 11:
            return SourceUnavailable(r.key.metric, r.primary.expr, Unavailability.unreachable, "connection refused")
        if r.key.metric == "errors":
            return VariantPair(CountWindow(0.01 * n, n), CountWindow((0.005 + 0.01 * (i % 4)) * n, n))
        cand_median = 0.4 * (0.85 + 0.1 * (i % 5))  # better, same, worse, much worse
        le_c = LE if i != 7 else (*LE[:-1:2], math.inf)  # one rollout's candidate has another layout
        primary = HistogramWindow(LE, tuple(float(round(n * _cdf(b, 0.4))) for b in LE))
        counts_c = tuple(float(round(n * _cdf(b, cand_median))) for b in le_c)
        if i == 9:  # not cumulative: not a histogram the judge takes
            counts_c = (*counts_c[:50], counts_c[49] - 1.0, *counts_c[51:])
        return VariantPair(primary, HistogramWindow(le_c, counts_c))

    async def check(self) -> SourceUnavailable | None:
        return None

    async def aclose(self) -> None:
        return None


def _object(i: int, since: float, phase: Phase = Phase.shadowing) -> dict[str, Any]:
    doc = policy_doc()
    doc["metadata"] = {"name": f"p{i}", "namespace": "llm", "uid": f"uid-{i}", "generation": 1}
    if i % 6 == 1:
        doc["spec"]["analysis"]["alpha"] = 0.01  # another error budget: another group of the pass
    if i % 6 == 2:
        doc["spec"]["analysis"]["metrics"][0]["statistic"] = "p50"
    if i == 3:
        doc["spec"]["analysis"]["method"] = "fixed"  # not vectorized: judged per tick
    state = RolloutState(
        phase=phase,
        step=0 if phase is Phase.progressing else None,
        weight=10 if phase is Phase.progressing else 0,
        mirror_percent=20,
        phase_started_at=since,
    )
    doc["status"] = {"rollout": state.to_record().to_json()}
    return doc


def _since(i: int) -> float:
    return END - (30.0 + 60.0 * (i % 8))  # some looks past the shadow's maxDuration (final)


def _objects() -> list[dict[str, Any]]:
    return [_object(i, _since(i), Phase.progressing if i % 3 == 0 else Phase.shadowing) for i in range(N)]


def _manager(analyzer: Analyzer, objects: list[dict[str, Any]]) -> Manager:
    kube = cast(KubeClient, None)  # never called: only looks() is used
    clock = FakeClock(NOW)
    manager = Manager(kube, Reconciler(kube, router_for, analyzer, clock), clock)
    manager.last_objects = {f"llm/{o['metadata']['name']}": o for o in objects}
    return manager


async def _looks(analyzer: Analyzer, objects: list[dict[str, Any]]) -> list[Look]:
    return list(await asyncio.gather(*(analyzer.look(parse_policy(o), read_state(o), NOW) for o in objects)))


async def _boundary(manager: Manager, end: float = END) -> None:
    """What the manager does at a boundary: the look of every rollout due then."""
    await manager.scheduler.run(end, manager.due(end))


async def test_the_shared_look_gives_the_same_looks_as_judging_each_rollout_alone() -> None:
    objects = _objects()
    alone = Analyzer(VariedSource())
    expected = await _looks(alone, objects)
    assert alone.looks_judged == 0 and alone.shared_verdicts == 0

    source = VariedSource()
    batched = Analyzer(source)
    manager = _manager(batched, objects)
    await _boundary(manager)
    assert source.calls == 1  # one fetch for every rollout's look
    got = await _looks(batched, objects)
    assert source.calls == 1  # the ticks read it: none fetched again

    assert [g.verdict for g in got] == [e.verdict for e in expected]
    assert [g.evidence for g in got] == [e.evidence for e in expected]
    assert [g.source_errors for g in got] == [e.source_errors for e in expected]
    # The data cover every outcome, so the comparison above means something.
    outcomes = {m.outcome for e in expected for m in e.evidence.metrics}
    assert {"pass", "fail", "continue", "nodata"} <= outcomes
    assert any(e.evidence.outcome == "inconclusive" for e in expected)
    assert batched.looks_judged == 1  # one pass for the whole look
    # Every sequential look took the shared verdict: not the fixed-method rollout (3), and not the one
    # whose histogram is not cumulative (9), which the judge refuses (the tick says why, as alone).
    assert batched.shared_verdicts == N - 2


async def test_a_tick_whose_data_differ_from_the_shared_look_judges_alone() -> None:
    objects = _objects()
    source = VariedSource()
    batched = Analyzer(source)
    stale = copy.deepcopy(objects)
    # The watch cache (what the boundary planned from) still has an older phase start for p4 and p8.
    stale[4] = _object(4, _since(4) - 10.0)
    stale[8] = _object(8, _since(8) - 20.0, Phase.shadowing)
    await _boundary(_manager(batched, stale))
    got = await _looks(batched, objects)
    expected = await _looks(Analyzer(VariedSource()), objects)
    assert [g.evidence for g in got] == [e.evidence for e in expected]
    assert batched.shared_verdicts == N - 2 - 2  # as above, and p4, p8 judged on their own data
    assert source.calls == 1 + 2  # p4 and p8 fetched their own windows


async def test_a_spec_edited_after_the_boundary_is_judged_alone() -> None:
    objects = _objects()
    batched = Analyzer(VariedSource())
    await _boundary(_manager(batched, objects))
    edited = copy.deepcopy(objects[5])
    edited["metadata"]["generation"] = 2
    edited["spec"]["analysis"]["alpha"] = 0.2
    look = await batched.look(parse_policy(edited), read_state(edited), NOW)
    alone = await Analyzer(VariedSource()).look(parse_policy(edited), read_state(edited), NOW)
    assert look.evidence == alone.evidence and batched.shared_verdicts == 0


async def test_a_tick_early_in_a_phase_is_not_in_the_boundary_look() -> None:
    objects = [_object(0, NOW - 2.0)]  # its window ends now, not at the boundary
    manager = _manager(Analyzer(VariedSource()), objects)
    assert manager.due(END) == []
    await _looks(manager.reconciler.analyzer, objects)
    assert manager.reconciler.analyzer.shared_verdicts == 0


def test_the_due_rollouts_are_those_whose_look_ends_at_the_boundary() -> None:
    objects = _objects()
    manager = _manager(Analyzer(VariedSource()), objects)
    due = manager.due(END)
    assert {p.key for p, _ in due} == {f"llm/p{i}" for i in range(N)}
    assert manager.due(END + 5.0) == []  # no interval boundary of these policies


def test_tick_offsets_spread_evenly_over_most_of_the_interval() -> None:
    analyzer = Analyzer(None)
    manager = _manager(analyzer, [])
    offsets = [manager.offset(f"bench/p{i:04d}", 10.0) for i in range(1000)]
    # The first second is left to the look's pass (Manager.lead), the last one to the next boundary.
    assert all(1.0 <= o < 9.0 for o in offsets)
    bins = [0] * 16  # half-second bins over 8 s: 1000 / 16 = 62.5 expected per bin
    for o in offsets:
        bins[int((o - 1.0) / 0.5)] += 1
    assert max(bins) < 95 and min(bins) > 35, bins


async def test_the_manager_runs_the_look_at_the_boundary_before_the_ticks() -> None:
    from shadowctl.controller.manager import _Worker
    from shadowctl.kube import SHADOW_POLICY, ResourceRef

    objects = _objects()
    source = VariedSource()
    analyzer = Analyzer(source)
    manager = _manager(analyzer, objects)
    clock = manager.clock
    assert isinstance(clock, FakeClock)
    clock.advance(-NOW + END - 5.0)  # 5 s before the boundary
    manager.workers["llm/p0"] = _Worker(ResourceRef(SHADOW_POLICY, "p0", "llm"), 10.0)
    task = asyncio.create_task(manager._run_looks())
    try:
        await asyncio.sleep(0)
        assert analyzer.looks_judged == 0  # not before the look ends
        clock.advance(5.0)
        for _ in range(20):
            await asyncio.sleep(0)
        assert analyzer.looks_judged == 1 and source.calls == 1
        clock.advance(3.7)
        policy, state = parse_policy(objects[0]), read_state(objects[0])
        await analyzer.look(policy, state, clock.now())
        assert analyzer.looks_judged == 1 and source.calls == 1  # the tick read the look, it fetched nothing
        assert analyzer.shared_verdicts == 1
    finally:
        await cancel_and_wait(task)


async def test_a_failing_look_costs_no_verdict() -> None:
    objects = _objects()

    class Broken(VariedSource):
        def plan(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the planner is broken")

    batched = Analyzer(Broken())
    manager = _manager(batched, objects)
    await _boundary(manager)  # logged, and an empty look posted
    batched.source = VariedSource()
    got = await _looks(batched, objects)
    expected = await _looks(Analyzer(VariedSource()), objects)
    assert [g.evidence for g in got] == [e.evidence for e in expected]
    assert batched.shared_verdicts == 0
