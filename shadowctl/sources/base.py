"""The MetricSource port: what primary and candidate did over a window, or why that is unknown.

Failure semantics (the one rule the judge relies on): a source never turns a
problem into a number. An unreachable server, a timeout or a rejected query
comes back as a :class:`SourceUnavailable` *result*; a query that ran but found
nothing usable (no series, NaN, Inf, no observations) comes back as
:class:`NoData`. Neither is raised: a look over many metrics gets every answer it
can, and the judge decides what a missing one means (never a pass). Exceptions
(:class:`SourceConfigError`) are raised only for requests that cannot be built
from the policy at all, before any query runs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from shadowctl.errors import ShadowctlError
from shadowctl.policy.model import Metric, MetricKind, ShadowPolicy


class SourceError(ShadowctlError):
    """Base of the metric and output sources' errors."""


class SourceConfigError(SourceError):
    """A policy's metric cannot be turned into a query (says which policy, metric and field)."""


class Variant(str, enum.Enum):
    primary = "primary"
    candidate = "candidate"


@dataclass(frozen=True)
class MetricKey:
    """Which policy's which metric a request and its result belong to."""

    policy: str
    metric: str

    def __str__(self) -> str:
        return f"{self.policy}:{self.metric}"


# --------------------------------------------------------------------------- windows (what a variant did)


@dataclass(frozen=True)
class HistogramWindow:
    """Observations in the window per cumulative bucket: counts[i] observations were <= le[i].

    `le` is strictly increasing and ends with +Inf; counts are non-decreasing, so
    counts[-1] is the number of observations. Counts are floats: Prometheus
    extrapolates `increase` to the window's edges.
    """

    le: tuple[float, ...]
    counts: tuple[float, ...]

    @property
    def total(self) -> float:
        return self.counts[-1]


@dataclass(frozen=True)
class CountWindow:
    """A ratio's counters over the window: `failures` of `total` (total > 0)."""

    failures: float
    total: float

    @property
    def rate(self) -> float:
        return self.failures / self.total


@dataclass(frozen=True)
class CounterWindow:
    """A counter's increase over a window of `seconds`."""

    increase: float
    seconds: float

    @property
    def rate(self) -> float:
        return self.increase / self.seconds


@dataclass(frozen=True)
class GaugeWindow:
    """A gauge sampled once per interval (unix `times`, end of each interval).

    `dropped` counts the intervals whose value was NaN or Inf (for example a cost
    per token while no token was generated); they are left out of `samples`.
    """

    samples: tuple[float, ...]
    times: tuple[float, ...]
    dropped: int = 0

    @property
    def mean(self) -> float:
        return math.fsum(self.samples) / len(self.samples)


Window = HistogramWindow | CountWindow | CounterWindow | GaugeWindow


@dataclass(frozen=True)
class VariantPair:
    """What primary and candidate did over the same window (both of the same window type)."""

    primary: Window
    candidate: Window

    def __getitem__(self, variant: Variant) -> Window:
        return self.primary if variant is Variant.primary else self.candidate


@dataclass(frozen=True)
class NoData:
    """The query ran but gave nothing to judge; `query` is the expression that found nothing."""

    metric: str
    variant: Variant | None
    query: str
    reason: str

    def __str__(self) -> str:
        who = f" for {self.variant.value}" if self.variant else ""
        return f"no data{who} in {self.metric}: {self.reason} (query: {self.query})"


class Unavailability(str, enum.Enum):
    unreachable = "unreachable"
    timeout = "timeout"
    query_error = "query-error"
    bad_response = "bad-response"
    unauthorized = "unauthorized"
    """The server refused the credentials (HTTP 401 or 403): a rotated Secret is read again at once."""


@dataclass(frozen=True)
class SourceUnavailable:
    """The source could not answer (both variants unknown); `query` names what was asked."""

    metric: str
    query: str
    cause: Unavailability
    reason: str
    variant: Variant | None = None

    def __str__(self) -> str:
        return f"metric source unavailable for {self.metric} ({self.cause.value}): {self.reason} (query: {self.query})"


