"""spec.analysis.outputs.sampling and outputs.mqtt.partitions (#19 items 1 and 2) from the policy to the
verdict: the verdict says how many requests its pairs stand for, and the real API server takes both fields
and refuses partitions on a topic ending in '#'.

Real parts: a real Mosquitto, the controller's OutputHub running the real MQTT output source built from the
policy, the Analyzer; the real kube-apiserver with the generated CRD and the real kubectl. Nothing is mocked.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import yaml
from conftest_kube import KubeEnv
from tap_helpers import eventually

from shadowctl.compare.events import Endpoint, OutputEvent, Variant
from shadowctl.compare.partitions import partition_topic
from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.outputs import OutputHub
from shadowctl.judge import Verdict
from shadowctl.machine import RolloutState
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.status import Phase
from shadowctl.sim.cluster import find_binaries
from shadowctl.sources.outputs import MqttOutputSource

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]


def _doc(broker_url: str, sampling: float | None, partitions: int) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "policies" / "chat-paired-latency.yaml").read_text())
    analysis = doc["spec"]["analysis"]
    analysis["outputs"]["mqtt"] = {"broker": broker_url, "topic": "shadowctl/outputs/llm/chat/+",
                                   "partitions": partitions}
    if sampling is not None:
        analysis["outputs"]["sampling"] = {"fraction": sampling}
    analysis["outputs"]["minPairs"] = 10
    analysis["metrics"] = [{"name": "ttft-paired", "kind": "paired-latency", "quantity": "ttft", "margin": "10%",
                            "minSamples": 10}]
    return doc


def _events(n: int) -> list[OutputEvent]:
    return [OutputEvent(request_id=f"s{i}", variant=v, shadow=v is not Variant.primary, service="llm/chat",
                        endpoint=Endpoint.chat, stream=True, prompt_hash=f"h{i}", output="Paris is the capital.",
                        output_tokens=5, status=200, started_at=0.0, ttft_s=0.1 + i / 1000, e2e_s=0.5 + i / 1000)
            for i in range(n) for v in (Variant.primary, Variant.candidate)]


async def _verdict(broker: MosquittoBroker, sampling: float | None, partitions: int) -> Verdict:
    policy = ShadowPolicy.model_validate(_doc(broker.url, sampling, partitions))
    hub = OutputHub(lambda p: MqttOutputSource.from_policy(p))
    analyzer = Analyzer(None, hub)
    since = 1_000.0
    state = RolloutState(phase=Phase.shadowing, phase_started_at=since, rollout_started_at=since, candidate="v2")
    try:
        await analyzer.look(policy, state, since + 30)  # starts the source
        source = hub._entries[policy.key].source
        assert isinstance(source, MqttOutputSource)
        await eventually(lambda: source.subscribed.is_set(), what="the source subscribed")
        async with aiomqtt.Client(broker.host, broker.port) as pub:
            for e in _events(40):  # as taps started with --partitions publish them
                topic = partition_topic(f"shadowctl/outputs/llm/chat/{e.variant.value}", e.request_id, partitions)
                await pub.publish(topic, e.to_json(), qos=1)
        await eventually(lambda: source.pairer.stats.paired[Variant.candidate] == 40, limit=20, what="40 pairs")
        return (await analyzer.look(policy, state, since + 60)).verdict
    finally:
        await hub.close()


async def test_the_verdict_says_how_many_requests_the_sampled_pairs_stand_for(mosquitto: MosquittoBroker) -> None:
    verdict = await _verdict(mosquitto, 0.1, partitions=4)  # the source subscribes to the 4 partitions
    by = {r.name: r.to_record() for r in verdict.results}
    for name in ("agreement/token-f1", "ttft-paired"):
        extra = by[name].extra
        assert extra is not None and extra["sampledFraction"] == 0.1 and extra["requestsRepresented"] == 400, name
    assert "40 pairs stand for about 400 requests (the taps publish 0.1 of them)" in verdict.reason

    unsampled = await _verdict(mosquitto, None, partitions=1)
    assert all("requestsRepresented" not in (r.to_record().extra or {}) for r in unsampled.results)
    assert "stand for" not in unsampled.reason


def test_the_api_server_takes_sampling_and_partitions_and_refuses_partitions_on_a_hash_topic(
        kube_env: KubeEnv, tmp_path: Path) -> None:
    config = kube_env.direct_kubeconfig(tmp_path / "admin.kubeconfig", namespace="llm")
    path = tmp_path / "policy.yaml"

    def apply(doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        path.write_text(yaml.safe_dump(doc))
        return subprocess.run([str(find_binaries().kubectl), f"--kubeconfig={config}", "apply", "--dry-run=server",
                               "-f", str(path)], capture_output=True, text=True, timeout=60, check=False)

    doc = _doc("mqtt://mosquitto.shadowctl.svc:1883", 0.1, partitions=8)
    done = apply(doc)
    assert done.returncode == 0, done.stderr
    doc["spec"]["analysis"]["outputs"]["mqtt"]["topic"] = "shadowctl/outputs/llm/#"
    done = apply(doc)
    assert done.returncode != 0 and "needs a topic that does not end in '#'" in done.stderr, done.stderr
    doc = _doc("mqtt://mosquitto.shadowctl.svc:1883", 0.0, partitions=1)
    done = apply(doc)
    assert done.returncode != 0 and "spec.analysis.outputs.sampling.fraction" in done.stderr, done.stderr
