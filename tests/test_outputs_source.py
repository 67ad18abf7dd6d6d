"""The MQTT output source against a real Mosquitto: strict parsing, pairing, tally, errors, and the
whole chain primary tap -> mirror -> candidate tap -> broker -> source. Nothing is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiomqtt
import httpx
import pytest
from openai_stub import OpenAIStub
from tap_helpers import eventually, free_port, running_tap

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.comparators import BoundComparator, build_comparators
from shadowctl.compare.events import Endpoint, OutputEvent, Variant
from shadowctl.policy.model import Comparator, ComparatorName, ShadowPolicy
from shadowctl.sources.base import SourceConfigError, SourceError
from shadowctl.sources.outputs import MAX_EVENT_BYTES, BrokerUnavailable, MqttOutputSource, load_local_embedder
from shadowctl.tap.proxy import MirrorConfig

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker


TOPIC = "shadowctl/outputs/ns/chat/+"


def ev(rid: str, variant: Variant, output: str) -> OutputEvent:
    return OutputEvent(request_id=rid, variant=variant, shadow=variant is not Variant.primary, service="ns/chat",
                       endpoint=Endpoint.chat, prompt_hash="h", output=output, status=200, started_at=0.0, e2e_s=0.1)


@contextlib.asynccontextmanager
async def running(source: MqttOutputSource) -> AsyncIterator[MqttOutputSource]:
    task = asyncio.create_task(source.run())
    try:
        await asyncio.wait_for(source.subscribed.wait(), 10)
        yield source
    finally:
        await cancel_and_wait(task)


def make_source(broker: MosquittoBroker, *, baseline: bool = True) -> MqttOutputSource:
    comps = build_comparators([Comparator(name=ComparatorName.exact, threshold=1.0),
                               Comparator(name=ComparatorName.token_f1, threshold=0.5)])
    return MqttOutputSource(broker.url, TOPIC, comps, pair_ttl_s=30, expect_baseline=baseline)


async def test_a_disagreeing_pair_keeps_the_user_s_trace_id(mosquitto: MosquittoBroker) -> None:
    """The traceparent a tap copied into the primary's event reaches the tally's last disagreements."""
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    source = make_source(mosquitto, baseline=False)
    async with running(source), aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
        primary = ev("t1", Variant.primary, "yes").model_copy(update={"traceparent": tp})
        for variant, event in [("primary", primary), ("candidate", ev("t1", Variant.candidate, "no"))]:
            await pub.publish(f"shadowctl/outputs/ns/chat/{variant}", event.to_json(), qos=1)
        await eventually(lambda: bool(source.snapshot().tally.disagreements), what="the disagreement")
    [d] = source.snapshot().tally.disagreements
    assert (d.request_id, d.trace_id) == ("t1", "4bf92f3577b34da6a3ce929d0e0e4736")
    assert sorted(d.comparators) == ["exact", "token-f1"]


async def test_pairs_tallies_and_counts_malformed(mosquitto: MosquittoBroker) -> None:
    source = make_source(mosquitto)
    async with running(source), aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
        messages = [
            ("candidate", ev("1", Variant.candidate, "the answer is 4")),  # before its primary
            ("primary", ev("1", Variant.primary, "The answer is 4")),
            ("baseline", ev("1", Variant.baseline, "The answer is 4")),
            ("primary", ev("2", Variant.primary, "yes")),
            ("candidate", ev("2", Variant.candidate, "no")),
            ("candidate", ev("2", Variant.candidate, "no")),  # duplicate delivery
        ]
        for variant, event in messages:
            await pub.publish(f"shadowctl/outputs/ns/chat/{variant}", event.to_json(), qos=1)
        await pub.publish("shadowctl/outputs/ns/chat/primary", b'{"schema": "nope"}', qos=1)
        await pub.publish("shadowctl/outputs/ns/chat/primary", b"\xff\xfe", qos=1)
        await pub.publish("shadowctl/outputs/ns/chat/primary", b"{" + b" " * MAX_EVENT_BYTES + b"}", qos=1)
        await eventually(lambda: source.snapshot().malformed == 3 and
                         source.pairer.stats.duplicates[Variant.candidate] == 1, what="all messages")
    snap = source.snapshot()
    exact, f1 = snap.tally.counts["exact"], snap.tally.counts["token-f1"]
    assert (exact.candidate_pairs, exact.candidate_agree, exact.baseline_pairs, exact.baseline_agree) == (2, 0, 1, 1)
    assert (f1.candidate_pairs, f1.candidate_agree) == (2, 1)  # case differs, tokens agree
    assert snap.pending == 1  # request 2 still waits for its baseline
    assert snap.pairing["paired"] == {"primary": 0, "candidate": 2, "baseline": 1}
    source.reset()
    assert source.snapshot().tally.counts == {}


async def test_unreachable_broker_is_a_chained_source_error() -> None:
    source = MqttOutputSource(f"mqtt://127.0.0.1:{free_port()}", TOPIC, [], pair_ttl_s=1, expect_baseline=False,
                              timeout_s=2)
    with pytest.raises(BrokerUnavailable, match="connecting failed") as info:
        async for _ in source.events():
            pass
    assert isinstance(info.value, SourceError)
    assert isinstance(info.value.__cause__, aiomqtt.MqttError)
    assert not source.snapshot().connected


def test_from_policy_and_bad_config() -> None:
    doc = {
        "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy", "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "target": {"istio": {"virtualService": "chat", "primary": {"host": "chat", "subset": "v1"},
                                 "candidate": {"host": "chat", "subset": "v2"}}},
            "shadow": {"mirrorPercent": 50},
            "analysis": {"outputs": {"mqtt": {"broker": "mqtt://broker:1884"}, "pairTTL": "45s",
                                     "comparators": [{"name": "rouge-l"}], "baseline": {"mode": "fixed",
                                                                                        "agreement": 0.8}}},
        },
    }
    source = MqttOutputSource.from_policy(ShadowPolicy.model_validate(doc))
    assert source.topic == TOPIC and (source.host, source.port) == ("broker", 1884)
    assert source.pairer.ttl == 45 and not source.pairer.expect_baseline
    doc["spec"]["analysis"]["outputs"]["mqtt"]["topic"] = "x/{cluster}/+"  # type: ignore[index]
    with pytest.raises(SourceConfigError, match=r"unknown placeholder 'cluster'"):
        MqttOutputSource.from_policy(ShadowPolicy.model_validate(doc))


def test_semantic_extra_missing_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the extra is installed (hack/setup.sh installs it on this project's machines), its absence is
    simulated the way Python reports it: a None entry in sys.modules makes the import fail."""
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(SourceError, match=r"shadowctl\[semantic\]"):
        load_local_embedder("/nonexistent")


