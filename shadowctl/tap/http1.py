"""The tap's HTTP/1.1 engine: asyncio protocols around httptools' C parser (llhttp).

Why not a framework: the tap forwards token streams, and its cost is per chunk. Through aiohttp's
server and an httpx client, a streamed answer of 17 chunks cost about 2.3 ms of the tap's CPU
(docs/outputs.md, "Tap overhead"): every chunk woke a task, went through two async iterators and
a stream writer. Here a chunk is handled inside the upstream connection's ``data_received``:
llhttp parses it, ``on_body`` writes it (framed) to the client's transport and hands it to the
recorder. No task, future or coroutine runs per chunk; each request has one task, which waits
for an upstream connection and for the answer to end.

What a proxy in the request path must get right, and how this one does it:

- Client side: HTTP/1.1 and 1.0, keep-alive (a connection is closed after ``client_idle_s``
  without a complete request: idle, or trickling one in), pipelined requests answered in order, ``Expect: 100-continue`` answered,
  request bodies by Content-Length or chunked, bounded by ``max_request_bytes`` (413).
  Upgrade and CONNECT are refused (501); a request that cannot be parsed gets 400; both close
  the connection.
- Upstream side: a pool of keep-alive connections to the one model server (http or https). A
  pooled connection is closed after ``upstream_idle_s`` idle (4 s: shorter than the 5 s
  keep-alive of uvicorn, which vLLM runs on, so that the tap closes an idle connection before the
  server does). If a reused connection is closed before any answer (the server closed it as
  idle while the request was on its way, unread), the request is sent again once, on a new
  connection, as Go's HTTP transport does; a new connection closed that way is a 502.
- Framing: Content-Length is kept; chunked and close-delimited answers go to the client chunked
  (HTTP/1.1) or close-delimited (HTTP/1.0). Body bytes are the upstream's (content encoding
  untouched); chunk boundaries are the upstream's reads, as through any proxy. 1xx interim
  answers are not forwarded (the tap reads the whole request body before sending it).
- Backpressure: while the client's socket buffer is full, reading from the upstream pauses.
- Failures: upstream unreachable, or gone before its status line: 502 with a JSON error. Gone
  mid-body: the client's connection is closed, so the client sees a broken response, never a
  short one that looks whole. Client gone: the upstream connection is closed, which tells the
  model server to stop generating.
- Shutdown (:meth:`TapServer.close`): the listener closes, idle clients are closed, requests in
  flight get ``drain_s`` to finish, then their connections are cut.

What is proxied, recorded and published is the :class:`Handler`'s business
(:class:`shadowctl.tap.proxy.TapProxy`); this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools
import structlog

from shadowctl.errors import ShadowctlError

log = structlog.get_logger(__name__)

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})

_REASONS = {
    200: b"OK", 400: b"Bad Request", 413: b"Payload Too Large", 501: b"Not Implemented",
    502: b"Bad Gateway", 503: b"Service Unavailable",
}

#: Pipelined requests parsed ahead of the one being answered before the tap stops reading.
MAX_PIPELINED = 8


class UpstreamUnavailable(ShadowctlError):
    """No connection to the upstream could be made (refused, unresolvable, timed out)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(slots=True)
class Request:
    """One request as the client sent it (hop-by-hop headers still in); the body is complete."""

    method: str
    target: bytes
    headers: Headers
    version: str
    keep_alive: bool
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (``name`` in lower case)."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class LocalResponse:
    """An answer the tap gives itself (its /metrics, its errors)."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"


class Recorder(Protocol):
    """What the handler learns of an answer as it passes (see :class:`shadowctl.tap.proxy.Trace`)."""

    def on_head(self, status: int, headers: Headers) -> None:
        """The status line and headers arrived (1xx excluded)."""

    def on_chunk(self, chunk: bytes, arrived: float) -> None:
        """A piece of the body, already sent to the client; ``arrived`` is ``perf_counter()`` on arrival."""

    def on_end(self, error: str | None, status: int | None) -> None:
        """The exchange is over: answered in full (``error`` None), or why not. ``status`` is set when
        no upstream status reached the client: 502 (the upstream failed before answering) or 499
        (the client left before the answer began, as nginx logs it)."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Send this request upstream; report what comes back to ``recorder``."""

    method: str
    target: bytes
    headers: Headers
    body: bytes
    recorder: Recorder | None
    upstream: str | None = None
    """Another upstream for this request (the candidate, when the tap routes a share to it); None: the tap's."""


