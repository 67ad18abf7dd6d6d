"""The `shadowctl tap` reverse proxy: a sidecar in front of an OpenAI-compatible model server.

This module is the tap's policy: what is forwarded, recorded and published. Moving the bytes is
:mod:`shadowctl.tap.http1` (asyncio protocols and httptools' C parser, no task per chunk: the
tap's cost is per streamed chunk, see that module). Mirror copies, which are off the user's
path, go through the same engine (:class:`~shadowctl.tap.http1.CopyClient`): on the same event loop as
the users' requests, a copy must cost no more than proxying one (an httpx client cost three times as much,
bench/tap/mirror.py).

The work on the user's path is kept small: the request is forwarded before its
body is parsed for the event (prompt hash, model), and after the first output
token a streamed chunk is only forwarded and copied; parsing, metrics and the
event happen once the response has ended.

What the proxy guarantees, and why it is built this way:

- Transparency: status, headers (minus hop-by-hop ones) and body bytes go
  through unchanged (framing: :mod:`shadowctl.tap.http1`); the incoming Host
  is kept (the upstream is the pod's own model server, and Host-based routing
  in front of the tap must still work when the tap is bypassed). Chunks are written as they arrive, never buffered.
- User traffic never waits for MQTT: events are offered to a bounded queue
  after the response is done (see :mod:`shadowctl.tap.publisher`).
- ``x-request-id`` is kept, or generated and sent upstream, so that Istio's
  mirror copy (same id) can be paired with the original. A valid W3C
  ``traceparent`` is copied into the event (an invalid one is ignored), so a
  disagreeing pair points to the user's trace; headers go upstream unchanged.
- Application-level mirroring (for Knative, which cannot mirror) sends a copy
  of the *request* to the candidate concurrently with the primary request;
  it is fire-and-forget with a cap on copies in flight (a copy over the cap is
  not sent, and counted as ``dropped_in_flight_cap``), and a request is
  chosen by a hash of its id, so a retried request is mirrored consistently.
  A copy is built (rewritten, budgeted) only after the user's request has been
  written upstream (``call_soon``): its cost is never on the user's path.
- As a router (``--route-policy``, :mod:`shadowctl.tap.routes`), the shares come from the
  controller's route setting instead of flags: ``mirrorPercent`` of requests are copied as
  above, and ``candidatePercent`` of live requests are forwarded to the candidate instead of
  the upstream (the user gets the candidate's answer; its event and metrics say variant
  ``candidate``). Both are chosen by :func:`shadowctl.compare.routing.in_share` on the
  request id, so every tap replica and worker picks the same requests; a request routed to
  the candidate is not also mirrored there. Without a setting, or with a stale one, the tap
  is primary-only.
- A v2 setting may make the candidate a *rewrite* of the request (``rewrite.model``: another
  served model name, a LoRA adapter, on the tap's own upstream unless the setting names a
  URL): the JSON body is parsed and serialized again exactly once, with only ``model``
  replaced, for the mirrored copies and for the candidate's live share (whose Content-Length
  follows the new body). A body that is not a JSON object cannot be rewritten: its copy is not
  sent, and a live request stays with the primary (both counted as ``not_rewritable``). Such
  a candidate has no tap of its own, so this tap records the candidate's answers to its
  copies itself (events of variant ``candidate``, ``shadow: true``). A v2 setting may also
  choose the live share per user (``sticky``): the hash of the policy and the user (the
  header the setting names, else the body's OpenAI ``user`` field, else the request id), so
  a user stays on one side on every replica. Every copy carries ``x-shadowctl-shadow: 1``,
  so gateways and billing can tell it from a user's request.
- The rewrite may also be a prompt version (``rewrite.prompt``: the system message, or a template around the
  user's input, :mod:`shadowctl.compare.prompts`; a request that does not carry the primary's version is not
  rewritten) and sampling parameters (``rewrite.parameters``). The events of rewritten requests keep the
  user's prompt (and its hash, so the copy pairs with the primary's answer) and the rewrite's model.
- The noise baseline (``baselinePercent``, or ``--baseline-resend`` for a tap that no route setting drives): that
  share of requests is sent once more, unchanged, to this tap's own upstream, and the answer recorded as variant
  ``baseline`` (``shadow: true``), so the primary's agreement with itself is measured on the same traffic without
  a second replica.
- The shadow budget (``budget``, :mod:`shadowctl.tap.budget`): copies and resends over the per-process rate
  or token budget, or cut by the back-off on the candidate's queue, are skipped and counted; users' requests
  never wait for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import structlog
from pydantic import ValidationError

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.events import SCHEMA_VERSION, Endpoint, OutputEvent, Variant, parse_traceparent
from shadowctl.compare.partitions import partition_topic
from shadowctl.compare.prompts import replace_system, retemplate
from shadowctl.compare.routing import Effective, Rewrite, in_share, user_bucket_key
from shadowctl.errors import ShadowctlError
from shadowctl.policy.prompts import PromptApply
from shadowctl.tap.budget import BudgetGate, QueueWatch, token_cost
from shadowctl.tap.extract import ResponseAccumulator, classify, parse_request
from shadowctl.tap.http1 import (
    CopyClient,
    Forward,
    Headers,
    LocalResponse,
    Request,
    TapServer,
    UpstreamUnavailable,
    end_to_end,
    error_body,
)
from shadowctl.tap.jsonbody import edit_object
from shadowctl.tap.metrics import CONTENT_TYPE, TapMetrics
from shadowctl.tap.publisher import EventPublisher
from shadowctl.tap.routes import RouteFollower
from shadowctl.tap.sampling import SAMPLE_HEADER, Sampler, header_fraction
from shadowctl.tap.workers import worker_index

log = structlog.get_logger(__name__)

SHADOW_HEADER = b"x-shadowctl-shadow"
REQUEST_ID_HEADER = b"x-request-id"
TRACEPARENT_HEADER = b"traceparent"
_REQUEST_ID = frozenset({REQUEST_ID_HEADER})


class TapError(ShadowctlError):
    """The tap cannot start (bad configuration, port in use)."""


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """Where and how to send mirror copies."""

    url: str
    percent: float
    host: str | None = None
    model: str | None = None
    temperature: float | None = None
    seed: int | None = None
    max_in_flight: int = 64
    rewrite: Rewrite | None = None
    """The route setting's rewrite (v2): the copy's body is rewritten by :func:`apply_rewrite`, or not sent."""
    record: bool = False
    """This tap records the candidate's answer to each copy (a rewrite: the candidate has no tap of its own)."""