WindowResult = VariantPair | NoData | SourceUnavailable


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class VariantQuery:
    """One variant's rendered PromQL: the value (a ratio's total), and a ratio's failures."""

    expr: str
    failures: str | None = None


@dataclass(frozen=True)
class ServerRef:
    """The Prometheus a policy names (``spec.analysis.prometheus``) instead of the controller's."""

    url: str
    token_secret: tuple[str, str] | None = None
    """(namespace, name) of a Secret whose key :attr:`token_key` holds a bearer token for this server."""
    token_key: str = "token"
    namespace: str | None = None
    """The policy's namespace, where the TLS Secrets are."""
    ca_secret: str | None = None
    """``name/key`` of the Secret holding the CA bundle that signed the server's certificate."""
    cert_secret: str | None = None
    """Name of a ``kubernetes.io/tls`` Secret: the client certificate for mutual TLS."""


@dataclass(frozen=True)
class WindowRequest:
    """One metric of one rollout, rendered for both variants, over [start, end].

    Histograms, ratios and counters are increases over `end - start`, evaluated at
    `end` (so a restarted controller recomputes "since phase start" exactly);
    gauges are sampled every `step` in (start, end]. Requests with the same
    `template` (and kind, end and step) are answered by one query. Requests are made by the
    source that answers them (:meth:`MetricSource.plan`), which may carry more in a subclass.
    """

    key: MetricKey
    kind: MetricKind
    template: str
    start: datetime
    end: datetime
    primary: VariantQuery
    candidate: VariantQuery
    step: timedelta = timedelta(seconds=30)
    scale: float = 1.0
    unit: str = ""
    server: ServerRef | None = None
    """The policy's own Prometheus; None: the controller's."""

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise SourceConfigError(f"{self.key}: the window ends ({self.end}) before it starts ({self.start})")
        if self.kind is MetricKind.ratio and (self.primary.failures is None or self.candidate.failures is None):
            raise SourceConfigError(f"{self.key}: a ratio needs a failures query for both variants")

    def __getitem__(self, variant: Variant) -> VariantQuery:
        return self.primary if variant is Variant.primary else self.candidate


# --------------------------------------------------------------------------- the port


Planned = list[tuple[Metric, "WindowRequest | SourceConfigError"]]
"""A policy's metrics, each with its request or the reason it cannot become one."""


class MetricSource(Protocol):
    """Where the judge's numbers come from (Prometheus, Thanos, Mimir, or recorded data)."""

    def plan(
        self, policy: ShadowPolicy, *, start: datetime, end: datetime, metrics: Sequence[str] | None = None
    ) -> Planned:
        """Every metric of the policy (or the named ones) as this source's request over [start, end], or
        the SourceConfigError saying why it cannot be asked (no selector for a variant, ...).

        Pure: no I/O. A request may start later than ``start`` (the source's own alignment).
        """
        ...

    async def fetch(self, request: WindowRequest) -> WindowResult:
        """What both variants did over the request's window.

        Returns a VariantPair, or NoData naming the variant and query that found
        nothing, or SourceUnavailable; never raises for those (see the module docs).
        """
        ...

    async def fetch_many(self, requests: Sequence[WindowRequest]) -> dict[MetricKey, WindowResult]:
        """Answer many requests (all rollouts' metrics of one look) with as few queries as possible.

        One entry per request key; the query count grows with the number of
        distinct metric templates, not with the number of rollouts. Keys must be
        unique (ValueError otherwise). Cancelling the call abandons all its queries.
        """
        ...

    async def check(self) -> SourceUnavailable | None:
        """None when the source answers a trivial query, otherwise why not (for readiness)."""
        ...

    async def aclose(self) -> None:
        """Release connections and worker threads; the source is unusable afterwards."""
        ...
