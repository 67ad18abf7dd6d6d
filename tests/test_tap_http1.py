"""The tap's HTTP/1.1 engine (shadowctl.tap.http1) at the byte level, through the real TapProxy.

Clients are raw sockets (so pipelining, HTTP/1.0, Expect and malformed input can be sent as
written); upstreams are raw asyncio servers scripted per test (close-delimited bodies, interim
1xx answers, garbage, slow readers), or the shared OpenAI stub. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from openai_stub import OpenAIStub
from tap_helpers import eventually, running_tap

from shadowctl.tap.http1 import origin_form

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


class RawUpstream:
    """A TCP server that runs ``script`` per connection; counts connections, keeps request heads."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.disconnected = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.disconnected.set()
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.bodies.append(body)
        return body

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._run, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


async def read_response(reader: asyncio.StreamReader, *, head_only: bool = False) -> tuple[bytes, bytes]:
    """One response off a raw connection, within 10 s (a proxy that misframes fails fast, not hangs)."""
    async with asyncio.timeout(10):
        return await _read_response(reader, head_only=head_only)


async def _read_response(reader: asyncio.StreamReader, *, head_only: bool) -> tuple[bytes, bytes]:
    """(head, de-chunked body); body to EOF when close-delimited."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if head_only or b" 204 " in head.split(b"\r\n")[0] or b" 100 " in head.split(b"\r\n")[0]:
        return head, b""
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += data[:-2]
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head, await reader.readexactly(int(line.split(b":", 1)[1]))
    return head, await reader.read()


@pytest_asyncio.fixture
async def raw_client() -> AsyncIterator[Callable[[str], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]]:
    writers: list[asyncio.StreamWriter] = []

    async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writers.append(writer)
        return reader, writer

    yield connect
    for writer in writers:
        writer.close()


def post(path: bytes, body: bytes, *, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/%s\r\nhost: model\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        path, version, len(body), extra, body)


async def test_pipelined_requests_are_answered_in_order_on_one_upstream_connection(raw_client) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await upstream.read_request(reader)
            await asyncio.sleep(0.05 if body == b"first" else 0)  # the first answer is the slowest
            writer.write(ok(b"answer to " + body))

    async with RawUpstream(echo) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        writer.write(post(b"/x", b"first") + post(b"/x", b"second") + post(b"/x", b"third"))
        bodies = [(await read_response(reader))[1] for _ in range(3)]
        assert bodies == [b"answer to first", b"answer to second", b"answer to third"]
        assert upstream.connections == 1  # kept alive and reused


async def test_close_delimited_upstream_body_is_rechunked_for_http11_and_streamed_to_eof_for_http10(
    raw_client,
) -> None:
    payload = b"x" * 70_000 + "é".encode()

    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n")
        for i in range(0, len(payload), 10_000):
            writer.write(payload[i:i + 10_000])
            await writer.drain()
        writer.close()

    async with RawUpstream(close_delimited) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        writer.write(post(b"/x", b"{}"))
        head, body = await read_response(reader)
        assert b"transfer-encoding: chunked" in head.lower() and body == payload
        writer.write(post(b"/x", b"{}"))  # and the client's connection is still usable
        assert (await read_response(reader))[1] == payload

        reader, writer = await raw_client(tap.url)
        writer.write(post(b"/x", b"{}", version=b"1.0"))
        head, body = await read_response(reader)
        assert b"chunked" not in head.lower() and b"connection: close" in head.lower() and body == payload


async def test_chunked_request_body_goes_upstream_with_its_length_and_expect_is_answered(raw_client) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await upstream.read_request(reader)
        writer.write(ok(body))

    async with RawUpstream(echo) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: model\r\ntransfer-encoding: chunked\r\n"
                     b"expect: 100-continue\r\n\r\n")
        interim, _ = await read_response(reader)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        half = len(CHAT) // 2
        writer.write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, CHAT[:half], len(CHAT) - half, CHAT[half:]))
        _, body = await read_response(reader)
        assert body == CHAT and upstream.bodies == [CHAT]
        sent = upstream.heads[0].lower()
        assert b"content-length: %d" % len(CHAT) in sent
        assert b"transfer-encoding" not in sent and b"expect" not in sent and b"x-request-id:" in sent


async def test_interim_1xx_answers_are_not_forwarded(raw_client) -> None:
    async def early_hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + ok(b"final"))

    async with RawUpstream(early_hints) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        writer.write(post(b"/x", b"{}"))
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 OK") and body == b"final"


async def test_head_answer_has_no_body_and_the_connection_goes_on(raw_client) -> None:
    async def with_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await upstream.read_request(reader)
            if upstream.heads[-1].startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
            else:
                writer.write(ok(b"after"))

    async with RawUpstream(with_length) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        writer.write(b"HEAD /v1/models HTTP/1.1\r\nhost: model\r\n\r\n")
        head, _ = await read_response(reader, head_only=True)
        assert b"content-length: 1234" in head.lower()
        writer.write(post(b"/x", b"{}"))
        assert (await read_response(reader))[1] == b"after"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n", b"501"),
        (b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com\r\n\r\n", b"501"),
        (post(b"/v1/chat/completions", b"y" * 2048), b"413"),
    ],
    ids=["malformed", "upgrade", "connect", "too-large"],
)
async def test_refused_requests_get_a_json_error_and_a_closed_connection(
    raw_client, stub: OpenAIStub, request_bytes: bytes, status: bytes,
) -> None:
    async with running_tap(stub.url, max_request_bytes=1024) as tap:
        reader, writer = await raw_client(tap.url)
        writer.write(request_bytes)
        head, body = await read_response(reader)
        assert head.split(b" ")[1] == status
        assert json.loads(body)["error"]["message"].startswith("shadowctl tap:")
        assert await reader.read() == b""  # closed
        assert stub.seen == []  # nothing reached the model server


async def test_client_gone_mid_stream_closes_the_upstream_and_is_recorded(raw_client) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            await asyncio.sleep(0.01)

    async with RawUpstream(endless) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        writer.write(post(b"/v1/chat/completions", CHAT))
        await reader.readuntil(b"tok")
        writer.close()
        await asyncio.wait_for(upstream.disconnected.wait(), 5)  # the model server stops generating
        labels = {"variant": "primary", "model": "m", "code": "200"}
        await eventually(lambda: tap.sample("shadowctl_tap_requests_total", labels) == 1)


async def test_slow_client_pauses_the_upstream_instead_of_buffering(raw_client) -> None:
    total = 64 * 1024 * 1024
    sent = [0]

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n"
                     % total)
        block = b"z" * 65536
        while sent[0] < total:
            writer.write(block)
            await writer.drain()
            sent[0] += len(block)

    async with RawUpstream(firehose) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        writer.write(post(b"/x", b"{}"))
        await asyncio.sleep(1.0)  # the client reads nothing for a second
        held = sent[0]
        assert held < total // 2, f"the upstream sent {held} bytes to a client that read none"
        _, body = await read_response(reader)
        assert len(body) == total and sent[0] == total


async def test_idle_upstream_connection_closed_by_the_server_is_not_reused(raw_client) -> None:
    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(ok(b"fine"))  # keep-alive by the headers, but the server closes right after
        await writer.drain()

    async with RawUpstream(one_per_connection) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        for _ in range(3):
            writer.write(post(b"/x", b"{}"))
            assert (await read_response(reader))[1] == b"fine"
            await asyncio.sleep(0.1)  # the close reaches the tap before the next request
        assert upstream.connections == 3


@pytest.mark.parametrize("answer", [b"SPDY/9 nonsense\r\n\r\n",
                                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\n"],
                         ids=["garbage", "unasked-101"])
async def test_upstream_garbage_before_the_head_is_a_502(raw_client, answer: bytes) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(1)

    async with RawUpstream(garbage) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        writer.write(post(b"/v1/chat/completions", CHAT))
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 502") and json.loads(body)["error"]["type"] == "upstream_unreachable"
        labels = {"variant": "primary", "model": "m", "code": "502"}
        await eventually(lambda: tap.sample("shadowctl_tap_requests_total", labels) == 1)


async def test_client_gone_before_the_answer_is_recorded_as_499(raw_client) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        await reader.read()  # never answers; returns when the tap closes the connection
        upstream.disconnected.set()

    async with RawUpstream(silent) as upstream, running_tap(upstream.url) as tap:
        _reader, writer = await raw_client(tap.url)
        writer.write(post(b"/v1/chat/completions", CHAT))
        await eventually(lambda: len(upstream.bodies) == 1)
        writer.close()
        await asyncio.wait_for(upstream.disconnected.wait(), 5)
        labels = {"variant": "primary", "model": "m", "code": "499"}
        await eventually(lambda: tap.sample("shadowctl_tap_requests_total", labels) == 1)


async def test_shutdown_lets_a_stream_in_flight_finish_and_refuses_new_connections(stub: OpenAIStub) -> None:
    stub.hold_after_first_chunk = True
    async with running_tap(stub.url) as tap, httpx.AsyncClient() as client:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with client.stream("POST", tap.url + "/v1/chat/completions", json=body) as r:
            chunks = r.aiter_raw()
            first = await anext(chunks)
            assert first
            server = tap.running.server
            closing = asyncio.create_task(server.close())
            await asyncio.sleep(0.2)
            assert not closing.done()  # draining: the stream is still in flight
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", int(tap.url.rsplit(":", 1)[1]))
            stub.release.set()
            rest = b"".join([c async for c in chunks])
            assert rest.endswith(b"data: [DONE]\n\n")
        await asyncio.wait_for(closing, 5)


async def test_absolute_form_target_and_empty_request_id(raw_client) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await upstream.read_request(reader)
            writer.write(ok(b"{}"))

    async with RawUpstream(echo) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        writer.write(b"POST http://model.example/v1/chat/completions?x=1 HTTP/1.1\r\nhost: model.example\r\n"
                     b"x-request-id: \r\ncontent-length: %d\r\n\r\n%s" % (len(CHAT), CHAT))
        await read_response(reader)
        head = upstream.heads[0]
        assert head.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
        ids = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
        assert len(ids) == 1 and len(ids[0].split(b":", 1)[1].strip()) == 32  # one, generated


def test_origin_form() -> None:
    assert origin_form(b"/v1/models?a=b") == b"/v1/models?a=b"
    assert origin_form(b"http://h:8/v1/x?q=1") == b"/v1/x?q=1"
    assert origin_form(b"https://h") == b"/"
    assert origin_form(b"http://h?q=1") == b"/?q=1"
    assert origin_form(b"*") == b"*"


async def test_a_connection_without_a_complete_request_is_closed_after_the_idle_time(
    raw_client, stub: OpenAIStub,
) -> None:
    async with running_tap(stub.url, client_idle_s=0.3) as tap:
        idle_reader, _ = await raw_client(tap.url)
        trickle_reader, trickle = await raw_client(tap.url)
        trickle.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: m\r\n")  # and never the rest
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        assert await asyncio.wait_for(trickle_reader.read(), 5) == b""
        busy_reader, busy = await raw_client(tap.url)  # a complete request in time is answered
        busy.write(post(b"/v1/chat/completions", CHAT))
        head, _ = await read_response(busy_reader)
        assert head.startswith(b"HTTP/1.1 200")


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % len(data) for c in cuts} - {0})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=20, deadline=None)
@given(client_cuts=st.lists(st.integers(1, 10_000), max_size=6),
       upstream_cuts=st.lists(st.integers(1, 10_000), max_size=6))
def test_byte_boundaries_do_not_matter(client_cuts: list[int], upstream_cuts: list[int]) -> None:
    """Two pipelined requests (the second with a chunked body) and a chunked event stream, each cut
    into pieces sent 2 ms apart at arbitrary byte offsets: the same bytes arrive either way."""
    tokens = [f" tök{i}" for i in range(8)]
    events = b"".join(b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % t.encode() for t in tokens)
    events += b"data: [DONE]\n\n"
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in _pieces(events, [17, 100, 333])) + b"0\r\n\r\n"
    stream = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + framed
    second = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "ünï"}]}).encode()
    client_bytes = post(b"/v1/chat/completions", CHAT) + (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: model\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second))

    async def scenario() -> None:
        async def streamer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await upstream.read_request(reader)
                for piece in _pieces(stream, upstream_cuts):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.002)

        async with RawUpstream(streamer) as upstream, running_tap(upstream.url) as tap:
            reader, writer = await asyncio.open_connection("127.0.0.1", int(tap.url.rsplit(":", 1)[1]))
            try:
                for piece in _pieces(client_bytes, client_cuts):
                    writer.write(piece)
                    await asyncio.sleep(0.002)
                bodies = [(await asyncio.wait_for(read_response(reader), 10))[1] for _ in range(2)]
            finally:
                writer.close()
            assert bodies == [events, events]
            assert upstream.bodies == [CHAT, second]
            labels = {"variant": "primary", "model": "m"}
            await eventually(lambda: tap.sample("shadowctl_tap_output_tokens_sum", labels) == 16)

    asyncio.run(scenario())


async def test_reused_connection_closed_before_answering_is_retried_once_on_a_new_one(raw_client) -> None:
    async def closes_when_reused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(ok(b"first on this connection"))
        await upstream.read_request(reader)  # the second request is read, then the server goes away

    async with RawUpstream(closes_when_reused) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        for _ in range(2):
            writer.write(post(b"/x", b"{}"))
            assert (await read_response(reader))[1] == b"first on this connection"
        assert upstream.connections == 2 and len(upstream.bodies) == 3  # the second request went twice


async def test_new_connection_closed_before_answering_is_a_502_not_a_retry(raw_client) -> None:
    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)

    async with RawUpstream(never_answers) as upstream, running_tap(upstream.url) as tap:
        reader, writer = await raw_client(tap.url)
        writer.write(post(b"/x", b"{}"))
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 502") and len(upstream.bodies) == 1
