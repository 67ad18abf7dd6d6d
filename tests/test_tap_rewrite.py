"""Candidates as request rewrites (#18 item 1, the ``model`` rewrite): route settings v2 through real taps.

Nothing is mocked: the controller's side is :class:`~shadowctl.routers.tap.TapRouter` on a real Mosquitto
(publishing and confirming the settings), the taps are the real proxy with its ``RouteFollower`` (two replicas of
the primary's tap, in this process), the upstream is the OpenAI stub (it records every request's bytes and headers)
or the simulated vLLM server serving a LoRA adapter (answers that depend on the model name asked for), and the output
events come back over the broker. An "old" tap is the route channel's parser as first committed (16891e1), loaded
from git: what a tap that knows only v1 settings does with a v2 one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
import httpx
import pytest
from openai_stub import OpenAIStub
from tap_helpers import eventually
from test_controller_tap import NAME, NS, RunningTap, running_tap

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.events import OutputEvent, Variant
from shadowctl.compare.routing import ROUTE_SCHEMA, Rewrite, in_share, parse_setting, user_bucket_key
from shadowctl.routers.base import RouteState
from shadowctl.routers.tap import CandidateShape, ChannelSettings, TapChannel, TapRouter, setting_for
from shadowctl.sim.modelserver import ModelKnobs, SimModelServer
from shadowctl.sim.prompts import reference_answer

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

POLICY = f"{NS}/{NAME}"
ADAPTER = "summarize-lora-v2"
# Spacing, key order, escapes, non-ASCII, numbers of every kind: only `model` may change, once.
BODY = (b'{ "model" : "base",\n "messages": [{"role": "user", "content": "r\\u00e9sum\xc3\xa9 \\"this\\""}],'
        b' "temperature": 0.7, "top_p": 1, "max_tokens": 64, "user": "USER",'
        b' "metadata": {"n": [1, 2.5e3, -0.0, null, true], "s": "\\ud83d\\ude00"}}')


def rewritten(body: bytes, model: str) -> bytes:
    """What the upstream must receive: the body parsed once and serialized once with `model` replaced."""
    data = json.loads(body)
    data["model"] = model
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def router(broker: MosquittoBroker, shape: CandidateShape) -> TapRouter:
    channel = TapChannel(ChannelSettings(broker.host, broker.port), NS, NAME)
    return TapRouter(channel, NS, NAME, 10.0, None, shape=shape)


@contextlib.asynccontextmanager
async def events(broker: MosquittoBroker) -> AsyncIterator[list[OutputEvent]]:
    seen: list[OutputEvent] = []
    ready = asyncio.Event()

    async def loop() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as client:
            await client.subscribe(f"shadowctl/outputs/{NS}/{NAME}/+", qos=1)
            ready.set()
            async for message in client.messages:
                if isinstance(message.payload, bytes):
                    seen.append(OutputEvent.model_validate_json(message.payload))

    task = asyncio.create_task(loop())
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        yield seen
    finally:
        await cancel_and_wait(task)


@contextlib.asynccontextmanager
async def two_taps(upstream: str, broker: MosquittoBroker) -> AsyncIterator[tuple[RunningTap, RunningTap]]:
    async with (running_tap(upstream, broker, Variant.primary, tap_id="tap-a") as a,
                running_tap(upstream, broker, Variant.primary, tap_id="tap-b") as b):
        yield a, b


def body_for(user: str, *, stream: bool = False) -> bytes:
    data = json.loads(BODY)
    data["user"] = user
    data["stream"] = stream
    return json.dumps(data).encode()  # the client's own spacing (": ", ", ") and escapes


@pytest.mark.parametrize("stream", [False, True], ids=["json", "streamed"])
async def test_shadow_copies_carry_the_rewritten_model_byte_for_byte(mosquitto: MosquittoBroker, stub: OpenAIStub,
                                                                     stream: bool) -> None:
    """Mirror 100% with rewrite.model and no candidate URL: each request reaches the same upstream twice, the
    user's bytes unchanged, the copy with only `model` replaced (serialized once, Content-Length its length,
    marked x-shadowctl-shadow: 1); the user gets the primary's answer; the tap publishes both answers, the
    copy's as variant candidate, shadow, model the adapter's."""
    sent = BODY.replace(b"}}", b'}, "stream": true}') if stream else BODY
    async with two_taps(stub.url, mosquitto) as (a, _), events(mosquitto) as seen:
        applied = await router(mosquitto, CandidateShape(Rewrite(model=ADAPTER), sticky=True)).apply(
            RouteState(100, 0, 100.0))
        assert applied.state.mirror_percent == 100.0
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            answer = await client.post(a.url + "/v1/chat/completions", content=sent,
                                       headers={"content-type": "application/json", "x-request-id": "req-1"})
        assert answer.status_code == 200 and "Paris" in answer.text
        await eventually(lambda: len(stub.seen) == 2, what="the copy reached the upstream")
        users = [s for s in stub.seen if "x-shadowctl-shadow" not in s.headers]
        copies = [s for s in stub.seen if s.headers.get("x-shadowctl-shadow") == "1"]
        assert len(users) == 1 and len(copies) == 1
        assert users[0].body == sent  # the user's request untouched
        copy = copies[0]
        assert copy.body == rewritten(sent, ADAPTER)
        assert int(copy.headers["content-length"]) == len(copy.body)
        assert copy.headers["x-request-id"] == "req-1"
        await eventually(lambda: len(seen) == 2, what="both events published")
    by_variant = {e.variant: e for e in seen}
    assert by_variant[Variant.primary].shadow is False and by_variant[Variant.primary].model == "base"
    candidate = by_variant[Variant.candidate]
    assert candidate.shadow is True and candidate.model == ADAPTER and candidate.request_id == "req-1"
    assert candidate.stream is stream and "Paris" in candidate.output


async def test_canary_share_is_sticky_per_user_and_equal_on_two_replicas(mosquitto: MosquittoBroker,
                                                                         stub: OpenAIStub) -> None:
    """Candidate 20%, rewrite.model: a user's requests go the same way on both replicas, whatever the request id;
    the users routed are exactly those the one hash puts in the share; a routed request reaches the upstream with
    only `model` rewritten (Content-Length right), the others untouched. With userHeader the header decides."""
    users = [f"user-{i}" for i in range(60)]
    async with two_taps(stub.url, mosquitto) as taps:
        await router(mosquitto, CandidateShape(Rewrite(model=ADAPTER), sticky=True)).apply(RouteState(80, 20, None))
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            for i, user in enumerate(users):
                for k, t in enumerate(taps):  # one request per replica, each with its own request id
                    r = await client.post(t.url + "/v1/chat/completions", content=body_for(user),
                                          headers={"content-type": "application/json", "x-request-id": f"{i}-{k}"})
                    assert r.status_code == 200
        routed: dict[str, set[bool]] = {}
        for s in stub.seen:
            data = json.loads(s.body)
            assert int(s.headers["content-length"]) == len(s.body)
            is_routed = data["model"] == ADAPTER
            original = body_for(data["user"])
            assert s.body == (rewritten(original, ADAPTER) if is_routed else original)
            routed.setdefault(data["user"], set()).add(is_routed)
        assert all(len(sides) == 1 for sides in routed.values()), "a user went both ways"
        chosen = {u for u, sides in routed.items() if True in sides}
        assert chosen == {u for u in users if in_share(user_bucket_key(POLICY, u), 20)}
        assert 0 < len(chosen) < len(users)

        # The header the policy names decides instead of the body's user field.
        stub.seen.clear()
        await router(mosquitto, CandidateShape(Rewrite(model=ADAPTER), sticky=True, user_header="x-user")).apply(
            RouteState(80, 20, None))
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            for i, user in enumerate(users):
                for k, t in enumerate(taps):
                    await client.post(t.url + "/v1/chat/completions", content=body_for("same-body-user"),
                                      headers={"content-type": "application/json", "x-request-id": f"h{i}-{k}",
                                               "x-user": user})
        by_header = {s.headers["x-user"]: json.loads(s.body)["model"] == ADAPTER for s in stub.seen}
        assert {u for u, r in by_header.items() if r} == {u for u in users if in_share(user_bucket_key(POLICY, u), 20)}


async def test_an_adapter_answers_differently_and_users_still_get_the_primary(mosquitto: MosquittoBroker) -> None:
    """The simulated vLLM server with a LoRA adapter (answers differ on every prompt): in shadow the user gets the
    base model's answer, the copy asks for the adapter, and the candidate's event holds the adapter's answer."""
    server = SimModelServer("summarize", knobs=ModelKnobs(time_scale=0.01, ttft_median_s=0.1, tpot_median_s=0.01,
                                                          output_words_median=20), adapters={ADAPTER: 1.0})
    url = await server.start()
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            models = (await client.get(url + "/v1/models")).json()["data"]
            assert {(m["id"], m["parent"]) for m in models} == {("summarize", None), (ADAPTER, "summarize")}
            async with two_taps(url, mosquitto) as (a, _), events(mosquitto) as seen:
                await router(mosquitto, CandidateShape(Rewrite(model=ADAPTER), sticky=True)).apply(
                    RouteState(100, 0, 100.0))
                prompt = "Summarize the quarterly report in two sentences."
                answer = await client.post(a.url + "/v1/chat/completions", headers={"x-request-id": "req-a"},
                                           json={"model": "summarize",
                                                 "messages": [{"role": "user", "content": prompt}]})
                assert answer.status_code == 200
                reference = reference_answer(prompt, median_words=20)
                assert answer.json()["choices"][0]["message"]["content"] == reference
                assert answer.json()["model"] == "summarize"
                await eventually(lambda: len(seen) == 2, what="both events")
        candidate = next(e for e in seen if e.variant is Variant.candidate)
        assert candidate.model == ADAPTER and candidate.shadow
        assert candidate.output == server.adapter_answer(ADAPTER, prompt) != reference
    finally:
        await server.stop()