@dataclass(frozen=True, slots=True)
class TapConfig:
    """Everything the proxy needs besides its publisher."""

    upstream: str
    variant: Variant
    namespace: str
    service: str
    topic: str
    redact_prompts: bool = False
    redaction: str = "none"
    """What the events keep of the texts: none, truncate, hash or drop (:mod:`shadowctl.compare.redaction`)."""
    redact_max_chars: int = 500
    """Redaction truncate: characters kept of each text."""
    max_output_chars: int = 200_000
    max_request_bytes: int = 64 * 1024 * 1024
    metrics_path: str = "/metrics"
    mirror: MirrorConfig | None = None
    """Fixed mirroring (--mirror-to); with ``routed``, only where copies go and how they are rewritten."""
    routed: bool = False
    """The shares come from a route setting (--route-policy): see :mod:`shadowctl.tap.routes`."""
    baseline_percent: float | None = None
    """A resent noise baseline without a route setting (--baseline-resend; with ``routed``, the setting's
    ``baselinePercent`` says instead): this share of requests is sent once more to the upstream, as variant
    ``baseline``."""
    sample: float = 1.0
    """Fraction of requests whose events are published (--sample), chosen by x-request-id: :mod:`shadowctl.tap.sampling`."""
    partitions: int = 1
    """Events go to ``<topic>/<k>``, k = the request id's partition of this many (--partitions; 1: ``<topic>``):
    :mod:`shadowctl.compare.partitions`."""
    upstream_connect_timeout_s: float = 10.0
    drain_s: float = 10.0
    client_idle_s: float = 75.0


def default_topic(namespace: str, service: str, variant: Variant) -> str:
    """`shadowctl/outputs/<namespace>/<service>/<variant>`."""
    return f"shadowctl/outputs/{namespace}/{service}/{variant.value}"


def is_shadow_request(host: str | None, marker: str | None) -> bool:
    """A mirrored copy: Host ends in -shadow (before or after a port), or the tap's marker header is set."""
    if marker is not None and marker.strip().lower() in ("1", "true", "yes"):
        return True
    if not host:
        return False
    host = host.strip().lower()
    if host.endswith("-shadow"):
        return True
    name, _, port = host.rpartition(":")
    return bool(name) and port.isdigit() and name.endswith("-shadow")


