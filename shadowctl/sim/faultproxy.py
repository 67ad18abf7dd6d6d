"""A fault-injecting HTTP proxy in front of the real kube-apiserver, for tests and fault campaigns.

The API server itself never answers 429 on demand, never cuts a watch when
asked, and cannot be made slow, so those faults are injected at the boundary
between a client and the server: the client talks plain HTTP to this proxy on
a loopback port (with its own bearer token, passed through unchanged), the
proxy talks HTTPS to the API server. Everything not faulted is forwarded byte
for byte, watches as a stream. Conflicts (409) are not faked here; tests get
them from a real second writer.

Faults, each for requests that match a verb (``get``, ``list``, ``watch``,
``create``, ``update``, ``patch``, ``delete``) and a path regex:

* :meth:`fail_next`: answer the next N with a status (and ``Retry-After``);
* :meth:`set_latency`: delay every answer;
* :meth:`cut_watches`: drop every open watch stream at once;
* :meth:`expire_watches`: answer watches from an older resourceVersion with
  the ERROR event (410 Expired) kube-apiserver sends once etcd has compacted
  that revision. The real server's watch cache makes a real compaction's 410
  depend on its history size, which a test cannot pin, hence the injection.

The proxy runs on its own thread and event loop so that a test may call the
API server synchronously (or block) without stalling it. It counts every
request per verb and keeps a bounded log of them.
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from shadowctl.sim.errors import SimError

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
     "transfer-encoding", "upgrade", "host", "content-length"}
)


def _names_an_object(path: str) -> bool:
    """Whether a REST path names one object (``.../plural/name[/subresource]``), not a collection."""
    segments = path.strip("/").split("/")
    rest = segments[2:] if segments[:1] == ["api"] else segments[3:]
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]  # /namespaces/<ns>/<plural>...: a namespaced resource
    return len(rest) >= 2


def verb_of(method: str, path: str, query: dict[str, str]) -> str:
    """The Kubernetes verb of an HTTP request: ``get``/``list``/``watch``/``create``/``update``/``patch``/``delete``."""
    if method == "GET":
        if query.get("watch") in ("true", "1"):
            return "watch"
        return "get" if _names_an_object(path) else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())


RESET = 0
"""The status a :class:`Fault` (and a :class:`RequestRecord`) carries for a dropped connection."""


@dataclass
class Fault:
    """Answer the next ``remaining`` matching requests with ``status``."""

    remaining: int
    status: int
    verb: str | None
    path: re.Pattern[str] | None
    retry_after: int | None

    def matches(self, verb: str, path: str) -> bool:
        return (self.verb is None or self.verb == verb) and (self.path is None or bool(self.path.search(path)))


@dataclass(frozen=True)
class RequestRecord:
    """One proxied request: verb, method, path with query, and the status answered."""

    verb: str
    method: str
    path: str
    status: int


_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 410: "Gone",
    422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
}


def status_body(code: int, message: str) -> dict[str, Any]:
    """A ``meta/v1`` Status, as kube-apiserver writes for an error."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": _REASONS.get(code, "Unknown"), "code": code}


