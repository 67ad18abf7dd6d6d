"""The controller's own /metrics (prometheus-client, a registry of its own)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shadowctl.controller.analysis import Look
from shadowctl.machine import RolloutState
from shadowctl.policy.status import Phase


class ControllerMetrics:
    """Phase, weights, mirror, decisions, evidence per metric, tick duration, source errors."""

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
        self.tick_seconds = Histogram("shadowctl_reconcile_duration_seconds", "Time of one tick of one policy",
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.tick_errors = Counter("shadowctl_reconcile_errors_total", "Ticks that ended with an error", ["policy"],
                                   registry=r)
        self.source_errors = Counter("shadowctl_source_errors_total", "Metric source failures seen by ticks",
                                     ["policy"], registry=r)
        self.leader = Gauge("shadowctl_leader", "1 while this replica leads", registry=r)

    def observe_tick(self, policy: str, state: RolloutState, look: Look | None, seconds: float, error: bool) -> None:
        for phase in Phase:
            self.phase.labels(policy, phase.value).set(1.0 if phase is state.phase else 0.0)
        self.weight.labels(policy).set(state.weight)
        self.mirror.labels(policy).set(state.mirror_percent or 0.0)
        self.tick_seconds.observe(seconds)
        if error:
            self.tick_errors.labels(policy).inc()
        if look is not None:
            self.decisions.labels(policy, look.verdict.outcome.value).inc()
            if look.source_errors:
                self.source_errors.labels(policy).inc(len(look.source_errors))
            for m in look.evidence.metrics:
                if m.effect is not None:
                    self.evidence.labels(policy, m.name).set(m.effect)

    def forget(self, policy: str) -> None:
        for gauge in (self.weight, self.mirror):
            with contextlib.suppress(KeyError):
                gauge.remove(policy)