def mirror_selected(request_id: str, percent: float) -> bool:
    """Whether a request id falls in the mirrored share (stable for a given id; the one hash of
    :func:`shadowctl.compare.routing.in_share`)."""
    return in_share(request_id, percent)


def rewrite_body(body: bytes, mirror: MirrorConfig) -> bytes:
    """The mirror copy's body: `model`, `temperature`, `seed` set when configured; else unchanged bytes."""
    if mirror.model is None and mirror.temperature is None and mirror.seed is None:
        return body
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if not isinstance(data, dict):
        return body
    if mirror.model is not None:
        data["model"] = mirror.model
    if mirror.temperature is not None:
        data["temperature"] = mirror.temperature
    if mirror.seed is not None:
        data["seed"] = mirror.seed
    return json.dumps(data, ensure_ascii=False).encode()


def apply_rewrite(body: bytes, rewrite: Rewrite | None, *, max_tokens_cap: int | None = None) -> bytes | None:
    """The body with the rewrite applied: parsed and serialized once (compact, non-ASCII kept), every other
    field as it was; None when the body is not a JSON object or the rewrite does not apply to it (a prompt
    rewrite whose primary prompt the request does not carry: :mod:`shadowctl.compare.prompts`).

    In order: ``model`` replaced; the prompt version applied; ``parameters`` set (``temperature``, ``top_p``,
    and ``max_tokens``, or ``max_completion_tokens`` where the request uses that one); `max_tokens_cap` (the
    shadow budget's, on mirror copies) lowers the limit, or sets it where the request has none. The parse and
    the serialization give the ``json`` module's bytes, made by orjson where it gives the same ones
    (:func:`shadowctl.tap.jsonbody.edit_object`: on a routed rewrite they are on the user's path). What the
    rewrite adds is finite (the route setting bounds its parameters), as :func:`edit_object` requires.
    :func:`rewriter` makes the same function once, for many bodies."""
    return rewriter(rewrite, max_tokens_cap=max_tokens_cap)(body)


def rewriter(rewrite: Rewrite | None, *, max_tokens_cap: int | None = None) -> Callable[[bytes], bytes | None]:
    """:func:`apply_rewrite` of `rewrite` as a function of the body, with what does not depend on the body read
    out of the route setting once (the values set, the prompt's way of applying): the tap makes it once per
    route setting, and a routed rewrite, on the user's path, runs only the per-body part."""
    sets: list[tuple[str, object]] = []
    if rewrite is not None and rewrite.model is not None:
        sets.append(("model", rewrite.model))
    params = rewrite.parameters if rewrite is not None else None
    if params is not None:
        sets += [(key, value) for key, value in (("temperature", params.temperature), ("top_p", params.top_p))
                 if value is not None]
    limit = params.max_tokens if params is not None else None
    prompt = rewrite.prompt if rewrite is not None else None
    apply: Callable[[dict[str, object], str, str], bool] | None = None
    primary = candidate = ""
    if prompt is not None:
        apply = replace_system if prompt.apply is PromptApply.replace_system else retemplate
        primary, candidate = prompt.primary, prompt.candidate

    def edit(data: dict[str, object]) -> bool:
        # The prompt first: it only replaces keys the body has (messages, prompt), so the keys the rest adds
        # come in the same order as ever (model, temperature, top_p, the limit).
        if apply is not None and not apply(data, primary, candidate):
            return False
        for key, value in sets:
            data[key] = value
        if limit is not None or max_tokens_cap is not None:
            limit_key = "max_completion_tokens" if "max_completion_tokens" in data else "max_tokens"
            if limit is not None:
                data[limit_key] = limit
            if max_tokens_cap is not None:
                cap_limit(data, limit_key, max_tokens_cap)
        return True

    return lambda body: edit_object(body, edit)  # None also for a number JSON cannot carry (1e999 read as inf)


def cap_limit(data: dict[str, object], key: str, cap: int) -> None:
    """Lower ``data[key]`` (a token limit) to `cap`, or set it where absent or not a positive integer."""
    current = data.get(key)
    if not (isinstance(current, int) and not isinstance(current, bool) and 0 < current <= cap):
        data[key] = cap


