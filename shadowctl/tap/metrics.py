"""The tap's own Prometheus metrics (own registry), so models without vLLM metrics still get latency data.

The ``model`` label comes from request bodies, which clients choose; to keep
the series count bounded, only the first :data:`MAX_MODELS` distinct names get
their own label value and the rest share ``other``.

Under ``shadowctl tap --workers N`` (:mod:`shadowctl.tap.workers`) the workers
record into prometheus_client's multiprocess files and :meth:`TapMetrics.render`
sums them, so a scrape that reaches any worker sees the whole tap.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from shadowctl.tap.workers import MULTIPROC_ENV, worker_index

MAX_MODELS = 20
DROP_REASONS = ("invalid", "queue_full", "publish_failed", "shutdown")
"""The ``reason`` values of ``shadowctl_tap_events_dropped_total``."""
MIRROR_OUTCOMES = ("sent", "failed", "dropped_in_flight_cap", "not_rewritable", "skipped_budget", "skipped_queue")
"""The ``outcome`` values of ``shadowctl_tap_mirror_requests_total`` and ``shadowctl_tap_baseline_requests_total``
(skipped_budget: over the route setting's shadow budget; skipped_queue: the candidate's queue back-off)."""
ROUTE_FALLBACK_REASONS = ("none", "stale", "invalid")
"""The ``reason`` values of ``shadowctl_tap_route_fallback`` (shadowctl.compare.routing.FallbackReason)."""
CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class TapMetrics:
    """Histograms and counters exposed on the tap's metrics path."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        # Set by the supervisor for its workers only.
        self.shared_dir = os.environ.get(MULTIPROC_ENV) if worker_index() is not None else None
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("variant", "model")
        self.ttft = Histogram(
            "shadowctl_tap_time_to_first_token_seconds", "Time from request received to first output token "
            "(streaming responses).", labels, buckets=_TTFT_BUCKETS, registry=self.registry)
        self.e2e = Histogram(
            "shadowctl_tap_e2e_request_latency_seconds", "Time from request received to the last byte sent.",
            labels, buckets=_E2E_BUCKETS, registry=self.registry)
        self.output_tokens = Histogram(
            "shadowctl_tap_output_tokens", "Output tokens per request (usage, else counted stream chunks).",
            labels, buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.requests = Counter(
            "shadowctl_tap_requests", "Recorded API requests by HTTP status code.",
            ("variant", "model", "code"), registry=self.registry)
        self.events_published = Counter(
            "shadowctl_tap_events_published", "Output events the broker acknowledged.", registry=self.registry)
        self.events_dropped = Counter(
            "shadowctl_tap_events_dropped", "Output events not published, by reason.", ("reason",),
            registry=self.registry)
        self.queue_depth = Gauge(
            "shadowctl_tap_event_queue_depth", "Output events waiting for the broker.", registry=self.registry,
            multiprocess_mode="livesum")
        self.broker_connected = Gauge(
            "shadowctl_tap_broker_connected", "1 while connected to the MQTT broker (with workers: 1 while all are).",
            registry=self.registry, multiprocess_mode="livemin")
        self.broker_refused = Counter(
            "shadowctl_tap_broker_refused", "Connections the MQTT broker refused for their credentials (bad user "
            "name, password or client certificate; not authorized).", registry=self.registry)
        self.mirrored = Counter(
            "shadowctl_tap_mirror_requests", "Application-level mirror copies, by outcome.", ("outcome",),
            registry=self.registry)
        # The tap-router channel (`--route-policy`; shadowctl.tap.routes). With workers: the generation is the
        # lowest any worker applies, the shares the highest, a fallback reason 1 while any worker falls back.
        self.route_generation = Gauge(
            "shadowctl_tap_route_generation", "Generation of the route setting applied (0: none, primary-only).",
            registry=self.registry, multiprocess_mode="livemin")
        self.route_mirror_percent = Gauge(
            "shadowctl_tap_route_mirror_percent", "Share of requests mirrored to the candidate by the route setting.",
            registry=self.registry, multiprocess_mode="livemax")
        self.route_candidate_percent = Gauge(
            "shadowctl_tap_route_candidate_percent", "Share of live requests the candidate answers.",
            registry=self.registry, multiprocess_mode="livemax")
        self.route_fallback = Gauge(
            "shadowctl_tap_route_fallback", "1 while the tap routes primary-only instead of by a setting, by reason "
            "(none: no setting; stale: issuedAt older than 3 intervals; invalid: not understood).", ("reason",),
            registry=self.registry, multiprocess_mode="livemax")
        self.route_broker_connected = Gauge(
            "shadowctl_tap_route_broker_connected", "1 while subscribed to the route setting (with workers: all are).",
            registry=self.registry, multiprocess_mode="livemin")
        self.route_fallback_reasons = ROUTE_FALLBACK_REASONS
        self.baseline = Counter(
            "shadowctl_tap_baseline_requests", "Requests sent once more, unchanged, to the tap's own upstream as the "
            "noise baseline (the route setting's baselinePercent), by outcome.", ("outcome",), registry=self.registry)
        self.routed = Counter(
            "shadowctl_tap_routed_requests", "Live requests the candidate answered (the setting's candidatePercent).",
            registry=self.registry)
        # Every reason and outcome exists from the start at 0, so that a rate over them is 0 rather than no
        # series at all (a dashboard cannot tell "none dropped" from "not scraped" otherwise).
        for reason in DROP_REASONS:
            self.events_dropped.labels(reason)
        for outcome in MIRROR_OUTCOMES:
            self.mirrored.labels(outcome)
            self.baseline.labels(outcome)
        self._models: set[str] = set()

    def model_label(self, model: str | None) -> str:
        """The label value for a model name (bounded set of values)."""
        name = model or "unknown"
        if name in self._models:
            return name
        if len(self._models) < MAX_MODELS:
            self._models.add(name)
            return name
        return "other"

    def observe(
        self, *, model: str | None, status: int, ttft_s: float | None, e2e_s: float, output_tokens: int | None,
        variant: str | None = None,
    ) -> None:
        """Record one finished API request (`variant`: who answered, when not this tap's own variant)."""
        label = self.model_label(model)
        v = variant or self.variant
        if ttft_s is not None:
            self.ttft.labels(v, label).observe(ttft_s)
        self.e2e.labels(v, label).observe(e2e_s)
        if output_tokens is not None:
            self.output_tokens.labels(v, label).observe(output_tokens)
        self.requests.labels(v, label, str(status)).inc()

    def render(self) -> bytes:
        """The text exposition format (of all workers, when there are several)."""
        if self.shared_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, self.shared_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
