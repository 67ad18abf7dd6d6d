"""The Prometheus metric source (also Thanos Query and Mimir: only the HTTP query API is used).

Batching: at a look the controller asks for every metric of every rollout, and
each metric is answered with one query whose size does not grow with the rollouts.
A preset is sent *grouped*: aggregated by the labels that tell variants apart
(``namespace, pod`` or Istio's destination labels) over the namespaces of the
batch, so one ``increase(...[W])`` serves every rollout whose window has length W,
and each rollout sums the series matching its variants. Windows start and end on
interval boundaries (:func:`shadowctl.sources.prometheus.promql.aligned_start`), so the
distinct lengths are the intervals in which phases began. Why not per-interval
increases summed over looks (one length for all): a window holding one or two
scrapes makes ``increase`` extrapolate, which would double some counts and lose
others, and the judge would then believe it had twice the data it has.
Gauges are grouped too, as one range query (an average as a sum and a count).
Custom queries, which have no grouped form, are batched by tagging each
rollout's expression (``label_replace(expr, "shadowctl_key", "<i>/<variant>/<part>", "", "")``)
and joining the tagged parts with ``or``; `max_batch` caps the parts of one query.

Gauges are sampled by a range query whose steps are aligned to multiples of the
step since the epoch, so a sample's time, and hence its value, does not depend on
which other rollouts happened to share the batch or when the look ran.

A ratio's failures are ``(F) or (0 * (T))``: a failure counter (``response_code="503"``,
``finished_reason="error"``) exists only after its first increment, so "no failure
series while the total exists" is a true zero; without the total it stays no data.

prometheus-api-client is synchronous (requests); calls run in a small thread
pool behind a semaphore. Each call has a client timeout, a server-side
``timeout`` parameter and an asyncio deadline; cancelling a look abandons its
calls (a worker thread finishes on its own when its HTTP timeout fires).

A bearer token given as a file (``bearer_token_file``: the controller's
``--prometheus-token-file``, typically a projected service-account token the kubelet
rotates) is read again when the server refuses the credentials (HTTP 401/403); if the
file now holds another token, the call is sent once more with it. The token is never
logged: only the file's path is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import re
import ssl
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import requests
import structlog
import urllib3.exceptions
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, NewConnectionError
from urllib3.util.retry import Retry

from shadowctl.policy.model import MetricKind, ShadowPolicy
from shadowctl.policy.templates import render
from shadowctl.sources.base import (
    CounterWindow,
    CountWindow,
    GaugeWindow,
    HistogramWindow,
    MetricKey,
    MetricSource,
    NoData,
    Planned,
    SourceConfigError,
    SourceError,
    SourceUnavailable,
    Unavailability,
    Variant,
    VariantPair,
    Window,
    WindowRequest,
    WindowResult,
)
from shadowctl.sources.prometheus.presets import combine_parts
from shadowctl.sources.prometheus.promql import (
    MIN_GAUGE_WINDOW,
    Matcher,
    PrometheusRequest,
    SeriesMatch,
    build_requests,
    escape_regex,
    format_window,
    selector_values,
)

log = structlog.get_logger(__name__)

TAG = "shadowctl_key"
_T = TypeVar("_T")
_PART_VALUE, _PART_FAILURES = "v", "f"


class QueryFailed(SourceError):
    """Raised by the raw `instant`/`range` calls (the port methods return SourceUnavailable instead)."""

    def __init__(self, cause: Unavailability, reason: str) -> None:
        super().__init__(f"{cause.value}: {reason}")
        self.cause = cause
        self.reason = reason


def _tagged(expr: str, tag: str) -> str:
    return f'label_replace({expr}, "{TAG}", "{tag}", "", "")'


def _tag(index: int, variant: Variant, part: str) -> str:
    return f"{index}/{variant.value[0]}/{part}"


def _parse_tag(tag: str) -> tuple[int, Variant, str]:
    index, v, part = tag.split("/")
    return int(index), Variant.primary if v == "p" else Variant.candidate, part


def batch_expression(requests_: Sequence[WindowRequest]) -> str:
    """The one PromQL expression that answers all `requests_` (same template and kind)."""
    parts: list[str] = []
    for i, req in enumerate(requests_):
        for variant in Variant:
            q = req[variant]
            parts.append(_tagged(q.expr, _tag(i, variant, _PART_VALUE)))
            if req.kind is MetricKind.ratio:
                assert q.failures is not None
                parts.append(_tagged(f"({q.failures}) or (0 * ({q.expr}))", _tag(i, variant, _PART_FAILURES)))
    return _balanced_or(parts)


def _balanced_or(parts: Sequence[str]) -> str:
    """`a or b or c ...` nested as a balanced tree.

    PromQL evaluates a chain left-deep, re-hashing the growing left side at every
    `or` (quadratic in the number of parts); a balanced tree keeps it n log n.
    """
    if len(parts) == 1:
        return parts[0]
    mid = len(parts) // 2
    return f"({_balanced_or(parts[:mid])}) or ({_balanced_or(parts[mid:])})"


def _describe(req: WindowRequest) -> str:
    return f"{req.primary.expr} ; {req.candidate.expr}"


def _timed_out(exc: BaseException) -> bool:
    """requests reports a read timeout as ConnectionError(MaxRetryError(reason=ReadTimeoutError)).

    urllib3's NewConnectionError (connection refused) subclasses its timeout error; it is not one.
    """
    return any(
        isinstance(arg, MaxRetryError)
        and isinstance(arg.reason, urllib3.exceptions.TimeoutError)
        and not isinstance(arg.reason, NewConnectionError)
        for arg in exc.args
    )


def _classify(exc: BaseException, timeout: float) -> QueryFailed:
    if isinstance(exc, QueryFailed):
        return exc
    if isinstance(exc, TimeoutError | requests.Timeout) or _timed_out(exc):
        return QueryFailed(Unavailability.timeout, f"no answer within {timeout:g}s")
    if isinstance(exc, requests.exceptions.SSLError):
        why = "the server's certificate is not trusted" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else (
            "the handshake failed")
        return QueryFailed(Unavailability.unreachable,
                           f"TLS: {why} (check the CA: tls.caSecret or --prometheus-ca-file; a client certificate)")
    if isinstance(exc, requests.ConnectionError):
        return QueryFailed(Unavailability.unreachable, f"cannot connect: {type(exc).__name__}")
    if isinstance(exc, PrometheusApiClientException):
        text = str(exc)
        status = re.search(r"HTTP Status Code (\d+)", text)
        code = int(status.group(1)) if status else 0
        error = re.search(r'"error":"((?:[^"\\]|\\.)*)"', text)
        detail = error.group(1) if error else text[:300]
        if code in (400, 422):
            return QueryFailed(Unavailability.query_error, f"the query was rejected: {detail}")
        if code in (401, 403):
            # The body of an auth proxy's refusal says nothing useful and may echo headers: not kept.
            return QueryFailed(Unavailability.unauthorized,
                               f"HTTP {code}: the server refused the credentials (bearer token or client certificate)")
        if code in (502, 503, 504):
            return QueryFailed(Unavailability.unreachable, f"HTTP {code}: {detail}")
        return QueryFailed(Unavailability.bad_response, f"HTTP {code}: {detail}")
    if isinstance(exc, requests.JSONDecodeError):
        return QueryFailed(Unavailability.bad_response, "the answer is not JSON (not a Prometheus API?)")
    if isinstance(exc, requests.RequestException):
        return QueryFailed(Unavailability.unreachable, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError | KeyError | TypeError | IndexError):
        return QueryFailed(Unavailability.bad_response, f"not a Prometheus API answer ({type(exc).__name__})")
    return QueryFailed(Unavailability.bad_response, f"{type(exc).__name__}: {exc}")


class _ContextAdapter(HTTPAdapter):
    """Verifies the server with one SSLContext (a CA and a client certificate from Secrets, held in memory).

    requests takes a CA only as a file path; with a context in the pool manager's settings and
    ``verify=True`` it only asks for a verified certificate, and :meth:`cert_verify` is kept from
    adding its default bundle, so the context alone decides which CAs are trusted.
    """

    def __init__(self, context: ssl.SSLContext, **kwargs: Any) -> None:
        self._context = context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None


def read_token_file(path: str) -> str | None:
    """The token a file holds (surrounding whitespace removed); None when it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


