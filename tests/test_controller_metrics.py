"""The controller's /metrics: the last verdict's numbers per metric, agreement per comparator, and that a
deleted policy's series go (read back through prometheus-client's own text exposition)."""

from __future__ import annotations

import math

from fake_clock import FakeClock
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shadowctl.compare.comparators import AgreementTally
from shadowctl.controller.analysis import Look
from shadowctl.controller.metrics import ControllerMetrics, margin_bounds
from shadowctl.controller.reconciler import Reconciler
from shadowctl.judge.model import Direction, Margin, MetricResult, Outcome, Verdict
from shadowctl.kube import SHADOW_POLICY, NotFound, ResourceRef
from shadowctl.machine import RolloutState
from shadowctl.policy.status import ComparatorCounts, Phase

STATE = RolloutState(phase=Phase.shadowing, step=0, weight=0, mirror_percent=50.0)


def _result(name: str, *, direction: Direction = Direction.increase, margin: Margin = Margin(0.1, relative=True),
            primary: float | None = 0.2, candidate: float | None = 0.21, effect: float | None = 1.05,
            interval: tuple[float | None, float | None] = (0.98, 1.08)) -> MetricResult:
    return MetricResult(name=name, outcome=Outcome.cont, statistic="p95", direction=direction, margin=margin,
                        critical=False, n_primary=100, n_candidate=100, primary_value=primary,
                        candidate_value=candidate, effect=effect, interval=interval, alpha=0.05, beta=0.2,
                        crossed=None, threshold=None, sentence="")


def _look(*results: MetricResult, tally: AgreementTally | None = None) -> Look:
    verdict = Verdict(Outcome.cont, tuple(results), "still looking")
    return Look(verdict=verdict, evidence=verdict.to_record(), tally=tally)