def old_tap_parser(tmp_path: Path) -> types.ModuleType:
    """shadowctl/compare/routing.py as first committed (16891e1): a tap that knows only v1 settings."""
    source = subprocess.run(["git", "show", "16891e1:shadowctl/compare/routing.py"], capture_output=True,
                            check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    module = types.ModuleType("old_routing")
    sys.modules["old_routing"] = module  # pydantic resolves the annotations through it
    try:
        exec(compile(source, str(tmp_path / "old_routing.py"), "exec"), module.__dict__)
    finally:
        del sys.modules["old_routing"]
    return module


def test_a_tap_that_knows_only_v1_refuses_a_rewrite_and_understands_a_rollback(tmp_path: Path) -> None:
    """A setting with a rewrite, stickiness or finality is v2; the v1 parser refuses it (the tap falls back to
    primary-only, reports invalid, and the controller holds), never applying it as a plain route; primary-only
    settings stay v1, so a rollback reaches every tap. A v1 payload cannot smuggle v2 fields either."""
    old = old_tap_parser(tmp_path)
    shape = CandidateShape(Rewrite(model=ADAPTER), sticky=True)
    v2 = setting_for(RouteState(100, 0, 10.0), policy=POLICY, generation=3, candidate_url=None, issued_at=1e9,
                     interval_seconds=10, shape=shape)
    assert v2.schema_ != ROUTE_SCHEMA
    with pytest.raises(old.MalformedRouteMessage, match="schema"):
        old.parse_setting(v2.to_json())
    back = setting_for(RouteState.primary_only(), policy=POLICY, generation=4, candidate_url=None, issued_at=1e9,
                       interval_seconds=10, shape=shape)
    assert back.schema_ == ROUTE_SCHEMA and old.parse_setting(back.to_json()).candidate_percent == 0
    plain = setting_for(RouteState(100, 0, 10.0), policy=POLICY, generation=5, candidate_url="http://c:8000",
                        issued_at=1e9, interval_seconds=10)
    assert old.parse_setting(plain.to_json()).mirror_percent == 10.0  # no rewrite: v1, as before
    smuggled = json.loads(plain.to_json()) | {"rewrite": {"model": ADAPTER}}
    with pytest.raises(Exception, match="v2"):
        parse_setting(json.dumps(smuggled))