def user_of(body: bytes) -> str | None:
    """The OpenAI ``user`` field of a JSON body, or None (only parsed when the bytes mention it)."""
    if b'"user"' not in body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    user = data.get("user") if isinstance(data, dict) else None
    return user if isinstance(user, str) and user else None


def in_candidate_share(current: Effective, request_id: str, body: bytes,
                       header: Callable[[bytes], bytes | None]) -> bool:
    """Whether the candidate answers this live request: its request id in the share, or, for a sticky setting,
    its user (the header the setting names, else the body's ``user``; neither: the request id)."""
    percent = current.candidate_percent
    if percent <= 0 or percent >= 100:
        return percent >= 100
    key = request_id
    if current.sticky:
        named = header(current.user_header.encode()) if current.user_header else None
        user = named.decode("latin-1") if named else user_of(body)
        if user:
            key = user_bucket_key(current.policy, user)
    return in_share(key, percent)


class Trace:
    """The recorder of one request: time to first token, the answer, then metrics and the event."""

    __slots__ = ("acc", "body", "endpoint", "origin", "proxy", "request_id", "rewritten_model", "sample_fraction",
                 "shadow", "started_at", "status", "t0", "traceparent", "ttft", "variant")

    def __init__(self, proxy: TapProxy, endpoint: Endpoint, body: bytes, request_id: str, shadow: bool,
                 t0: float, started_at: float, traceparent: bytes | None = None, variant: Variant | None = None) -> None:
        self.proxy = proxy
        self.endpoint = endpoint
        self.body = body
        self.request_id = request_id
        self.shadow = shadow
        self.t0 = t0
        self.started_at = started_at
        self.traceparent = traceparent
        """The raw W3C traceparent header (validated when the event is built, off the user's path)."""
        self.variant = variant or proxy.config.variant
        """Who answers: the tap's own variant, or the candidate for a request the route setting sends there."""
        self.status = 0
        self.ttft: float | None = None
        self.acc: ResponseAccumulator | None = None
        self.origin: bytes | None = None
        """The user's body where `body` is a rewrite of it: the event's prompt (and its hash, which pairs the
        answer with the primary's) are the user's; its model is the rewrite's."""
        self.rewritten_model: str | None = None
        """The model name the rewrite put into `body` (None: the rewrite left the user's model as it was), so that
        recording the answer does not parse the rewritten body a second time only to read it back."""
        self.sample_fraction: float | None = None
        """The sampling fraction decided when the request arrived (the route setting's, or a copy's header); None:
        ``--sample``."""

    def on_head(self, status: int, headers: Headers) -> None:
        self.status = status
        content_type = content_encoding = None
        for key, value in headers:
            lk = key.lower()
            if lk == b"content-type":
                content_type = value.decode("latin-1")
            elif lk == b"content-encoding":
                content_encoding = value.decode("latin-1")
        self.acc = ResponseAccumulator(
            self.endpoint,
            event_stream=(content_type or "").startswith("text/event-stream"),
            content_encoding=content_encoding,
            max_chars=self.proxy.config.max_output_chars,
        )

    def on_chunk(self, chunk: bytes, arrived: float) -> None:
        acc = self.acc
        if acc is None:
            return
        if self.ttft is None:
            if acc.feed(chunk):
                self.ttft = arrived - self.t0
        else:
            acc.feed(chunk)  # after the first token only a copy: parsed in batches and at the end

    def on_end(self, error: str | None, status: int | None) -> None:
        if status is not None:
            self.status = status
        self.proxy.record(self, error=error)


