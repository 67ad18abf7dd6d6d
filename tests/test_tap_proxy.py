"""The tap as a reverse proxy: transparency, request ids, metrics, events and mirroring.

The upstream is an OpenAI-compatible stub written for these tests (tests/openai_stub.py); the
broker is a real Mosquitto. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import TYPE_CHECKING

import httpx
import pytest
from openai_stub import OpenAIStub
from tap_helpers import collecting, eventually, free_port, running_tap

from shadowctl.compare.events import Endpoint, Variant, parse_event
from shadowctl.tap.extract import ResponseAccumulator, parse_request
from shadowctl.tap.proxy import MirrorConfig, is_shadow_request, mirror_selected, rewrite_body

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker


CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "Capital of France?"}]}


async def test_plain_body_status_and_headers_pass_through(stub: OpenAIStub) -> None:
    async with running_tap(stub.url) as tap, httpx.AsyncClient() as client:
        r = await client.post(tap.url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        assert r.content == stub.body("chat")
        assert r.headers["x-stub"] == "json"
        assert r.headers["content-length"] == str(len(stub.body("chat")))
        r = await client.get(tap.url + "/echo?x=1", headers={"X-Custom": "v", "Proxy-Authorization": "secret",
                                                              "x-request-id": "rid-123"})
        seen = stub.seen[-1]
        assert seen.path == "/echo?x=1"
        assert seen.headers["X-Custom"] == "v"
        assert seen.headers["x-request-id"] == "rid-123"
        assert "Proxy-Authorization" not in seen.headers  # hop-by-hop
        assert r.headers.get_list("x-multi") == ["a"] and r.headers["set-cookie"] == "x=1"
        r = await client.get(tap.url + "/v1/models")  # any other path passes through
        assert r.status_code == 404 and r.text == "no such path"


async def test_request_id_is_generated_and_sent_upstream(stub: OpenAIStub) -> None:
    async with running_tap(stub.url) as tap, httpx.AsyncClient() as client:
        await client.post(tap.url + "/v1/chat/completions", json=CHAT)
        rid = stub.seen[-1].headers["x-request-id"]
        assert len(rid) == 32 and int(rid, 16) >= 0


async def test_stream_chunks_arrive_before_upstream_finishes(stub: OpenAIStub) -> None:
    stub.hold_after_first_chunk = True
    expected = b"".join(stub.chunks("chat"))
    first = stub.chunks("chat")[0]
    async with running_tap(stub.url) as tap, httpx.AsyncClient() as client:
        async with client.stream("POST", tap.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
            received = bytearray()
            chunks = r.aiter_raw()
            while len(received) < len(first):
                # A buffering proxy would hang here (the upstream waits for us): fail instead.
                received += await asyncio.wait_for(anext(chunks), timeout=10)
            # The upstream is still holding the rest of the answer: the tap did not buffer.
            assert not stub.finished.is_set()
            assert bytes(received) == first
            stub.release.set()
            async for chunk in chunks:
                received += chunk
        assert bytes(received) == expected


@pytest.mark.parametrize("code", [400, 404, 429, 500, 503])
async def test_upstream_errors_pass_through(stub: OpenAIStub, code: int) -> None:
    async with running_tap(stub.url) as tap, httpx.AsyncClient() as client:
        r = await client.post(tap.url + f"/status/{code}", content=b"{}")
        assert r.status_code == code and r.content == b'{"error":"as asked"}' and r.headers["x-stub"] == "status"


async def test_connection_refused_is_502_and_recorded() -> None:
    async with running_tap(f"http://127.0.0.1:{free_port()}") as tap, httpx.AsyncClient() as client:
        r = await client.post(tap.url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 502
        assert r.json()["error"]["type"] == "upstream_unreachable"
        labels = {"variant": "primary", "model": "stub-model", "code": "502"}
        assert tap.sample("shadowctl_tap_requests_total", labels) == 1


async def test_metrics_are_exposed(stub: OpenAIStub) -> None:
    async with running_tap(stub.url) as tap, httpx.AsyncClient() as client:
        await client.post(tap.url + "/v1/chat/completions", json={**CHAT, "stream": True})
        await client.post(tap.url + "/v1/chat/completions", json=CHAT)
        text = (await client.get(tap.url + "/metrics")).text
        labels = 'model="stub-model",variant="primary"'
        assert f"shadowctl_tap_time_to_first_token_seconds_count{{{labels}}} 1.0" in text  # streamed only
        assert f"shadowctl_tap_e2e_request_latency_seconds_count{{{labels}}} 2.0" in text
        # 6 words: from usage in the stream's last chunk, and from usage in the JSON body
        assert f"shadowctl_tap_output_tokens_sum{{{labels}}} 12.0" in text


async def test_events_published_per_request(stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    stub.tool_call = {"name": "lookup", "arguments": {"city": "Paris"}}
    async with (
        running_tap(stub.url, broker=(mosquitto.host, mosquitto.port)) as tap,
        collecting(mosquitto.host, mosquitto.port, "shadowctl/outputs/ns/chat/#") as got,
        httpx.AsyncClient() as client,
    ):
        await client.post(tap.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={"x-request-id": "req-1"})
        await client.post(tap.url + "/v1/completions", json={"model": "m", "prompt": "Say hi"},
                          headers={"x-request-id": "req-2", "host": "chat-shadow:8080"})
        await client.post(tap.url + "/v1/embeddings", json={"model": "e", "input": "x"})
        await client.get(tap.url + "/health")  # not an API call: no event
        await eventually(lambda: len(got.messages) >= 3, what="three events")
        events = {e.request_id: e for e in map(parse_event, got.messages)}
        chat = events["req-1"]
        assert chat.variant is Variant.primary and not chat.shadow and chat.service == "ns/chat"
        assert chat.output == stub.answer and chat.stream and chat.finish_reason == "stop"
        assert chat.tool_calls is not None and chat.tool_calls[0].name == "lookup"
        assert json.loads(chat.tool_calls[0].arguments) == {"city": "Paris"}
        assert chat.usage is not None and chat.usage.completion_tokens == 6 and chat.output_tokens == 6
        assert chat.ttft_s is not None and chat.ttft_s <= chat.e2e_s
        assert chat.prompt == "user: Capital of France?"
        assert chat.prompt_hash == parse_request(Endpoint.chat, json.dumps(CHAT).encode()).prompt_hash
        comp = events["req-2"]
        assert comp.shadow and comp.endpoint is Endpoint.completions and comp.output == stub.answer
        assert comp.ttft_s is None and comp.model == "m"
        assert sum(1 for e in events.values() if e.endpoint is Endpoint.embeddings) == 1
        assert tap.sample("shadowctl_tap_events_published_total") == 3


async def test_redacted_prompts(stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    async with (
        running_tap(stub.url, broker=(mosquitto.host, mosquitto.port), redact_prompts=True) as tap,
        collecting(mosquitto.host, mosquitto.port, tap.topic) as got,
        httpx.AsyncClient() as client,
    ):
        await client.post(tap.url + "/v1/chat/completions", json=CHAT)
        await eventually(lambda: len(got.messages) == 1)
        event = parse_event(got.messages[0])
        assert event.prompt is None and len(event.prompt_hash) == 64 and event.output == stub.answer


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_traceparent_is_copied_into_the_event(stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    """A valid W3C traceparent reaches the event (and the upstream, unchanged); an invalid one is ignored
    and then the event has no `traceparent` key at all, as a tap before the field wrote it."""
    async with (
        running_tap(stub.url, broker=(mosquitto.host, mosquitto.port)) as tap,
        collecting(mosquitto.host, mosquitto.port, tap.topic) as got,
        httpx.AsyncClient() as client,
    ):
        await client.post(tap.url + "/v1/chat/completions", json=CHAT,
                          headers={"x-request-id": "traced", "traceparent": TRACEPARENT})
        assert stub.seen[-1].headers["traceparent"] == TRACEPARENT
        bad = {"zeros": "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
               "upper": TRACEPARENT.upper(), "short": "00-4bf92f35-00f067aa0ba902b7-01",
               "ff": "ff" + TRACEPARENT[2:], "tail": TRACEPARENT + "-x"}
        for rid, value in bad.items():
            await client.post(tap.url + "/v1/chat/completions", json=CHAT,
                              headers={"x-request-id": rid, "traceparent": value})
        await client.post(tap.url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": "untraced"})
        await eventually(lambda: len(got.messages) >= 2 + len(bad), what="the events")
        raw = {json.loads(m)["request_id"]: m for m in got.messages}
        assert parse_event(raw["traced"]).traceparent == TRACEPARENT
        assert json.loads(raw["traced"])["traceparent"] == TRACEPARENT
        for rid in [*bad, "untraced"]:
            assert parse_event(raw[rid]).traceparent is None
            assert "traceparent" not in json.loads(raw[rid]), rid


async def test_application_level_mirror(stub: OpenAIStub) -> None:
    candidate = OpenAIStub(answer="Paris.")
    await candidate.start()
    mirror = MirrorConfig(url=candidate.url, percent=100, host="chat-candidate.ns", model="cand-model",
                          temperature=0.0, seed=7)
    try:
        async with running_tap(stub.url, mirror=mirror) as tap, httpx.AsyncClient() as client:
            r = await client.post(tap.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                                  headers={"x-request-id": "m-1"})
            assert r.content == b"".join(stub.chunks("chat"))  # the user still gets the primary's answer
            await eventually(lambda: len(candidate.seen) == 1, what="the mirror copy")
            copy = candidate.seen[0]
            assert copy.headers["x-request-id"] == "m-1"
            assert copy.headers["x-shadowctl-shadow"] == "1"
            assert copy.headers["Host"] == "chat-candidate.ns"
            body = json.loads(copy.body)
            assert body["model"] == "cand-model" and body["temperature"] == 0.0 and body["seed"] == 7
            assert body["messages"] == CHAT["messages"]
            await eventually(lambda: tap.sample("shadowctl_tap_mirror_requests_total", {"outcome": "sent"}) == 1)
            # a request that is itself a shadow copy is never mirrored again
            await client.post(tap.url + "/v1/chat/completions", json=CHAT, headers={"x-shadowctl-shadow": "1"})
            await client.get(tap.url + "/health")  # nor are non-API paths
            assert len(candidate.seen) == 1
    finally:
        await candidate.stop()


class _HeldCandidate(asyncio.Protocol):
    """A candidate that answers each request only once ``release`` is set; ``connections`` counts its connections."""

    connections = 0
    release: asyncio.Event

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).connections += 1
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                       if line.startswith(b"content-length:")), 0)
        if sep and len(rest) >= length:
            self.buf = rest[length:]
            asyncio.get_running_loop().create_task(self._answer())

    async def _answer(self) -> None:
        await type(self).release.wait()
        body = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"Lyon."}}]}'
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"  # type: ignore[attr-defined]
                             % (len(body), body))


async def test_mirror_copies_are_counted_and_never_hold_the_user(stub: OpenAIStub) -> None:
    """Copies go through the tap's own engine (http1.CopyClient): a copy over the cap is not sent and is counted
    (dropped_in_flight_cap), the user's answer never waits for a copy, a finished copy's connection is reused
    (keep-alive), and a candidate that is gone counts failed copies while users are still answered."""
    _HeldCandidate.connections, _HeldCandidate.release = 0, asyncio.Event()
    server = await asyncio.get_running_loop().create_server(_HeldCandidate, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    mirror = MirrorConfig(url=url, percent=100, max_in_flight=1)

    def count(tap: object, outcome: str) -> float:
        return tap.sample("shadowctl_tap_mirror_requests_total", {"outcome": outcome})  # type: ignore[attr-defined]

    try:
        async with running_tap(stub.url, mirror=mirror) as tap, httpx.AsyncClient() as client:
            for i in (1, 2):  # the first copy is held by the candidate: the second one is over the cap
                r = await client.post(tap.url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": f"c{i}"})
                assert r.status_code == 200 and b"Lyon" not in r.content  # the primary's answer, at once
            assert count(tap, "dropped_in_flight_cap") == 1 and count(tap, "sent") == 0
            _HeldCandidate.release.set()
            await eventually(lambda: count(tap, "sent") == 1, what="the held copy answered")
            await client.post(tap.url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": "c3"})
            await eventually(lambda: count(tap, "sent") == 2, what="the third copy")
            assert _HeldCandidate.connections == 1  # the second copy went on the first one's connection
            server.close()
            await server.wait_closed()
            tap.proxy.copies.close()  # type: ignore[union-attr]  # its pooled connection too: the candidate is gone
            r = await client.post(tap.url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": "c4"})
            assert r.status_code == 200
            await eventually(lambda: count(tap, "failed") == 1, what="the copy to a gone candidate counted")
    finally:
        server.close()


def test_shadow_detection_and_mirror_selection() -> None:
    assert is_shadow_request("chat.ns.svc.cluster.local-shadow", None)
    assert is_shadow_request("chat-shadow:8080", None)
    assert is_shadow_request("chat:8080-shadow", None)
    assert is_shadow_request("chat", "1")
    assert not is_shadow_request("chat:8080", None)
    assert not is_shadow_request(None, "0")
    ids = [f"id-{i}" for i in range(4000)]
    share = sum(mirror_selected(i, 25) for i in ids) / len(ids)
    assert 0.22 < share < 0.28
    assert all(mirror_selected(i, 100) for i in ids[:10]) and not any(mirror_selected(i, 0) for i in ids[:10])
    assert [mirror_selected(i, 25) for i in ids[:50]] == [mirror_selected(i, 25) for i in ids[:50]]
    m = MirrorConfig(url="http://x", percent=1)
    assert rewrite_body(b"not json", MirrorConfig(url="http://x", percent=1, model="m")) == b"not json"
    assert rewrite_body(b'{"a": 1}', m) == b'{"a": 1}'


def test_accumulator_handles_split_events_gzip_and_truncation() -> None:
    stub = OpenAIStub(answer="héllo wörld 東京")
    data = b"".join(stub.chunks("chat")).replace(b"\n\n", b"\r\n\r\n", 2)
    acc = ResponseAccumulator(Endpoint.chat, event_stream=True, content_encoding=None, max_chars=1000)
    firsts = [acc.feed(data[i:i + 1]) for i in range(len(data))]  # one byte at a time
    assert firsts.count(True) == 1
    info = acc.finish()
    assert info.output == "héllo wörld 東京" and info.finish_reason == "stop" and info.output_tokens == 3
    body = stub.body("completions")
    gz = ResponseAccumulator(Endpoint.completions, event_stream=False, content_encoding="gzip", max_chars=5)
    packed = gzip.compress(body)
    gz.feed(packed[:10])
    gz.feed(packed[10:])
    out = gz.finish()
    assert out.output == "héllo" and out.truncated
    br = ResponseAccumulator(Endpoint.chat, event_stream=False, content_encoding="br", max_chars=5)
    br.feed(b"\x00")
    assert br.finish().error is not None


async def test_deeply_nested_json_still_reaches_the_user_and_the_event(stub: OpenAIStub,
                                                                       mosquitto: MosquittoBroker) -> None:
    """A request body nested 100,000 levels deep (valid JSON the decoder cannot recurse through): the upstream
    gets it and the user its answer, as for any body; the event hashes the raw bytes (before: RecursionError
    inside the tap's parsing). The stub answers 400, as a server that cannot read the body does."""
    deep = b"[" * 100_000 + b"]" * 100_000
    async with (
        running_tap(stub.url, broker=(mosquitto.host, mosquitto.port)) as tap,
        collecting(mosquitto.host, mosquitto.port, "shadowctl/outputs/ns/chat/#") as got,
        httpx.AsyncClient() as client,
    ):
        r = await client.post(tap.url + "/v1/chat/completions", content=deep,
                              headers={"content-type": "application/json", "x-request-id": "deep-1"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "invalid JSON body"
        assert stub.seen[-1].body == deep
        await eventually(lambda: len(got.messages) >= 1, what="the event")
        event = parse_event(got.messages[0])
        assert event.request_id == "deep-1" and event.prompt is None and event.status == 400
        assert event.prompt_hash == parse_request(Endpoint.chat, deep).prompt_hash
    nested = ResponseAccumulator(Endpoint.chat, event_stream=True, content_encoding=None, max_chars=100)
    nested.feed(b"data: " + deep + b"\n\n")
    assert nested.finish().output == ""


def test_tool_calls_share_the_output_budget_and_odd_shapes_are_ignored() -> None:
    """Streamed tool-call names and arguments count against max_chars like text (before: unbounded, the
    tap held a 1 MB argument whole), at most MAX_TOOL_CALLS indices are kept, and a `tool_calls` that is
    not a list is ignored (before: TypeError, the answer's event lost; found by bench/fuzz)."""
    from shadowctl.tap.extract import MAX_TOOL_CALLS

    def sse(delta: dict[str, object]) -> bytes:
        return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta}]}).encode() + b"\n\n"

    acc = ResponseAccumulator(Endpoint.chat, event_stream=True, content_encoding=None, max_chars=1000)
    acc.feed(sse({"content": "x" * 400}))
    for _ in range(100):
        acc.feed(sse({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "a" * 10_000}}]}))
    acc.feed(sse({"tool_calls": True}))
    acc.feed(sse({"tool_calls": 1}))
    info = acc.finish()
    assert info.truncated and info.tool_calls is not None
    assert len(info.output) + sum(len(c.name) + len(c.arguments) for c in info.tool_calls) == 1000
    many = ResponseAccumulator(Endpoint.chat, event_stream=True, content_encoding=None, max_chars=100_000)
    for i in range(1000):
        many.feed(sse({"tool_calls": [{"index": i, "function": {"name": "f", "arguments": "{}"}}]}))
    calls = many.finish().tool_calls
    assert calls is not None and len(calls) == MAX_TOOL_CALLS
