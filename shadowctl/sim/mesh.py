"""A mesh data-plane simulator: routes real HTTP requests by Istio VirtualServices, Gateway API HTTPRoutes,
Knative Services or KServe InferenceServices.

It stands in for Envoy (and Knative's activator) in the local environment. The
routing objects are read from the Kubernetes API (the local control plane) through
:class:`~shadowctl.kube.KubeClient`: a list, then a watch from the list's
resourceVersion, re-listing on 410 and after errors. A watch rather than
polling, because the change log must hold *every* version the data plane saw,
so tests can check the invariants (weights sum to 100, no candidate traffic
before its step) at each change, not only at a polling instant.

Istio semantics implemented (``spec.http`` only):

* the first ``http`` route whose ``match`` list has an entry that matches wins
  (a route without ``match`` matches everything); supported match fields are
  ``uri``, ``method``, ``authority``, ``scheme``, ``headers``, ``withoutHeaders``,
  ``queryParams`` (``exact``/``prefix``/``regex``; an empty string match on a
  header means "present") and ``ignoreUriCase``; any other match field makes
  that entry not match (Envoy behind a gateway would not match it either);
* a destination by relative weight (a single destination takes all traffic,
  with or without ``weight``); no route: 404; no upstream for the destination: 503;
* mirroring: ``mirror`` with ``mirrorPercentage.value`` (absent: 100; the
  deprecated ``mirrorPercent`` is honoured only when ``mirrorPercentage`` is
  absent and flagged in the change log) and every ``mirrors[]`` entry with its
  own ``percentage``. The copy goes with Host suffixed ``-shadow`` (before a
  port, as current Envoy does), the same ``x-request-id``, fire-and-forget on a
  separate connection pool; its response is drained and discarded, and copies
  in flight are capped (beyond the cap they are dropped and counted).

Gateway API HTTPRoute (``gateway.networking.k8s.io/v1``, ``spec.rules`` only):

* the route serves the Hosts of its ``hostnames`` (exact, or ``*.`` wildcards; none: every Host);
* among every rule's ``matches`` (absent: a ``PathPrefix /``) that match the request, the one with
  the Gateway API's precedence wins: an ``Exact`` path, then the longest ``PathPrefix``, then a
  ``method``, then the most ``headers``, then the most ``queryParams``, then the first rule (and
  match) in order. Paths match ``Exact``, ``PathPrefix`` (by whole path elements) and
  ``RegularExpression``; headers (names case-insensitive) and query parameters ``Exact`` or
  ``RegularExpression``;
* a backend by ``weight`` as a proportion of the rule's total (absent: 1); every weight 0, or a
  backend with no upstream: 500, as the spec asks;
* every rule-level ``RequestMirror`` filter, each at its own ``percent`` or ``fraction``
  (neither: 100%), with Envoy's ``-shadow`` Host suffix like Istio's mirrors. Filters on a single
  backendRef and the other filter types are not applied.

Knative: ``status.traffic`` when the status reports the current generation,
else ``spec.traffic`` with ``latestRevision`` resolved to
``status.latestReadyRevisionName``; Host ``<tag>-<service>.*`` (or the
``Knative-Serving-Tag`` header) goes to the tagged revision. Knative cannot
mirror.

KServe InferenceService (serverless): by ``status.components.predictor.traffic``, the Knative traffic
KServe programmed (percents per revision; its ``latestRevision`` target already resolved to the latest
ready revision), since that, not the spec, is what the data plane follows; Host
``<tag>-<name>-predictor.*`` (e.g. ``prev-``) goes to the tagged revision. No status yet: 404, as
before KServe has programmed a route. KServe cannot mirror.

``x-request-id`` is generated when absent, as Envoy does. Hop-by-hop headers
are dropped; bodies stream through chunk by chunk, undecoded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from shadowctl.kube import (
    HTTP_ROUTE,
    INFERENCE_SERVICE,
    KNATIVE_SERVICE,
    VIRTUAL_SERVICE,
    KubeClient,
    KubeError,
    WatchExpired,
)
from shadowctl.sim.errors import SimError

log = structlog.get_logger(__name__)

JSON = dict[str, Any]
DEST_HEADER = "x-sim-mesh-destination"
TAG_HEADER = "knative-serving-tag"
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "content-length",
})
_MATCH_FIELDS = frozenset({
    "uri", "method", "authority", "scheme", "headers", "withoutHeaders", "queryParams", "ignoreUriCase", "name",
})


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Upstream:
    """Where a destination's pods are reachable (base URL, e.g. a tap or a model server)."""

    url: str


@dataclass(frozen=True)
class IstioSource:
    """Route by this VirtualService."""

    namespace: str
    name: str
    kind: Literal["VirtualService"] = "VirtualService"


@dataclass(frozen=True)
class KnativeSource:
    """Route by this Knative Service."""

    namespace: str
    name: str
    kind: Literal["KnativeService"] = "KnativeService"