class TapProxy:
    """What the tap does with a request (the :class:`~shadowctl.tap.http1.Handler`), and the mirror."""

    def __init__(self, config: TapConfig, publisher: EventPublisher | None, metrics: TapMetrics,
                 routes: RouteFollower | None = None) -> None:
        """`routes`: the route setting to follow (``config.routed``); its ``current`` is read per request."""
        self.config = config
        self.publisher = publisher
        self.metrics = metrics
        self.routes = routes
        self.upstream = config.upstream.rstrip("/")
        self._metrics_path = config.metrics_path.encode()
        self._routed_by: tuple[Effective, MirrorConfig | None, str | None] | None = None
        self._live: tuple[Rewrite, Callable[[bytes], bytes | None]] | None = None
        """The route setting's rewrite of live requests (:func:`rewriter`), made once per rewrite."""
        self.mirror_client: httpx.AsyncClient | None = None
        """For the shadow budget's queue watch (GETs of the candidate's /metrics); copies go through `copies`."""
        self.copies: CopyClient | None = None
        if config.mirror is not None or config.routed or config.baseline_percent:
            self.copies = CopyClient(connect_timeout_s=5.0)
            in_flight = config.mirror.max_in_flight if config.mirror is not None else MirrorConfig("", 0).max_in_flight
            self.mirror_client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=in_flight),
                timeout=httpx.Timeout(connect=5.0, read=600.0, write=30.0, pool=1.0),
                trust_env=False,
            )
        self._mirror_tasks: set[asyncio.Task[None]] = set()
        self._resend = MirrorConfig(url=self.upstream, percent=100.0, record=True)
        """Where the noise baseline's copies go: this tap's own upstream, unchanged (baselinePercent)."""
        self._gate: BudgetGate | None = None
        """The route setting's shadow budget for this process (kept while the budget stays the same)."""
        self._watch: tuple[QueueWatch, asyncio.Task[None]] | None = None
        self.sampler = Sampler(config.sample, metrics.registry)
        self._redact: Callable[[OutputEvent], OutputEvent] | None = None
        if config.redaction != "none":  # loaded only where used: the comparators' tokenizer and the policy model
            from shadowctl.compare.redaction import redact
            from shadowctl.policy.model import RedactionMode

            mode, limit = RedactionMode(config.redaction), config.redact_max_chars
            self._redact = lambda event: redact(event, mode, limit)

    async def aclose(self) -> None:
        """Cancel mirror copies in flight and the queue watch, and close the mirror's client."""
        self._set_watch(None)
        for task in list(self._mirror_tasks):
            task.cancel()
        if self._mirror_tasks:
            await asyncio.gather(*self._mirror_tasks, return_exceptions=True)
        if self.copies is not None:
            self.copies.close()
        if self.mirror_client is not None:
            await self.mirror_client.aclose()

    def _by_setting(self, current: Effective) -> tuple[MirrorConfig | None, str | None]:
        """The mirror and the candidate's URL under a route setting (computed once per setting applied)."""
        cached = self._routed_by
        if cached is not None and cached[0] is current:
            return cached[1], cached[2]
        fixed = self.config.mirror
        url = fixed.url if fixed is not None else current.candidate_url  # --mirror-to overrides the setting's URL
        if url is None and current.rewrite is not None:
            url = self.upstream  # a rewrite without a URL: the same server, another served model name
        mirror = None
        if url is not None and current.mirror_percent is not None:
            mirror = (dataclasses.replace(fixed, percent=current.mirror_percent) if fixed is not None
                      else MirrorConfig(url=url, percent=current.mirror_percent))
            if current.rewrite is not None:
                mirror = dataclasses.replace(mirror, rewrite=current.rewrite, record=True)
        candidate = url if url is not None and current.candidate_percent > 0 else None
        self._routed_by = (current, mirror, candidate)
        budget = current.budget
        if budget is None:
            self._gate = None
            self._set_watch(None)
        elif self._gate is None or self._gate.budget != budget:
            self._gate = BudgetGate(budget)
            queue_of = url if url is not None else self.upstream
            self._set_watch(QueueWatch(self.mirror_client, queue_of.rstrip("/") + "/metrics", self._gate)
                            if budget.max_queue is not None and self.mirror_client is not None else None)
        return mirror, candidate

    def _live_rewriter(self, rewrite: Rewrite) -> Callable[[bytes], bytes | None]:
        """:func:`rewriter` of the route setting's rewrite for live requests (made once per rewrite)."""
        live = self._live
        if live is None or live[0] is not rewrite:
            live = self._live = (rewrite, rewriter(rewrite))
        return live[1]

    def _set_watch(self, watch: QueueWatch | None) -> None:
        """Replace the queue watch (None: stop it)."""
        if self._watch is not None:
            self._watch[1].cancel()
            self._watch = None
        if watch is not None:
            self._watch = (watch, asyncio.get_running_loop().create_task(watch.run()))

    @property
    def budget_gate(self) -> BudgetGate | None:
        """The shadow budget in force (its counts: admitted, skipped_rate, skipped_queue; its share)."""
        return self._gate

    def variant_topic(self, variant: Variant) -> str:
        """Where events of another variant's answers go (the candidate's to requests routed or copied to it, the
        baseline's to resent copies): that variant's default topic (or --topic as given)."""
        c = self.config
        if c.topic == default_topic(c.namespace, c.service, c.variant):
            return default_topic(c.namespace, c.service, variant)
        return c.topic

    # ------------------------------------------------------------------ Handler

    def route(self, request: Request) -> Forward | LocalResponse:
        """Serve /metrics locally; forward anything else with an ``x-request-id``, mirroring if configured."""
        t0 = time.perf_counter()
        started_at = time.time()
        path = request.target.partition(b"?")[0]
        if path == self._metrics_path and request.method in ("GET", "HEAD"):
            return LocalResponse(200, self.metrics.render(), CONTENT_TYPE.encode())
        request_id = request.header(REQUEST_ID_HEADER)
        if request_id:
            headers = end_to_end(request.headers)
        else:  # absent or empty: Istio's mirror pairing needs one
            request_id = uuid.uuid4().hex.encode()
            headers = end_to_end(request.headers, drop=_REQUEST_ID)
            headers.append((REQUEST_ID_HEADER, request_id))
        endpoint = classify(request.method, path.decode("latin-1"))
        trace = None
        if endpoint is not None:
            host, marker = request.header(b"host"), request.header(SHADOW_HEADER)
            shadow = is_shadow_request(host.decode("latin-1") if host is not None else None,
                                       marker.decode("latin-1") if marker is not None else None)
            rid = request_id.decode("latin-1")
            mirror = self.config.mirror
            candidate = None
            body = request.body
            rewritten_model: str | None = None
            fraction = self.routes.current.sample_fraction if self.routes is not None else None
            if fraction is None and shadow:
                fraction = header_fraction(request.header(SAMPLE_HEADER))
            if self.routes is not None:
                current = self.routes.current
                mirror, candidate_url = self._by_setting(current)
                if candidate_url is not None and not shadow and in_candidate_share(current, rid, body, request.header):
                    candidate = candidate_url
                    if current.rewrite is not None:
                        rewritten = self._live_rewriter(current.rewrite)(body)
                        if rewritten is None:  # cannot be rewritten: the primary answers it
                            candidate = None
                            self.metrics.mirrored.labels("not_rewritable").inc()
                        else:
                            body, rewritten_model = rewritten, current.rewrite.model
            trace = Trace(self, endpoint, body, rid, shadow, t0, started_at,
                          request.header(TRACEPARENT_HEADER), Variant.candidate if candidate else None)
            trace.sample_fraction = fraction
            if body is not request.body:
                trace.origin = request.body
                trace.rewritten_model = rewritten_model
            if candidate is not None:
                self.metrics.routed.inc()
                netloc = (mirror.host if mirror is not None and mirror.host else None) or urlsplit(candidate).netloc
                headers = [(k, v) for k, v in headers if k.lower() != b"host"] + [(b"host", netloc.encode("idna"))]
                return Forward(request.method, request.target, headers, body, trace, upstream=candidate)
            if mirror is not None and not shadow and mirror_selected(rid, mirror.percent):
                copy = Trace(self, endpoint, b"", rid, True, 0.0, 0.0, request.header(TRACEPARENT_HEADER),
                             Variant.candidate) if mirror.record else None
                if copy is not None:
                    copy.sample_fraction = fraction
                # After the user's request is on its way: a copy's rewrite (one parse and one serialization of
                # the body) must not delay it. call_soon runs once the serving task has written the request
                # upstream and waits for the answer (bench/tap/rewrite.py).
                asyncio.get_running_loop().call_soon(self._send_mirror, request.target, headers, request.body,
                                                     mirror, rid, copy, fraction)
            resend = self.routes.current.baseline_percent if self.routes is not None else self.config.baseline_percent
            if resend is not None and not shadow and in_share(rid, resend):
                again = Trace(self, endpoint, b"", rid, True, 0.0, 0.0, request.header(TRACEPARENT_HEADER),
                              Variant.baseline)
                again.sample_fraction = fraction
                asyncio.get_running_loop().call_soon(self._send_mirror, request.target, headers, request.body,
                                                     self._resend, rid, again, fraction)
        return Forward(request.method, request.target, headers, request.body, trace)

    def upstream_unreachable(self, request: Request, forward: Forward, error: UpstreamUnavailable) -> LocalResponse:
        """502 with an OpenAI-style error; recorded like any answer."""
        log.warning("upstream unreachable", upstream=self.upstream, error=str(error))
        if isinstance(forward.recorder, Trace):
            forward.recorder.status = 502
            self.record(forward.recorder, error=f"upstream unreachable: {error.kind}")
        return LocalResponse(502, error_body(f"upstream unreachable: {error}", "upstream_unreachable"))

    def record(self, trace: Trace, *, error: str | None) -> None:
        """Metrics and the output event of one finished request (never raises into the request path)."""
        e2e = time.perf_counter() - trace.t0
        info = parse_request(trace.endpoint, trace.body if trace.origin is None else trace.origin)
        model = info.model if trace.rewritten_model is None else trace.rewritten_model  # a rewrite that names one
        out = trace.acc.finish() if trace.acc is not None else None
        tokens = out.output_tokens if out is not None else None
        status = trace.status
        routed = trace.variant is not self.config.variant
        self.metrics.observe(model=model, status=status, ttft_s=trace.ttft, e2e_s=e2e, output_tokens=tokens,
                             variant=trace.variant.value if routed else None)
        if self.publisher is None or not self.sampler.keep(trace.request_id, trace.sample_fraction):
            return
        try:
            event = OutputEvent(
                schema=SCHEMA_VERSION,
                request_id=trace.request_id[:256],
                variant=trace.variant,
                shadow=trace.shadow,
                service=f"{self.config.namespace}/{self.config.service}",
                endpoint=trace.endpoint,
                model=model,
                stream=trace.acc.event_stream if trace.acc is not None else False,
                prompt_hash=info.prompt_hash,
                prompt=None if self.config.redact_prompts else info.prompt_text,
                output=out.output if out is not None else "",
                truncated=out.truncated if out is not None else False,
                tool_calls=out.tool_calls if out is not None else None,
                finish_reason=out.finish_reason if out is not None else None,
                usage=out.usage if out is not None else None,
                output_tokens=tokens,
                status=status,
                error=error or (out.error if out is not None else None),
                started_at=trace.started_at,
                ttft_s=trace.ttft,
                e2e_s=e2e,
                traceparent=parse_traceparent(trace.traceparent),
            )
        except ValueError as exc:  # pydantic's ValidationError; a bug here must never fail the request
            # Only where and what: pydantic's message would quote the input, which may be the user's text.
            errors = exc.errors() if isinstance(exc, ValidationError) else []
            log.error("cannot build output event", fields=[".".join(map(str, e["loc"])) for e in errors],
                      error_type=type(exc).__name__)
            self.metrics.events_dropped.labels("invalid").inc()
            return
        if self._redact is not None:
            event = self._redact(event)
        topic = self.variant_topic(trace.variant) if routed else self.config.topic
        self.publisher.offer(partition_topic(topic, event.request_id, self.config.partitions), event.to_json())

    # ------------------------------------------------------------------ mirror

    def _send_mirror(self, target: bytes, headers: Headers, body: bytes, mirror: MirrorConfig,
                     request_id: str, trace: Trace | None = None, sample_fraction: float | None = None) -> None:
        """Send a copy (off the user's path), within the route setting's budget where it has one; `trace`: record
        the answer to it (``mirror.record``: a rewrite's candidate, or a resent baseline copy); `sample_fraction`:
        the route setting's sampling fraction, sent along for the receiving tap (:data:`SAMPLE_HEADER`)."""
        kind = "baseline" if mirror is self._resend else "mirror"
        if len(self._mirror_tasks) >= mirror.max_in_flight:
            self._count(kind, "dropped_in_flight_cap")
            return
        original = body
        gate = self._gate if self.routes is not None and self.routes.current.budget is not None else None
        cap = gate.budget.max_tokens if gate is not None else None
        if mirror.rewrite is None:
            body = rewrite_body(body, mirror)
        if mirror.rewrite is not None or cap is not None:
            rewritten = apply_rewrite(body, mirror.rewrite, max_tokens_cap=cap)
            if rewritten is not None:
                body = rewritten
            elif mirror.rewrite is not None:
                self._count(kind, "not_rewritable")
                return
        if gate is not None:
            why = gate.admit(request_id, token_cost(body, cap))
            if why is not None:
                self._count(kind, why)
                return
        host = mirror.host or urlsplit(mirror.url).netloc
        copy = [(k, v) for k, v in headers if k.lower() not in (b"host", SHADOW_HEADER, SAMPLE_HEADER)]
        copy += [(b"host", host.encode("idna")), (SHADOW_HEADER, b"1")]
        if sample_fraction is not None:
            copy.append((SAMPLE_HEADER, repr(sample_fraction).encode()))
        if trace is not None:
            trace.body, trace.origin = body, original
            if body is not original:
                trace.rewritten_model = mirror.rewrite.model if mirror.rewrite is not None else mirror.model
        task = asyncio.create_task(self._mirror(mirror.url, target, copy, body, kind, trace))
        self._mirror_tasks.add(task)
        task.add_done_callback(self._mirror_tasks.discard)

    def _count(self, kind: str, outcome: str) -> None:
        """One copy (`kind` ``mirror`` or ``baseline``) ended with `outcome`: on /metrics, and in the route
        follower's tally for its report (what the verdict says the budget allowed)."""
        (self.metrics.baseline if kind == "baseline" else self.metrics.mirrored).labels(outcome).inc()
        if self.routes is not None:
            self.routes.copies.count(kind, outcome)

    async def _mirror(self, url: str, target: bytes, headers: Headers, body: bytes, kind: str,
                      trace: Trace | None = None) -> None:
        assert self.copies is not None
        if trace is not None:
            trace.t0, trace.started_at = time.perf_counter(), time.time()
        error = await self.copies.send(url, "POST", target, headers, body, trace)
        if error is None:
            self._count(kind, "sent")
            if trace is not None:
                trace.on_end(None, None)
            return
        self._count(kind, "failed")
        log.debug("mirror copy failed", url=url, error=error)  # the target's query string may be personal: not logged
        if trace is not None:
            trace.on_end(f"candidate unreachable: {error}", trace.status or 502)


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`, or `:PORT` for all interfaces) into (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise TapError(f"--listen {value!r}: expected HOST:PORT, e.g. 0.0.0.0:8080")
    return (host.strip("[]") or "0.0.0.0"), int(port)


@dataclass
class RunningServer:
    """A listening tap; :meth:`cleanup` stops it (requests in flight get the drain time)."""

    server: TapServer
    proxy: TapProxy

    async def cleanup(self) -> None:
        await self.server.close()
        await self.proxy.aclose()


async def start_server(proxy: TapProxy, host: str, port: int, *, reuse_port: bool = False) -> RunningServer:
    """Bind and start serving; the caller cleans up the returned server. `reuse_port`: share the port with
    other processes that set it too (SO_REUSEPORT; the kernel spreads connections across them)."""
    config = proxy.config
    try:
        server = TapServer(proxy, config.upstream, connect_timeout_s=config.upstream_connect_timeout_s,
                           max_request_bytes=config.max_request_bytes, drain_s=config.drain_s,
                           client_idle_s=config.client_idle_s)
    except ShadowctlError as exc:
        raise TapError(str(exc)) from exc
    try:
        await server.start(host, port, reuse_port=reuse_port)
    except OSError as exc:
        await proxy.aclose()
        raise TapError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return RunningServer(server, proxy)


def bound_port(running: RunningServer) -> int:
    """The port a tap listens on (useful with port 0)."""
    return running.server.port


async def serve(proxy: TapProxy, publisher: EventPublisher | None, host: str, port: int,
                stop: asyncio.Event, *, reuse_port: bool = False, on_ready: Callable[[], None] | None = None) -> None:
    """Run the proxy and the publisher until ``stop`` is set; `on_ready()` once listening."""
    running = await start_server(proxy, host, port, reuse_port=reuse_port)
    publisher_task = asyncio.create_task(publisher.run()) if publisher is not None else None
    routes_task = asyncio.create_task(proxy.routes.run()) if proxy.routes is not None else None
    index = worker_index()
    worker = {"worker": index} if index is not None else {}
    log.info("tap listening", host=host, port=bound_port(running), upstream=proxy.upstream, **worker)
    # Everything allocated so far (modules, pydantic models, the CLI) lives as long as the process.
    # Frozen, it is no longer scanned by the collector: a full collection over it took 55 ms here,
    # a stall of every stream in flight at that moment; over what requests allocate it takes well
    # under 1 ms.
    gc.collect()
    gc.freeze()
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        if proxy.routes is not None:
            await proxy.routes.say_gone()  # before the drain: the controller stops counting this tap at once
        await cancel_and_wait(routes_task)
        await running.cleanup()
        if publisher_task is not None:
            await cancel_and_wait(publisher_task)
            if publisher is not None:
                publisher.drop_remaining()
