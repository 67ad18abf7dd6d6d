"""An httpx transport that sends requests with aiohttp's client (its HTTP parser is written in C).

The tap keeps httpx as its client API (``httpx.Request`` in, ``httpx.Response`` out), but httpx's
default transport, httpcore with the pure-Python h11 parser, costs several times more CPU per
streamed chunk than aiohttp's client; under a few hundred concurrent streams that difference is
what saturates the sidecar's core. aiohttp is already a dependency (the tap's server side), so
this costs no new package. (The ``httpx-aiohttp`` package does the same; this one is smaller
and does what a transparent proxy needs:)

- bytes are passed on raw: no decompression (``auto_decompress=False``), so the user gets the
  upstream's bytes exactly;
- no headers are invented: aiohttp's automatic ``Accept``, ``Accept-Encoding`` and
  ``User-Agent`` are skipped, so a request without them reaches the model server without them;
- no cookie jar: a ``Set-Cookie`` from the model server to one user is never sent upstream on
  another user's request;
- the URL is sent as httpx encoded it (no re-quoting);
- aiohttp's errors become httpx's (``ConnectError``, ``ConnectTimeout``, ``ReadError``,
  ``RemoteProtocolError``), so callers handle only ``httpx.HTTPError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
from multidict import CIMultiDict
from yarl import URL

#: Headers aiohttp would add to a request that lacks them; a transparent proxy adds none.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")


def _mapped(exc: BaseException, *, connecting: bool) -> httpx.TransportError:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return httpx.ConnectTimeout(str(exc)) if connecting else httpx.ReadTimeout(str(exc))
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc) or type(exc).__name__)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(str(exc) or type(exc).__name__)
    return httpx.ReadError(str(exc) or type(exc).__name__)


class _ResponseStream(httpx.AsyncByteStream):
    """The upstream body as it arrives (transfer decoding done, content encoding kept)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _mapped(exc, connecting=False) from exc

    async def aclose(self) -> None:
        # A fully read body has already released its connection to the pool; one closed early
        # cannot be reused (the rest of the body would still arrive on it), so it is closed.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx transport over one aiohttp session (created on first use, in the running loop)."""

    def __init__(self, *, connect_timeout_s: float, keepalive_s: float = 60.0, max_connections: int = 0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.max_connections = max_connections  # 0: no limit
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, limit_per_host=0, keepalive_timeout=self.keepalive_s, ttl_dns_cache=10
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
                trust_env=False,
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._get_session()
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw)
        body = request.content  # the tap always sends a body it has read in full
        try:
            response = await session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _mapped(exc, connecting=True) from exc
        extensions: dict[str, object] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", "replace")
        return httpx.Response(
            status_code=response.status,
            headers=list(response.raw_headers),
            stream=_ResponseStream(response),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
