"""The controller's own /metrics (prometheus-client, a registry of its own).

Per policy (label ``policy``, ``namespace/name``) and per metric of its spec (label ``metric``), the
last verdict's numbers: the statistic of each variant, the observed effect, the judge's interval and
the margin it was held against, all on the effect's scale (the ratio candidate/primary for a relative
margin, the difference for an absolute one). Per comparator, the agreement rate of the candidate's
pairs and of the baseline's (primary vs primary). The label values come from the policy's spec, so the
series count is bounded by the policies and their metrics; a number the verdict does not have (no data,
NaN) removes its series rather than keep a stale value, and :meth:`ControllerMetrics.forget` removes
all of a deleted policy's series. deploy/grafana/shadowctl.json draws them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shadowctl.compare.comparators import AgreementTally
from shadowctl.controller.analysis import Look
from shadowctl.judge.model import Direction, MetricResult, Outcome
from shadowctl.machine import RolloutState
from shadowctl.policy.status import Phase

_Series = tuple[Gauge, tuple[str, ...]]


def margin_bounds(result: MetricResult) -> dict[str, float]:
    """The margin on the effect's scale, by side: ``upper`` where an increase is a regression, ``lower``
    where a decrease is (both for ``either``). A relative margin m bounds the ratio at 1+m / 1-m, an
    absolute one the difference at +m / -m."""
    m = result.margin
    centre = 1.0 if m.relative else 0.0
    out: dict[str, float] = {}
    if result.direction in (Direction.increase, Direction.either):
        out["upper"] = centre + m.value
    if result.direction in (Direction.decrease, Direction.either):
        out["lower"] = centre - m.value
    return out


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


class ControllerMetrics:
    """Phase, weights, mirror, decisions, evidence per metric, agreement, tick duration, source errors."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.phase = Gauge("shadowctl_rollout_phase", "1 for the rollout's current phase", ["policy", "phase"],
                           registry=r)
        self.weight = Gauge("shadowctl_canary_weight_percent", "Live traffic share of the candidate", ["policy"],
                            registry=r)
        self.mirror = Gauge("shadowctl_mirror_percent", "Mirrored share of requests (0: none)", ["policy"], registry=r)
        self.decisions = Counter("shadowctl_decisions_total", "Judge verdicts by outcome", ["policy", "outcome"],
                                 registry=r)
        self.evidence = Gauge("shadowctl_metric_effect", "Observed effect (ratio or difference) per metric",
                              ["policy", "metric"], registry=r)
        self.value = Gauge("shadowctl_metric_value", "The metric's statistic (e.g. p95 TTFT in seconds) per variant, "
                           "as the last verdict saw it", ["policy", "metric", "variant"], registry=r)
        self.interval_lower = Gauge("shadowctl_metric_interval_lower", "Lower end of the judge's interval for the "
                                    "effect (same scale as shadowctl_metric_effect)", ["policy", "metric"], registry=r)
        self.interval_upper = Gauge("shadowctl_metric_interval_upper", "Upper end of the judge's interval for the "
                                    "effect (same scale as shadowctl_metric_effect)", ["policy", "metric"], registry=r)
        self.margin = Gauge("shadowctl_metric_margin", "The margin on the effect's scale: side upper (an increase "
                            "is worse) or lower (a decrease is worse)", ["policy", "metric", "side"], registry=r)
        self.agreement = Gauge("shadowctl_output_agreement_ratio", "Share of output pairs a comparator found in "
                               "agreement since the phase started: variant candidate (candidate vs primary) or "
                               "baseline (primary vs primary)", ["policy", "comparator", "variant"], registry=r)
        self.pairs = Gauge("shadowctl_output_pairs", "Output pairs a comparator compared since the phase started",
                           ["policy", "comparator", "variant"], registry=r)
        self.tick_seconds = Histogram("shadowctl_reconcile_duration_seconds", "Time of one tick of one policy",
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.tick_errors = Counter("shadowctl_reconcile_errors_total", "Ticks that ended with an error", ["policy"],
                                   registry=r)
        self.source_errors = Counter("shadowctl_source_errors_total", "Metric source failures seen by ticks",
                                     ["policy"], registry=r)
        self.leader = Gauge("shadowctl_leader", "1 while this replica leads", registry=r)
        self._evidence_series: dict[str, set[_Series]] = {}
        self._agreement_series: dict[str, set[_Series]] = {}

    def observe_tick(self, policy: str, state: RolloutState, look: Look | None, seconds: float, error: bool) -> None:
        for phase in Phase:
            self.phase.labels(policy, phase.value).set(1.0 if phase is state.phase else 0.0)
        self.weight.labels(policy).set(state.weight)
        self.mirror.labels(policy).set(state.mirror_percent or 0.0)
        self.tick_seconds.observe(seconds)
        # Counters start at 0 for every label value, so that their rates are 0, not missing, until one counts.
        for outcome in Outcome:
            self.decisions.labels(policy, outcome.value)
        for counter in (self.tick_errors, self.source_errors):
            counter.labels(policy)
        if error:
            self.tick_errors.labels(policy).inc()
        if look is not None:
            self.decisions.labels(policy, look.verdict.outcome.value).inc()
            if look.source_errors:
                self.source_errors.labels(policy).inc(len(look.source_errors))
            self._set(self._evidence_series, policy, self._evidence(policy, look.verdict.results))
            if look.tally is not None:
                self._set(self._agreement_series, policy, self._agreement(policy, look.tally))

    def _evidence(self, policy: str, results: Iterable[MetricResult]) -> dict[_Series, float | None]:
        values: dict[_Series, float | None] = {}
        for r in results:
            values[(self.evidence, (policy, r.name))] = _finite(r.effect)
            values[(self.value, (policy, r.name, "primary"))] = _finite(r.primary_value)
            values[(self.value, (policy, r.name, "candidate"))] = _finite(r.candidate_value)
            values[(self.interval_lower, (policy, r.name))] = _finite(r.interval[0])
            values[(self.interval_upper, (policy, r.name))] = _finite(r.interval[1])
            for side, bound in margin_bounds(r).items():
                values[(self.margin, (policy, r.name, side))] = bound
        return values

    def _agreement(self, policy: str, tally: AgreementTally) -> dict[_Series, float | None]:
        values: dict[_Series, float | None] = {}
        for name, c in tally.counts.items():
            for variant, pairs, agree in (("candidate", c.candidate_pairs, c.candidate_agree),
                                          ("baseline", c.baseline_pairs, c.baseline_agree)):
                values[(self.pairs, (policy, name, variant))] = float(pairs)
                values[(self.agreement, (policy, name, variant))] = agree / pairs if pairs > 0 else None
        return values

    @staticmethod
    def _set(kept: dict[str, set[_Series]], policy: str, values: dict[_Series, float | None]) -> None:
        """Set each series that has a number; remove the policy's others (no data now, or no longer in its spec)."""
        now: set[_Series] = set()
        for (gauge, labels), value in values.items():
            if value is not None:
                gauge.labels(*labels).set(value)
                now.add((gauge, labels))
        for gauge, labels in kept.get(policy, set()) - now:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        kept[policy] = now

    def forget(self, policy: str) -> None:
        """Remove every series of a policy that no longer exists."""
        for gauge in (self.weight, self.mirror):
            with contextlib.suppress(KeyError):
                gauge.remove(policy)
        for counter in (self.tick_errors, self.source_errors):
            with contextlib.suppress(KeyError):
                counter.remove(policy)
        for phase in Phase:
            with contextlib.suppress(KeyError):
                self.phase.remove(policy, phase.value)
        for outcome in Outcome:
            with contextlib.suppress(KeyError):
                self.decisions.remove(policy, outcome.value)
        for kept in (self._evidence_series, self._agreement_series):
            self._set(kept, policy, {})
            kept.pop(policy, None)
