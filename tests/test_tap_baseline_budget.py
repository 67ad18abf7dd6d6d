"""The resent noise baseline and the shadow GPU budget (#18 items 2, 3) through real taps and a real Mosquitto.

Nothing is mocked: :class:`TapRouter` publishes v2 settings with ``baselinePercent`` / ``budget``, the primary's
taps follow them, the upstreams are the OpenAI stub (it records every request) and the simulated vLLM server (its
``vllm:num_requests_waiting`` is real: requests beyond ``max_running`` wait), and the events come back over the
broker into the controller's pure :class:`Pairer` as the output source builds it for ``baseline.mode: resend``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
from openai_stub import OpenAIStub
from tap_helpers import eventually
from test_controller_tap import NAME, NS
from test_tap_rewrite import events, router, two_taps

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.events import Variant
from shadowctl.compare.pairing import Pairer
from shadowctl.compare.routing import Budget, Rewrite, in_share
from shadowctl.routers.base import RouteState
from shadowctl.routers.tap import CandidateShape
from shadowctl.sim.modelserver import ModelKnobs, SimModelServer
from shadowctl.tap.budget import BudgetGate, queue_length
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.proxy import TapConfig, TapProxy, bound_port, default_topic, start_server
from shadowctl.tap.publisher import BrokerSettings
from shadowctl.tap.routes import RouteFollower

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

ADAPTER = "lora-b"


def body(i: int, **extra: object) -> bytes:
    return json.dumps({"model": "base", "messages": [{"role": "user", "content": f"question {i}"}], **extra}).encode()


async def test_resend_baseline_copies_go_to_the_primary_unchanged_and_pair(mosquitto: MosquittoBroker,
                                                                            stub: OpenAIStub) -> None:
    """baselinePercent 30 beside a 60% mirror of a model rewrite: exactly the requests whose id falls in the first
    30% are sent once more to the tap's own upstream with the user's bytes unchanged (marked as copies), each is
    published as variant baseline (shadow), and the controller's pairer (expecting a baseline, as for mode
    resend) pairs primary-vs-baseline and primary-vs-candidate on them. Every resent request is also mirrored
    (one hash, 30 <= 60). Users get the primary's answer, once."""
    shape = CandidateShape(Rewrite(model=ADAPTER), sticky=True, baseline_percent=30.0)
    ids = [f"r{i}" for i in range(40)]
    async with two_taps(stub.url, mosquitto) as (a, b), events(mosquitto) as seen:
        await router(mosquitto, shape).apply(RouteState(100, 0, 60.0))
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            for i, rid in enumerate(ids):
                tap = a if i % 2 else b
                r = await client.post(tap.url + "/v1/chat/completions", content=body(i),
                                      headers={"content-type": "application/json", "x-request-id": rid})
                assert r.status_code == 200 and "Paris" in r.text
        resent = {rid for rid in ids if in_share(rid, 30.0)}
        mirrored = {rid for rid in ids if in_share(rid, 60.0)}
        assert resent and resent < mirrored
        total = len(ids) + len(resent) + len(mirrored)
        await eventually(lambda: len(stub.seen) == total, what="users' requests, resends and copies")
        await eventually(lambda: len(seen) == total, what="every event")
    users = [s for s in stub.seen if "x-shadowctl-shadow" not in s.headers]
    copies = [s for s in stub.seen if "x-shadowctl-shadow" in s.headers]
    again = [s for s in copies if json.loads(s.body)["model"] == "base"]
    assert len(users) == len(ids)
    assert {s.headers["x-request-id"] for s in again} == resent
    by_id = {s.headers["x-request-id"]: s.body for s in users}
    assert all(s.body == by_id[s.headers["x-request-id"]] for s in again)  # unchanged bytes
    baseline_events = [e for e in seen if e.variant is Variant.baseline]
    assert {e.request_id for e in baseline_events} == resent and all(e.shadow for e in baseline_events)
    pairer = Pairer(60.0, expect_baseline=True)
    pairs = [p for e in seen for p in pairer.add(e, 0.0)]
    assert {p.request_id for p in pairs if p.variant is Variant.baseline} == resent
    assert {p.request_id for p in pairs if p.variant is Variant.candidate} == mirrored


