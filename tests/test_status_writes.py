"""Status-write economy: a tick writes `.status` at once when a decision changed, and refreshes figures that
alone changed at most once per refresh period (``max(30 s, 3 x interval)``, controller/writes.py).

Against the real local API server: whether a tick wrote is read from the API server itself (the policy's
resourceVersion, read as the admin, moves with every write that landed), never from the reconciler's word.
The metric source is the deterministic double of controller_helpers (a boundary: no Prometheus runs here);
its counts grow with the window, as Prometheus' ``increase`` does, so every look has new figures.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest_kube import KubeEnv
from controller_helpers import REF, Harness

from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.reconciler import Reconciler
from shadowctl.controller.writes import decisions, refresh_period
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

    # Two more looks: the counts grew at each, nothing was decided; no write reaches the API server.
    for _ in range(2):
        result = await h.tick()
        assert result.phase is not None and result.phase.value == "Shadowing" and not result.status_written
        assert _rv(h) == rv and _samples(h) == samples
    # 30 s after the last write: the figures are refreshed.
    await h.tick()
    assert _rv(h) != rv and (_samples(h) or 0) > samples
    rv = _rv(h)

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
