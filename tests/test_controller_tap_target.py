"""Whole rollouts where the taps are the only router (``spec.target.tap``, #17 item 3): they mirror in the shadow
phase and route the step's share of live requests in the canary phase; promotion leaves them routing everything to
the candidate (a ``final`` route setting) until the policy is deleted.

Real parts: the reconciler and the factory's :class:`~shadowctl.routers.tap.TapRouter`, the real API server (the
policy, its status and its commands: there is no routing object at all), a real Mosquitto carrying the route
settings, the taps' applied reports and the output events, two primary taps (the real proxy and ``RouteFollower``,
in this process, as in tests/test_controller_tap.py) in front of the OpenAI stub, a candidate tap in front of a
second stub (the policy's ``candidateURL``), the real MQTT output source pairing the answers. The metric source is the
double of tests/controller_helpers.py (a port boundary); the controller's clock is the fake one, the taps and the
route channel use the wall clock.

The invariants are checked on every applied report as it arrives (against the status the API server holds at that
moment): the candidate's live share never exceeds the step the status records (or the raise it records first,
``status.pendingRoute``); a mirror only around Shadowing; after a rollback every tap reports primary-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiomqtt
import httpx
import pytest
import yaml
from conftest_kube import KubeEnv
from controller_helpers import FakeMetricSource, Harness
from openai_stub import OpenAIStub
from test_controller_tap import CHAT, NAME, NS, REF, TAPS, RunningTap, allowed_share, retained, running_tap

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.events import Variant
from shadowctl.compare.routing import (
    ROUTE_SCHEMA_V2,
    AppliedReport,
    AppliedState,
    applied_filter,
    applied_topic,
    parse_report,
    parse_setting,
    route_topic,
)
from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.commands import command_patch, new_command
from shadowctl.controller.outputs import OutputHub
from shadowctl.controller.reconciler import Reconciler, TickResult
from shadowctl.kube import SHADOW_POLICY, KubeClient
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.status import Command, PolicyStatus
from shadowctl.routers.factory import router_for
from shadowctl.routers.tap import ChannelSettings, TapChannel, TapRouter
from shadowctl.sources.outputs import MqttOutputSource

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

STEPS = [20, 50]

POLICY = """
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {name: summarize, namespace: llm}
spec:
  target:
    tap: {service: summarize, candidateURL: CANDIDATE_URL}
  shadow: {mirrorPercent: 50, minDuration: 20s, maxDuration: 600s, minPairs: 0, mode: tap}
  canary: {steps: [20, 50], stepDuration: 20s, maxStepDuration: 300s}
  analysis:
    interval: 10s
    variants:
      primary: {workload: summarize}
      candidate: {workload: summarize-candidate}
    metrics:
      - {name: ttft-p95, preset: vllm-ttft, statistic: p95, margin: 10%, critical: true, minSamples: 50}
      - {name: errors, preset: vllm-errors, kind: ratio, statistic: rate, margin: 1pp, minSamples: 50}
    outputs:
      mqtt: {broker: BROKER, topic: "shadowctl/outputs/llm/summarize/+"}
      comparators: [{name: exact}]
      baseline: {mode: fixed, agreement: 0.9}
      minRelativeAgreement: 0.5
      minPairs: 10
  progressDeadline: 1h
