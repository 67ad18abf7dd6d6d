"""The tap's upstream side and its streaming path (shadowctl.tap.http1), against a real upstream.

An inline aiohttp server plays the model server where the shared stub cannot: compressed event
streams, an upstream that dies mid-stream, long streams, and a client that sends no default
headers. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import pytest_asyncio
from aiohttp import web
from multidict import CIMultiDict
from tap_helpers import eventually, running_tap

from shadowctl.compare.events import Endpoint
from shadowctl.tap.extract import PARSE_BATCH_BYTES, ResponseAccumulator

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def token(text: str) -> bytes:
    return sse({"choices": [{"index": 0, "delta": {"content": text}}]})


class Upstream:
    """A one-route aiohttp server; ``seen`` keeps each request's headers."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen: list[CIMultiDict[str]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(CIMultiDict(request.headers))
        await request.read()
        return await self.handler(request)

    async def __aenter__(self) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = getattr(site, "_server", None)
        assert server is not None
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest_asyncio.fixture
async def cookie_upstream() -> AsyncIterator[Upstream]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok", headers={"Set-Cookie": "session=alice; Path=/"})

    async with Upstream(handler) as upstream:
        yield upstream


async def raw_request(url: str, request: bytes) -> bytes:
    """Send bytes exactly as given (no client library adds headers) and read the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=10)  # "Connection: close": read to EOF
    writer.close()
    return data


async def test_no_headers_are_added_and_no_cookies_kept(cookie_upstream: Upstream) -> None:
    async with running_tap(cookie_upstream.url) as tap:
        answer = await raw_request(
            tap.url,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: chat\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\n{}",
        )
        assert answer.startswith(b"HTTP/1.1 200") and b"session=alice" in answer
        first = cookie_upstream.seen[-1]
        # httpx and aiohttp would both add these to a request that lacks them; a proxy must not
        for name in ("Accept", "Accept-Encoding", "User-Agent", "Cookie"):
            assert name not in first, name
        assert first["Host"] == "chat" and "x-request-id" in first
        async with httpx.AsyncClient() as client:  # another user, after the Set-Cookie above
            await client.get(tap.url + "/other", headers={"accept-encoding": "identity"})
        second = cookie_upstream.seen[-1]
        assert "Cookie" not in second  # the tap kept no cookie jar
        assert second["Accept-Encoding"] == "identity"  # the client's own header, unchanged


async def test_gzip_event_stream_passes_raw_and_is_recorded() -> None:
    body = b"".join([token("Bonjour"), token(" le"), token(" monde"), b"data: [DONE]\n\n"])
    packed = gzip.compress(body)

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"})
        await response.prepare(request)
        for i in range(0, len(packed), 7):  # compressed bytes in small pieces
            await response.write(packed[i : i + 7])
        await response.write_eof()
        return response

    async with Upstream(handler) as upstream, running_tap(upstream.url) as tap:
        async with (
            httpx.AsyncClient() as client,
            client.stream(
                "POST", tap.url + "/v1/chat/completions", json={"model": "m", "stream": True, "messages": []}
            ) as r,
        ):
            raw = b"".join([chunk async for chunk in r.aiter_raw()])
        assert r.headers["content-encoding"] == "gzip"
        assert raw == packed  # not decompressed on the way
        labels = {"variant": "primary", "model": "m"}
        await eventually(lambda: tap.sample("shadowctl_tap_time_to_first_token_seconds_count", labels) == 1)
        assert tap.sample("shadowctl_tap_output_tokens_sum", labels) == 3  # counted content chunks


async def test_upstream_dying_mid_stream_breaks_the_users_response() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path != "/v1/chat/completions":
            return web.Response(text="ok")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(token("partial"))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # no terminating chunk: the body is cut short
        return response

    async with Upstream(handler) as upstream, running_tap(upstream.url) as tap, httpx.AsyncClient() as client:

        async def read_all() -> None:
            async with client.stream(
                "POST", tap.url + "/v1/chat/completions", json={"model": "m", "stream": True, "messages": []}
            ) as r:
                async for _ in r.aiter_raw():
                    pass

        with pytest.raises(httpx.RemoteProtocolError):  # a broken response, not a short "complete" one
            await read_all()
        # and the next request still works (the broken upstream connection was not pooled)
        r2 = await client.get(tap.url + "/health")
        assert r2.status_code == 200


async def test_long_stream_parsed_in_batches_after_the_first_token() -> None:
    n = 3 * PARSE_BATCH_BYTES // len(token("word 000000"))  # several batches of deferred parsing
    chunks = [token(f" w{i}") for i in range(n)] + [b"data: [DONE]\n\n"]
    acc = ResponseAccumulator(Endpoint.chat, event_stream=True, content_encoding=None, max_chars=10**7)
    firsts = []
    for chunk in chunks:
        firsts.append(acc.feed(chunk))
        assert len(acc._buffer) < PARSE_BATCH_BYTES + len(chunk)  # memory stays bounded
    assert firsts.index(True) == 0 and firsts.count(True) == 1
    info = acc.finish()
    assert info.output == "".join(f" w{i}" for i in range(n)) and info.output_tokens == n
    # CRLF line ends after the first token take the general path and give the same answer
    crlf = ResponseAccumulator(Endpoint.chat, event_stream=True, content_encoding=None, max_chars=10**7)
    for chunk in [
        token("a"),
        token("b").replace(b"\n", b"\r\n"),
        b"data: ",
        b'{"choices":[{"delta":{"content":"c"}}]}',
        b"\r\n\r\n",
    ]:
        crlf.feed(chunk)
    assert crlf.finish().output == "abc"

