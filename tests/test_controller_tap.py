"""Whole rollouts of a Knative target whose shadow phase goes through the tap (``shadow.mode: tap``, #17 item 3).

Real parts: the reconciler and its routers (``SplitWithTapMirror``: the Knative router for the live
shares, the tap router for the mirror), the real API server with the Knative stand-in (its webhook
checks every Service write), a real Mosquitto carrying the route settings, the taps' applied reports
and the output events, two primary taps (in this process: the real proxy and ``RouteFollower``) that
mirror to a candidate tap, the OpenAI stub behind them, the real MQTT output source pairing the
answers. The metric source is the double of tests/controller_helpers.py (a port boundary), and the
controller's clock is the fake one (the taps and the route channel use the wall clock, as in
production; the interval is 10 s, so a setting goes stale only after 30 s of real time).

The invariants are checked at every Knative Service write (as the server stored it) and on every
applied report the taps publish: the candidate's live share never exceeds what the status records
(its step, or the raise it records before writing it: ``status.pendingRoute``); the taps mirror
only while the rollout is Shadowing and never route live requests themselves (Knative does);
after a rollback every tap reports primary-only and the Service is 100% primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import httpx
import pytest
import yaml
from conftest_kube import KubeEnv, eventually
from controller_helpers import Arm, FakeMetricSource, Harness
from openai_stub import OpenAIStub
from typer.testing import CliRunner

from shadowctl.aio import cancel_and_wait
from shadowctl.cli.app import app
from shadowctl.compare.events import Variant
from shadowctl.compare.routing import (
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
from shadowctl.kube import KNATIVE_SERVICE, SHADOW_POLICY, Invalid, KubeClient, ResourceRef
from shadowctl.kube.refs import GVR
from shadowctl.machine import RolloutState
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.status import Command, PolicyStatus
from shadowctl.routers.factory import router_for
from shadowctl.routers.kserve import KServeRouter, candidate_url_of
from shadowctl.routers.tap import ChannelSettings, SplitWithTapMirror, TapChannel
from shadowctl.sources.outputs import MqttOutputSource
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.proxy import MirrorConfig, TapConfig, TapProxy, bound_port, default_topic, start_server
from shadowctl.tap.publisher import BrokerSettings, EventPublisher
from shadowctl.tap.routes import RouteFollower

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

NS, NAME = "llm", "summarize"
REF = ResourceRef(SHADOW_POLICY, NAME, NS)
KSVC_REF = ResourceRef(KNATIVE_SERVICE, NAME, NS)
PRIMARY, CANDIDATE = "summarize-00001", "summarize-00002"
STEPS = [20, 50]
CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "summarize this"}]}
TAPS = ("tap-a", "tap-b")

KSVC = {
    "apiVersion": "serving.knative.dev/v1",
    "kind": "Service",
    "metadata": {"name": NAME, "namespace": NS},
    "spec": {"template": {"metadata": {"annotations": {"v": "1"}},
                          "spec": {"containers": [{"image": "vllm/vllm-openai:v1"}]}}},
}

POLICY = """
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {name: summarize, namespace: llm}
spec:
  target:
    knative: {service: summarize}
  shadow: {mirrorPercent: 50, minDuration: 20s, maxDuration: 600s, minPairs: 0, mode: tap}
  canary: {steps: [20, 50], stepDuration: 20s, maxStepDuration: 300s}
  analysis:
    interval: 10s
    variants:
      primary: {revision: summarize-00001}
      candidate: {revision: summarize-00002}
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
class RunningTap:
    url: str
    follower: RouteFollower | None
    tasks: list[asyncio.Task[None]]