"""


@dataclass
class Checked:
    """Every applied report, checked against the stored status as it arrived."""

    seen: list[tuple[int, AppliedReport, str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    tick: int = 0


class TargetHarness(Harness):
    def __init__(self, env: KubeEnv, kube: KubeClient, broker: MosquittoBroker,
                 source: FakeMetricSource | None = None) -> None:
        super().__init__(env, kube, source)
        self.broker = broker
        self.hub = OutputHub(lambda p: MqttOutputSource.from_policy(p))

        def channel(policy: ShadowPolicy) -> TapChannel:
            return TapChannel(ChannelSettings(broker.host, broker.port), policy.metadata.namespace,
                              policy.metadata.name)

        self.channel = channel
        self.reconciler = Reconciler(kube, functools.partial(router_for, tap_channel=channel),
                                     Analyzer(self.source, self.hub), self.clock)
        self.taps: list[RunningTap] = []
        self.candidate_url = ""
        self.phases: list[tuple[str, str | None]] = []

    async def setup(self, **spec: Any) -> None:
        doc = yaml.safe_load(POLICY.replace("BROKER", self.broker.url).replace("CANDIDATE_URL", self.candidate_url))
        for key, value in spec.items():
            doc["spec"][key] = {**doc["spec"].get(key, {}), **value} if isinstance(value, dict) else value
        await self.kube.create(SHADOW_POLICY, doc)

    async def weights(self) -> tuple[int, int, float | None]:
        """What the primary taps apply (all the same): (primary, candidate) percents and the mirror."""
        applied = {(t.follower.current.candidate_percent, t.follower.current.mirror_percent)
                   for t in self.taps if t.follower is not None}
        assert len(applied) == 1, applied
        share, mirror = next(iter(applied))
        return 100 - share, share, mirror

    async def traffic(self, n: int) -> None:
        primaries = [t for t in self.taps if t.follower is not None]
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            for i in range(n):
                t = primaries[i % len(primaries)]
                answer = await client.post(t.url + "/v1/chat/completions", json=CHAT,
                                           headers={"x-request-id": f"r{self.clock.now():.0f}-{i}"})
                assert answer.status_code == 200 and "Paris" in answer.text

    async def status(self) -> PolicyStatus:
        return PolicyStatus.of(await self.kube.get(REF))

    async def tick(self, advance: float = 10.0) -> TickResult:
        before = (await self.status()).phase.value
        if before in ("Pending", "Shadowing", "Progressing"):
            await self.traffic(12)
        self.clock.advance(advance)
        result = await self.reconciler.tick(REF)
        primary, candidate, mirror = await self.weights()
        status = await self.status()
        self.history.append({"phase": status.phase.value, "primary": primary, "candidate": candidate,
                             "mirror": mirror, "step": status.step, "error": result.error,
                             "decided": result.phase.value if result.phase else None})
        self.phases.append((before, result.phase.value if result.phase else None))
        return result


@contextlib.asynccontextmanager
async def checking_reports(h: TargetHarness) -> AsyncIterator[Checked]:
    """Collect every applied report; at its arrival, its live share must be within what the stored status allows."""
    out = Checked()
    ready = asyncio.Event()

    async def loop() -> None:
        async with aiomqtt.Client(h.broker.host, h.broker.port) as client:
            await client.subscribe(applied_filter(NS, NAME), qos=1)
            ready.set()
            async for message in client.messages:
                if not isinstance(message.payload, bytes) or not message.payload:
                    continue
                report = parse_report(message.payload)
                stored = h.env.get_object(SHADOW_POLICY, NS, NAME)
                status = PolicyStatus.of(stored or {})
                out.seen.append((out.tick, report, status.phase.value))
                if report.candidate_percent > allowed_share(status):
                    out.violations.append(f"{report.tap} routes {report.candidate_percent}% while the status "
                                          f"allows {allowed_share(status)} ({status.phase.value})")

    task = asyncio.create_task(loop())
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        yield out
    finally:
        await cancel_and_wait(task)


def check_mirrors(h: TargetHarness, checked: Checked) -> None:
    assert checked.seen, "the taps reported"
    assert not checked.violations, checked.violations
    for tick, report, _ in checked.seen:
        if report.mirror_percent is not None:
            around = {p for i in (tick - 1, tick) if 0 <= i < len(h.phases) for p in h.phases[i]}
            assert "Shadowing" in around, (report, around)


async def run(h: TargetHarness, checked: Checked, phases: set[str], max_ticks: int = 60) -> str:
    for _ in range(max_ticks):
        checked.tick = len(h.phases)
        await h.tick()
        phase = (await h.status()).phase.value
        if phase in phases:
            return phase
    raise AssertionError(f"no phase in {phases} after {max_ticks} ticks: {h.history[-5:]}")


@pytest.fixture
async def h(kube_env: KubeEnv, kube_client: KubeClient, mosquitto: MosquittoBroker,
            stub: OpenAIStub) -> AsyncIterator[TargetHarness]:
    harness = TargetHarness(kube_env, kube_client, mosquitto)
    candidate_stub = OpenAIStub()  # the same answers: the candidate agrees with the primary
    await candidate_stub.start()
    try:
        async with running_tap(candidate_stub.url, mosquitto, Variant.candidate) as candidate_tap:
            harness.candidate_url = candidate_tap.url  # the policy's candidateURL: no --mirror-to on the taps
            async with (
                running_tap(stub.url, mosquitto, Variant.primary, tap_id=TAPS[0]) as a,
                running_tap(stub.url, mosquitto, Variant.primary, tap_id=TAPS[1]) as b,
            ):
                harness.taps = [candidate_tap, a, b]
                harness.candidate_stub = candidate_stub  # type: ignore[attr-defined]
                try:
                    yield harness
                finally:
                    await harness.hub.stop(f"{NS}/{NAME}")
    finally:
        await candidate_stub.stop()


def live_requests(stub: OpenAIStub) -> int:
    return sum(1 for s in stub.seen if s.headers.get("x-shadowctl-shadow") != "1")


async def test_shadow_canary_and_promotion_all_routed_by_the_taps(h: TargetHarness) -> None:
    router = router_for(ShadowPolicy.model_validate(yaml.safe_load(
        POLICY.replace("BROKER", h.broker.url).replace("CANDIDATE_URL", h.candidate_url))), h.kube,
        tap_channel=h.channel)
    assert isinstance(router, TapRouter)  # the taps alone: no split router under it
    assert router.capabilities.can_mirror and router.capabilities.can_split
    stub = h.candidate_stub  # type: ignore[attr-defined]
    async with checking_reports(h) as checked:
        await h.setup()
        await run(h, checked, {"Shadowing"})
        assert await h.weights() == (100, 0, 50.0)
        setting = parse_setting(await retained(h.broker, route_topic(NS, NAME)) or b"")
        assert setting.candidate_url == h.candidate_url and setting.schema_ == ROUTE_SCHEMA_V2 and setting.sticky
        assert await run(h, checked, {"Progressing", "RolledBack"}) == "Progressing"
        assert live_requests(stub) == 0, "no live request reached the candidate in the shadow phase"
        tally = (await h.status()).outputs
        assert tally is not None and tally.comparators["exact"].candidate_pairs >= 10, tally
        assert (await h.weights())[1:] == (STEPS[0], None)
        assert await run(h, checked, {"Succeeded", "RolledBack"}) == "Succeeded"
        check_mirrors(h, checked)
    steps = [row["candidate"] for row in h.history]
    assert {0, *STEPS, 100} <= set(steps), steps
    assert steps == sorted(steps), steps  # the share only grew
    assert live_requests(stub) > 0, "the taps sent live requests to the candidate in the canary phase"
    # Promoted: a final setting, routing everything to the candidate, that the taps keep applying without renewal.
    setting = parse_setting(await retained(h.broker, route_topic(NS, NAME)) or b"")
    assert (setting.candidate_percent, setting.mirror_percent, setting.final) == (100, None, True)
    for t in h.taps[1:]:
        assert t.follower is not None
        t.follower.clock = lambda: time.time() + 3600  # an hour with no heartbeat: a final setting stays
        t.follower.refresh()
        assert t.follower.current.state is AppliedState.applied and t.follower.current.candidate_percent == 100
        t.follower.clock = time.time
    # Deleting the policy puts the taps back on their own upstream (primary-only), confirmed by them.
    obj = await h.kube.get(REF)
    await h.kube.delete(REF)
    await h.reconciler.abandon(obj)
    setting = parse_setting(await retained(h.broker, route_topic(NS, NAME)) or b"")
    assert (setting.candidate_percent, setting.mirror_percent, setting.final) == (0, None, False)
    for tap in TAPS:
        report = parse_report(await retained(h.broker, applied_topic(NS, NAME, tap)) or b"")
        assert report.state is AppliedState.applied and report.candidate_percent == 0, report


async def test_a_rollback_in_canary_leaves_the_taps_primary_only(h: TargetHarness) -> None:
    async with checking_reports(h) as checked:
        await h.setup()
        await run(h, checked, {"Progressing"})
        assert (await h.weights())[1:] == (STEPS[0], None)
        await h.kube.patch_merge(REF, command_patch(new_command(Command.rollback, "2026-01-01T00:00:00Z", "test")))
        assert await run(h, checked, {"RolledBack", "Succeeded"}) == "RolledBack"
        check_mirrors(h, checked)
    assert await h.weights() == (100, 0, None)
    setting = parse_setting(await retained(h.broker, route_topic(NS, NAME)) or b"")
    assert (setting.candidate_percent, setting.mirror_percent) == (0, None)
    assert setting.schema_ != ROUTE_SCHEMA_V2  # primary-only is plain v1: any tap understands a rollback
    for tap in TAPS:
        report = parse_report(await retained(h.broker, applied_topic(NS, NAME, tap)) or b"")
        assert report.state is AppliedState.applied and report.candidate_percent == 0 and report.mirror_percent is None


async def test_a_canary_only_tap_target_moves_users_on_metrics_alone(h: TargetHarness) -> None:
    """No shadow phase (a platform engineer moves 20% -> 50% of users to the candidate judged on errors and latency):
    the policy keeps only outputs.mqtt, the taps' route channel. The taps never mirror, the candidate gets no live
    request before Progressing, each step's share is applied by both taps and within what the status records, and
    the rollout is promoted."""
    stub = h.candidate_stub  # type: ignore[attr-defined]
    async with checking_reports(h) as checked:
        doc = yaml.safe_load(POLICY.replace("BROKER", h.broker.url).replace("CANDIDATE_URL", h.candidate_url))
        del doc["spec"]["shadow"]
        doc["spec"]["analysis"]["outputs"] = {"mqtt": doc["spec"]["analysis"]["outputs"]["mqtt"]}
        ShadowPolicy.model_validate(doc)
        await h.kube.create(SHADOW_POLICY, doc)
        assert await run(h, checked, {"Progressing", "RolledBack"}) == "Progressing"
        assert (await h.weights())[1:] == (STEPS[0], None)
        assert await run(h, checked, {"Succeeded", "RolledBack"}) == "Succeeded"
        assert not checked.violations, checked.violations
    assert all(report.mirror_percent is None for _, report, _ in checked.seen), "a canary-only rollout never mirrors"
    assert "Shadowing" not in {p for pair in h.phases for p in pair}
    steps = [row["candidate"] for row in h.history]
    assert {*STEPS, 100} <= set(steps) and steps == sorted(steps), steps
    assert not any(s.headers.get("x-shadowctl-shadow") == "1" for s in stub.seen), "no copy reached the candidate"
    assert live_requests(stub) > 0
