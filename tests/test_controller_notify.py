"""Notifications and the confirm-promotion gate against real HTTP servers on localhost, and the
controller's /metrics, /healthz and /readyz."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web
from conftest_kube import KubeEnv
from controller_helpers import policy_doc
from fake_clock import FakeClock

from shadowctl.controller.metrics import ControllerMetrics
from shadowctl.controller.notify import ClusterNotifier, WebhookGate, event_payload, events_topic
from shadowctl.controller.server import bound_port, make_app, serve
from shadowctl.kube import EVENT, SHADOW_POLICY, KubeClient
from shadowctl.machine import Notify, RolloutState
from shadowctl.policy import ShadowPolicy, parse_policies
from shadowctl.policy.status import Phase
from shadowctl.webhooks import HttpWebhooks


class Hooks:
    """A webhook receiver whose answer the test sets."""

    def __init__(self) -> None:
        self.status = 200
        self.delay = 0.0
        self.received: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        await asyncio.sleep(self.delay)
        return web.Response(status=self.status)


@pytest.fixture
async def hooks() -> AsyncIterator[tuple[Hooks, str]]:
    h = Hooks()
    app = web.Application()
    app.router.add_post("/hook", h.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield h, f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


def _policy(url: str, hook_type: str, timeout: str = "1s") -> ShadowPolicy:
    doc = policy_doc(notifications={"mqtt": {"topic": "shadowctl/events/{namespace}/{name}"},
                                    "webhooks": [{"name": "h", "url": url, "type": hook_type, "timeout": timeout,
                                                  "retries": 1}]})
    return parse_policies(yaml.safe_dump(doc))[0]


class NoWaitClock(FakeClock):
    """Retries' back-off sleeps return at once (time is not what these tests are about)."""

    async def sleep(self, seconds: float) -> None:
        return None


STATE = RolloutState(phase=Phase.waiting_promotion, step=1, weight=50, candidate="v2")


async def test_gate_opens_only_on_2xx(hooks: tuple[Hooks, str]) -> None:
    h, url = hooks
    clock = NoWaitClock()
    async with httpx.AsyncClient() as http:
        gate = WebhookGate(HttpWebhooks(clock.sleep, http), clock)
        policy = _policy(url, "confirm-promotion")
        assert await gate.check(policy, STATE) is True
        assert h.received[-1]["reason"] == "ConfirmPromotion"
        h.status = 403
        assert await gate.check(policy, STATE) is False
        h.status = 503  # retried, then closed
        before = len(h.received)
        assert await gate.check(policy, STATE) is False
        assert len(h.received) == before + 2


async def test_gate_closed_when_unreachable_or_slow(hooks: tuple[Hooks, str]) -> None:
    h, url = hooks
    clock = NoWaitClock()
    async with httpx.AsyncClient() as http:
        gate = WebhookGate(HttpWebhooks(clock.sleep, http), clock)
        assert await gate.check(_policy("http://127.0.0.1:1/hook", "confirm-promotion"), STATE) is False
        h.delay = 2.0
        assert await gate.check(_policy(url, "confirm-promotion", timeout="200ms"), STATE) is False
        assert await gate.check(_policy(url, "event"), STATE) is None  # no gate configured


async def test_notifier_records_event_posts_webhook_and_publishes(hooks: tuple[Hooks, str],
                                                                 kube_env: KubeEnv,
                                                                 kube_client: KubeClient) -> None:
    h, url = hooks
    policy = _policy(url, "event")
    obj = await kube_client.create(SHADOW_POLICY, policy_doc())
    published: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes) -> None:
        published.append((topic, payload))

    clock = NoWaitClock()
    async with httpx.AsyncClient() as http:
        notifier = ClusterNotifier(kube_client, clock, HttpWebhooks(clock.sleep, http), publish)
        note = Notify("RollingBack", "RollingBack: critical metric(s) failed: ttft-p95", warning=True)
        await notifier.notify(obj, policy, note, STATE)
    events = (await kube_client.list(EVENT, "llm")).items
    assert [(e["reason"], e["type"], e["involvedObject"]["name"]) for e in events] == [("RollingBack", "Warning", "chat")]
    assert h.received[-1]["message"] == note.message
    assert published[0][0] == events_topic(policy) == "shadowctl/events/llm/chat"
    payload = json.loads(published[0][1])
    assert payload == event_payload(policy, note, STATE, clock.now())
    assert payload["schema"] == "shadowctl.dev/event/v1"
    assert notifier.failures == 0