@dataclass(frozen=True)
class GatewaySource:
    """Route by this Gateway API HTTPRoute."""

    namespace: str
    name: str
    kind: Literal["HTTPRoute"] = "HTTPRoute"


@dataclass(frozen=True)
class KServeSource:
    """Route by this KServe InferenceService's predictor traffic."""

    namespace: str
    name: str
    kind: Literal["InferenceService"] = "InferenceService"


Source = IstioSource | KnativeSource | GatewaySource | KServeSource
DestKey = tuple[str, str | None, int | None]  # host, subset, port


def _label(source: Source) -> str:
    return f"{source.kind}/{source.namespace}/{source.name}"


# ----------------------------------------------------------------------------- parsed routes (pure)


@dataclass(frozen=True)
class Destination:
    """An Istio destination, the host expanded to its FQDN."""

    host: str
    subset: str | None = None
    port: int | None = None

    @property
    def key(self) -> str:
        out = self.host + (f"/{self.subset}" if self.subset else "")
        return out + (f":{self.port}" if self.port else "")


@dataclass(frozen=True)
class HttpRoute:
    """One ``spec.http[]`` entry, reduced to what routing needs."""

    name: str
    matches: tuple[JSON, ...]
    destinations: tuple[tuple[Destination, float], ...]
    mirrors: tuple[tuple[Destination, float], ...]
    deprecated_mirror_percent: bool = False

    @property
    def weight_sum(self) -> float:
        if len(self.destinations) == 1:
            return 100.0
        return sum(w for _, w in self.destinations)


@dataclass(frozen=True)
class GatewayRule:
    """One HTTPRoute ``spec.rules[]`` entry, reduced to what routing needs (matches with defaults filled in)."""

    name: str
    matches: tuple[JSON, ...]
    backends: tuple[tuple[Destination, float], ...]
    mirrors: tuple[tuple[Destination, float], ...]

    @property
    def weight_total(self) -> float:
        return sum(max(0.0, w) for _, w in self.backends)


@dataclass(frozen=True)
class KnativeTarget:
    revision: str
    percent: int
    tag: str | None


@dataclass(frozen=True)
class RoutingTable:
    """The routing state of one source at one resourceVersion (``http`` for Istio, ``traffic`` for Knative)."""

    source: Source
    resource_version: str
    generation: int | None
    hosts: tuple[str, ...] = ()
    http: tuple[HttpRoute, ...] = ()
    traffic: tuple[KnativeTarget, ...] = ()
    rules: tuple[GatewayRule, ...] = ()


def _fqdn(host: str, namespace: str) -> str:
    host = host.lower()
    return host if "." in host or host == "*" else f"{host}.{namespace}.svc.cluster.local"


def _destination(raw: Any, namespace: str) -> Destination | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("host"), str):
        return None
    port = raw.get("port")
    number = port.get("number") if isinstance(port, dict) else None
    subset = raw.get("subset")
    return Destination(
        _fqdn(raw["host"], namespace),
        subset if isinstance(subset, str) and subset else None,
        number if isinstance(number, int) else None,
    )


def _percent(raw: Any, default: float = 100.0) -> float:
    if isinstance(raw, dict) and isinstance(raw.get("value"), int | float):
        return float(raw["value"])
    return default


def parse_virtual_service(obj: JSON, source: IstioSource) -> RoutingTable:
    """The routing table of a VirtualService object (unparseable entries are skipped)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") or source.namespace
    spec = obj.get("spec") or {}
    routes: list[HttpRoute] = []
    for i, http in enumerate(spec.get("http") or []):
        if not isinstance(http, dict):
            continue
        dests: list[tuple[Destination, float]] = []
        for entry in http.get("route") or []:
            dest = _destination((entry or {}).get("destination"), ns)
            if dest is not None:
                weight = entry.get("weight")
                dests.append((dest, float(weight) if isinstance(weight, int | float) else 0.0))
        mirrors: list[tuple[Destination, float]] = []
        deprecated = False
        single = _destination(http.get("mirror"), ns)
        if single is not None:
            if "mirrorPercentage" in http:
                pct = _percent(http.get("mirrorPercentage"))
            elif isinstance(http.get("mirrorPercent"), int | float):
                pct, deprecated = float(http["mirrorPercent"]), True
            else:
                pct = 100.0
            mirrors.append((single, pct))
        for entry in http.get("mirrors") or []:
            dest = _destination((entry or {}).get("destination"), ns)
            if dest is not None:
                mirrors.append((dest, _percent(entry.get("percentage"))))
        matches = tuple(m for m in (http.get("match") or []) if isinstance(m, dict))
        routes.append(
            HttpRoute(str(http.get("name") or f"http[{i}]"), matches, tuple(dests), tuple(mirrors), deprecated)
        )
    hosts = tuple(_fqdn(h, ns) for h in spec.get("hosts") or [] if isinstance(h, str))
    gen = meta.get("generation")
    return RoutingTable(source, str(meta.get("resourceVersion") or ""), gen if isinstance(gen, int) else None,
                        hosts=hosts, http=tuple(routes))


def _backend(raw: Any, namespace: str) -> Destination | None:
    """A Gateway API backendRef to a Service as a Destination (``name.namespace.svc.cluster.local:port``)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        return None
    if (raw.get("group") or "") != "" or (raw.get("kind") or "Service") != "Service":
        return None
    ns = raw.get("namespace") if isinstance(raw.get("namespace"), str) else namespace
    port = raw.get("port")
    return Destination(f"{raw['name'].lower()}.{ns}.svc.cluster.local", None, port if isinstance(port, int) else None)


