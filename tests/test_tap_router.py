"""The tap as a router (#17 item 3): route settings over a real Mosquitto, applied by real taps.

Nothing is mocked: the controller's side is :class:`~shadowctl.routers.tap.TapRouter` on a real
broker, the tap is the real proxy with its :class:`~shadowctl.tap.routes.RouteFollower` (in-process,
or the real ``shadowctl tap --workers 2`` command), the upstreams are the OpenAI stub (primary) and a
second stub (candidate). What a tap applies is read from its own ``/metrics`` over HTTP, by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiomqtt
import httpx
import pytest
from openai_stub import OpenAIStub
from tap_helpers import eventually, free_port
from test_tap_workers import TapProcess, _listening, _workers_of

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.events import Variant
from shadowctl.compare.routing import (
    AppliedState,
    RouteSetting,
    applied_topic,
    in_share,
    parse_report,
    parse_setting,
    rfc3339,
    route_topic,
)
from shadowctl.routers.base import RouteState
from shadowctl.routers.tap import ChannelSettings, NotConfirmed, TapChannel, TapRouter
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.proxy import TapConfig, TapProxy, bound_port, default_topic, start_server
from shadowctl.tap.publisher import BrokerSettings
from shadowctl.tap.routes import RouteFollower

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

NS, POLICY = "llm", "chat"
CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Tap:
    url: str
    follower: RouteFollower
    task: asyncio.Task[None]

    async def metric(self, name: str, labels: str = "") -> float | None:
        """One sample of the tap's /metrics, read over HTTP like a scrape."""
        async with httpx.AsyncClient(trust_env=False) as client:
            text = (await client.get(self.url + "/metrics")).text
        wanted = name + (f"{{{labels}}}" if labels else "")
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return None


@contextlib.asynccontextmanager
async def tap(upstream: str, broker: MosquittoBroker, tap_id: str = "tap-a", *,
              candidate_url: str | None = None) -> AsyncIterator[Tap]:
    metrics = TapMetrics("primary")
    config = TapConfig(upstream=upstream, variant=Variant.primary, namespace=NS, service="chat",
                       topic=default_topic(NS, "chat", Variant.primary), routed=True)
    follower = RouteFollower(BrokerSettings(broker.host, broker.port, keepalive_s=5), NS, POLICY, tap_id, metrics,
                             report_every_s=0.5)
    proxy = TapProxy(config, None, metrics, follower)
    running = await start_server(proxy, "127.0.0.1", 0)
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.wait_for(follower.connected.wait(), 10)
        yield Tap(f"http://127.0.0.1:{bound_port(running)}", follower, task)
    finally:
        await cancel_and_wait(task)
        await running.cleanup()


def router(broker: MosquittoBroker, *, interval: float = 10.0, url: str | None = None,
           confirm: float = 5.0) -> TapRouter:
    async def candidate() -> str | None:
        return url

    channel = TapChannel(ChannelSettings(broker.host, broker.port), NS, POLICY)
    return TapRouter(channel, NS, POLICY, interval, candidate, confirm_timeout_s=confirm)


async def retained(broker: MosquittoBroker, topic: str) -> bytes | None:
    """The retained message on `topic` as a new subscriber gets it (None: none within a second)."""
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    return message.payload if isinstance(message.payload, bytes) else b""
        except TimeoutError:
            return None
    return None


async def publish(broker: MosquittoBroker, setting: RouteSetting) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.publish(route_topic(NS, POLICY), setting.to_json(), qos=1, retain=True)


async def applied_within(t: Tap, generation: int, limit: float) -> float:
    """Poll the tap's /metrics until it shows `generation`; the seconds it took (fails past `limit`)."""
    start = time.monotonic()
    while await t.metric("shadowctl_tap_route_generation") != generation:
        assert time.monotonic() - start < limit, f"generation {generation} not applied within {limit}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.asyncio
