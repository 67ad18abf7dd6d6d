"""The sampling fraction over the tap-router channel (route setting v3, ``sampleFraction``) and the adaptive target
(``spec.analysis.outputs.sampling.targetPairsPerSecond``, controller.sampling).

Real parts in the channel test: the controller's :class:`~shadowctl.routers.tap.TapRouter` on a real Mosquitto,
the primary's tap as a router (its :class:`~shadowctl.tap.routes.RouteFollower`, publishing its events), the
candidate's own tap (a plain tap started with the default ``--sample 1``, no channel), the OpenAI stub behind
each; the events are read from the broker. Nothing is mocked. The tuner's tests are pure (time is an argument).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml
from conftest_kube import KubeEnv
from openai_stub import OpenAIStub
from tap_helpers import collecting, eventually, running_tap

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.events import Variant, parse_event
from shadowctl.compare.routing import (
    ROUTE_SCHEMA,
    ROUTE_SCHEMA_V2,
    ROUTE_SCHEMA_V3,
    MalformedRouteMessage,
    make_setting,
    parse_setting,
    rfc3339,
)
from shadowctl.controller.analysis import with_sampling
from shadowctl.controller.sampling import SamplingTuner, next_fraction
from shadowctl.judge.model import Direction, Margin, MetricResult, Outcome, Verdict
from shadowctl.policy.model import ShadowPolicy
from shadowctl.routers.base import RouteState
from shadowctl.routers.tap import ChannelSettings, TapChannel, TapRouter
from shadowctl.sim.cluster import find_binaries
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.proxy import TapConfig, TapProxy, bound_port, default_topic, start_server
from shadowctl.tap.publisher import BrokerSettings, EventPublisher
from shadowctl.tap.routes import RouteFollower
from shadowctl.tap.sampling import sampled

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

NS, POLICY = "ns", "chat"
REPO = Path(__file__).resolve().parents[1]
CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def _setting(**fields: Any) -> Any:
    return make_setting(policy=f"{NS}/{POLICY}", generation=3, mirror_percent=20.0, candidate_url="http://c:8000",
                        issued_at=rfc3339(1_700_000_000), interval_seconds=10.0, **fields)


def test_the_fraction_needs_v3_and_settings_without_it_keep_their_older_schema() -> None:
    v1, v2 = _setting(), _setting(baseline_percent=5.0)
    assert (v1.schema_, v2.schema_) == (ROUTE_SCHEMA, ROUTE_SCHEMA_V2)
    assert "sampleFraction" not in json.loads(v1.to_json()) and "sampleFraction" not in json.loads(v2.to_json())
    v3 = _setting(sample_fraction=0.1, baseline_percent=5.0)
    data = json.loads(v3.to_json())
    assert (data["schema"], data["sampleFraction"], data["baselinePercent"]) == (ROUTE_SCHEMA_V3, 0.1, 5.0)
    assert parse_setting(v3.to_json()) == v3
    assert not v3.same_routes(v2)  # a new fraction is a new generation
    # Claiming an older schema with the field is refused (what an older tap's literal schema does with v3).
    plain = json.loads(_setting(sample_fraction=0.1).to_json())
    for older in (ROUTE_SCHEMA, ROUTE_SCHEMA_V2):
        with pytest.raises(MalformedRouteMessage, match=r"sampleFraction needs schema shadowctl\.dev/route/v3"):
            parse_setting(json.dumps({**plain, "schema": older}))
    with pytest.raises(MalformedRouteMessage, match="sampleFraction"):
        parse_setting(json.dumps({**data, "sampleFraction": 0}))


@contextlib.asynccontextmanager
async def routed_tap(upstream: str, broker: MosquittoBroker, queue: int) -> AsyncIterator[tuple[str, TapProxy]]:
    """The primary's tap as a router (--route-policy ns/chat), publishing its events (default --sample 1)."""
    metrics = TapMetrics("primary")
    config = TapConfig(upstream=upstream, variant=Variant.primary, namespace=NS, service="chat",
                       topic=default_topic(NS, "chat", Variant.primary), routed=True)
    settings = BrokerSettings(broker.host, broker.port, keepalive_s=5)
    follower = RouteFollower(settings, NS, POLICY, "tap-a", metrics, report_every_s=0.5)
    publisher = EventPublisher(settings, metrics, queue_size=queue, backoff_initial_s=0.05, backoff_max_s=0.2)
    proxy = TapProxy(config, publisher, metrics, follower)
    running = await start_server(proxy, "127.0.0.1", 0)
    tasks = [asyncio.create_task(follower.run()), asyncio.create_task(publisher.run())]
    try:
        await asyncio.wait_for(follower.connected.wait(), 10)
        yield f"http://127.0.0.1:{bound_port(running)}", proxy
    finally:
        await running.cleanup()
        for task in tasks:
            await cancel_and_wait(task)