def mirror_percent(mirror: JSON) -> float:
    """A RequestMirror's share in percent: ``percent``, else ``fraction`` (denominator default 100), else 100."""
    pct = mirror.get("percent")
    if isinstance(pct, int | float) and not isinstance(pct, bool):
        return float(pct)
    frac = mirror.get("fraction")
    if isinstance(frac, dict):
        num, den = frac.get("numerator"), frac.get("denominator", 100)
        if isinstance(num, int) and isinstance(den, int) and den > 0:
            return num * 100 / den
    return 100.0


_DEFAULT_MATCH: JSON = {"path": {"type": "PathPrefix", "value": "/"}}


def parse_http_route(obj: JSON, source: GatewaySource) -> RoutingTable:
    """The routing table of an HTTPRoute (unparseable entries are skipped)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") or source.namespace
    spec = obj.get("spec") or {}
    rules: list[GatewayRule] = []
    for i, rule in enumerate(spec.get("rules") or []):
        if not isinstance(rule, dict):
            continue
        backends: list[tuple[Destination, float]] = []
        for ref in rule.get("backendRefs") or []:
            dest = _backend(ref, ns)
            if dest is not None:
                weight = ref.get("weight", 1)
                backends.append((dest, float(weight) if isinstance(weight, int | float) else 0.0))
        mirrors: list[tuple[Destination, float]] = []
        for f in rule.get("filters") or []:
            mirror = f.get("requestMirror") if isinstance(f, dict) and f.get("type") == "RequestMirror" else None
            if isinstance(mirror, dict):
                dest = _backend(mirror.get("backendRef"), ns)
                if dest is not None:
                    mirrors.append((dest, mirror_percent(mirror)))
        matches = tuple(m for m in (rule.get("matches") or [_DEFAULT_MATCH]) if isinstance(m, dict))
        rules.append(GatewayRule(str(rule.get("name") or f"rules[{i}]"), matches, tuple(backends), tuple(mirrors)))
    hosts = tuple(h.lower() for h in spec.get("hostnames") or [] if isinstance(h, str))
    gen = meta.get("generation")
    return RoutingTable(source, str(meta.get("resourceVersion") or ""), gen if isinstance(gen, int) else None,
                        hosts=hosts, rules=tuple(rules))


def parse_knative_service(obj: JSON, source: KnativeSource) -> RoutingTable:
    """The routing table of a Knative Service: its programmed status traffic, or its spec resolved."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    gen = meta.get("generation")
    current = isinstance(status.get("traffic"), list) and status.get("observedGeneration") == gen
    latest = status.get("latestReadyRevisionName")
    targets: list[KnativeTarget] = []
    raw = status.get("traffic") if current else spec.get("traffic")
    for t in raw or [{"latestRevision": True, "percent": 100}]:
        if not isinstance(t, dict):
            continue
        revision = t.get("revisionName")
        if not revision and (t.get("latestRevision") or t.get("latestRevision") is None):
            revision = latest
        if not isinstance(revision, str):
            continue
        percent = t.get("percent")
        tag = t.get("tag")
        targets.append(KnativeTarget(revision, percent if isinstance(percent, int) else 0,
                                     tag if isinstance(tag, str) and tag else None))
    return RoutingTable(source, str(meta.get("resourceVersion") or ""), gen if isinstance(gen, int) else None,
                        traffic=tuple(targets))


def parse_inference_service(obj: JSON, source: KServeSource) -> RoutingTable:
    """The routing table of an InferenceService: the predictor traffic KServe reports in its status."""
    meta = obj.get("metadata") or {}
    gen = meta.get("generation")
    components = (obj.get("status") or {}).get("components") or {}
    predictor = components.get("predictor") if isinstance(components, dict) else None
    raw = predictor.get("traffic") if isinstance(predictor, dict) else None
    targets: list[KnativeTarget] = []
    for t in raw if isinstance(raw, list) else []:
        if not isinstance(t, dict) or not isinstance(t.get("revisionName"), str):
            continue
        percent, tag = t.get("percent"), t.get("tag")
        targets.append(KnativeTarget(t["revisionName"], percent if isinstance(percent, int) else 0,
                                     tag if isinstance(tag, str) and tag else None))
    return RoutingTable(source, str(meta.get("resourceVersion") or ""), gen if isinstance(gen, int) else None,
                        traffic=tuple(targets))


