"""Pairing a policy's partitions in worker processes, their counts added up for the judge (#19 item 2).

Real parts: a real Mosquitto, two real worker processes (spawned) each running the MQTT output source on
its partitions, the controller's OutputHub and Analyzer; nothing is mocked. A worker is SIGKILLed to show
it is started again.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import pytest
import yaml
from tap_helpers import eventually

from shadowctl.compare.comparators import AgreementTally
from shadowctl.compare.events import Endpoint, OutputEvent, Variant
from shadowctl.compare.partitions import partition, partition_topic
from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.outputs import OutputHub
from shadowctl.machine import RolloutState
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.status import ComparatorCounts, Phase
from shadowctl.sources.base import SourceConfigError
from shadowctl.sources.partitioned import PartitionedOutputSource, add_tallies, partitioned_source

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]
TOPIC = "shadowctl/outputs/llm/chat"


def _policy(broker_url: str, partitions: int = 4, **outputs: Any) -> ShadowPolicy:
    doc: dict[str, Any] = yaml.safe_load((REPO / "policies" / "chat-paired-latency.yaml").read_text())
    analysis = doc["spec"]["analysis"]
    analysis["outputs"]["mqtt"] = {"broker": broker_url, "topic": f"{TOPIC}/+", "partitions": partitions}
    analysis["outputs"]["minPairs"] = 10
    analysis["outputs"].update(outputs)
    analysis["metrics"] = [{"name": "ttft-paired", "kind": "paired-latency", "quantity": "ttft", "margin": "10%",
                            "minSamples": 10}]
    return ShadowPolicy.model_validate(doc)


def _events(prefix: str, n: int, *, agree: bool = True) -> list[OutputEvent]:
    out = []
    for i in range(n):
        for v in (Variant.primary, Variant.candidate):
            text = "Paris is the capital." if agree or v is Variant.primary else "I cannot help with that request."
            out.append(OutputEvent(request_id=f"{prefix}{i}", variant=v, shadow=v is not Variant.primary,
                                   service="llm/chat", endpoint=Endpoint.chat, stream=True, prompt_hash=f"h{i}",
                                   output=text, output_tokens=5, status=200, started_at=0.0, ttft_s=0.1 + i / 1e4,
                                   e2e_s=0.5))
    return out


async def _publish(broker: MosquittoBroker, events: list[OutputEvent]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as pub:
        for e in events:
            await pub.publish(partition_topic(f"{TOPIC}/{e.variant.value}", e.request_id, 4), e.to_json(), qos=1)


def _pairs(source: PartitionedOutputSource) -> int:
    counts = source.snapshot().tally.counts.get("token-f1")
    return counts.candidate_pairs if counts is not None else 0


async def test_two_worker_processes_pair_disjoint_partitions_and_the_judge_sees_the_sum(
        mosquitto: MosquittoBroker) -> None:
    policy = _policy(mosquitto.url)
    sources: list[PartitionedOutputSource] = []

    def factory(p: ShadowPolicy) -> PartitionedOutputSource:
        sources.append(partitioned_source(p, workers=2))
        return sources[-1]

    hub = OutputHub(factory)
    analyzer = Analyzer(None, hub)
    since = 1_000.0
    state = RolloutState(phase=Phase.shadowing, phase_started_at=since, rollout_started_at=since, candidate="v2")
    try:
        await analyzer.look(policy, state, since + 30)  # starts the source, hence the two processes
        [source] = sources
        await eventually(lambda: source.snapshot().connected, limit=60, what="both workers connected")
        pids = source.pids()
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()

        await _publish(mosquitto, _events("a", 150) + _events("d", 50, agree=False))
        await eventually(lambda: _pairs(source) == 200, limit=30, what="200 pairs over both workers")
        workers = source.snapshot().workers
        expected0 = sum(partition(f"{p}{i}", 4) in (0, 2) for p, n in (("a", 150), ("d", 50)) for i in range(n))
        assert workers[0].tally.counts["token-f1"].candidate_pairs == expected0  # its own partitions only
        assert workers[1].tally.counts["token-f1"].candidate_pairs == 200 - expected0
        look = await analyzer.look(policy, state, since + 60)
        agreement = {r.name: r for r in look.verdict.results}["agreement/token-f1"]
        assert agreement.n_candidate == 200  # what the judge saw: the sum
        assert look.tally is not None and look.tally.counts["token-f1"].candidate_agree == 150
        ttft = {r.name: r for r in look.verdict.results}["ttft-paired"].to_record()
        assert ttft.extra is not None and ttft.extra["pairs"] == 200

        # A new phase counts afresh in every worker.
        since2 = since + 100
        state2 = RolloutState(phase=Phase.shadowing, phase_started_at=since2, rollout_started_at=since,
                              candidate="v2")
        await analyzer.look(policy, state2, since2 + 1)
        assert _pairs(source) == 0
        await eventually(lambda: source.snapshot().connected, limit=30, what="both workers reset")
        await _publish(mosquitto, _events("n", 40))
        await eventually(lambda: _pairs(source) == 40, limit=30, what="40 pairs of the new phase")

        # A worker killed is started again and its partitions are paired again.
        first = pids[0]
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: source.restarts == 1 and source.pids()[0] != pids[0], limit=30,
                         what="worker 0 started again")
        await eventually(lambda: source.snapshot().connected, limit=60, what="worker 0 connected again")
        before = source.snapshot().workers[1].tally.counts["token-f1"].candidate_pairs
        await _publish(mosquitto, _events("k", 60))
        # Worker 0 restarted from zero in this phase: it counts only its share of the 60.
        k0 = sum(partition(f"k{i}", 4) in (0, 2) for i in range(60))
        await eventually(lambda: (source.snapshot().workers.get(0) is not None
                                  and source.snapshot().workers[0].tally.counts.get("token-f1", ComparatorCounts())
                                  .candidate_pairs == k0
                                  and source.snapshot().workers[1].tally.counts["token-f1"].candidate_pairs
                                  == before + 60 - k0), limit=30, what="both workers pair the new events")
    finally:
        await hub.close()
    # Stopping the source stops its processes.
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("shadowctl-pairing-")]


def test_the_sum_of_tallies_and_what_workers_cannot_carry() -> None:
    a = AgreementTally(counts={"exact": ComparatorCounts(candidate_pairs=3, candidate_agree=2, baseline_pairs=1)})
    b = AgreementTally(counts={"exact": ComparatorCounts(candidate_pairs=4, candidate_agree=4),
                               "token-f1": ComparatorCounts(candidate_pairs=1)}, skipped_primary_failed=2)
    total = add_tallies([a, b])
    assert total.counts["exact"] == ComparatorCounts(candidate_pairs=7, candidate_agree=6, baseline_pairs=1)
    assert total.counts["token-f1"].candidate_pairs == 1 and total.skipped_primary_failed == 2
    with pytest.raises(SourceConfigError, match=r"3 pairing workers need .*partitions >= 3 \(it is 2"):
        partitioned_source(_policy("mqtt://b:1883", partitions=2), workers=3)
    semantic = _policy("mqtt://b:1883", comparators=[{"name": "semantic", "threshold": 0.8}])
    with pytest.raises(SourceConfigError, match="semantic comparator runs in the controller's process only"):
        partitioned_source(semantic, workers=2)