@pytest.mark.asyncio
async def test_the_controller_sets_and_changes_the_fraction_and_every_pair_survives(
        stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    """The controller's setting carries F = 0.1; the routed primary tap applies it and its copies carry it to
    the candidate's tap (started without --sample), so both publish exactly the same tenth; then the controller
    lowers F to 0.05 (as the adaptive target does) with a new generation on its next route read, and both
    taps publish the same twentieth. Fails if the candidate's tap publishes at its own --sample (every copy),
    or if a change of F is not a new generation the taps apply."""
    n = 400
    wanted: list[float | None] = [0.1]
    second = OpenAIStub(answer="the candidate answers")
    await second.start()
    try:
        async with (
            running_tap(second.url, broker=(mosquitto.host, mosquitto.port), variant=Variant.candidate,
                        queue_size=2 * n) as candidate,
            routed_tap(stub.url, mosquitto, 2 * n) as (primary_url, primary),
            collecting(mosquitto.host, mosquitto.port, default_topic(NS, "chat", Variant.primary)) as got_primary,
            collecting(mosquitto.host, mosquitto.port, default_topic(NS, "chat", Variant.candidate)) as got_candidate,
            httpx.AsyncClient(timeout=30, trust_env=False) as client,
        ):
            async def url() -> str | None:
                return candidate.url

            channel = TapChannel(ChannelSettings(mosquitto.host, mosquitto.port), NS, POLICY)
            router = TapRouter(channel, NS, POLICY, 10.0, url, sampling=lambda: wanted[0])
            first = await router.apply(RouteState(100, 0, 100.0))  # returns once the tap reported it
            assert primary.routes is not None and primary.routes.current.sample_fraction == 0.1

            async def run(prefix: str) -> tuple[set[str], set[str]]:
                got_primary.messages.clear()
                got_candidate.messages.clear()
                gate = asyncio.Semaphore(16)

                async def one(i: int) -> int:
                    async with gate:
                        r = await client.post(primary_url + "/v1/chat/completions", json=CHAT,
                                              headers={"x-request-id": f"{prefix}-{i:04d}"})
                        return r.status_code

                assert set(await asyncio.gather(*(one(i) for i in range(n)))) == {200}
                await eventually(lambda: len(second.seen) >= n, limit=60, what="every copy reached the candidate")
                await asyncio.sleep(1.0)  # the events of the last answers reach the broker
                second.seen.clear()
                p = {parse_event(m).request_id for m in got_primary.messages}
                c = {parse_event(m).request_id for m in got_candidate.messages}
                return p, c

            p, c = await run("a")
            assert abs(len(p) - 0.1 * n) <= 0.03 * n, len(p)
            assert p == c  # the candidate's tap followed the copies' fraction, not its own --sample 1

            wanted[0] = 0.05
            assert await router.read() == RouteState(100, 0, 100.0)  # the heartbeat publishes the new F
            assert primary.routes.current.sample_fraction == 0.05
            assert int(primary.routes.current.generation or 0) == int(first.state.resource_version or 0) + 1
            p, c = await run("b")
            assert abs(len(p) - 0.05 * n) <= 0.03 * n, len(p)
            assert p == c
            assert all(parse_event(m).shadow for m in got_candidate.messages)
    finally:
        await second.stop()


@pytest.mark.asyncio
async def test_a_tap_takes_the_header_only_on_a_shadow_copy(stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    """The fraction header is honoured only on a shadow copy (``x-shadowctl-shadow: 1``, what a routed tap's copies
    carry): a user cannot thin out a tap's events on live traffic by sending it."""
    async with (
        running_tap(stub.url, broker=(mosquitto.host, mosquitto.port), sample=1.0) as t,
        httpx.AsyncClient(trust_env=False) as client,
    ):
        for i in range(20):
            await client.post(t.url + "/v1/chat/completions", json=CHAT,
                              headers={"x-request-id": f"live-{i}", "x-shadowctl-sample-fraction": "0.2"})
        await eventually(lambda: t.sample("shadowctl_tap_sampled_requests_total", {"decision": "sampled"}) == 20,
                         what="every live request sampled at the tap's own fraction")
        copies = [f"copy-{i}" for i in range(40)]
        for rid in copies:
            await client.post(t.url + "/v1/chat/completions", json=CHAT,
                              headers={"x-request-id": rid, "x-shadowctl-sample-fraction": "0.2",
                                       "x-shadowctl-shadow": "1"})
        kept = sum(sampled(rid, 0.2) for rid in copies)
        assert 0 < kept < len(copies)
        await eventually(lambda: t.sample("shadowctl_tap_sampled_requests_total", {"decision": "skipped"})
                         == len(copies) - kept, what="the copies decided at the header's fraction")
        assert t.sample("shadowctl_tap_sampled_requests_total", {"decision": "sampled"}) == 20 + kept


POLICY_YAML = """
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {name: chat, namespace: ns}
spec:
  target:
    kserve: {inferenceService: chat}
  shadow: {mode: tap, mirrorPercent: 100, minDuration: 10m, maxDuration: 1h, minPairs: 0}
  analysis:
    interval: 10s
    outputs:
      mqtt: {broker: "mqtt://broker:1883"}
      comparators: [{name: exact}]
      sampling: SAMPLING
  progressDeadline: 3h
"""


def _policy(sampling: str) -> ShadowPolicy:
    return ShadowPolicy.model_validate(yaml.safe_load(POLICY_YAML.replace("SAMPLING", sampling)))


def test_next_fraction_brings_the_rate_to_the_target_within_the_bounds() -> None:
    assert next_fraction(1.0, 500.0, 50.0, 0.01, 1.0) == 0.1
    assert next_fraction(0.1, 60.0, 50.0, 0.01, 1.0) == 0.1  # inside the band: unchanged
    assert next_fraction(0.1, 5000.0, 50.0, 0.01, 1.0) == 0.01  # never below the floor
    assert next_fraction(0.05, 5.0, 50.0, 0.01, 0.5) == 0.5  # raised again, never above the policy's fraction
    assert next_fraction(0.05, 0.0, 50.0, 0.01, 1.0) == 0.05  # no pairs: no information


def test_the_tuner_lowers_the_fraction_and_the_verdict_counts_each_stretch_at_its_own() -> None:
    policy = _policy("{fraction: 1, targetPairsPerSecond: 10, minFraction: 0.02}")
    tuner = SamplingTuner()
    since = 1000.0
    assert tuner.fraction(policy) == 1.0
    # 100 pairs/s at F = 1 for two intervals (20 s): F drops to 0.1.
    assert tuner.observe(policy, since, 1000, since + 10) is not None and tuner.fraction(policy) == 1.0
    tuner.observe(policy, since, 2000, since + 20)
    assert tuner.fraction(policy) == 0.1
    # Then 10 pairs/s at F = 0.1 for 20 s: 200 more pairs, standing for 2,000 requests.
    got = tuner.observe(policy, since, 2200, since + 40)
    assert got is not None and tuner.fraction(policy) == 0.1
    assert got.requests == pytest.approx(2000 + 2000) and got.fraction == pytest.approx(2200 / 4000)
    agreement = MetricResult(name="agreement/exact", outcome=Outcome.cont, statistic="agreement",
                             direction=Direction.decrease, margin=Margin(0.1, relative=True), critical=False,
                             n_primary=2200, n_candidate=2200, primary_value=0.9, candidate_value=0.9, effect=1.0,
                             interval=(0.95, 1.05), alpha=0.05, beta=0.2, crossed=None, threshold=None, sentence="")
    verdict = Verdict(Outcome.cont, (agreement,), "continue")
    said = with_sampling(policy, verdict, got)
    assert said.results[0].extra["requestsRepresented"] == 4000
    assert "2200 pairs stand for about 4000 requests" in said.reason and "0.1 now" in said.reason
    # A new phase starts from the policy's fraction; a fixed fraction never adapts.
    tuner.observe(policy, since + 100, 0, since + 100)
    assert tuner.fraction(policy) == 1.0
    fixed = _policy("{fraction: 0.1}")
    tuner.observe(fixed, since, 100_000, since + 60)
    assert tuner.fraction(fixed) == 0.1
    assert tuner.fraction(_policy("{fraction: 1}")) is None  # the default: no fraction in the setting (v1/v2)


def test_the_policy_refuses_a_floor_above_the_fraction_and_a_target_without_routed_taps() -> None:
    with pytest.raises(ValueError, match=r"minFraction 0\.5 is above fraction 0\.1"):
        _policy("{fraction: 0.1, targetPairsPerSecond: 5, minFraction: 0.5}")
    istio = POLICY_YAML.replace("kserve: {inferenceService: chat}",
                                "istio: {virtualService: chat, route: r, primary: {host: a}, candidate: {host: b}}")
    istio = istio.replace("mode: tap, ", "").replace("SAMPLING", "{targetPairsPerSecond: 5}")
    with pytest.raises(ValueError, match=r"targetPairsPerSecond needs shadow\.mode: tap"):
        ShadowPolicy.model_validate(yaml.safe_load(istio))


def test_the_api_server_takes_the_adaptive_target_and_refuses_a_zero_floor(kube_env: KubeEnv, tmp_path: Path) -> None:
    """The generated CRD on the real kube-apiserver (kubectl apply --dry-run=server) takes the KServe example policy
    with an adaptive target, and refuses a floor of 0."""
    config = kube_env.direct_kubeconfig(tmp_path / "admin.kubeconfig", namespace="llm")
    path = tmp_path / "policy.yaml"
    doc: dict[str, Any] = yaml.safe_load((REPO / "policies" / "chat-kserve.yaml").read_text())

    def apply(sampling: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        doc["spec"]["analysis"]["outputs"]["sampling"] = sampling
        path.write_text(yaml.safe_dump(doc))
        return subprocess.run([str(find_binaries().kubectl), f"--kubeconfig={config}", "apply", "--dry-run=server",
                               "-f", str(path)], capture_output=True, text=True, timeout=60, check=False)

    done = apply({"fraction": 0.5, "targetPairsPerSecond": 20, "minFraction": 0.01})
    assert done.returncode == 0, done.stderr
    done = apply({"fraction": 0.5, "targetPairsPerSecond": 20, "minFraction": 0})
    assert done.returncode != 0 and "spec.analysis.outputs.sampling.minFraction" in done.stderr, done.stderr