async def test_tap_to_source_end_to_end(mosquitto: MosquittoBroker) -> None:
    """Primary tap mirrors (application level) to the candidate's tap; the source pairs their events."""
    primary, candidate = OpenAIStub(answer="The capital of France is Paris."), OpenAIStub(answer="Paris.")
    await primary.start()
    await candidate.start()
    source = make_source(mosquitto, baseline=False)
    broker = (mosquitto.host, mosquitto.port)
    try:
        async with (
            running(source),
            running_tap(candidate.url, broker=broker, variant=Variant.candidate) as ctap,
            running_tap(primary.url, broker=broker, mirror=MirrorConfig(url=ctap.url, percent=100)) as ptap,
            httpx.AsyncClient() as client,
        ):
            for i in range(3):
                r = await client.post(ptap.url + "/v1/chat/completions", json={
                    "model": "m", "stream": i % 2 == 0, "messages": [{"role": "user", "content": f"q{i}"}]})
                assert r.status_code == 200
            await eventually(lambda: source.snapshot().tally.counts.get("exact") is not None
                             and source.snapshot().tally.counts["exact"].candidate_pairs == 3, what="3 pairs")
        tally = source.snapshot().tally.counts
        assert tally["exact"].candidate_agree == 0
        # token F1 of "the capital of france is paris" vs "paris": p=1, r=1/6 -> 2/7 < 0.5
        assert tally["token-f1"].candidate_agree == 0
        assert source.pairer.stats.not_shadow == 0
    finally:
        await primary.stop()
        await candidate.stop()


async def test_a_failing_comparator_costs_one_pair_not_the_connection(mosquitto: MosquittoBroker) -> None:
    """An exception while pairing or comparing one event must not end the source."""
    def score(primary: OutputEvent, other: OutputEvent) -> float:
        if other.output == "boom":
            raise RuntimeError("a comparator bug")
        return 1.0

    comps = [BoundComparator(name=ComparatorName.exact, threshold=0.5, critical=False, score=score)]
    source = MqttOutputSource(mosquitto.url, TOPIC, comps, pair_ttl_s=30, expect_baseline=False)
    async with running(source), aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
        for rid, answer in (("1", "boom"), ("2", "fine"), ("3", "fine")):
            await pub.publish("shadowctl/outputs/ns/chat/primary", ev(rid, Variant.primary, "x").to_json(), qos=1)
            await pub.publish("shadowctl/outputs/ns/chat/candidate", ev(rid, Variant.candidate, answer).to_json(),
                              qos=1)
        await eventually(lambda: "exact" in source.snapshot().tally.counts
                         and source.snapshot().tally.counts["exact"].candidate_pairs == 2, what="two pairs")
        assert source.snapshot().connected and source.pairer.stats.paired[Variant.candidate] == 3


async def test_slow_comparators_are_scored_off_the_event_loop(mosquitto: MosquittoBroker) -> None:
    """A semantic comparator's model must not stall the controller's loop (Lease renewals, ticks).

    The embedding function is a stand-in at the model boundary: it sleeps 0.4 s per text, as torch
    computes without holding the GIL. Scored on the loop, each pair would stall it for 0.8 s."""

    def slow_embed(text: str) -> list[float]:
        time.sleep(0.4)
        return [1.0, float(len(text))]

    comps = build_comparators([Comparator(name=ComparatorName.semantic, threshold=0.5)], embedder=slow_embed)
    assert [c.slow for c in comps] == [True]
    source = MqttOutputSource(mosquitto.url, TOPIC, comps, pair_ttl_s=30, expect_baseline=False)
    loop = asyncio.get_running_loop()
    worst = 0.0

    async def heartbeat() -> None:
        nonlocal worst
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            worst = max(worst, loop.time() - before)

    beat = asyncio.create_task(heartbeat())
    try:
        async with running(source), aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            for rid in ("1", "2", "3"):
                await pub.publish("shadowctl/outputs/ns/chat/primary", ev(rid, Variant.primary, "a").to_json(), qos=1)
                await pub.publish("shadowctl/outputs/ns/chat/candidate",
                                  ev(rid, Variant.candidate, "bb").to_json(), qos=1)
            await eventually(lambda: "semantic" in source.snapshot().tally.counts
                             and source.snapshot().tally.counts["semantic"].candidate_pairs == 3, 20, "3 pairs")
    finally:
        await cancel_and_wait(beat)
    assert worst < 0.4, f"the event loop stalled for {worst:.2f} s"
