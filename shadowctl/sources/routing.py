"""Send each request to the Prometheus its policy names, or to the controller's.

A policy may name its own server (``spec.analysis.prometheus``: a tenant's Thanos or
Mimir, or a Prometheus behind an auth proxy), with a bearer token and TLS material in
Secrets of its namespace. :class:`RoutingSource` keeps one source per server, made by an
injected ``connect`` (the controller's, :class:`SecretConnect`, reads the Secrets), and
makes it again after ``refresh`` seconds so that a rotated token is picked up, and at
once when the server refuses the credentials (HTTP 401/403): then the Secrets are read
again and the requests are sent once more with what they hold now. A server that cannot
be connected to (no such Secret, no ``token`` key, a CA that is not PEM) answers its
requests with :class:`SourceUnavailable`, like an unreachable one: the judge then sees
"no data", never a number.
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
from shadowctl.sources.secrets import DEFAULT_TTL_S, SecretReader

Connect = Callable[[ServerRef], Awaitable[MetricSource]]


class RoutingSource:
    """A MetricSource that dispatches by :attr:`WindowRequest.server` (None: ``default``)."""

    def __init__(
        self,
        default: MetricSource | None,
        connect: Connect,
        *,
        clock: Callable[[], float],
        refresh: float = 60.0,
        on_refused: Callable[[ServerRef], None] | None = None,
    ) -> None:
        self.default = default
        self._connect = connect
        self._clock = clock
        self.refresh = refresh
        self._on_refused = on_refused
        """Told when a server refused the credentials, before the source is made again (forget cached Secrets)."""
        self._sources: dict[ServerRef, tuple[MetricSource, float]] = {}

    async def _source_for(self, ref: ServerRef, *, again: bool = False) -> MetricSource:
        held = self._sources.get(ref)
        now = self._clock()
        if held is not None and now - held[1] < self.refresh and not again:
            return held[0]
        made = await self._connect(ref)
        self._sources[ref] = (made, now)
        if held is not None:
            await held[0].aclose()
        return made

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
            answers = await source.fetch_many(reqs)
            if ref is not None and _refused(answers):
                # The credentials may have been rotated since the source was made: read them again, send again.
                if self._on_refused is not None:
                    self._on_refused(ref)
                try:
                    answers = await (await self._source_for(ref, again=True)).fetch_many(reqs)
                except SourceError as exc:
                    answers = _unavailable(reqs, Unavailability.unreachable, str(exc))
            out.update(answers)
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


class SecretConnect:
    """Connects to a policy's Prometheus with the controller's options (timeout, max_batch) and the policy's
    credentials from its Secrets (read through a :class:`SecretReader`) instead of the controller's."""

    def __init__(self, secrets: SecretReader, options: Mapping[str, Any]) -> None:
        self.secrets = secrets
        self.options = {k: v for k, v in options.items()
                        if k not in ("bearer_token", "bearer_token_file", "basic_auth", "ca_file",
                                     "insecure_skip_verify")}

    async def __call__(self, ref: ServerRef) -> MetricSource:
        opts = dict(self.options)
        if ref.token_secret is not None:
            ns, name = ref.token_secret
            opts["bearer_token"] = await self.secrets.text(
                ns, name, ref.token_key, field=f"spec.analysis.prometheus.bearerTokenSecret, the token for {ref.url}"
            )
        if ref.namespace is not None and (ref.ca_secret is not None or ref.cert_secret is not None):
            material = await self.secrets.tls(ref.namespace, ref.ca_secret, ref.cert_secret,
                                              field="spec.analysis.prometheus.tls")
            opts["ssl_context"] = material.context()
        return PrometheusMetricSource(ref.url, **opts)

    def invalidate(self, ref: ServerRef) -> None:
        """Forget the Secrets of ``ref``: the server refused what they held."""
        if ref.token_secret is not None:
            self.secrets.invalidate(*ref.token_secret)
        if ref.namespace is not None:
            for name in (ref.ca_secret, ref.cert_secret):
                if name is not None:
                    self.secrets.invalidate(ref.namespace, name.partition("/")[0])


def secret_connect(kube: KubeClient, options: Mapping[str, Any], *, ttl: float = DEFAULT_TTL_S) -> SecretConnect:
    """:class:`SecretConnect` with a reader of its own (Secrets reused for ``ttl`` seconds)."""
    return SecretConnect(SecretReader(kube, ttl=ttl), options)


def _refused(answers: Mapping[MetricKey, WindowResult]) -> bool:
    return any(isinstance(a, SourceUnavailable) and a.cause is Unavailability.unauthorized for a in answers.values())


def _unavailable(reqs: Sequence[WindowRequest], cause: Unavailability, reason: str) -> dict[MetricKey, WindowResult]:
    where = f" ({reqs[0].server.url})" if reqs and reqs[0].server is not None else ""
    return {r.key: SourceUnavailable(str(r.key), f"{r.primary.expr}{where}", cause, reason) for r in reqs}


if TYPE_CHECKING:  # the router implements the port

    def _implements(source: RoutingSource) -> MetricSource:
        return source
