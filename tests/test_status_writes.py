"""Status-write economy: a tick writes `.status` at once when a decision changed, and refreshes figures that
alone changed once per refresh period (``max(30 s, 3 x interval)``, controller/writes.py), each policy at its
own point of the period.

Against the real local API server: whether a tick wrote is read from the API server itself (the policy's
resourceVersion, read as the admin, moves with every write that landed), never from the reconciler's word.
The metric source is the deterministic double of controller_helpers (a boundary: no Prometheus runs here);
its counts grow with the window, as Prometheus' ``increase`` does, so every look has new figures.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

import pytest
from conftest_kube import KubeEnv
from controller_helpers import REF, Harness

from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.reconciler import Reconciler
from shadowctl.controller.writes import decisions, figures_due, refresh_period, refresh_phase
from shadowctl.kube import SHADOW_POLICY, KubeClient
from shadowctl.policy.status import PolicyStatus
from shadowctl.routers.factory import router_for

LONG_SHADOW = {"mirrorPercent": 20, "minDuration": "120s", "maxDuration": "1h", "minPairs": 0}


def _stored(h: Harness) -> dict[str, Any]:
    obj = h.env.get_object(SHADOW_POLICY, REF.namespace, REF.name)
    assert obj is not None
    return obj


def _rv(h: Harness) -> str:
    return str(_stored(h)["metadata"]["resourceVersion"])


def _samples(h: Harness) -> float | None:
    verdict = PolicyStatus.of(_stored(h)).last_verdict
    return verdict.metrics[0].samples.candidate if verdict is not None and verdict.metrics else None


@pytest.fixture
async def h(kube_env: KubeEnv, kube_client: KubeClient) -> Harness:
    return Harness(kube_env, kube_client)


async def _into_shadowing(h: Harness) -> None:
    await h.setup(shadow=LONG_SHADOW)
    await h.run_until({"Shadowing"})
    await h.tick()  # the first look of the phase: its verdict and figures are new, so they are written


async def test_figures_alone_are_refreshed_once_per_period_and_decisions_at_once(h: Harness) -> None:
    await _into_shadowing(h)
    assert refresh_period(_stored(h)) == 30.0  # a 10 s interval: 3 intervals are 30 s
    rv, samples = _rv(h), _samples(h)
    assert samples

    # Six more looks, 10 s apart: the counts grow at each. The figures alone are refreshed once per 30 s, at the
    # policy's own point of the period: exactly every third look. A look that changes a decision (the sequential
    # test may pass its metrics meanwhile) is written at once, between those.
    refreshed, decided = [], []
    for i in range(6):
        before = decisions(PolicyStatus.of(_stored(h)).comparable())
        result = await h.tick()
        assert result.phase is not None and result.phase.value == "Shadowing"
        if _rv(h) == rv:
            assert _samples(h) == samples and not result.status_written
        elif decisions(PolicyStatus.of(_stored(h)).comparable()) != before:
            decided.append(i)
        else:
            assert (_samples(h) or 0) > (samples or 0) and result.status_written
            refreshed.append(i)
        rv, samples = _rv(h), _samples(h)
    assert len(refreshed) == 2 and refreshed[1] - refreshed[0] == 3, (refreshed, decided)
    assert len(refreshed) + len(decided) < 6  # some looks wrote nothing

    # A decision changes 10 s later (the metric source goes down: the verdict's outcome and the source errors
    # change): written at once, not at the next refresh.
    h.source.down = True
    await h.tick()
    assert _rv(h) != rv and PolicyStatus.of(_stored(h)).source_errors
    rv = _rv(h)
    h.source.down = False
    await h.tick()
    assert _rv(h) != rv and not PolicyStatus.of(_stored(h)).source_errors
    assert PolicyStatus.of(_stored(h)).phase.value == "Shadowing"

    # The shadow phase's minimum duration passes: the step to the canary (an intent, a route write, a new
    # phase) is recorded at once, 10 s after the previous write.
    for _ in range(8):
        rv = _rv(h)
        result = await h.tick()
        if result.transitioned:
            break
    stored = PolicyStatus.of(_stored(h))
    assert _rv(h) != rv
    assert result.transitioned and stored.phase.value == "Progressing" and stored.canary_weight == 10
    assert stored.pending_route is None and (await h.weights())[1] == 10


async def test_without_a_refresh_period_every_change_is_written(kube_env: KubeEnv, kube_client: KubeClient) -> None:
    h = Harness(kube_env, kube_client)
    h.reconciler = Reconciler(kube_client, router_for, Analyzer(h.source), h.clock, status_refresh=0)
    await _into_shadowing(h)
    rv = _rv(h)
    for _ in range(2):
        result = await h.tick()
        assert result.status_written and _rv(h) != rv
        rv = _rv(h)


def _view(reason: str, samples: int, effect: float, outcome: str, pairs: int, since: float,
          phase: str = "Shadowing") -> dict[str, Any]:
    """A status in its comparable form: phase, a one-metric verdict and an output tally."""
    metric = {"name": "ttft", "outcome": outcome, "samples": {"primary": samples, "candidate": samples + 2},
              "effect": effect, "interval": [0.9, 1.1], "sentence": f"ttft p95 {effect}x"}
    return {"phase": phase,
            "lastVerdict": {"outcome": "continue", "method": "sequential", "reason": reason, "metrics": [metric]},
            "outputs": {"phaseStartedAt": since, "comparators": {"exact": {"candidatePairs": pairs}}}}


def test_what_counts_as_a_decision() -> None:
    base = decisions(_view("120 samples", 10, 1.01, "continue", 3, 5.0))
    assert decisions(_view("240 samples", 20, 1.02, "continue", 9, 5.0)) == base  # figures alone
    assert decisions(_view("120 samples", 10, 1.01, "fail", 3, 5.0)) != base  # a metric's outcome
    assert decisions(_view("120 samples", 10, 1.01, "continue", 0, 9.0)) != base  # a new phase's tally
    assert decisions(_view("120 samples", 10, 1.01, "continue", 3, 5.0, "Progressing")) != base


def test_policies_started_together_refresh_at_different_ticks() -> None:
    """A thousand policies written at the same moment refresh spread over the period's three ticks, each once."""
    written = PolicyStatus(last_tick="2027-01-15T08:00:00Z")
    start = 1_800_000_000.0 - (1_800_000_000.0 % 30)  # not the write's time: any 10 s ticks will do
    objs = [{"metadata": {"namespace": "llm", "name": f"p{i:04d}"}} for i in range(1000)]
    t0 = datetime.fromisoformat("2027-01-15T08:00:00+00:00").timestamp()
    due_at = []
    for obj in objs:
        phase = refresh_phase(obj, 30.0)
        assert 0.0 <= phase < 30.0
        ticks = [k for k in range(1, 4) if figures_due(written, t0 + 10 * k, 30.0, phase)]
        assert ticks, obj  # due within the period
        due_at.append(ticks[0])
    spread = Counter(due_at)
    assert set(spread) == {1, 2, 3} and min(spread.values()) > 250, spread
    assert start and not figures_due(written, t0 + 5, 30.0, 29.0) and figures_due(written, t0, 0.0)