def _samples(metrics: ControllerMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_margin_bounds_are_on_the_effect_scale() -> None:
    assert margin_bounds(_result("a")) == {"upper": 1.1}
    down = margin_bounds(_result("a", direction=Direction.decrease, margin=Margin(0.05, relative=True)))
    assert math.isclose(down["lower"], 0.95) and set(down) == {"lower"}
    either = margin_bounds(_result("a", direction=Direction.either, margin=Margin(0.005, relative=False)))
    assert either == {"upper": 0.005, "lower": -0.005}


def test_a_verdict_sets_values_interval_margin_and_agreement() -> None:
    m = ControllerMetrics()
    tally = AgreementTally(counts={"exact": ComparatorCounts(candidate_pairs=40, candidate_agree=30,
                                                             baseline_pairs=20, baseline_agree=19),
                                   "semantic": ComparatorCounts()})
    m.observe_tick("llm/chat", STATE, _look(_result("ttft"), _result(
        "agreement", direction=Direction.decrease, margin=Margin(0.1, relative=True), primary=0.95, candidate=0.75,
        effect=0.79, interval=(0.7, 0.88))), 0.01, False)
    m.observe_tick("llm/chat", STATE, _look(_result("ttft"), tally=tally), 0.01, False)
    s = _samples(m)
    p = {"policy": "llm/chat"}
    assert _get(s, "shadowctl_metric_value", **p, metric="ttft", variant="primary") == 0.2
    assert _get(s, "shadowctl_metric_value", **p, metric="ttft", variant="candidate") == 0.21
    assert _get(s, "shadowctl_metric_effect", **p, metric="ttft") == 1.05
    assert _get(s, "shadowctl_metric_interval_lower", **p, metric="ttft") == 0.98
    assert _get(s, "shadowctl_metric_interval_upper", **p, metric="ttft") == 1.08
    assert _get(s, "shadowctl_metric_margin", **p, metric="ttft", side="upper") == 1.1
    assert _get(s, "shadowctl_metric_margin", **p, metric="ttft", side="lower") is None
    # The second look no longer judged "agreement" (the spec was edited): its series went with it.
    assert not any(dict(labels).get("metric") == "agreement" for _, labels in s)
    assert _get(s, "shadowctl_output_agreement_ratio", **p, comparator="exact", variant="candidate") == 0.75
    assert _get(s, "shadowctl_output_agreement_ratio", **p, comparator="exact", variant="baseline") == 0.95
    assert _get(s, "shadowctl_output_pairs", **p, comparator="exact", variant="candidate") == 40
    # No pairs yet: a count of 0, and no rate (never a made-up 0% or 100%).
    assert _get(s, "shadowctl_output_pairs", **p, comparator="semantic", variant="candidate") == 0
    assert _get(s, "shadowctl_output_agreement_ratio", **p, comparator="semantic", variant="candidate") is None
    assert _get(s, "shadowctl_decisions_total", **p, outcome="continue") == 2
    # Counters exist at 0 before anything counts (a rate over them is 0, not missing).
    assert _get(s, "shadowctl_decisions_total", **p, outcome="fail") == 0
    assert _get(s, "shadowctl_source_errors_total", **p) == 0


def test_a_number_the_verdict_lacks_removes_its_series() -> None:
    m = ControllerMetrics()
    m.observe_tick("llm/chat", STATE, _look(_result("ttft")), 0.01, False)
    m.observe_tick("llm/chat", STATE, _look(_result("ttft", candidate=None, effect=float("nan"),
                                                    interval=(None, math.inf))), 0.01, False)
    s = _samples(m)
    p = {"policy": "llm/chat", "metric": "ttft"}
    assert _get(s, "shadowctl_metric_value", **p, variant="primary") == 0.2
    for name, extra in (("shadowctl_metric_value", {"variant": "candidate"}), ("shadowctl_metric_effect", {}),
                        ("shadowctl_metric_interval_lower", {}), ("shadowctl_metric_interval_upper", {})):
        assert _get(s, name, **p, **extra) is None, name
    assert _get(s, "shadowctl_metric_margin", **p, side="upper") == 1.1


def test_forget_removes_every_series_of_that_policy_only() -> None:
    m = ControllerMetrics()
    tally = AgreementTally(counts={"exact": ComparatorCounts(candidate_pairs=4, candidate_agree=3)})
    for policy in ("llm/chat", "llm/other"):
        m.observe_tick(policy, STATE, _look(_result("ttft"), tally=tally), 0.01, True)
    m.forget("llm/chat")
    s = _samples(m)
    assert not [key for key in s if dict(key[1]).get("policy") == "llm/chat"]
    assert _get(s, "shadowctl_metric_value", policy="llm/other", metric="ttft", variant="primary") == 0.2
    assert _get(s, "shadowctl_output_agreement_ratio", policy="llm/other", comparator="exact",
                variant="candidate") == 0.75
    assert _get(s, "shadowctl_rollout_phase", policy="llm/other", phase="Shadowing") == 1.0
    m.forget("llm/never-seen")  # nothing to remove: no error


class _GoneKube:
    """Stands in for the API server at the one call these tests reach (a GET of a deleted policy); the
    reconciler's other collaborators are never called on these paths."""

    async def get(self, ref: object) -> dict[str, object]:
        raise NotFound("shadowpolicies.shadowctl.dev \"chat\" not found", status=404)


async def test_the_reconciler_forgets_a_deleted_policy() -> None:
    m = ControllerMetrics()
    m.observe_tick("llm/chat", STATE, _look(_result("ttft")), 0.01, False)
    m.observe_tick("llm/gone", STATE, _look(_result("ttft")), 0.01, False)
    reconciler = Reconciler(_GoneKube(), lambda policy, kube: None, None, FakeClock(), metrics=m)  # type: ignore[arg-type]
    result = await reconciler.tick(ResourceRef(SHADOW_POLICY, "gone", "llm"))
    assert result.gone
    # Deleted while the manager watched: it abandons the object (a finished rollout: nothing to restore).
    await reconciler.abandon({"metadata": {"name": "chat", "namespace": "llm"},
                              "status": {"phase": "Succeeded"}})
    assert not [key for key in _samples(m) if dict(key[1]).get("policy") in ("llm/chat", "llm/gone")]