async def test_notifier_never_raises(kube_env: KubeEnv, kube_client: KubeClient) -> None:
    policy = _policy("http://127.0.0.1:1/hook", "event")

    async def broken(topic: str, payload: bytes) -> None:
        raise RuntimeError("broker gone")

    clock = NoWaitClock()
    async with httpx.AsyncClient() as http:
        notifier = ClusterNotifier(kube_client, clock, HttpWebhooks(clock.sleep, http), broken)
        await notifier.notify({"metadata": {"name": "gone", "namespace": "nowhere-ns"}}, policy,
                              Notify("Progressing", "x"), STATE)
    assert notifier.failures >= 2


async def test_metrics_health_and_readiness_endpoints() -> None:
    metrics = ControllerMetrics()
    metrics.observe_tick("llm/chat", RolloutState(phase=Phase.progressing, step=0, weight=10), None, 0.02, False)
    ready = {"value": False}
    runner = await serve(make_app(metrics.registry, lambda: ready["value"]), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{bound_port(runner)}"
    try:
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{base}/healthz")).status_code == 200
            assert (await client.get(f"{base}/readyz")).status_code == 503
            ready["value"] = True
            assert (await client.get(f"{base}/readyz")).status_code == 200
            text = (await client.get(f"{base}/metrics")).text
        assert 'shadowctl_canary_weight_percent{policy="llm/chat"} 10.0' in text
        assert 'shadowctl_rollout_phase{phase="Progressing",policy="llm/chat"} 1.0' in text
        assert "shadowctl_reconcile_duration_seconds_count 1.0" in text
    finally:
        await runner.cleanup()


async def test_a_receiver_that_streams_or_trickles_cannot_hold_the_controller() -> None:
    """The answer's body is never read (an endless one costs nothing) and the whole attempt, headers
    included, ends within the webhook's timeout, not per read; a redirect is the answer, not followed."""
    sent: list[int] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        try:
            for _ in range(100_000):  # 6 GB if it were read
                await response.write(b"x" * 65536)
                sent.append(1)
                await asyncio.sleep(0)
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    async def trickle(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        for ch in b"HTTP/1.1 200 OK\r\n":  # each byte within httpx's read timeout, the whole far past it
            transport.write(bytes([ch]))
            await asyncio.sleep(0.3)
        return web.Response()

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/endless")

    app = web.Application()
    app.router.add_post("/endless", endless)
    app.router.add_post("/trickle", trickle)
    app.router.add_post("/moved", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    clock = NoWaitClock()
    try:
        async with httpx.AsyncClient() as http:
            hooks = HttpWebhooks(clock.sleep, http)
            endless_hook = _policy(f"{base}/endless", "event", timeout="5s").spec.notifications.webhooks[0]
            assert await hooks.post(endless_hook, {"x": 1}) == 200
            assert len(sent) < 1000  # the sender was cut off long before its 100,000 chunks
            trickle_hook = _policy(f"{base}/trickle", "event", timeout="500ms").spec.notifications.webhooks[0]
            started = asyncio.get_running_loop().time()
            assert await hooks.post(trickle_hook, {"x": 1}) is None  # two attempts, each cut at 0.5 s
            # A coarse bound, the behaviour under test: unbounded, each attempt takes 17 x 0.3 = 5.1 s.
            assert asyncio.get_running_loop().time() - started < 4.0
            moved_hook = _policy(f"{base}/moved", "event").spec.notifications.webhooks[0]
            assert await hooks.post(moved_hook, {"x": 1}) == 302
    finally:
        await runner.cleanup()