@dataclass(frozen=True)
class RequestView:
    """What route matching looks at."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    authority: str
    scheme: str = "http"


def _string_match(spec: Any, value: str | None, ignore_case: bool = False) -> bool:
    if not isinstance(spec, dict):
        return False
    if value is None:
        return False
    if ignore_case:
        value = value.lower()
    if "exact" in spec:
        want = str(spec["exact"])
        return value == (want.lower() if ignore_case else want)
    if "prefix" in spec:
        want = str(spec["prefix"])
        return value.startswith(want.lower() if ignore_case else want)
    if "regex" in spec:
        try:
            return re.fullmatch(str(spec["regex"]), value) is not None
        except re.error:
            return False
    return True  # an empty StringMatch: presence


def match_request(match: JSON, req: RequestView) -> bool:
    """Whether one ``HTTPMatchRequest`` matches (every field it sets must match)."""
    if set(match) - _MATCH_FIELDS:
        return False
    ignore_case = bool(match.get("ignoreUriCase"))
    if "uri" in match and not _string_match(match["uri"], req.path, ignore_case):
        return False
    if "method" in match and not _string_match(match["method"], req.method):
        return False
    if "authority" in match and not _string_match(match["authority"], req.authority):
        return False
    if "scheme" in match and not _string_match(match["scheme"], req.scheme):
        return False
    for name, spec in (match.get("headers") or {}).items():
        if not _string_match(spec, req.headers.get(name.lower())):
            return False
    for name, spec in (match.get("withoutHeaders") or {}).items():
        if _string_match(spec, req.headers.get(name.lower())):
            return False
    return all(_string_match(spec, req.query.get(name)) for name, spec in (match.get("queryParams") or {}).items())


def select_route(routes: Sequence[HttpRoute], req: RequestView) -> HttpRoute | None:
    """The first route with no ``match`` or a matching entry (Istio's order), or None."""
    for route in routes:
        if not route.matches or any(match_request(m, req) for m in route.matches):
            return route
    return None


def _value_match(spec: Any, value: str | None) -> bool:
    """A Gateway API header or query parameter match (``type`` Exact by default, or RegularExpression)."""
    if value is None or not isinstance(spec, dict):
        return False
    want = str(spec.get("value", ""))
    if spec.get("type", "Exact") == "RegularExpression":
        try:
            return re.search(want, value) is not None
        except re.error:
            return False
    return spec.get("type", "Exact") == "Exact" and value == want


def _path_match(path_spec: Any, path: str) -> bool:
    if not isinstance(path_spec, dict):
        return False
    kind, value = path_spec.get("type", "PathPrefix"), str(path_spec.get("value", "/"))
    if kind == "Exact":
        return path == value
    if kind == "PathPrefix":
        prefix = value.rstrip("/")
        return not prefix or path == prefix or path.startswith(prefix + "/")
    if kind == "RegularExpression":
        try:
            return re.fullmatch(value, path) is not None
        except re.error:
            return False
    return False


def match_gateway_request(match: JSON, req: RequestView) -> bool:
    """Whether one ``HTTPRouteMatch`` matches (path, method, headers and query parameters all must)."""
    if not _path_match(match.get("path", _DEFAULT_MATCH["path"]), req.path):
        return False
    if "method" in match and match["method"] != req.method:
        return False
    for h in match.get("headers") or []:
        if not isinstance(h, dict) or not _value_match(h, req.headers.get(str(h.get("name", "")).lower())):
            return False
    return all(isinstance(q, dict) and _value_match(q, req.query.get(str(q.get("name", ""))))
               for q in match.get("queryParams") or [])


def _precedence(match: JSON) -> tuple[int, int, int, int, int]:
    path = match.get("path", _DEFAULT_MATCH["path"]) or {}
    kind = path.get("type", "PathPrefix") if isinstance(path, dict) else ""
    prefix_len = len(str(path.get("value", ""))) if kind == "PathPrefix" and isinstance(path, dict) else 0
    return (0 if kind == "Exact" else 1, -prefix_len, 0 if "method" in match else 1,
            -len(match.get("headers") or []), -len(match.get("queryParams") or []))


def select_rule(rules: Sequence[GatewayRule], req: RequestView) -> GatewayRule | None:
    """The rule whose matching ``matches`` entry has the Gateway API's precedence (ties: list order), or None."""
    best: tuple[tuple[int, ...], GatewayRule] | None = None
    for i, rule in enumerate(rules):
        for j, match in enumerate(rule.matches):
            if match_gateway_request(match, req):
                key = (*_precedence(match), i, j)
                if best is None or key < best[0]:
                    best = (key, rule)
    return best[1] if best is not None else None


def pick_weighted(choices: Sequence[tuple[Any, float]], u: float) -> Any | None:
    """The choice that ``u`` in [0, 1) falls on by relative weight; a single choice always wins."""
    if len(choices) == 1:
        return choices[0][0]
    total = sum(max(0.0, w) for _, w in choices)
    if total <= 0:
        return None
    point = u * total
    for choice, weight in choices:
        point -= max(0.0, weight)
        if point < 0:
            return choice
    return choices[-1][0]


def shadow_host(host: str) -> str:
    """``chat.llm`` -> ``chat.llm-shadow``; ``127.0.0.1:8080`` -> ``127.0.0.1-shadow:8080``."""
    name, port = split_port(host)
    return f"{name}-shadow{port}"


def split_port(authority: str) -> tuple[str, str]:
    """``host:8080`` -> (``host``, ``:8080``); ``[::1]:80`` -> (``[::1]``, ``:80``); no port -> (host, "")."""
    if re.search(r":\d+$", authority) and (authority.count(":") == 1 or authority.startswith("[")):
        name, _, port = authority.rpartition(":")
        return name, f":{port}"
    return authority, ""


def _gateway_host_matches(pattern: str, hostname: str) -> bool:
    if pattern.startswith("*."):
        return hostname.endswith(pattern[1:]) and hostname != pattern[2:]
    return hostname == pattern


def _host_matches(pattern: str, hostname: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return hostname.endswith(pattern[1:])
    return hostname == pattern or pattern.split(".")[0] == hostname


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RouteChange:
    """A routing-object version the mesh started to use."""

    seq: int
    observed_at: float
    """Wall-clock seconds (time.time())."""
    source: str
    event: str
    resource_version: str
    generation: int | None
    routes: tuple[JSON, ...]
    """Per http route: name, weights {dest: w}, weight_sum, mirrors {dest: %}, deprecated_mirror_percent;
    per HTTPRoute rule the same with weights as percent shares of the rule's total (weight_sum 100, or 0
    when every weight is 0) and the raw total as total_weight;
    for Knative one entry with percents {revision: %}, percent_sum and tags {tag: revision}."""

    def to_dict(self) -> JSON:
        return dataclasses.asdict(self)


def _summarise(table: RoutingTable | None) -> tuple[JSON, ...]:
    if table is None:
        return ()
    if isinstance(table.source, GatewaySource):
        rules = []
        for rule in table.rules:
            total = rule.weight_total
            shares: dict[str, float] = {}
            for d, w in rule.backends:
                shares[d.key] = shares.get(d.key, 0.0) + (100.0 * max(0.0, w) / total if total > 0 else 0.0)
            rules.append({"name": rule.name, "weights": shares, "weight_sum": 100.0 if total > 0 else 0.0,
                          "total_weight": total, "mirrors": {d.key: p for d, p in rule.mirrors},
                          "deprecated_mirror_percent": False})
        return tuple(rules)
    if isinstance(table.source, KnativeSource | KServeSource):
        percents: Counter[str] = Counter()
        for t in table.traffic:
            percents[t.revision] += t.percent
        return ({
            "percents": dict(percents),
            "percent_sum": sum(t.percent for t in table.traffic),
            "tags": {t.tag: t.revision for t in table.traffic if t.tag},
        },)
    out = []
    for route in table.http:
        weights: dict[str, float] = {}
        for d, w in route.destinations:
            weights[d.key] = weights.get(d.key, 0.0) + (100.0 if len(route.destinations) == 1 else w)
        out.append({
            "name": route.name,
            "weights": weights,
            "weight_sum": route.weight_sum,
            "mirrors": {d.key: p for d, p in route.mirrors},
            "deprecated_mirror_percent": route.deprecated_mirror_percent,
        })
    return tuple(out)


class Routed(NamedTuple):
    """Where the mesh sends a request: the destination's key and upstream, the mirror copies, and the
    status when the destination has no upstream (Envoy's 503; 500 for an HTTPRoute, as its spec asks)."""

    key: str
    upstream: Upstream | None
    mirrors: list[tuple[str, Upstream | None]]
    missing_status: int = 503


@dataclass
class MirrorCounts:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    dropped: int = 0


@dataclass
class MeshStats:
    """What the mesh routed since start (``/mesh/stats``)."""

    requests: int = 0
    no_route: int = 0
    no_upstream: int = 0
    upstream_errors: int = 0
    routed: Counter[str] = field(default_factory=Counter)
    mirrors: dict[str, MirrorCounts] = field(default_factory=dict)

    def to_dict(self) -> JSON:
        return {
            "requests": self.requests,
            "no_route": self.no_route,
            "no_upstream": self.no_upstream,
            "upstream_errors": self.upstream_errors,
            "routed": dict(self.routed),
            "mirrors": {k: dataclasses.asdict(v) for k, v in self.mirrors.items()},
        }


# ----------------------------------------------------------------------------- the simulator


def _as_upstream(value: str | Upstream) -> Upstream:
    return value if isinstance(value, Upstream) else Upstream(value)


class MeshSimulator:
    """The front door: route, mirror, proxy; follow the routing objects; count everything.

    ::

        mesh = MeshSimulator(kube, [IstioSource("llm", "chat")],
                             upstreams={("chat.llm.svc.cluster.local", "primary"): primary_url,
                                        ("chat.llm.svc.cluster.local", "candidate"): candidate_url})
        url = await mesh.start()
        await mesh.wait_ready()
        ...
        await mesh.stop()

    ``upstreams`` keys are ``(host, subset)`` or ``(host, subset, port)``; a
    short host (``chat``) matches the FQDN of any namespace. ``revisions`` maps
    Knative (and KServe) revision names to URLs. ``seed`` fixes the weighted and mirror draws.
    """

    def __init__(
        self,
        kube: KubeClient,
        sources: Sequence[Source],
        *,
        upstreams: Mapping[tuple[str, str | None] | DestKey, str | Upstream] | None = None,
        revisions: Mapping[str, str | Upstream] | None = None,
        seed: int | None = None,
        mirror_max_in_flight: int = 256,
        upstream_timeout: float = 300.0,
        watch_timeout: int = 60,
        retry_delay: float = 0.2,
    ) -> None:
        if not sources:
            raise SimError("mesh: at least one routing source (VirtualService or Knative Service) is needed")
        self.kube = kube
        self.sources = tuple(sources)
        self._upstreams: dict[DestKey, Upstream] = {}
        for key, value in (upstreams or {}).items():
            if len(key) == 2:
                host, subset = key
                port = None
            elif len(key) == 3:
                host, subset, port = key
            else:
                raise SimError(f"mesh: upstream key {key!r} must be (host, subset) or (host, subset, port)")
            self._upstreams[(str(host).lower(), subset or None, port)] = _as_upstream(value)
        self._revisions = {k: _as_upstream(v) for k, v in (revisions or {}).items()}
        self._rng = random.Random(seed)
        self.mirror_max_in_flight = mirror_max_in_flight
        self.upstream_timeout = upstream_timeout
        self.watch_timeout = watch_timeout
        self.retry_delay = retry_delay
        self.tables: dict[Source, RoutingTable | None] = {}
        self.changes: list[RouteChange] = []
        self.stats = MeshStats()
        self._changed = asyncio.Event()
        self._followers: list[asyncio.Task[None]] = []
        self._mirror_tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._mirror_session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Follow the sources and serve the front door; returns its URL. Raises SimError when it cannot bind."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.upstream_timeout)
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=timeout)
        self._mirror_session = aiohttp.ClientSession(
            auto_decompress=False, timeout=timeout,
            connector=aiohttp.TCPConnector(limit=max(1, self.mirror_max_in_flight)),
        )
        app = web.Application()
        app.router.add_get("/mesh/stats", self._stats_handler)
        app.router.add_get("/mesh/changes", self._changes_handler)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            await self._close_sessions()
            raise SimError(f"mesh: cannot listen on {host}:{port}: {exc}") from exc
        self._runner = runner
        self._url = f"http://{host}:{runner.addresses[0][1]}"
        for source in self.sources:
            self._followers.append(asyncio.create_task(self._follow(source), name=f"mesh-follow-{_label(source)}"))
        return self._url

    @property
    def url(self) -> str:
        if self._url is None:
            raise SimError("the mesh simulator is not started")
        return self._url

    async def stop(self) -> None:
        """Stop following, cancel mirror copies in flight, stop serving."""
        for task in [*self._followers, *self._mirror_tasks]:
            task.cancel()
        await asyncio.gather(*self._followers, *self._mirror_tasks, return_exceptions=True)
        self._followers.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._close_sessions()

    async def _close_sessions(self) -> None:
        for session in (self._session, self._mirror_session):
            if session is not None:
                await session.close()
        self._session = self._mirror_session = None

    async def wait_ready(self, within: float = 10.0) -> None:
        """Wait until every source has been read once (present or not). Raises SimError after ``within`` s."""
        await self.wait_for(lambda: all(s in self.tables for s in self.sources), within, "the first read")

    async def wait_for(self, condition: Callable[[], bool], within: float = 10.0, what: str = "a condition") -> None:
        """Wait until ``condition()`` holds, re-checked at every routing change. Raises SimError on timeout."""
        async def loop() -> None:
            while not condition():
                event = self._changed
                await event.wait()

        try:
            async with asyncio.timeout(within):
                await loop()
        except TimeoutError as exc:
            raise SimError(f"mesh: {what} did not happen within {within:g}s") from exc

    async def drain_mirrors(self, within: float = 10.0) -> None:
        """Wait until no mirror copy is in flight. Raises SimError after ``within`` seconds."""
        deadline = asyncio.get_running_loop().time() + within
        while self._mirror_tasks:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise SimError(f"mesh: {len(self._mirror_tasks)} mirror copies still in flight after {within:g}s")
            await asyncio.wait(set(self._mirror_tasks), timeout=remaining)

    @property
    def mirrors_in_flight(self) -> int:
        return len(self._mirror_tasks)

    async def wait_for_version(self, source: Source, resource_version: str, within: float = 10.0) -> RouteChange:
        """Wait until the mesh routes ``source`` by ``resource_version`` (or a later one); returns that change."""
        target = int(resource_version)

        def seen() -> bool:
            table = self.tables.get(source)
            return table is not None and table.resource_version.isdigit() and int(table.resource_version) >= target

        await self.wait_for(seen, within, f"{_label(source)} at resourceVersion {resource_version}")
        return next(c for c in reversed(self.changes) if c.source == _label(source))

    # ----------------------------------------------------------------- following the objects

    def _apply(self, source: Source, obj: JSON | None, event: str) -> None:
        table: RoutingTable | None = None
        if obj is not None:
            if isinstance(source, IstioSource):
                table = parse_virtual_service(obj, source)
            elif isinstance(source, GatewaySource):
                table = parse_http_route(obj, source)
            elif isinstance(source, KServeSource):
                table = parse_inference_service(obj, source)
            else:
                table = parse_knative_service(obj, source)
        if source in self.tables:
            previous = self.tables[source]
            if (previous is None and table is None) or (
                previous is not None and table is not None and previous.resource_version == table.resource_version
            ):
                return
        self.tables[source] = table
        change = RouteChange(
            seq=len(self.changes) + 1,
            observed_at=time.time(),
            source=_label(source),
            event=event,
            resource_version=table.resource_version if table else "",
            generation=table.generation if table else None,
            routes=_summarise(table),
        )
        self.changes.append(change)
        log.info("mesh.route_change", source=change.source, kind=event, rv=change.resource_version)
        event_flag, self._changed = self._changed, asyncio.Event()
        event_flag.set()

    async def _follow(self, source: Source) -> None:
        gvr = (VIRTUAL_SERVICE if isinstance(source, IstioSource)
               else HTTP_ROUTE if isinstance(source, GatewaySource)
               else INFERENCE_SERVICE if isinstance(source, KServeSource) else KNATIVE_SERVICE)
        selector = f"metadata.name={source.name}"
        rv: str | None = None
        while True:
            try:
                if rv is None:
                    items, rv = await self.kube.list(gvr, source.namespace, field_selector=selector)
                    self._apply(source, items[0] if items else None, "LIST")
                async for ev in self.kube.watch(
                    gvr, source.namespace, rv, field_selector=selector, timeout_seconds=self.watch_timeout
                ):
                    if ev.type != "BOOKMARK":
                        self._apply(source, None if ev.type == "DELETED" else ev.object, ev.type)
                    rv = ev.resource_version or rv
            except WatchExpired:
                rv = None
            except KubeError as exc:
                log.info("mesh.follow_failed", source=_label(source), error=str(exc))
                rv = None
                await asyncio.sleep(self.retry_delay)
            except Exception:  # keep routing by the last version seen rather than die silently
                log.exception("mesh.follow_crashed", source=_label(source))
                rv = None
                await asyncio.sleep(self.retry_delay)

    # ----------------------------------------------------------------- routing

    def _upstream_for(self, dest: Destination) -> Upstream | None:
        short = dest.host.split(".")[0]
        for host in (dest.host, short):
            for port in ((dest.port, None) if dest.port is not None else (None,)):
                found = self._upstreams.get((host, dest.subset, port))
                if found is not None:
                    return found
        return None

    def _table_for(self, hostname: str) -> RoutingTable | None:
        tables = [(s, t) for s, t in self.tables.items() if t is not None]
        for source, table in tables:
            if isinstance(source, IstioSource) and any(_host_matches(h, hostname) for h in table.hosts):
                return table
            if isinstance(source, GatewaySource) and (
                    not table.hosts or any(_gateway_host_matches(h, hostname) for h in table.hosts)):
                return table
            if isinstance(source, KnativeSource):
                first = hostname.split(".")[0]
                if first == source.name or first.endswith(f"-{source.name}"):
                    return table
            if isinstance(source, KServeSource):
                first = hostname.split(".")[0]
                if first in (source.name, f"{source.name}-predictor") or first.endswith(f"-{source.name}-predictor"):
                    return table
        # One VirtualService or Knative Service takes any Host (a test's 127.0.0.1:port); an HTTPRoute
        # with hostnames serves those only, as a Gateway's listener does.
        alone = len(self.sources) == 1 and tables and not isinstance(tables[0][0], GatewaySource)
        return tables[0][1] if alone else None

    def route(self, req: RequestView) -> Routed | None:
        """Pick the destination (key, upstream) and the mirror copies for a request; None: no route."""
        hostname = split_port(req.authority)[0]
        table = self._table_for(hostname.lower())
        if table is None:
            return None
        if isinstance(table.source, GatewaySource):
            rule = select_rule(table.rules, req)
            if rule is None:
                return None
            mirrors = [(m.key, self._upstream_for(m)) for m, pct in rule.mirrors if self._rng.random() * 100.0 < pct]
            if rule.weight_total <= 0:  # no backend may take it: the Gateway API's 500
                return Routed(f"{rule.name} (every backend at weight 0)", None, mirrors, 500)
            picked: Destination | None = pick_weighted(rule.backends, self._rng.random())
            assert picked is not None  # a positive total always picks
            return Routed(picked.key, self._upstream_for(picked), mirrors, 500)
        if isinstance(table.source, KnativeSource | KServeSource):
            first = hostname.split(".")[0]
            tag = req.headers.get(TAG_HEADER)
            service = table.source.name + ("-predictor" if isinstance(table.source, KServeSource) else "")
            if first.endswith(f"-{service}") and first != service:
                tag = first[: -len(service) - 1]
            if tag:
                for t in table.traffic:
                    if t.tag == tag:
                        return Routed(t.revision, self._revisions.get(t.revision), [])
                return None
            revision = pick_weighted([(t.revision, float(t.percent)) for t in table.traffic], self._rng.random())
            if revision is None:
                return None
            return Routed(revision, self._revisions.get(revision), [])
        route = select_route(table.http, req)
        if route is None or not route.destinations:
            return None
        dest = pick_weighted(route.destinations, self._rng.random())
        if dest is None:
            return None
        mirrors = [
            (m.key, self._upstream_for(m)) for m, pct in route.mirrors if self._rng.random() * 100.0 < pct
        ]
        return Routed(dest.key, self._upstream_for(dest), mirrors)

    # ----------------------------------------------------------------- HTTP

    async def _stats_handler(self, _: web.Request) -> web.Response:
        body = self.stats.to_dict()
        body["mirror_in_flight"] = len(self._mirror_tasks)
        body["changes"] = len(self.changes)
        return web.json_response(body)

    async def _changes_handler(self, _: web.Request) -> web.Response:
        return web.json_response([c.to_dict() for c in self.changes])

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        body = await request.read()
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        if not headers.get("x-request-id"):
            headers["x-request-id"] = str(uuid.uuid4())
        authority = request.headers.get("Host", "")
        view = RequestView(
            method=request.method,
            path=request.path,
            query={k: v for k, v in request.query.items()},
            headers={k.lower(): v for k, v in headers.items()},
            authority=authority,
            scheme=request.scheme,
        )
        decision = self.route(view)
        if decision is None:
            self.stats.no_route += 1
            return web.Response(status=404, text="no route matched (simulated Envoy: NR)\n")
        key, upstream, mirrors, missing = decision
        for mirror_key, mirror_upstream in mirrors:
            self._spawn_mirror(mirror_key, mirror_upstream, request, headers, body, authority)
        if upstream is None:
            self.stats.no_upstream += 1
            return web.Response(status=missing, text=f"no healthy upstream for {key} (simulated Envoy: UH)\n")
        self.stats.routed[key] += 1
        assert self._session is not None
        response: web.StreamResponse | None = None
        try:
            async with self._session.request(
                request.method, upstream.url.rstrip("/") + request.path_qs, headers=headers, data=body,
                allow_redirects=False,
            ) as up:
                out_headers = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP)
                out_headers[DEST_HEADER] = key
                response = web.StreamResponse(status=up.status, reason=up.reason, headers=out_headers)
                await response.prepare(request)
                try:
                    async for chunk in up.content.iter_any():
                        await response.write(chunk)
                    await response.write_eof()
                except (aiohttp.ClientConnectionResetError, ConnectionResetError):
                    pass  # the client hung up (Envoy just closes the upstream too): nothing to tell it
                return response
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.stats.upstream_errors += 1
            if response is not None and response.prepared:
                raise  # the status line is gone; aiohttp drops the connection
            log.info("mesh.upstream_failed", destination=key, error=repr(exc))
            return web.Response(status=503, text=f"upstream connect error or disconnect/reset before headers: {exc}\n")

    def _spawn_mirror(
        self, key: str, upstream: Upstream | None, request: web.Request, headers: CIMultiDict[str], body: bytes,
        authority: str,
    ) -> None:
        counts = self.stats.mirrors.setdefault(key, MirrorCounts())
        if upstream is None:
            counts.failed += 1
            return
        if len(self._mirror_tasks) >= self.mirror_max_in_flight:
            counts.dropped += 1
            return
        copy_headers = CIMultiDict(headers)
        copy_headers["Host"] = shadow_host(authority)
        url = upstream.url.rstrip("/") + request.path_qs
        counts.sent += 1
        task = asyncio.create_task(self._mirror(counts, request.method, url, copy_headers, body))
        self._mirror_tasks.add(task)
        task.add_done_callback(self._mirror_tasks.discard)

    async def _mirror(
        self, counts: MirrorCounts, method: str, url: str, headers: CIMultiDict[str], body: bytes
    ) -> None:
        assert self._mirror_session is not None
        try:
            async with self._mirror_session.request(method, url, headers=headers, data=body) as resp:
                async for _ in resp.content.iter_any():
                    pass
                if resp.status >= 500:
                    counts.failed += 1
                else:
                    counts.ok += 1
        except (aiohttp.ClientError, OSError, TimeoutError):
            counts.failed += 1

