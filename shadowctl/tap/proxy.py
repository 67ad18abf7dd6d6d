"""The `shadowctl tap` reverse proxy: a sidecar in front of an OpenAI-compatible model server.

Server side is aiohttp (already a dependency of the demo tooling, mature, and
its ``StreamResponse.write`` sends each chunk as it comes, which is what
streamed tokens need); the client side is an httpx transport (httpx.Request in,
httpx.Response out, whose ``aiter_raw`` gives the upstream bytes exactly as
sent: compressed bodies stay compressed) built on aiohttp
(:mod:`shadowctl.tap.transport`: aiohttp's C HTTP parser needs a fraction of
httpcore's CPU per streamed chunk), called without an ``httpx.AsyncClient``
around it, whose layers would all be no-ops for a proxy. Mirror copies go
through an ``httpx.AsyncClient``.

The work on the user's path is kept small: the request is forwarded before its
body is parsed for the event (prompt hash, model), and after the first output
token a streamed chunk is only forwarded and copied; parsing, metrics and the
event happen once the response has ended.

What the proxy guarantees, and why it is built this way:

- Transparency: status, headers (minus hop-by-hop ones) and body bytes go
  through unchanged; the incoming Host is kept (the upstream is the pod's own
  model server, and Host-based routing in front of the tap must still work
  when the tap is bypassed). Chunks are written as they arrive, never buffered.
- User traffic never waits for MQTT: events are offered to a bounded queue
  after the response is done (see :mod:`shadowctl.tap.publisher`).
- ``x-request-id`` is kept, or generated and sent upstream, so that Istio's
  mirror copy (same id) can be paired with the original.
- Application-level mirroring (for Knative, which cannot mirror) sends a copy
  of the *request* to the candidate concurrently with the primary request;
  it is fire-and-forget with a cap on copies in flight, and a request is
  chosen by a hash of its id, so a retried request is mirrored consistently.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import structlog
from aiohttp import ClientConnectionResetError, web

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.events import SCHEMA_VERSION, Endpoint, OutputEvent, Variant
from shadowctl.errors import ShadowctlError
from shadowctl.tap.extract import RequestInfo, ResponseAccumulator, classify, parse_request
from shadowctl.tap.metrics import CONTENT_TYPE, TapMetrics
from shadowctl.tap.publisher import EventPublisher
from shadowctl.tap.transport import AiohttpTransport
from shadowctl.tap.workers import worker_index

log = structlog.get_logger(__name__)

SHADOW_HEADER = "x-shadowctl-shadow"
REQUEST_ID_HEADER = "x-request-id"

_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})


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


@dataclass(frozen=True, slots=True)
class TapConfig:
    """Everything the proxy needs besides its publisher."""

    upstream: str
    variant: Variant
    namespace: str
    service: str
    topic: str
    redact_prompts: bool = False
    max_output_chars: int = 200_000
    max_request_bytes: int = 64 * 1024 * 1024
    metrics_path: str = "/metrics"
    mirror: MirrorConfig | None = None
    upstream_connect_timeout_s: float = 10.0


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
    """Whether a request id falls in the mirrored share (stable for a given id)."""
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    bucket = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big") % 1_000_000
    return bucket < percent * 10_000


def rewrite_body(body: bytes, mirror: MirrorConfig) -> bytes:
    """The mirror copy's body: `model`, `temperature`, `seed` set when configured; else unchanged bytes."""
    if mirror.model is None and mirror.temperature is None and mirror.seed is None:
        return body
    try:
        data = json.loads(body)
    except ValueError:
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


def _request_headers(request: web.BaseRequest) -> list[tuple[str, str]]:
    listed = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    return [
        (k, v) for k, v in request.headers.items()
        if (lk := k.lower()) not in _HOP_BY_HOP and lk not in listed and lk != "content-length"
    ]