async def test_setting_is_applied_within_a_second_and_routes_the_shares(stub: OpenAIStub,
                                                                      mosquitto: MosquittoBroker) -> None:
    """The controller's setting reaches the tap, which applies it within a second (seen on /metrics), reports
    it, and then mirrors and routes exactly the requests the shared hash picks; the user of a routed request
    gets the candidate's answer."""
    candidate = OpenAIStub(answer="the candidate answers")
    await candidate.start()
    try:
        async with tap(stub.url, mosquitto) as t:
            r = router(mosquitto, url=candidate.url)
            assert await t.metric("shadowctl_tap_route_fallback", 'reason="none"') == 1.0
            result = await r.apply(RouteState(100, 0, 50.0))  # returns once the tap reported it
            assert result.wrote and result.state == RouteState(100, 0, 50.0)
            generation = int(result.state.resource_version or 0)
            assert await applied_within(t, generation, 1.0) < 1.0
            assert await t.metric("shadowctl_tap_route_mirror_percent") == 50.0
            assert await t.metric("shadowctl_tap_route_fallback", 'reason="none"') == 0.0
            report = parse_report(await retained(mosquitto, applied_topic(NS, POLICY, "tap-a")) or b"")
            assert report.state is AppliedState.applied and report.generation == generation

            ids = [f"req-{i}" for i in range(40)]
            async with httpx.AsyncClient(trust_env=False) as client:
                for rid in ids:
                    answer = await client.post(t.url + "/v1/chat/completions", json=CHAT,
                                               headers={"x-request-id": rid})
                    assert "Paris" in answer.text  # the shadow phase: users only see the primary
            mirrored = {rid for rid in ids if in_share(rid, 50.0)}
            assert 0 < len(mirrored) < len(ids)
            await eventually(lambda: len(candidate.seen) == len(mirrored), what="the mirror copies")
            assert {s.headers["x-request-id"] for s in candidate.seen} == mirrored
            assert all(s.headers.get("x-shadowctl-shadow") == "1" for s in candidate.seen)

            # A canary step: 30% of live requests answered by the candidate, none mirrored.
            candidate.seen.clear()
            step = await r.apply(RouteState(70, 30, None))
            assert int(step.state.resource_version or 0) == generation + 1
            await applied_within(t, generation + 1, 1.0)
            async with httpx.AsyncClient(trust_env=False) as client:
                for rid in ids:
                    answer = await client.post(t.url + "/v1/chat/completions", json=CHAT,
                                               headers={"x-request-id": rid})
                    expect = "the candidate answers" if in_share(rid, 30) else "Paris"
                    assert expect in answer.text, rid
            assert {s.headers["x-request-id"] for s in candidate.seen} == {rid for rid in ids if in_share(rid, 30)}
            assert await t.metric("shadowctl_tap_routed_requests_total") == sum(in_share(rid, 30) for rid in ids)
            assert await r.read() == RouteState(70, 30, None)

            # Finalize: primary-only, confirmed.
            done = await r.finalize()
            assert done.state == RouteState.primary_only()
            await applied_within(t, generation + 2, 1.0)
            assert await t.metric("shadowctl_tap_route_candidate_percent") == 0.0
    finally:
        await candidate.stop()