class Handler(Protocol):
    """The tap's policy: what to do with a request, and what to record of it."""

    def route(self, request: Request) -> Forward | LocalResponse:
        """Answer locally, or forward (headers already filtered, request id set)."""

    def upstream_unreachable(self, request: Request, forward: Forward, error: UpstreamUnavailable) -> LocalResponse:
        """The 502 to send when no upstream connection could be made (and record it)."""


def local_response(status: int, body: bytes, content_type: bytes = b"application/json",
                   *, keep_alive: bool = True, head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 answer with Content-Length."""
    reason = _REASONS.get(status, b"Unknown")
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
            % (status, reason, content_type, len(body), b"" if keep_alive else b"connection: close\r\n"))
    return head if head_only else head + body


def error_body(message: str, kind: str) -> bytes:
    """An OpenAI-style error body."""
    return json.dumps({"error": {"message": f"shadowctl tap: {message}", "type": kind}}).encode()


def origin_form(target: bytes) -> bytes:
    """``/path?query`` of a request target; an absolute-form one (``http://host/path``, which a client
    configured to use the tap as its proxy sends) loses its scheme and authority."""
    if target.startswith((b"http://", b"https://")):
        rest = target.partition(b"://")[2]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        if slash < 0 or 0 <= query < slash:
            return b"/" + rest[query:] if query >= 0 else b"/"
        return rest[slash:]
    return target


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def end_to_end(headers: Headers, *, drop: frozenset[bytes] = frozenset()) -> Headers:
    """Headers minus hop-by-hop ones, those that ``Connection`` names, Content-Length and ``drop``."""
    listed = _connection_tokens(headers)
    out: Headers = []
    for key, value in headers:
        lk = key.lower()
        if lk in HOP_BY_HOP or lk in listed or lk == b"content-length" or lk in drop:
            continue
        out.append((key, value))
    return out


# ---------------------------------------------------------------------------------------- upstream


class _Answer(Protocol):
    """What an upstream connection reports an answer to: a user's :class:`_Exchange` or a mirror :class:`_Copy`."""

    answered: bool
    """The upstream began an answer (a status line, or part of one)."""

    def upstream_head(self, status: int, reason: bytes, headers: Headers) -> None:
        """The final status line and headers arrived."""

    def upstream_body(self, chunk: bytes) -> None:
        """A piece of the body arrived."""

    def upstream_done(self, *, keep_alive: bool) -> None:
        """The answer ended; the connection may be pooled again when `keep_alive`."""

    def upstream_lost(self) -> None:
        """The connection closed while this answer was expected or under way."""

    def upstream_failed(self, why: str) -> None:
        """The answer cannot be read (not HTTP); the connection is closed."""


class _UpstreamConn(asyncio.Protocol):
    """One connection to the model server; carries one exchange at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Answer | None = None
        self.closed = False
        self.uses = 0
        self.idle_timer: asyncio.TimerHandle | None = None
        self._reason = b""
        self._headers: Headers = []

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:  # bytes on an idle connection: the server broke the protocol
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # the tap never asks for 101
            exchange = self.exchange
            self.close()
            if exchange is not None:
                exchange.upstream_failed(f"invalid response from upstream ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reason = b""
        self._headers = []
        if self.exchange is not None:
            self.exchange.answered = True

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # interim answer (100 Continue, 103 Early Hints): not forwarded; the final one follows
        if self.exchange is not None:
            self.exchange.upstream_head(status, self._reason, self._headers)

    def on_body(self, chunk: bytes) -> None:
        if self.exchange is not None:
            self.exchange.upstream_body(chunk)

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:
            return
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_done(keep_alive=self.parser.should_keep_alive())

    # used by the pool and the exchange
    def send(self, exchange: _Answer, data: bytes) -> None:
        self.uses += 1
        self.exchange = exchange
        assert self.transport is not None
        self.transport.write(data)

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.transport is not None:
            self.transport.close()


class _Pool:
    """Keep-alive connections to one upstream, reused most-recent first."""

    def __init__(self, url: str, *, connect_timeout_s: float, idle_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ShadowctlError(f"--upstream {url!r}: expected http://HOST[:PORT] or https://HOST[:PORT]")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.netloc = parts.netloc.rpartition("@")[2].encode("idna")
        self.prefix = parts.path.rstrip("/").encode()
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        self.connect_timeout_s = connect_timeout_s
        self.idle_s = idle_s
        self.idle: list[_UpstreamConn] = []
        self.all: set[_UpstreamConn] = set()

    async def acquire(self, *, fresh: bool = False) -> _UpstreamConn:
        """A pooled connection (most recently used first), or a new one (always, with ``fresh``)."""
        while self.idle and not fresh:
            conn = self.idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if conn.usable():
                return conn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _UpstreamConn(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError as exc:
            raise UpstreamUnavailable("connect timeout", f"{self.host}:{self.port}") from exc
        except ssl.SSLError as exc:
            raise UpstreamUnavailable("TLS handshake failed", str(exc)) from exc
        except OSError as exc:
            raise UpstreamUnavailable("connect failed", f"{self.host}:{self.port}: {exc.strerror or exc}") from exc
        self.all.add(conn)
        return conn

    def release(self, conn: _UpstreamConn) -> None:
        if not conn.usable():
            return
        assert conn.transport is not None
        conn.transport.resume_reading()  # it may have been paused for a slow client
        conn.idle_timer = asyncio.get_running_loop().call_later(self.idle_s, conn.close)
        self.idle.append(conn)

    def forget(self, conn: _UpstreamConn) -> None:
        self.all.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close(self) -> None:
        for conn in list(self.all):
            conn.close()
        self.idle.clear()


# ---------------------------------------------------------------------------------------- exchange


_NO_BODY_STATUS = frozenset({204, 304})


class _Exchange:
    """One request forwarded upstream and its answer streamed back; ends by resolving ``done``."""

    def __init__(self, client: _ClientConn, request: Request, forward: Forward, pool: _Pool) -> None:
        self.client = client
        self.request = request
        self.recorder = forward.recorder
        self.pool = pool
        self.upstream: _UpstreamConn | None = None
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()  # True: send it again
        self.answered = False  # the upstream began an answer (a status line, or part of one)
        self.retried = False
        self.head_sent = False
        self.chunked = False  # re-framed as chunked to the client
        self.close_delimited = False  # the upstream's body ends when its connection does
        self.keep_client = request.keep_alive
        self.head_only = request.method == "HEAD"

    def start(self, conn: _UpstreamConn, data: bytes) -> None:
        self.upstream = conn
        if self.client.writing_paused:
            conn.transport.pause_reading()  # type: ignore[union-attr]
        conn.send(self, data)

    # from the upstream connection
    def upstream_head(self, status: int, reason: bytes, headers: Headers) -> None:
        length: bytes | None = None
        chunked_in = False
        for key, value in headers:
            lk = key.lower()
            if lk == b"content-length":
                length = value
            elif lk == b"transfer-encoding" and b"chunked" in value.lower():
                chunked_in = True
        has_body = not self.head_only and status not in _NO_BODY_STATUS
        out = end_to_end(headers)
        if length is not None and not chunked_in and (has_body or self.head_only or status == 304):
            out.append((b"content-length", length))
        elif has_body:
            self.close_delimited = not chunked_in
            if self.request.version == "1.1":
                self.chunked = True
                out.append((b"transfer-encoding", b"chunked"))
            else:
                self.keep_client = False  # an HTTP/1.0 client reads to the end of the connection
        if not self.keep_client:
            out.append((b"connection", b"close"))
        elif self.request.version == "1.0":
            out.append((b"connection", b"keep-alive"))
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason or _REASONS.get(status, b""))]
        head.extend(b"%s: %s\r\n" % kv for kv in out)
        head.append(b"\r\n")
        self.client.write(b"".join(head))
        self.head_sent = True
        if self.recorder is not None:
            self.recorder.on_head(status, headers)
        if self.head_only:  # llhttp cannot know that the answer to HEAD has no body
            conn, self.upstream = self.upstream, None
            if conn is not None:
                conn.exchange = None
                conn.close()
            self._finish(None)

    def upstream_body(self, chunk: bytes) -> None:
        arrived = time.perf_counter()
        if self.chunked:
            self.client.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self.client.write(chunk)
        if self.recorder is not None:
            self.recorder.on_chunk(chunk, arrived)

    def upstream_done(self, *, keep_alive: bool) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None:
            if keep_alive:
                self.pool.release(conn)
            else:
                conn.close()
        if self.chunked:
            self.client.write(b"0\r\n\r\n")
        self._finish(None)

    def upstream_lost(self) -> None:
        conn, self.upstream = self.upstream, None
        if self.done.done():
            return
        if conn is not None and conn.uses > 1 and not self.answered and not self.retried:
            # A reused connection closed before any answer: the server closed it as idle while the
            # request was on its way (it had read none of it). Sent again once, on a new connection.
            self.retried = True
            self.done.set_result(True)
            return
        if self.head_sent and self.close_delimited:  # the connection's end is the body's end
            if self.chunked:
                self.client.write(b"0\r\n\r\n")
            self._finish(None)
            return
        self.upstream_failed("upstream closed the connection" + (" mid-response" if self.head_sent else ""))

    def upstream_failed(self, why: str) -> None:
        if self.done.done():
            return
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.exchange = None
            conn.close()
        if self.head_sent:
            log.warning("upstream failed mid-response", error=why)
            self.client.abort()  # a broken response, not a short one that looks complete
        else:
            log.warning("upstream failed before answering", error=why)
            self.client.write(local_response(502, error_body(why, "upstream_unreachable"), keep_alive=False))
            self.keep_client = False
        self._finish(why, None if self.head_sent else 502)

    # from the client connection
    def client_lost(self) -> None:
        if self.done.done():
            return
        conn, self.upstream = self.upstream, None
        if conn is not None:  # the model server sees the connection close and stops generating
            conn.exchange = None
            conn.close()
        self._finish("client disconnected", None if self.head_sent else 499)

    def client_paused(self, paused: bool) -> None:
        conn = self.upstream
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            if paused:
                conn.transport.pause_reading()
            else:
                conn.transport.resume_reading()

    def _finish(self, error: str | None, status: int | None = None) -> None:
        if self.done.done():
            return
        if self.recorder is not None:
            try:
                self.recorder.on_end(error, status)
            except Exception:  # recording must never break the user's connection
                log.exception("recording the answer failed")
        self.done.set_result(False)


# ---------------------------------------------------------------------------------------- copies


class _Copy:
    """A request sent upstream with nobody waiting for the answer (a mirror copy): the answer only feeds the
    recorder. Ends by resolving ``done`` (True: send it again on a new connection); ``error`` says why it did
    not end in full (None: it did)."""

    __slots__ = ("answered", "close_delimited", "done", "error", "head_seen", "pool", "recorder", "retried",
                 "upstream")

    def __init__(self, pool: _Pool, recorder: Recorder | None) -> None:
        self.pool = pool
        self.recorder = recorder
        self.upstream: _UpstreamConn | None = None
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.answered = False
        self.retried = False
        self.head_seen = False
        self.close_delimited = False
        self.error: str | None = None

    def start(self, conn: _UpstreamConn, data: bytes) -> None:
        self.upstream = conn
        conn.send(self, data)

    def upstream_head(self, status: int, reason: bytes, headers: Headers) -> None:
        length = chunked = False
        for key, value in headers:
            lk = key.lower()
            if lk == b"content-length":
                length = True
            elif lk == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        self.close_delimited = not length and not chunked and status not in _NO_BODY_STATUS
        self.head_seen = True
        if self.recorder is not None:
            self.recorder.on_head(status, headers)

    def upstream_body(self, chunk: bytes) -> None:
        if self.recorder is not None:
            self.recorder.on_chunk(chunk, time.perf_counter())

    def upstream_done(self, *, keep_alive: bool) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None:
            if keep_alive:
                self.pool.release(conn)
            else:
                conn.close()
        self._finish(None)

    def upstream_lost(self) -> None:
        conn, self.upstream = self.upstream, None
        if self.done.done():
            return
        if conn is not None and conn.uses > 1 and not self.answered and not self.retried:
            self.retried = True  # a reused connection the server closed as idle: sent again once, as for users
            self.done.set_result(True)
            return
        if self.head_seen and self.close_delimited:
            self._finish(None)
            return
        self._finish("upstream closed the connection" + (" mid-response" if self.head_seen else ""))

    def upstream_failed(self, why: str) -> None:
        self.abandon(why)

    def abandon(self, why: str) -> None:
        """Stop reading (a timeout, the tap closing): the connection is closed, never pooled again."""
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.exchange = None
            conn.close()
        self._finish(why)

    def _finish(self, error: str | None) -> None:
        if not self.done.done():
            self.error = error
            self.done.set_result(False)


class CopyClient:
    """Sends mirror copies on keep-alive connections pooled per URL, through the same llhttp engine as the
    users' requests: no task, future or async iterator per chunk. The httpx client the tap used before cost
    about 3.3 ms of CPU per streamed copy of 17 chunks against about 1 ms for proxying the user's request
    (bench/tap/mirror.py), so under load the copies slowed the users' requests on the same event loop, and
    took long enough to fill the cap on copies in flight.

    The caller bounds the copies in flight (and so the connections: one per copy at most, idle ones closed
    after ``idle_s``)."""

    def __init__(self, *, connect_timeout_s: float = 5.0, idle_s: float = 4.0, timeout_s: float = 600.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_s = idle_s
        self.timeout_s = timeout_s
        self._pools: dict[str, _Pool] = {}

    def _pool(self, url: str) -> _Pool:
        pool = self._pools.get(url)
        if pool is None:
            pool = self._pools[url] = _Pool(url, connect_timeout_s=self.connect_timeout_s, idle_s=self.idle_s)
        return pool

    async def send(self, url: str, method: str, target: bytes, headers: Headers, body: bytes,
                   recorder: Recorder | None) -> str | None:
        """Send a copy to `url` (``http(s)://HOST[:PORT][/prefix]``) and read its whole answer, fed to `recorder`
        (``on_head`` and ``on_chunk``; ``on_end`` is the caller's). None when it was answered in full, else why
        not (unreachable, closed, not HTTP, no end within ``timeout_s``); raises only CancelledError."""
        try:
            pool = self._pool(url)
        except ShadowctlError as exc:
            return str(exc)
        data = _request_bytes(Forward(method, target, headers, body, None), pool)
        copy = _Copy(pool, recorder)
        again = False
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    conn = await pool.acquire(fresh=again)
                    copy.start(conn, data)
                    again = await copy.done
                    if not again:
                        return copy.error
                    copy.done = asyncio.get_running_loop().create_future()
        except UpstreamUnavailable as exc:
            return str(exc)
        except TimeoutError:
            copy.abandon(f"no complete answer within {self.timeout_s:g} s")
            return copy.error
        except asyncio.CancelledError:
            copy.abandon("cancelled")
            raise

    def close(self) -> None:
        """Close every pooled connection (copies still in flight are the caller's to cancel first)."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


# ---------------------------------------------------------------------------------------- client


class _ClientConn(asyncio.Protocol):
    """One client connection: parses requests, answers them in order."""

    def __init__(self, server: TapServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request | LocalResponse] = deque()
        self.task: asyncio.Task[None] | None = None
        self.exchange: _Exchange | None = None
        self.writing_paused = False
        self.reading_paused = False
        self.closed = False
        self.idle_timer: asyncio.TimerHandle | None = None
        # the request being parsed
        self._target = b""
        self._headers: Headers = []
        self._body: list[bytes] = []
        self._size = 0
        self._refused = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.server.clients.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(501, "upgrade and CONNECT are not supported", "not_implemented")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request ({exc})", "bad_request")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.clients.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.queue.clear()
        if self.exchange is not None:
            self.exchange.client_lost()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.exchange is not None:
            self.exchange.client_paused(True)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.exchange is not None:
            self.exchange.client_paused(False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._target = b""
        self._headers = []
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        limit = self.server.max_request_bytes
        for key, value in self._headers:
            lk = key.lower()
            if lk == b"content-length" and value.strip().isdigit() and int(value) > limit:
                self._refuse(413, f"request body over {limit} bytes", "request_too_large")
                return
            if lk == b"expect" and value.strip().lower() == b"100-continue":
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk: bytes) -> None:
        if self._refused:
            return
        self._size += len(chunk)
        if self._size > self.server.max_request_bytes:
            self._refuse(413, f"request body over {self.server.max_request_bytes} bytes", "request_too_large")
            return
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        method = self.parser.get_method().decode("ascii", "replace")
        if method == "CONNECT" or self.parser.should_upgrade():
            # llhttp hands the bytes after an upgrade request's head to the new protocol, body
            # included, so such a request cannot be forwarded as plain HTTP/1.1 either.
            self._refuse(501, "upgrade and CONNECT are not supported", "not_implemented")
            return
        headers = [(k, v) for k, v in self._headers if k.lower() != b"expect"]
        self.queue.append(Request(method, origin_form(self._target), headers, self.parser.get_http_version(),
                                  self.parser.should_keep_alive(), b"".join(self._body)))
        self._body = []
        if len(self.queue) > MAX_PIPELINED and self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._next()

    # serving
    def _refuse(self, status: int, message: str, kind: str) -> None:
        """Answer ``status`` after what is queued, then close; the rest of the input is ignored."""
        if self._refused:
            return
        self._refused = True
        self.queue.append(LocalResponse(status, error_body(message, kind)))
        self._next()

    def _next(self) -> None:
        if self.task is not None or self.closed:
            return
        if not self.queue:
            if self._refused or self.server.closing:
                self.close()
            else:
                self._arm_idle()
            return
        item = self.queue.popleft()
        if self.idle_timer is not None:  # armed while idle, so a request trickled in slowly still times out
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.reading_paused and len(self.queue) <= MAX_PIPELINED // 2 and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        self.task = asyncio.get_running_loop().create_task(self._serve(item))
        self.task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        self.task = None
        self.exchange = None
        if not task.cancelled() and task.exception() is not None:
            log.error("serving a request failed", error=repr(task.exception()))
            self.close()
            return
        self._next()

    async def _serve(self, item: Request | LocalResponse) -> None:
        if isinstance(item, LocalResponse):  # a refusal: the connection closes after it
            self.write(local_response(item.status, item.body, item.content_type, keep_alive=False))
            self.close()
            return
        request = item
        handler = self.server.handler
        routed = handler.route(request)
        if isinstance(routed, LocalResponse):
            self._answer_locally(request, routed)
            return
        pool = self.server.pool if routed.upstream is None else self.server.pool_for(routed.upstream)
        exchange = _Exchange(self, request, routed, pool)
        data = _request_bytes(routed, pool)
        self.exchange = exchange
        again = False
        while True:
            try:
                conn = await pool.acquire(fresh=again)
            except UpstreamUnavailable as exc:
                self.exchange = None
                self._answer_locally(request, handler.upstream_unreachable(request, routed, exc))
                return
            if self.closed:
                pool.release(conn)
                exchange.client_lost()
                return
            exchange.start(conn, data)
            again = await exchange.done
            if not again:
                break
            exchange.done = asyncio.get_running_loop().create_future()
        if not exchange.keep_client:
            self.close()

    def _answer_locally(self, request: Request, response: LocalResponse) -> None:
        keep = request.keep_alive and not self.server.closing
        self.write(local_response(response.status, response.body, response.content_type, keep_alive=keep,
                                  head_only=request.method == "HEAD"))
        if not keep:
            self.close()

    def _arm_idle(self) -> None:
        if self.idle_timer is None and not self.closed:
            self.idle_timer = asyncio.get_running_loop().call_later(self.server.client_idle_s, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self.idle_timer = None
        if self.task is None and not self.queue:
            self.close()

    # used by the exchange
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    @property
    def idle(self) -> bool:
        return self.task is None and not self.queue


def _request_bytes(forward: Forward, pool: _Pool) -> bytes:
    headers = forward.headers
    if not any(k.lower() == b"host" for k, _ in headers):
        headers = [(b"host", pool.netloc), *headers]
    lines = [b"%s %s%s HTTP/1.1\r\n" % (forward.method.encode("ascii"), pool.prefix, forward.target)]
    lines.extend(b"%s: %s\r\n" % kv for kv in headers)
    if forward.body or forward.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(b"content-length: %d\r\n" % len(forward.body))
    lines.append(b"\r\n")
    lines.append(forward.body)
    return b"".join(lines)


# ---------------------------------------------------------------------------------------- server


@dataclass
class TapServer:
    """The listening tap: :meth:`start`, then :meth:`close`."""

    handler: Handler
    upstream: str
    connect_timeout_s: float = 10.0
    upstream_idle_s: float = 4.0
    client_idle_s: float = 75.0
    max_request_bytes: int = 64 * 1024 * 1024
    drain_s: float = 10.0
    clients: set[_ClientConn] = field(default_factory=set)
    closing: bool = False
    _server: asyncio.Server | None = None
    pool: _Pool = field(init=False)
    other_pools: dict[str, _Pool] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.pool = _Pool(self.upstream, connect_timeout_s=self.connect_timeout_s, idle_s=self.upstream_idle_s)

    def pool_for(self, url: str) -> _Pool:
        """The connection pool of another upstream (made on first use; a handful at most: the candidate)."""
        pool = self.other_pools.get(url)
        if pool is None:
            pool = self.other_pools[url] = _Pool(url, connect_timeout_s=self.connect_timeout_s,
                                                 idle_s=self.upstream_idle_s)
        return pool

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Bind and listen; raises OSError as the socket call did."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ClientConn(self), host, port, backlog=1024, reuse_port=reuse_port or None,
        )

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            raise ShadowctlError("the tap is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, let requests in flight finish for up to ``drain_s``, then cut them."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for client in list(self.clients):
            if client.idle:
                client.close()
        busy = [c.task for c in self.clients if c.task is not None]
        if busy:
            await asyncio.wait(busy, timeout=self.drain_s)
        for client in list(self.clients):
            client.abort()  # their exchanges end as the connections are lost
        busy = [c.task for c in self.clients if c.task is not None]
        if busy:
            await asyncio.wait(busy, timeout=1.0)
        self.pool.close()
        for pool in self.other_pools.values():
            pool.close()