class TapProxy:
    """The request handler, the upstream client and the mirror; :meth:`app` builds the aiohttp application."""

    def __init__(self, config: TapConfig, publisher: EventPublisher | None, metrics: TapMetrics) -> None:
        self.config = config
        self.publisher = publisher
        self.metrics = metrics
        self.upstream = config.upstream.rstrip("/")
        # The user's request goes straight to the transport (httpx.Request in, httpx.Response out).
        # An AsyncClient's layers would all be no-ops or harmful here: a proxy follows no redirect,
        # adds no default header (Accept-Encoding, User-Agent) and keeps no cookie (a Set-Cookie for
        # one user must not ride on another's request); they cost CPU on every request and chunk.
        self.transport = AiohttpTransport(connect_timeout_s=config.upstream_connect_timeout_s, keepalive_s=60.0)
        self.mirror_client: httpx.AsyncClient | None = None
        if config.mirror is not None:
            self.mirror_client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=config.mirror.max_in_flight),
                timeout=httpx.Timeout(connect=5.0, read=600.0, write=30.0, pool=1.0),
                trust_env=False,
            )
        self._mirror_tasks: set[asyncio.Task[None]] = set()

    def app(self) -> web.Application:
        """The aiohttp application: every path and method goes to :meth:`handle`."""
        application = web.Application(client_max_size=self.config.max_request_bytes)
        application.router.add_route("*", "/{tail:.*}", self.handle)
        application.on_cleanup.append(self._cleanup)
        return application

    async def _cleanup(self, _app: web.Application) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel mirror copies in flight and close the HTTP clients."""
        for task in list(self._mirror_tasks):
            task.cancel()
        if self._mirror_tasks:
            await asyncio.gather(*self._mirror_tasks, return_exceptions=True)
        await self.transport.aclose()
        if self.mirror_client is not None:
            await self.mirror_client.aclose()

    # ------------------------------------------------------------------ handler

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        started_at = time.time()
        if request.path == self.config.metrics_path and request.method in ("GET", "HEAD"):
            return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
        body = await request.read()
        headers = _request_headers(request)
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        if REQUEST_ID_HEADER not in request.headers:
            headers.append((REQUEST_ID_HEADER, request_id))
        endpoint = classify(request.method, request.path)
        shadow = is_shadow_request(request.headers.get("host"), request.headers.get(SHADOW_HEADER))
        mirror = self.config.mirror
        if mirror is not None and endpoint is not None and not shadow and mirror_selected(request_id, mirror.percent):
            self._send_mirror(request.raw_path, headers, body, mirror)

        url = self.upstream + request.raw_path
        try:
            upstream = await self.transport.handle_async_request(
                httpx.Request(request.method, url, headers=headers, content=body))
        except httpx.HTTPError as exc:
            log.warning("upstream unreachable", url=url, error=str(exc))
            failure = web.json_response(
                {"error": {"message": f"shadowctl tap: upstream unreachable: {type(exc).__name__}",
                           "type": "upstream_unreachable"}},
                status=502,
            )
            if endpoint is not None:
                self._record(endpoint, parse_request(endpoint, body), request_id, shadow, None, 502, started_at, t0,
                             None, error=f"upstream unreachable: {type(exc).__name__}")
            return failure

        acc: ResponseAccumulator | None = None
        if endpoint is not None:
            acc = ResponseAccumulator(
                endpoint,
                event_stream=upstream.headers.get("content-type", "").startswith("text/event-stream"),
                content_encoding=upstream.headers.get("content-encoding"),
                max_chars=self.config.max_output_chars,
            )
        response = web.StreamResponse(status=upstream.status_code, reason=upstream.reason_phrase or None)
        listed = {t.strip().lower() for t in upstream.headers.get("connection", "").split(",")}
        for key, value in upstream.headers.multi_items():
            lk = key.lower()
            if lk in _HOP_BY_HOP or lk in listed or lk == "content-length":
                continue
            response.headers.add(key, value)
        length = upstream.headers.get("content-length")
        if length is not None and length.isdigit():
            response.content_length = int(length)
        ttft: float | None = None
        error: str | None = None
        try:
            await response.prepare(request)
            async for chunk in upstream.aiter_raw():
                if ttft is None and acc is not None:
                    arrived = time.perf_counter()
                    await response.write(chunk)  # the user's bytes first; parsing for the event after
                    if acc.feed(chunk):
                        ttft = arrived - t0
                else:
                    await response.write(chunk)
                    if acc is not None:
                        acc.feed(chunk)  # after the first token only a copy: parsed at the end
            await response.write_eof()
        except (ClientConnectionResetError, ConnectionResetError, asyncio.CancelledError) as exc:
            error = "client disconnected"
            if isinstance(exc, asyncio.CancelledError):
                self._finish(acc, endpoint, body, request_id, shadow, upstream.status_code, started_at, t0, ttft,
                             error)
                raise
        except httpx.HTTPError as exc:
            error = f"upstream failed mid-response: {type(exc).__name__}"
            log.warning("upstream failed mid-response", url=url, error=str(exc))
            if request.transport is not None:
                request.transport.close()  # the client must see a broken response, not a short one
        finally:
            await upstream.aclose()
        self._finish(acc, endpoint, body, request_id, shadow, upstream.status_code, started_at, t0, ttft, error)
        return response

    def _finish(
        self, acc: ResponseAccumulator | None, endpoint: Endpoint | None, body: bytes,
        request_id: str, shadow: bool, status: int, started_at: float, t0: float, ttft: float | None,
        error: str | None,
    ) -> None:
        if acc is None or endpoint is None:
            return
        self._record(endpoint, parse_request(endpoint, body), request_id, shadow, acc, status, started_at, t0, ttft,
                     error=error)

    def _record(
        self, endpoint: Endpoint, info: RequestInfo, request_id: str, shadow: bool,
        acc: ResponseAccumulator | None, status: int, started_at: float, t0: float, ttft: float | None,
        *, error: str | None,
    ) -> None:
        e2e = time.perf_counter() - t0
        out = acc.finish() if acc is not None else None
        tokens = out.output_tokens if out is not None else None
        self.metrics.observe(model=info.model, status=status, ttft_s=ttft, e2e_s=e2e, output_tokens=tokens)
        if self.publisher is None:
            return
        try:
            event = OutputEvent(
                schema=SCHEMA_VERSION,
                request_id=request_id[:256],
                variant=self.config.variant,
                shadow=shadow,
                service=f"{self.config.namespace}/{self.config.service}",
                endpoint=endpoint,
                model=info.model,
                stream=acc.event_stream if acc is not None else False,
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
                started_at=started_at,
                ttft_s=ttft,
                e2e_s=e2e,
            )
        except ValueError as exc:  # pydantic's ValidationError; a bug here must never fail the request
            log.error("cannot build output event", error=str(exc))
            self.metrics.events_dropped.labels("invalid").inc()
            return
        self.publisher.offer(self.config.topic, event.to_json())

    # ------------------------------------------------------------------ mirror

    def _send_mirror(self, raw_path: str, headers: list[tuple[str, str]], body: bytes, mirror: MirrorConfig) -> None:
        if len(self._mirror_tasks) >= mirror.max_in_flight:
            self.metrics.mirrored.labels("dropped_in_flight_cap").inc()
            return
        host = mirror.host or urlsplit(mirror.url).netloc
        copy = [(k, v) for k, v in headers if k.lower() not in ("host", SHADOW_HEADER)]
        copy += [("host", host), (SHADOW_HEADER, "1")]
        task = asyncio.create_task(self._mirror(mirror.url.rstrip("/") + raw_path, copy, rewrite_body(body, mirror)))
        self._mirror_tasks.add(task)
        task.add_done_callback(self._mirror_tasks.discard)

    async def _mirror(self, url: str, headers: list[tuple[str, str]], body: bytes) -> None:
        assert self.mirror_client is not None
        try:
            async with self.mirror_client.stream("POST", url, headers=headers, content=body) as response:
                async for _ in response.aiter_raw():
                    pass
            self.metrics.mirrored.labels("sent").inc()
        except httpx.HTTPError as exc:
            self.metrics.mirrored.labels("failed").inc()
            log.debug("mirror copy failed", url=url, error=str(exc))


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`, or `:PORT` for all interfaces) into (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise TapError(f"--listen {value!r}: expected HOST:PORT, e.g. 0.0.0.0:8080")
    return (host.strip("[]") or "0.0.0.0"), int(port)


async def start_server(proxy: TapProxy, host: str, port: int, *, reuse_port: bool = False) -> web.AppRunner:
    """Bind and start serving; the caller cleans up the returned runner. `reuse_port`: share the port with
    other processes that set it too (SO_REUSEPORT; the kernel spreads connections across them)."""
    runner = web.AppRunner(proxy.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise TapError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner listens on (useful with port 0)."""
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    raise TapError("the tap is not listening")


async def serve(proxy: TapProxy, publisher: EventPublisher | None, host: str, port: int,
                stop: asyncio.Event, *, reuse_port: bool = False, on_ready: Callable[[], None] | None = None) -> None:
    """Run the proxy and the publisher until ``stop`` is set; `on_ready()` once listening."""
    runner = await start_server(proxy, host, port, reuse_port=reuse_port)
    publisher_task = asyncio.create_task(publisher.run()) if publisher is not None else None
    index = worker_index()
    worker = {"worker": index} if index is not None else {}
    log.info("tap listening", host=host, port=bound_port(runner), upstream=proxy.upstream, **worker)
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if publisher_task is not None:
            await cancel_and_wait(publisher_task)
            if publisher is not None:
                publisher.drop_remaining()
