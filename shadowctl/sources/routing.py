"""Send each request to the Prometheus its policy names, or to the controller's.

A policy may name its own server (``spec.analysis.prometheus``: a tenant's Thanos or
Mimir), with a bearer token in a Secret of its namespace. :class:`RoutingSource` keeps
one source per server, made by an injected ``connect`` (the controller's reads the
Secret), and makes it again after ``refresh`` seconds so that a rotated token is
picked up. A server that cannot be connected to (no such Secret, no ``token`` key)
answers its requests with :class:`SourceUnavailable`, like an unreachable one: the
judge then sees "no data", never a number.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from shadowctl.kube import KubeClient
from shadowctl.policy.model import ShadowPolicy
from shadowctl.sources.base import (
    MetricKey,
    MetricSource,
    Planned,
    ServerRef,
    SourceError,
    SourceUnavailable,
    Unavailability,
    WindowRequest,
    WindowResult,
)
from shadowctl.sources.prometheus import PrometheusMetricSource, build_requests
from shadowctl.sources.secrets import read_secret_value

Connect = Callable[[ServerRef], Awaitable[MetricSource]]


class RoutingSource:
    """A MetricSource that dispatches by :attr:`WindowRequest.server` (None: ``default``)."""

    def __init__(
        self,
        default: MetricSource | None,
        connect: Connect,
        *,
        clock: Callable[[], float],
        refresh: float = 300.0,
    ) -> None:
        self.default = default
        self._connect = connect
        self._clock = clock
        self.refresh = refresh
        self._sources: dict[ServerRef, tuple[MetricSource, float]] = {}

    async def _source_for(self, ref: ServerRef) -> MetricSource:
        held = self._sources.get(ref)
        now = self._clock()
        if held is not None and now - held[1] < self.refresh:
            return held[0]
        fresh = await self._connect(ref)
        self._sources[ref] = (fresh, now)
        if held is not None:
            await held[0].aclose()
        return fresh

    def plan(
        self, policy: ShadowPolicy, *, start: datetime, end: datetime, metrics: Sequence[str] | None = None
    ) -> Planned:
        """Prometheus requests, whichever server answers them."""
        return build_requests(policy, start=start, end=end, metrics=metrics)

    async def fetch(self, request: WindowRequest) -> WindowResult:
        return (await self.fetch_many([request]))[request.key]

    async def fetch_many(self, requests: Sequence[WindowRequest]) -> dict[MetricKey, WindowResult]:
        by_server: dict[ServerRef | None, list[WindowRequest]] = defaultdict(list)
        for req in requests:
            by_server[req.server].append(req)
        out: dict[MetricKey, WindowResult] = {}
        for ref, reqs in by_server.items():
            source: MetricSource | None
            try:
                source = self.default if ref is None else await self._source_for(ref)
            except SourceError as exc:
                out.update(_unavailable(reqs, Unavailability.unreachable, str(exc)))
                continue
            if source is None:
                out.update(_unavailable(reqs, Unavailability.unreachable,
                                        "no Prometheus: the controller has none (--prometheus) and the policy names none"))
                continue
            out.update(await source.fetch_many(reqs))
        return {r.key: out[r.key] for r in requests}

    async def check(self) -> SourceUnavailable | None:
        return await self.default.check() if self.default is not None else None

    async def aclose(self) -> None:
        sources = [s for s, _ in self._sources.values()]
        self._sources.clear()
        if self.default is not None:
            sources.append(self.default)
        for s in sources:
            await s.aclose()


TOKEN_KEY = "token"


def secret_connect(kube: KubeClient, options: Mapping[str, Any]) -> Connect:
    """Connect to a policy's Prometheus with the controller's options (TLS, timeout, max_batch) and the
    bearer token from the policy's Secret (key ``token``) instead of the controller's credentials."""

    async def connect(ref: ServerRef) -> MetricSource:
        opts = {k: v for k, v in options.items() if k not in ("bearer_token", "basic_auth")}
        if ref.token_secret is not None:
            ns, name = ref.token_secret
            opts["bearer_token"] = await read_secret_value(
                kube, ns, name, TOKEN_KEY, field=f"spec.analysis.prometheus.bearerTokenSecret, the token for {ref.url}"
            )
        return PrometheusMetricSource(ref.url, **opts)

    return connect


def _unavailable(reqs: Sequence[WindowRequest], cause: Unavailability, reason: str) -> dict[MetricKey, WindowResult]:
    where = f" ({reqs[0].server.url})" if reqs and reqs[0].server is not None else ""
    return {r.key: SourceUnavailable(str(r.key), f"{r.primary.expr}{where}", cause, reason) for r in reqs}


if TYPE_CHECKING:  # the router implements the port

    def _implements(source: RoutingSource) -> MetricSource:
        return source
