"""Consistent sampling of output events (``shadowctl tap --sample F``): publish the events of a fraction F
of requests, and the same requests on every tap.

A pair needs the primary's event and the candidate's (and the baseline's) for one ``x-request-id``; if
each tap drew its own random fraction, only F^2 of the pairs would survive. So the decision is a pure
function of the request id, the one hash the tap router uses to choose which requests are mirrored and
which the candidate answers (:func:`shadowctl.compare.routing.in_share`): a request is sampled when its
bucket falls in the first F of the buckets. Every tap replica and worker process, and a retried request
(same id), decide the same way. One hash for both also nests the shares: with the tap mirroring 20% and
sampling 10%, every sampled request is one that was mirrored, so a sampled primary event always has its
candidate event.

Sampling only decides which events are published; every request is forwarded, answered and measured
(latency histograms, request counts) as before. The tap's ``/metrics`` counts both sides:
``shadowctl_tap_sampled_requests_total{decision="sampled|skipped"}``.

Where the fraction comes from: ``--sample``, unless the tap follows a route setting that carries one
(``sampleFraction``, route setting v3), which then overrides it, so the controller can change F without
restarting taps. The routed tap sends its copies to the candidate's tap with the fraction it decided by in
:data:`SAMPLE_HEADER`, and a tap takes that header's fraction for a shadow copy: the candidate's tap needs no
channel of its own, and both events of a pair are decided by the same F even while F changes (the fraction is
taken when the request arrives at the routed tap, not when it ends).
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter

from shadowctl.compare.routing import in_share

SAMPLE_HEADER = b"x-shadowctl-sample-fraction"
"""On a copy from a routed tap: the sampling fraction the copy's request was decided by (honoured only on a shadow
copy: ``x-shadowctl-shadow: 1``)."""

DECISIONS = ("sampled", "skipped")
"""The ``decision`` values of ``shadowctl_tap_sampled_requests_total``."""


def check_fraction(value: float, where: str = "--sample") -> float:
    """The fraction if it is in (0, 1]; ValueError naming ``where`` and the value otherwise."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{where}: {value!r} is not a fraction in (0, 1] (0.1 publishes one request in ten)")
    return float(value)


def header_fraction(value: bytes | None) -> float | None:
    """The fraction a copy's :data:`SAMPLE_HEADER` gives; None where absent or not a fraction in (0, 1] (the
    tap's own ``--sample`` then applies: a bad header never breaks the request)."""
    if value is None:
        return None
    try:
        return check_fraction(float(value.decode("ascii")), SAMPLE_HEADER.decode())
    except (UnicodeDecodeError, ValueError):
        return None


def sampled(request_id: str, fraction: float) -> bool:
    """Whether the events of ``request_id`` are published at ``fraction`` (1: every request)."""
    return fraction >= 1.0 or in_share(request_id, fraction * 100.0)


class Sampler:
    """The tap's sampling decision and its counters (in the tap's metrics registry)."""

    def __init__(self, fraction: float = 1.0, registry: CollectorRegistry | None = None) -> None:
        """``fraction``: in (0, 1]; ``registry``: where the counters live (None: not exported)."""
        self.fraction = check_fraction(fraction)
        self.requests = Counter(
            "shadowctl_tap_sampled_requests", "Requests whose output events were published (sampled) or not "
            "(skipped) by --sample; the choice is a hash of x-request-id, the same on every tap.", ("decision",),
            registry=registry)
        for decision in DECISIONS:
            self.requests.labels(decision)

    def keep(self, request_id: str, fraction: float | None = None) -> bool:
        """Decide for one finished request, and count it; `fraction`: the one in force for this request where the
        route setting or the copy's header gives one (else ``--sample``)."""
        keep = sampled(request_id, self.fraction if fraction is None else fraction)
        self.requests.labels(DECISIONS[0] if keep else DECISIONS[1]).inc()
        return keep