@contextlib.asynccontextmanager
async def running_tap(upstream: str, broker: MosquittoBroker, variant: Variant, *, tap_id: str | None = None,
                      mirror_to: str | None = None) -> AsyncIterator[RunningTap]:
    """A tap publishing its output events to the broker; with `tap_id`, a primary's tap that follows the policy's
    route setting and mirrors to `mirror_to` (its --mirror-to: the Knative tag URL does not resolve here)."""
    metrics = TapMetrics(variant.value)
    settings = BrokerSettings(broker.host, broker.port, keepalive_s=5)
    publisher = EventPublisher(settings, metrics, backoff_initial_s=0.05, backoff_max_s=0.2)
    config = TapConfig(upstream=upstream, variant=variant, namespace=NS, service=NAME,
                       topic=default_topic(NS, NAME, variant), routed=tap_id is not None,
                       mirror=MirrorConfig(url=mirror_to, percent=100.0) if mirror_to is not None else None)
    follower = None
    if tap_id is not None:
        follower = RouteFollower(settings, NS, NAME, tap_id, metrics, own_candidate_url=mirror_to is not None,
                                 report_every_s=0.5)
    proxy = TapProxy(config, publisher, metrics, follower)
    runner = await start_server(proxy, "127.0.0.1", 0)
    tasks = [asyncio.create_task(publisher.run())]
    if follower is not None:
        tasks.append(asyncio.create_task(follower.run()))
    try:
        if follower is not None:
            async with asyncio.timeout(10):
                await follower.connected.wait()
        yield RunningTap(f"http://127.0.0.1:{bound_port(runner)}", follower, tasks)
    finally:
        await cancel_and_wait(*tasks)
        await runner.cleanup()
        await proxy.aclose()


@dataclass
class Report:
    """An applied report as the broker delivered it, with the tick it arrived in."""

    tick: int
    report: AppliedReport


@dataclass
class Reports:
    """Every applied report of the policy's taps, collected from the broker in the background."""

    seen: list[Report] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    tick: int = 0


@contextlib.asynccontextmanager
async def collecting_reports(broker: MosquittoBroker) -> AsyncIterator[Reports]:
    out = Reports()

    async def loop() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as client:
            await client.subscribe(applied_filter(NS, NAME), qos=1)
            out.ready.set()
            async for message in client.messages:
                if isinstance(message.payload, bytes) and message.payload:
                    out.seen.append(Report(out.tick, parse_report(message.payload)))

    task = asyncio.create_task(loop())
    try:
        async with asyncio.timeout(10):
            await out.ready.wait()
        yield out
    finally:
        await cancel_and_wait(task)


async def retained(broker: MosquittoBroker, topic: str) -> bytes | None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    return message.payload if isinstance(message.payload, bytes) else b""
        except TimeoutError:
            return None
    return None


def candidate_percent(ksvc: dict[str, Any]) -> int:
    return sum(int(t.get("percent") or 0) for t in ksvc["spec"].get("traffic") or []
               if t.get("revisionName") == CANDIDATE)


def allowed_share(status: PolicyStatus) -> int:
    """The most live traffic the recorded status allows the candidate: its step, or a raise it records first."""
    weight = RolloutState.from_record(status.rollout).weight if status.rollout is not None else 0
    if status.pending_route is not None:
        weight = max(weight, status.pending_route.candidate_weight)
    return weight