@pytest.mark.asyncio
async def test_a_stale_setting_falls_back_and_says_so(stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    """A setting older than 3 intervals is not applied (fallback, reason stale, on /metrics and in the report);
    one that is fresh is applied, and falls back once the controller stops renewing it."""
    async with tap(stub.url, mosquitto) as t:
        now = time.time()
        await publish(mosquitto, RouteSetting(policy=f"{NS}/{POLICY}", generation=4, mirror_percent=20.0,
                                              candidate_url="http://127.0.0.1:9", issued_at=rfc3339(now - 31),
                                              interval_seconds=10))
        await eventually(lambda: t.follower.current.reason is not None and t.follower.current.reason.value == "stale",
                         what="the stale fallback")
        assert await t.metric("shadowctl_tap_route_fallback", 'reason="stale"') == 1.0
        assert await t.metric("shadowctl_tap_route_generation") == 0.0
        assert await t.metric("shadowctl_tap_route_mirror_percent") == 0.0
        report = parse_report(await retained(mosquitto, applied_topic(NS, POLICY, "tap-a")) or b"")
        assert report.state is AppliedState.fallback and report.reason is not None and report.reason.value == "stale"

        # Fresh, with a short interval and no heartbeat: applied, then stale after 3 intervals.
        await publish(mosquitto, RouteSetting(policy=f"{NS}/{POLICY}", generation=5, mirror_percent=20.0,
                                              candidate_url="http://127.0.0.1:9", issued_at=rfc3339(time.time()),
                                              interval_seconds=0.5))
        await applied_within(t, 5, 1.0)
        start = time.monotonic()
        while await t.metric("shadowctl_tap_route_fallback", 'reason="stale"') != 1.0:
            assert time.monotonic() - start < 10, "the setting never went stale"
            await asyncio.sleep(0.05)
        assert await t.metric("shadowctl_tap_route_generation") == 0.0


@pytest.mark.asyncio
async def test_a_tap_that_stops_reporting_holds_the_rollout(stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    """No tap ever reported: apply holds. Two taps; one stops following (its last report stays, recent): the
    next step is not confirmed, NotConfirmed names that tap, and the setting is put back to the previous
    routes, which the live tap applies again; read() holds as well. Primary-only is still confirmed."""
    r = router(mosquitto, url="http://127.0.0.1:9", confirm=1.0)
    with pytest.raises(NotConfirmed, match="no tap has reported"):
        await r.apply(RouteState(100, 0, 10.0))
    back = parse_setting(await retained(mosquitto, route_topic(NS, POLICY)) or b"")
    assert back.mirror_percent is None and back.candidate_percent == 0  # put back: nobody confirmed

    async with tap(stub.url, mosquitto, "tap-a") as a, tap(stub.url, mosquitto, "tap-b") as b:
        first = await r.apply(RouteState(100, 0, 10.0))
        g = int(first.state.resource_version or 0)
        await cancel_and_wait(b.task)  # tap-b stops following: no will (no broker-side disconnect seen yet)
        with pytest.raises(NotConfirmed, match="tap-b applies generation"):
            await r.apply(RouteState(100, 0, 20.0))
        now = parse_setting(await retained(mosquitto, route_topic(NS, POLICY)) or b"")
        assert now.mirror_percent == 10.0 and now.generation == g + 2  # the previous routes, a newer generation
        await applied_within(a, g + 2, 1.0)
        with pytest.raises(NotConfirmed, match="tap-b"):
            await r.read()


@pytest.mark.asyncio
async def test_every_worker_applies_the_setting(stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    """`shadowctl tap --workers 2 --route-policy`: each worker process follows the setting itself and reports
    it under its own id; the controller's apply returns only once both have, and /metrics (whichever worker
    answers) shows the generation the slowest worker applies."""
    port = free_port()
    proc = TapProcess(["--listen", f"127.0.0.1:{port}", "--upstream", stub.url, "--service", f"{NS}/chat",
                       "--mqtt", mosquitto.url, "--workers", "2", "--route-policy", f"{NS}/{POLICY}",
                       "--tap-id", "pod-1", "--mirror-to", stub.url])
    try:
        deadline = time.monotonic() + 60
        while not (_listening(port) and len(_workers_of(proc.proc.pid)) == 2):
            assert proc.proc.poll() is None, f"the tap exited: {proc.output()}"
            assert time.monotonic() < deadline, "the workers did not start within 60 s"
            await asyncio.sleep(0.1)
        r = router(mosquitto)
        reports: dict[str, bytes | None] = {}
        while len(reports) < 2 or None in reports.values():
            for w in ("pod-1-w0", "pod-1-w1"):
                reports[w] = await retained(mosquitto, applied_topic(NS, POLICY, w))
            assert time.monotonic() < deadline, f"the workers did not both report: {reports}"
        result = await r.apply(RouteState(100, 0, 25.0))  # no candidate URL from the controller: --mirror-to
        g = int(result.state.resource_version or 0)
        for w in ("pod-1-w0", "pod-1-w1"):
            report = parse_report(await retained(mosquitto, applied_topic(NS, POLICY, w)) or b"")
            assert report.state is AppliedState.applied and report.generation == g, report
        t = Tap(f"http://127.0.0.1:{port}", None, None)  # type: ignore[arg-type]
        assert await t.metric("shadowctl_tap_route_generation") == g
        assert await t.metric("shadowctl_tap_route_mirror_percent") == 25.0
    finally:
        proc.stop()
    # A clean stop says gone: the controller no longer counts these taps.
    for w in ("pod-1-w0", "pod-1-w1"):
        assert parse_report(await retained(mosquitto, applied_topic(NS, POLICY, w)) or b"").state is AppliedState.gone