class FaultProxy:
    """Plain HTTP on ``127.0.0.1`` to the API server at ``upstream`` (HTTPS, verified with ``ca_file``)."""

    def __init__(self, upstream: str, ca_file: str, *, log_size: int = 10_000) -> None:
        self.upstream = upstream.rstrip("/")
        self._ca_file = ca_file
        self._faults: list[Fault] = []
        self._latency: dict[str | None, float] = {}
        self._expire_before: int | None = None
        self._lock = threading.Lock()
        self.verb_counts: Counter[str] = Counter()
        self.request_log: collections.deque[RequestRecord] = collections.deque(maxlen=log_size)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._streams: dict[int, web.Request] = {}  # by id(): a web.Request is unhashable

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ----------------------------------------------------------------- faults

    def fail_next(
        self, count: int, status: int = 500, *, verb: str | None = None, path: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next ``count`` requests matching ``verb`` and the ``path`` regex with ``status``."""
        with self._lock:
            self._faults.append(Fault(count, status, verb, re.compile(path) if path else None, retry_after))

    def reset_next(self, count: int, *, verb: str | None = None, path: str | None = None) -> None:
        """Drop the connection of the next ``count`` matching requests without any answer (a TCP reset)."""
        self.fail_next(count, RESET, verb=verb, path=path)

    def set_latency(self, seconds: float, *, verb: str | None = None) -> None:
        """Delay answers to ``verb`` (every verb when None) by ``seconds``; 0 removes the delay."""
        with self._lock:
            if seconds <= 0:
                self._latency.pop(verb, None)
            else:
                self._latency[verb] = seconds

    def cut_watches(self) -> None:
        """Drop every open watch stream (the client sees its connection end mid-stream)."""
        loop = self._loop
        if loop is None:
            return
        done = threading.Event()

        def cut() -> None:
            for stream in list(self._streams.values()):
                if stream.transport is not None:
                    stream.transport.close()
            self._streams.clear()
            done.set()

        loop.call_soon_threadsafe(cut)
        done.wait(5)

    def expire_watches(self, before: int) -> None:
        """From now on, a watch from a resourceVersion lower than ``before`` gets 410 Expired."""
        with self._lock:
            self._expire_before = before

    def reset(self) -> None:
        """Remove every fault and the latency; clear the counts and the log."""
        with self._lock:
            self._faults.clear()
            self._latency.clear()
            self._expire_before = None
            self.verb_counts.clear()
            self.request_log.clear()

    def reset_counts(self) -> None:
        """Clear the per-verb counts and the request log (faults stay)."""
        with self._lock:
            self.verb_counts.clear()
            self.request_log.clear()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> str:
        """Start the proxy's thread; returns its URL."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="kube-fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise SimError(f"fault proxy cannot start: {failure[0]}")
        return self.url

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)
        self._loop = None

    async def _serve(self) -> None:
        context = ssl.create_default_context(cafile=self._ca_file)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # ----------------------------------------------------------------- proxying

    def _take_fault(self, verb: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.matches(verb, path):
                    fault.remaining -= 1
                    return fault
            self._faults = [f for f in self._faults if f.remaining > 0]
        return None

    def _record(self, verb: str, request: web.Request, status: int) -> None:
        with self._lock:
            self.verb_counts[verb] += 1
            self.request_log.append(RequestRecord(verb, request.method, request.path_qs, status))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        verb = verb_of(request.method, request.path, dict(request.query))
        with self._lock:
            delay = self._latency.get(verb, self._latency.get(None, 0.0))
            expire = self._expire_before
        if delay:
            await asyncio.sleep(delay)
        fault = self._take_fault(verb, request.path)
        if fault is not None:
            self._record(verb, request, fault.status)
            if fault.status == RESET:
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=500)  # never sent: the connection is gone
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            return web.json_response(status_body(fault.status, f"injected by the fault proxy: {fault.status}"),
                                     status=fault.status, headers=headers)
        if verb == "watch" and expire is not None:
            rv = request.query.get("resourceVersion", "")
            if rv.isdigit() and 0 < int(rv) < expire:
                self._record(verb, request, 200)
                gone = status_body(410, f"too old resource version: {rv} ({expire})")
                gone["reason"] = "Expired"
                return web.json_response({"type": "ERROR", "object": gone})
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        assert self._session is not None
        try:
            upstream = await self._session.request(
                request.method, self.upstream + request.path_qs, data=body or None, headers=headers,
                allow_redirects=False,
            )
        except aiohttp.ClientError as exc:
            self._record(verb, request, 502)
            return web.json_response(status_body(503, f"fault proxy: upstream unreachable: {exc}"), status=503)
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers[key] = value
            if verb != "watch":
                data = await upstream.read()
                response.content_length = len(data)
                # Recorded before the answer leaves: a client that has its answer finds it in the log.
                self._record(verb, request, upstream.status)
                await response.prepare(request)
                await response.write(data)
                await response.write_eof()
                return response
            await response.prepare(request)
            self._record(verb, request, upstream.status)
            self._streams[id(request)] = request
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionResetError, aiohttp.ClientError, RuntimeError):
                pass
            finally:
                self._streams.pop(id(request), None)
            return response
        finally:
            upstream.release()