class TapHarness(Harness):
    """The controller harness on a Knative Service with the tap router; every Service write and every applied
    report is checked against the invariants as it happens."""

    def __init__(self, env: KubeEnv, kube: KubeClient, broker: MosquittoBroker,
                 source: FakeMetricSource | None = None) -> None:
        super().__init__(env, kube, source)
        self.broker = broker
        self.hub = OutputHub(lambda p: MqttOutputSource.from_policy(p))

        def channel(policy: ShadowPolicy) -> TapChannel:
            return TapChannel(ChannelSettings(broker.host, broker.port), policy.metadata.namespace,
                              policy.metadata.name)

        self.reconciler = Reconciler(kube, functools.partial(router_for, tap_channel=channel),
                                     Analyzer(self.source, self.hub), self.clock)
        self.taps: list[RunningTap] = []
        self.ksvc_writes: list[dict[str, Any]] = []
        self.phases: list[tuple[str, str | None]] = []  # per tick: (phase before, phase decided)
        original_replace = kube.replace

        async def replace(gvr: GVR, obj: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
            stored = await original_replace(gvr, obj, *args, **kwargs)
            if gvr == KNATIVE_SERVICE:
                self.check_ksvc_write(stored)
            return stored

        kube.replace = replace  # type: ignore[method-assign]

    def check_ksvc_write(self, stored: dict[str, Any]) -> None:
        """At the write: percents sum to 100, the candidate's share is within what the status records, and no
        tap mirrors while the candidate has live traffic."""
        traffic = stored["spec"]["traffic"]
        assert sum(int(t.get("percent") or 0) for t in traffic) == 100, traffic
        share = candidate_percent(stored)
        status = PolicyStatus.of(self.env.get_object(SHADOW_POLICY, NS, NAME) or {})
        assert share <= allowed_share(status), (share, status.phase, status.rollout, status.pending_route)
        assert share in (0, 100, *STEPS), share
        if share:
            for t in self.taps:
                if t.follower is not None:
                    assert t.follower.current.mirror_percent is None, (share, t.follower.current)
        self.ksvc_writes.append({"phase": status.phase.value, "share": share})

    async def setup(self, **spec: Any) -> None:  # type: ignore[override]
        """Revision 1 serving, revision 2 deployed with all traffic pinned to 1 (waiting for the stand-in's
        status each time), then the policy."""
        async def ready(name: str) -> bool:
            return ((await self.kube.get(KSVC_REF)).get("status") or {}).get("latestReadyRevisionName") == name

        await self.kube.create(KNATIVE_SERVICE, KSVC)
        await eventually(lambda: ready(PRIMARY))
        svc = await self.kube.get(KSVC_REF)
        svc["spec"]["template"]["metadata"]["annotations"]["v"] = "2"
        svc["spec"]["template"]["spec"]["containers"][0]["image"] = "vllm/vllm-openai:v2"
        svc["spec"]["traffic"] = [{"revisionName": PRIMARY, "percent": 100}]
        await self.kube.replace(KNATIVE_SERVICE, svc)
        await eventually(lambda: ready(CANDIDATE))
        doc = yaml.safe_load(POLICY.replace("BROKER", self.broker.url))
        for key, value in spec.items():
            doc["spec"][key] = {**doc["spec"].get(key, {}), **value} if isinstance(value, dict) else value
        await self.kube.create(SHADOW_POLICY, doc)

    async def weights(self) -> tuple[int, int, float | None]:
        """(primary, candidate) percents of the Service, and the mirror the taps apply (all the same)."""
        svc = await self.kube.get(KSVC_REF)
        share = candidate_percent(svc)
        mirrors = {t.follower.current.mirror_percent for t in self.taps if t.follower is not None}
        assert len(mirrors) <= 1, mirrors
        return 100 - share, share, next(iter(mirrors)) if mirrors else None

    async def traffic(self, n: int) -> None:
        """`n` user requests through the primary's taps (alternating, as a Service balances replicas)."""
        primaries = [t for t in self.taps if t.follower is not None]
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            for i in range(n):
                t = primaries[i % len(primaries)]
                rid = f"r{self.clock.now():.0f}-{i}"
                answer = await client.post(t.url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": rid})
                assert answer.status_code == 200 and "Paris" in answer.text  # users get the primary's answers

    async def status(self) -> PolicyStatus:
        return PolicyStatus.of(await self.kube.get(REF))

    async def tick(self, advance: float = 10.0) -> TickResult:
        before = (await self.status()).phase.value
        if before in ("Pending", "Shadowing"):
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


def check_reports(h: TapHarness, reports: Reports) -> None:
    """Every applied report: no live share routed by a tap (Knative carries it), a mirror only in a tick that
    started or decided Shadowing (or the one after it, for a periodic report already on its way)."""
    assert reports.seen, "the taps reported"
    for r in reports.seen:
        assert r.report.candidate_percent == 0, r
        if r.report.mirror_percent is not None:
            around = {p for i in (r.tick - 1, r.tick) if 0 <= i < len(h.phases) for p in h.phases[i]}
            assert "Shadowing" in around, (r, around)


@pytest.fixture
async def h(kube_env: KubeEnv, kube_client: KubeClient, mosquitto: MosquittoBroker,
            stub: OpenAIStub) -> AsyncIterator[TapHarness]:
    harness = TapHarness(kube_env, kube_client, mosquitto)
    candidate_stub = OpenAIStub()  # the same answers: the candidate agrees with the primary
    await candidate_stub.start()
    try:
        async with (
            running_tap(candidate_stub.url, mosquitto, Variant.candidate) as candidate_tap,
            running_tap(stub.url, mosquitto, Variant.primary, tap_id=TAPS[0], mirror_to=candidate_tap.url) as a,
            running_tap(stub.url, mosquitto, Variant.primary, tap_id=TAPS[1], mirror_to=candidate_tap.url) as b,
        ):
            harness.taps = [candidate_tap, a, b]
            harness.candidate_stub = candidate_stub  # type: ignore[attr-defined]
            try:
                yield harness
            finally:
                await harness.hub.stop(f"{NS}/{NAME}")
    finally:
        await candidate_stub.stop()


async def run(h: TapHarness, reports: Reports, phases: set[str], max_ticks: int = 60) -> str:
    for _ in range(max_ticks):
        reports.tick = len(h.phases)
        await h.tick()
        phase = (await h.status()).phase.value
        if phase in phases:
            return phase
    raise AssertionError(f"no phase in {phases} after {max_ticks} ticks: {h.history[-5:]}")


async def command(h: TapHarness, cmd: Command) -> None:
    await h.kube.patch_merge(REF, command_patch(new_command(cmd, "2026-01-01T00:00:00Z", "test")))


async def primary_only(h: TapHarness) -> None:
    """Every primary tap reports (retained) primary-only, applied, and the Service is 100% primary."""
    for tap in TAPS:
        report = parse_report(await retained(h.broker, applied_topic(NS, NAME, tap)) or b"")
        assert report.state is AppliedState.applied, report
        assert report.mirror_percent is None and report.candidate_percent == 0, report
    setting = parse_setting(await retained(h.broker, route_topic(NS, NAME)) or b"")
    assert setting.mirror_percent is None and setting.candidate_percent == 0
    traffic = (await h.kube.get(KSVC_REF))["spec"]["traffic"]
    assert [(t.get("revisionName"), t.get("percent")) for t in traffic if t.get("percent")] == [(PRIMARY, 100)]


async def test_shadow_through_the_tap_then_knative_canary_promoted(h: TapHarness) -> None:
    async with collecting_reports(h.broker) as reports:
        await h.setup()
        await run(h, reports, {"Shadowing"})
        # The taps mirror half of the requests to the candidate; the setting names the Knative tag's URL.
        assert await h.weights() == (100, 0, 50.0)
        setting = parse_setting(await retained(h.broker, route_topic(NS, NAME)) or b"")
        tag_url = next(t["url"] for t in (await h.kube.get(KSVC_REF))["status"]["traffic"] if t.get("tag"))
        assert setting.mirror_percent == 50.0 and setting.candidate_url == tag_url
        assert await run(h, reports, {"Progressing", "RolledBack"}) == "Progressing"
        # The shadow phase passed on the answers the taps paired: the candidate's copies came through the mirror.
        assert h.candidate_stub.seen, "mirrored copies reached the candidate"  # type: ignore[attr-defined]
        tally = (await h.status()).outputs
        assert tally is not None and tally.comparators["exact"].candidate_pairs >= 10, tally
        assert await run(h, reports, {"Succeeded", "RolledBack"}) == "Succeeded"
        check_reports(h, reports)
    phases = [row["phase"] for row in h.history]
    assert phases.index("Shadowing") < phases.index("Progressing") < phases.index("Promoting")
    assert {w["share"] for w in h.ksvc_writes} >= {0, *STEPS, 100}
    assert all(row["mirror"] is None for row in h.history if row["phase"] != "Shadowing")
    traffic = (await h.kube.get(KSVC_REF))["spec"]["traffic"]
    assert [(t.get("revisionName"), t.get("percent")) for t in traffic if t.get("percent")] == [(CANDIDATE, 100)]
    for tap in TAPS:  # the mirror went away before the candidate got live traffic, and stays away
        report = parse_report(await retained(h.broker, applied_topic(NS, NAME, tap)) or b"")
        assert report.mirror_percent is None and report.candidate_percent == 0


@pytest.mark.parametrize("how", ["slow-candidate-in-shadow", "command-in-canary"])
async def test_rollback_leaves_the_taps_primary_only(h: TapHarness, how: str) -> None:
    async with collecting_reports(h.broker) as reports:
        if how == "slow-candidate-in-shadow":
            h.source.candidate = Arm(median=0.6)
            await h.setup()
        else:
            await h.setup()
            await run(h, reports, {"Progressing"})
            assert (await h.weights())[1:] == (STEPS[0], None)
            await command(h, Command.rollback)
        assert await run(h, reports, {"RolledBack", "Succeeded"}) == "RolledBack"
        if how == "slow-candidate-in-shadow":
            assert "Progressing" not in [row["phase"] for row in h.history]
        check_reports(h, reports)
    await primary_only(h)
    assert await h.weights() == (100, 0, None)


async def test_shadow_mode_tap_without_an_outputs_broker_is_refused(tmp_path: Path, kube_client: KubeClient) -> None:
    """The controller sends the taps their route setting over the policy's outputs broker: a policy with
    shadow.mode: tap and no spec.analysis.outputs is refused at load (`shadowctl validate`, naming the field,
    no traceback) and by the real API server (the CRD's CEL rule), not left to fail at run time."""
    doc = yaml.safe_load(POLICY.replace("BROKER", "mqtt://mosquitto:1883"))
    del doc["spec"]["analysis"]["outputs"]
    path = tmp_path / "tap.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    assert "shadow.mode: tap needs spec.analysis.outputs.mqtt" in result.output
    assert f"{path}:" in result.output and "Traceback" not in result.output
    with pytest.raises(Invalid, match=r"shadow.mode: tap needs spec.analysis.outputs.mqtt"):
        await kube_client.create(SHADOW_POLICY, doc)
    doc["spec"]["shadow"]["mode"] = "istio"  # the same policy mirroring through Istio needs no broker
    doc["spec"]["shadow"]["virtualService"] = {"name": "summarize", "candidate": {"host": "candidate-summarize"}}
    path.write_text(yaml.safe_dump(doc))
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == 0


def test_a_kserve_target_gives_the_taps_its_tagged_candidate_url(kube_client: KubeClient) -> None:
    """KServe composes with the tap like Knative: the factory's router asks the KServe router for the candidate's
    URL, which KServe lists only under tag routing (the `latest` tag's URL); without it, none (the taps need
    --mirror-to)."""
    doc = yaml.safe_load(POLICY.replace("BROKER", "mqtt://mosquitto:1883"))
    doc["spec"]["target"] = {"kserve": {"inferenceService": "chat"}}
    router = router_for(ShadowPolicy.model_validate(doc), kube_client)
    assert isinstance(router, SplitWithTapMirror) and isinstance(router.split, KServeRouter)
    assert router.tap.candidate_url == router.split.candidate_url
    assert router.capabilities.can_mirror and router.capabilities.can_split

    def isvc(traffic: list[dict[str, Any]]) -> dict[str, Any]:
        return {"status": {"components": {"predictor": {
            "latestReadyRevision": "chat-predictor-00002", "latestRolledoutRevision": "chat-predictor-00001",
            "traffic": traffic}}}}

    tagged = [{"revisionName": "chat-predictor-00002", "latestRevision": True, "percent": 0, "tag": "latest",
               "url": "http://latest-chat-predictor.llm.example.com"},
              {"revisionName": "chat-predictor-00001", "latestRevision": False, "percent": 100, "tag": "prev",
               "url": "http://prev-chat-predictor.llm.example.com"}]
    assert candidate_url_of(isvc(tagged)) == "http://latest-chat-predictor.llm.example.com"
    untagged = [{"revisionName": "chat-predictor-00002", "latestRevision": True, "percent": 0},
                {k: v for k, v in tagged[1].items()}]
    assert candidate_url_of(isvc(untagged)) is None  # only the primary's (prev) URL: never mirror to that
    assert candidate_url_of({}) is None