async def test_the_budget_holds_under_a_burst_and_users_are_all_served(mosquitto: MosquittoBroker,
                                                                        stub: OpenAIStub) -> None:
    """Mirror 100% under budget {requestsPerSecond 5, maxTokens 32}: a burst of 60 concurrent requests on one tap
    yields at most one second's bucket (5) of copies plus what refills during the burst, each copy's max_tokens
    capped at 32 (lowered, or set where absent); every user's request reaches the upstream once, uncapped, and
    gets its answer; the skipped copies are counted (skipped_budget) and add up with the sent ones."""
    shape = CandidateShape(Rewrite(model=ADAPTER), sticky=True, budget=Budget(requests_per_second=5, max_tokens=32))
    async with two_taps(stub.url, mosquitto) as (a, _):
        await router(mosquitto, shape).apply(RouteState(100, 0, 100.0))
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(trust_env=False, timeout=30,
                                     limits=httpx.Limits(max_connections=100)) as client:
            started = loop.time()
            answers = await asyncio.gather(*(
                client.post(a.url + "/v1/chat/completions", content=body(i, **({"max_tokens": 500} if i % 2 else {})),
                            headers={"content-type": "application/json", "x-request-id": f"b{i}"})
                for i in range(60)))
            elapsed = loop.time() - started
            assert all(r.status_code == 200 and "Paris" in r.text for r in answers)
            await asyncio.sleep(0.3)  # copies in flight land
            page = (await client.get(a.url + "/metrics")).text
    users = [s for s in stub.seen if "x-shadowctl-shadow" not in s.headers]
    copies = [s for s in stub.seen if "x-shadowctl-shadow" in s.headers]
    assert len(users) == 60
    assert all(json.loads(s.body).get("max_tokens") in (None, 500) for s in users)  # users' requests untouched
    allowed = 5 + 5 * (elapsed + 0.3)
    assert 1 <= len(copies) <= allowed, (len(copies), allowed)
    assert all(json.loads(s.body)["max_tokens"] == 32 for s in copies)
    sent = float(page.split('shadowctl_tap_mirror_requests_total{outcome="sent"} ')[1].split()[0])
    skipped = float(page.split('shadowctl_tap_mirror_requests_total{outcome="skipped_budget"} ')[1].split()[0])
    assert sent == len(copies) and sent + skipped == 60


async def test_the_mirror_backs_off_while_the_candidates_queue_is_long(mosquitto: MosquittoBroker) -> None:
    """budget.maxQueue 0 on the simulated vLLM server with one running slot: while requests wait
    (vllm:num_requests_waiting > 0, read from its /metrics by the tap), the share of copies halves per read;
    once the queue drains, it grows back. A queue that cannot be read counts as long (never a blind mirror)."""
    server = SimModelServer("base", knobs=ModelKnobs(time_scale=1.0, ttft_median_s=0.3, tpot_median_s=0.02,
                                                     output_words_median=3, max_running=1),
                            adapters={ADAPTER: 0.5})
    url = await server.start()
    try:
        shape = CandidateShape(Rewrite(model=ADAPTER), sticky=True, budget=Budget(max_queue=0))
        async with tap_with_proxy(url, mosquitto) as (tap_url, proxy):
            await router(mosquitto, shape).apply(RouteState(100, 0, 100.0))
            async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
                first = await client.post(tap_url + "/v1/chat/completions", content=body(0),
                                          headers={"x-request-id": "warm"})  # the tap builds its budget gate
                assert first.status_code == 200
                gate = proxy.budget_gate
                assert gate is not None
                await eventually(lambda: gate.share == 1.0, limit=10, what="an empty queue keeps the share at 1")
                burst = asyncio.gather(*(client.post(tap_url + "/v1/chat/completions", content=body(i),
                                                     headers={"x-request-id": f"q{i}"}) for i in range(8)))
                await eventually(lambda: gate.share <= 0.5, limit=20, what="the share backs off")
                answers = await burst
                assert all(r.status_code == 200 for r in answers)
                assert gate.skipped_queue + gate.admitted == 9 and gate.admitted >= 1
                await eventually(lambda: gate.share == 1.0, limit=30, what="the share recovers")
    finally:
        await server.stop()
    unread = BudgetGate(Budget(max_queue=5))
    unread.observe_queue(None)
    assert unread.share == 0.5
    assert queue_length(b'# HELP x\nvllm:num_requests_waiting{model_name="a"} 3.0\n'
                        b'vllm:num_requests_waiting{model_name="b"} 4\n') == 7.0
    assert queue_length(b"vllm:num_requests_running 3\n") is None


@contextlib.asynccontextmanager
async def tap_with_proxy(upstream: str, broker: MosquittoBroker) -> AsyncIterator[tuple[str, TapProxy]]:
    """A primary's tap following the policy's route setting, as tests/test_controller_tap.py's running_tap, that
    also hands out its proxy (to read the budget gate's back-off share)."""
    metrics = TapMetrics("primary")
    settings = BrokerSettings(broker.host, broker.port, keepalive_s=5)
    config = TapConfig(upstream=upstream, variant=Variant.primary, namespace=NS, service=NAME,
                       topic=default_topic(NS, NAME, Variant.primary), routed=True)
    follower = RouteFollower(settings, NS, NAME, "tap-q", metrics, report_every_s=0.5)
    proxy = TapProxy(config, None, metrics, follower)
    runner = await start_server(proxy, "127.0.0.1", 0)
    task = asyncio.create_task(follower.run())
    try:
        async with asyncio.timeout(10):
            await follower.connected.wait()
        yield f"http://127.0.0.1:{bound_port(runner)}", proxy
    finally:
        await cancel_and_wait(task)
        await runner.cleanup()