class PrometheusMetricSource:
    """A MetricSource over the Prometheus HTTP API (Prometheus, Thanos Query, Mimir)."""

    def __init__(
        self,
        url: str,
        *,
        bearer_token: str | None = None,
        bearer_token_file: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        ca_file: str | None = None,
        insecure_skip_verify: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        max_concurrency: int = 4,
        max_batch: int = 20,
        retries: int = 1,
    ) -> None:
        if not re.match(r"^https?://\S+$", url):
            raise SourceConfigError(f"Prometheus URL {url!r} is not an http(s) URL")
        if bearer_token_file is not None and bearer_token is None:
            bearer_token = read_token_file(bearer_token_file)
            if bearer_token is None:
                raise SourceConfigError(f"the Prometheus token file {bearer_token_file} cannot be read or is empty")
        if bearer_token is not None and basic_auth is not None:
            raise SourceConfigError("give a bearer token or basic auth for Prometheus, not both")
        if timeout <= 0 or max_concurrency < 1 or max_batch < 1 or retries < 0:
            raise SourceConfigError("timeout, max_concurrency and max_batch must be positive, retries >= 0")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_batch = max_batch
        self.queries_sent = 0
        session = requests.Session()
        session.verify = False if insecure_skip_verify else (ca_file or True)
        retry = Retry(
            total=retries, connect=retries, read=0, status=0, other=0,
            backoff_factor=0.1, allowed_methods=None, raise_on_status=False,
        )
        self._token = bearer_token
        self._token_file = bearer_token_file
        self.token_rereads = 0
        """How often the token file was read again after a refusal (a test counts them)."""
        headers = {"Authorization": f"Bearer {bearer_token}"} if bearer_token else None
        # POST keeps batched expressions out of proxies' URL length limits where they honour form bodies;
        # prometheus-api-client sends parameters in the query string either way.
        self._client = PrometheusConnect(
            url=self.url, headers=headers, auth=basic_auth, retry=retry, session=session, method="POST",
        )
        if ssl_context is not None and not insecure_skip_verify:  # replaces the adapter the client mounted
            session.mount(self.url, _ContextAdapter(ssl_context, max_retries=retry))
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="shadowctl-prom")
        self._sem = asyncio.Semaphore(max_concurrency)
        self._closed = False

    # ------------------------------------------------------------------ calls off the event loop

    async def _call(self, fn: Callable[[], _T]) -> _T:
        used = self._token
        try:
            return await self._call_once(fn)
        except QueryFailed as exc:
            if exc.cause is not Unavailability.unauthorized or not self._token_renewed(used):
                raise
        return await self._call_once(fn)  # once more, with the token the file holds now

    def _token_renewed(self, used: str | None) -> bool:
        """After a refusal: read the token file again; whether a token other than ``used`` is now in use."""
        if self._token_file is None:
            return False
        self.token_rereads += 1
        fresh = read_token_file(self._token_file)
        if fresh is None:
            log.warning("prometheus.token_file_unreadable", file=self._token_file)
        elif fresh != self._token:
            self._token = fresh
            self._client.headers = {"Authorization": f"Bearer {fresh}"}
            log.info("prometheus.token_reread", file=self._token_file, reason="the server refused the old token")
        return self._token != used

    async def _call_once(self, fn: Callable[[], _T]) -> _T:
        if self._closed:
            raise QueryFailed(Unavailability.unreachable, "the metric source is closed")
        async with self._sem:
            loop = asyncio.get_running_loop()
            self.queries_sent += 1
            try:
                async with asyncio.timeout(self.timeout + 1.0):
                    return await loop.run_in_executor(self._executor, fn)
            except Exception as exc:  # cancellation (a BaseException) passes through
                raise _classify(exc, self.timeout) from exc

    def _params(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {**extra, "timeout": f"{self.timeout:g}s"}

    def _http_timeout(self) -> tuple[float, float]:
        return (min(self.timeout, 5.0), self.timeout)

    async def instant(self, expr: str, at: datetime) -> list[dict[str, Any]]:
        """Run an instant query at `at`; the raw result rows. Raises QueryFailed."""
        params = self._params({"time": f"{at.timestamp():.3f}"})
        rows: list[dict[str, Any]] = await self._call(
            lambda: self._client.custom_query(expr, params=params, timeout=self._http_timeout())
        )
        return rows

    async def range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Run a range query; the raw result rows. Raises QueryFailed."""
        # The client rounds start/end to whole seconds; the explicit parameters override them.
        params = self._params({"start": f"{start:.3f}", "end": f"{end:.3f}"})
        dt = datetime.fromtimestamp(start)
        rows: list[dict[str, Any]] = await self._call(
            lambda: self._client.custom_query_range(
                expr, dt, dt, step=f"{step:g}", params=params, timeout=self._http_timeout()
            )
        )
        return rows

    # ------------------------------------------------------------------ the port

    def plan(
        self, policy: ShadowPolicy, *, start: datetime, end: datetime, metrics: Sequence[str] | None = None
    ) -> Planned:
        return build_requests(policy, start=start, end=end, metrics=metrics)

    async def check(self) -> SourceUnavailable | None:
        try:
            rows = await self.instant("vector(1)", datetime.now().astimezone())
            if not rows:
                raise QueryFailed(Unavailability.bad_response, "vector(1) returned nothing")
        except QueryFailed as exc:
            return SourceUnavailable("(health check)", "vector(1)", exc.cause, exc.reason)
        return None

    async def fetch(self, request: WindowRequest) -> WindowResult:
        return (await self.fetch_many([request]))[request.key]

    async def fetch_many(self, requests_: Sequence[WindowRequest]) -> dict[MetricKey, WindowResult]:
        seen: set[MetricKey] = set()
        groups: dict[tuple[Any, ...], list[WindowRequest]] = defaultdict(list)
        for req in requests_:
            if req.key in seen:
                raise ValueError(f"request key {req.key} is given twice")
            seen.add(req.key)
            step = req.step if req.kind is MetricKind.gauge else timedelta(0)
            groups[(req.kind, req.template, req.end, step)].append(req)
        jobs: list[Any] = []
        for reqs in groups.values():
            grouped = [r for r in reqs if isinstance(r, PrometheusRequest) and r.grouped is not None]
            rest = [r for r in reqs if not (isinstance(r, PrometheusRequest) and r.grouped is not None)]
            if grouped:
                gauge = grouped[0].kind is MetricKind.gauge
                jobs.append(self._run_grouped_gauge(grouped) if gauge else self._run_grouped(grouped))
            jobs.extend(self._run_chunk(rest[i:i + self.max_batch]) for i in range(0, len(rest), self.max_batch))
        answers = await asyncio.gather(*jobs)
        out: dict[MetricKey, WindowResult] = {}
        for answer in answers:
            out.update(answer)
        return {req.key: out[req.key] for req in requests_}

    async def aclose(self) -> None:
        """Stop accepting calls, wait for in-flight ones (bounded by the HTTP timeout), close connections."""
        if not self._closed:
            self._closed = True
            # Calls abandoned by a cancelled look still run in their threads; wait (at most their HTTP
            # timeout) so that no thread outlives the source and its event loop.
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
            self._client.close()

    # ------------------------------------------------------------------ one batched query

    async def _run_chunk(self, chunk: Sequence[WindowRequest]) -> dict[MetricKey, WindowResult]:
        expr = batch_expression(chunk)
        kind = chunk[0].kind
        try:
            if kind is MetricKind.gauge:
                step = chunk[0].step.total_seconds()
                first = min(r.start.timestamp() for r in chunk)
                start = math.floor(first / step) * step
                rows = await self.range(expr, start, chunk[0].end.timestamp(), step)
            else:
                rows = await self.instant(expr, chunk[0].end)
            by_tag = self._split(rows, kind)
        except QueryFailed as exc:
            return {
                r.key: SourceUnavailable(str(r.key), _describe(r), exc.cause, exc.reason) for r in chunk
            }
        return {r.key: _assemble(r, {k[1:]: v for k, v in by_tag.items() if k[0] == i}) for i, r in enumerate(chunk)}

    # ------------------------------------------------------------------ grouped queries for many rollouts

    async def _run_grouped(self, reqs: Sequence[PrometheusRequest]) -> dict[MetricKey, WindowResult]:
        """Answer requests of a preset with one query whose size grows with their window lengths.

        Rollouts whose windows have the same length (the controller starts and ends windows on
        interval boundaries, so rollouts whose phases began in the same interval do) share one
        ``increase(...[W])``, aggregated by the labels that tell variants apart and scoped to their
        namespaces (and pods); the parts, one per distinct length, are tagged and joined with ``or``.
        Each rollout then sums the series that match its variants. The numbers are those of one query
        per rollout: the same increase over the same window, summed over the same series.
        """
        by_length: dict[int, list[PrometheusRequest]] = defaultdict(list)
        for r in reqs:
            by_length[round((r.end - r.start).total_seconds() * 1000)].append(r)
        lengths = sorted(by_length)
        out: dict[MetricKey, WindowResult] = {}
        chunks = [lengths[i:i + self.max_batch] for i in range(0, len(lengths), self.max_batch)]
        for answer in await asyncio.gather(*(self._run_lengths([by_length[w] for w in c]) for c in chunks)):
            out.update(answer)
        return out

    async def _run_lengths(self, groups: Sequence[Sequence[PrometheusRequest]]) -> dict[MetricKey, WindowResult]:
        expr = _balanced_or([_grouped_part(i, g, g[0].end - g[0].start) for i, g in enumerate(groups)])
        flat = [r for g in groups for r in g]
        try:
            rows = await self.instant(expr, flat[0].end)
        except QueryFailed as exc:
            return {r.key: SourceUnavailable(str(r.key), _describe(r), exc.cause, exc.reason) for r in flat}
        sums = self._sum_by_variant(groups, rows, instant=True)
        if isinstance(sums, SourceUnavailable):
            return {r.key: dataclasses.replace(sums, metric=str(r.key), query=_describe(r)) for r in flat}
        end = flat[0].end.timestamp()
        return {
            r.key: _assemble(r, {
                (v, part): [_Series(le, ((end, points[end]),)) for le, points in per_le.items() if end in points]
                for (v, part), per_le in sums[r.key].items()
            })
            for r in flat
        }

    async def _run_grouped_gauge(self, reqs: Sequence[PrometheusRequest]) -> dict[MetricKey, WindowResult]:
        """All rollouts of a gauge preset with one range query: samples sit on the same step grid for
        every rollout (multiples of the step since the epoch), so each keeps those inside its window."""
        first = reqs[0]
        assert first.grouped is not None and first.grouped.combine is not None
        step = first.step.total_seconds()
        start = math.floor(min(r.start.timestamp() for r in reqs) / step) * step
        expr = _grouped_part(0, reqs, max(first.step, MIN_GAUGE_WINDOW))
        try:
            rows = await self.range(expr, start, first.end.timestamp(), step)
        except QueryFailed as exc:
            return {r.key: SourceUnavailable(str(r.key), _describe(r), exc.cause, exc.reason) for r in reqs}
        sums = self._sum_by_variant([reqs], rows, instant=False)
        if isinstance(sums, SourceUnavailable):
            return {r.key: dataclasses.replace(sums, metric=str(r.key), query=_describe(r)) for r in reqs}
        combine = first.grouped.combine
        out: dict[MetricKey, WindowResult] = {}
        for r in reqs:
            parts_out: dict[tuple[Variant, str], list[_Series]] = {}
            for v in Variant:
                by_part = {part: per_le.get(None, {}) for (vv, part), per_le in sums[r.key].items() if vv is v}
                times = sorted(set().union(*(set(p) for p in by_part.values()))) if by_part else []
                points = [(t, x) for t in times if (x := combine_parts(combine, {n: p.get(t) for n, p in by_part.items()}))
                          is not None]
                if points:
                    parts_out[(v, _PART_VALUE)] = [_Series(None, tuple(points))]
            out[r.key] = _assemble(r, parts_out)
        return out

    @staticmethod
    def _sum_by_variant(
        groups: Sequence[Sequence[PrometheusRequest]], rows: list[dict[str, Any]], *, instant: bool
    ) -> dict[MetricKey, dict[tuple[Variant, str], dict[str | None, dict[float, float]]]] | SourceUnavailable:
        """Sum a grouped answer's series per request, variant, part, ``le`` and sample time."""
        flat = [r for g in groups for r in g]
        form0 = flat[0].grouped
        assert form0 is not None
        scope, names = form0.scope_label, form0.labels
        index: dict[tuple[int, str], list[tuple[PrometheusRequest, Variant]]] = defaultdict(list)
        for i, g in enumerate(groups):
            for r in g:
                assert r.grouped is not None
                for v in Variant:
                    index[(i, r.grouped.namespace)].append((r, v))
        sums: dict[MetricKey, dict[tuple[Variant, str], dict[str | None, dict[float, float]]]] = {
            r.key: {} for r in flat
        }
        owners: dict[tuple[int, tuple[str | None, ...]], list[tuple[PrometheusRequest, Variant]]] = {}
        try:
            for row in rows:
                labels: dict[str, str] = row["metric"]
                tag, _, part = labels[TAG].partition("/")
                i = int(tag)
                raw = [row["value"]] if instant else row["values"]
                points = [(float(t), float(x)) for t, x in raw]
                # Which variants a series belongs to depends only on its group labels, not on `le` or the part.
                who = (i, tuple(labels.get(n) for n in names))
                found = owners.get(who)
                if found is None:
                    found = owners[who] = [
                        (r, v) for r, v in index.get((i, labels.get(scope, "")), ())
                        if r.grouped is not None and _matches(r.grouped[v], labels)
                    ]
                for r, v in found:
                    lo, hi = r.start.timestamp(), r.end.timestamp()
                    acc = sums[r.key].setdefault((v, part), {}).setdefault(labels.get("le"), {})
                    for t, x in points:
                        if instant or lo < t <= hi:
                            acc[t] = acc.get(t, 0.0) + x
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            return SourceUnavailable("", "", Unavailability.bad_response, f"unexpected result row ({type(exc).__name__})")
        return sums

    @staticmethod
    def _split(rows: list[dict[str, Any]], kind: MetricKind) -> dict[tuple[int, Variant, str], list[_Series]]:
        out: dict[tuple[int, Variant, str], list[_Series]] = defaultdict(list)
        try:
            for row in rows:
                labels: dict[str, str] = row["metric"]
                if kind is MetricKind.gauge:
                    points = tuple((float(t), float(v)) for t, v in row["values"])
                else:
                    points = ((float(row["value"][0]), float(row["value"][1])),)
                out[_parse_tag(labels[TAG])].append(_Series(labels.get("le"), points))
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise QueryFailed(Unavailability.bad_response, f"unexpected result row ({type(exc).__name__})") from exc
        return out


def _grouped_part(index: int, reqs: Sequence[PrometheusRequest], window: timedelta) -> str:
    """A preset's parts for many rollouts, scoped to their namespaces (and pods), each tagged ``index/part``."""
    form = reqs[0].grouped
    assert form is not None
    namespaces = sorted({r.grouped.namespace for r in reqs if r.grouped is not None})
    matchers: list[Matcher] = [(form.scope_label, "=~", "|".join(escape_regex(ns) for ns in namespaces))]
    regexes = [m.regex for r in reqs if r.grouped is not None for m in (r.grouped.primary, r.grouped.candidate)
               if m.regex is not None]
    if len(regexes) == 2 * len(reqs) and len({name for name, _ in regexes}) == 1:
        # Every variant is a pod pattern: read only those pods' series.
        matchers.append((regexes[0][0], "=~", "|".join(sorted({p for _, p in regexes}))))
    values = {**selector_values(matchers), "window": format_window(window)}
    return " or ".join(f"({_tagged(render(q, values), f'{index}/{name}')})" for name, q in form.parts)


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _matches(match: SeriesMatch, labels: dict[str, str]) -> bool:
    if any(labels.get(name) != value for name, value in match.equals):
        return False
    if match.regex is None:
        return True
    name, pattern = match.regex
    return _regex(pattern).fullmatch(labels.get(name, "")) is not None


@dataclass(frozen=True)
class _Series:
    le: str | None
    points: tuple[tuple[float, float], ...]


# --------------------------------------------------------------------------- rows -> windows


class _Missing(Exception):
    def __init__(self, variant: Variant, query: str, reason: str) -> None:
        self.no_data = NoData("", variant, query, reason)


def _single(series: list[_Series], variant: Variant, query: str) -> float:
    if not series:
        raise _Missing(variant, query, "the query returned no series")
    if len(series) > 1:
        raise _Missing(variant, query, f"the query returned {len(series)} series; aggregate it to one")
    value = series[0].points[0][1]
    if not math.isfinite(value):
        raise _Missing(variant, query, f"the value is {value}")
    return value


def _buckets(series: list[_Series], variant: Variant, query: str) -> dict[float, float]:
    if not series:
        raise _Missing(variant, query, "the query returned no series")
    buckets: dict[float, float] = {}
    for s in series:
        if s.le is None:
            raise _Missing(variant, query, "a series has no 'le' label; a histogram query must keep 'le'")
        try:
            bound = float(s.le)
        except ValueError:
            raise _Missing(variant, query, f"le={s.le!r} is not a number") from None
        value = s.points[0][1]
        if not math.isfinite(value):
            raise _Missing(variant, query, f"bucket le={s.le} is {value}")
        if bound in buckets:
            raise _Missing(variant, query, f"bucket le={s.le} appears twice; aggregate by le")
        buckets[bound] = value
    if math.inf not in buckets:
        raise _Missing(variant, query, "no +Inf bucket, so the number of observations is unknown")
    return buckets


def _histograms(
    found: dict[Variant, dict[float, float]], queries: dict[Variant, str]
) -> tuple[HistogramWindow, HistogramWindow]:
    # Variants may expose different bucket bounds (another vLLM version, a custom build); cumulative
    # counts are only known at bounds both have, so both are cut to the common ones (+Inf included).
    common = sorted(set(found[Variant.primary]) & set(found[Variant.candidate]))
    windows: list[HistogramWindow] = []
    for variant in Variant:
        counts: list[float] = []
        for bound in common:
            # increase() extrapolates each bucket series on its own; keep the cumulative counts monotone.
            counts.append(max(found[variant][bound], counts[-1] if counts else 0.0))
        if counts[-1] <= 0:
            raise _Missing(variant, queries[variant], "no observations in the window")
        windows.append(HistogramWindow(tuple(common), tuple(counts)))
    return windows[0], windows[1]


def _assemble(req: WindowRequest, parts: dict[tuple[Variant, str], list[_Series]]) -> WindowResult:
    name = str(req.key)
    try:
        windows: dict[Variant, Window] = {}
        if req.kind is MetricKind.latency_histogram:
            found = {v: _buckets(parts.get((v, _PART_VALUE), []), v, req[v].expr) for v in Variant}
            p, c = _histograms(found, {v: req[v].expr for v in Variant})
            return VariantPair(p, c)
        for v in Variant:
            q = req[v]
            value_series = parts.get((v, _PART_VALUE), [])
            if req.kind is MetricKind.ratio:
                assert q.failures is not None
                total = _single(value_series, v, q.expr)
                if total <= 0:
                    raise _Missing(v, q.expr, "no requests in the window")
                failures = _single(parts.get((v, _PART_FAILURES), []), v, q.failures)
                # Both are extrapolated separately; a failure count cannot exceed the total.
                windows[v] = CountWindow(min(max(failures, 0.0), total), total)
            elif req.kind is MetricKind.counter:
                seconds = (req.end - req.start).total_seconds()
                windows[v] = CounterWindow(_single(value_series, v, q.expr), seconds)
            else:
                windows[v] = _gauge(req, value_series, v, q.expr)
        return VariantPair(windows[Variant.primary], windows[Variant.candidate])
    except _Missing as missing:
        nd = missing.no_data
        return NoData(name, nd.variant, nd.query, nd.reason)


def _gauge(req: WindowRequest, series: list[_Series], variant: Variant, query: str) -> GaugeWindow:
    if not series:
        raise _Missing(variant, query, "the query returned no series")
    if len(series) > 1:
        raise _Missing(variant, query, f"the query returned {len(series)} series; aggregate it to one")
    lo, hi = req.start.timestamp(), req.end.timestamp()
    inside = [(t, v * req.scale) for t, v in series[0].points if lo < t <= hi]
    kept = [(t, v) for t, v in inside if math.isfinite(v)]
    if not kept:
        what = f"all {len(inside)} samples are NaN or Inf" if inside else "no samples in the window"
        raise _Missing(variant, query, what)
    return GaugeWindow(tuple(v for _, v in kept), tuple(t for t, _ in kept), len(inside) - len(kept))



if TYPE_CHECKING:  # the adapter implements the port

    def _implements(source: PrometheusMetricSource) -> MetricSource:
        return source
