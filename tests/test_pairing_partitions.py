"""Partitioned pairing (#19 item 2): the taps publish each request's events on one of P partitions, workers
pair disjoint partitions, MQTT 5 shared subscriptions give a partition a standby, and the pairer's memory
stays bounded under a storm of unmatched request ids.

Real parts: a real Mosquitto (2.0.11 here), the real MQTT output source, a real tap in front of the OpenAI
stub; nothing is mocked. The pure rules (which partition, which subscriptions) are tested on literal data.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiomqtt
import httpx
import pytest
from openai_stub import OpenAIStub
from tap_helpers import eventually, running_tap

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.comparators import build_comparators
from shadowctl.compare.events import Endpoint, OutputEvent, Variant, parse_event
from shadowctl.compare.pairing import Pairer
from shadowctl.compare.partitions import assignment, partition, partition_filters, partition_topic, shared
from shadowctl.compare.routing import bucket
from shadowctl.policy.model import Comparator, ComparatorName, Mqtt
from shadowctl.sources.base import SourceConfigError
from shadowctl.sources.outputs import DRAIN_BATCH, MqttOutputSource
from shadowctl.tap.proxy import default_topic
from shadowctl.tap.sampling import sampled

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

TOPIC = "shadowctl/outputs/llm/chat"
P, C = Variant.primary, Variant.candidate


def _event(rid: str, variant: Variant, output: str = "Paris.") -> OutputEvent:
    return OutputEvent(request_id=rid, variant=variant, shadow=variant is not P, service="llm/chat",
                       endpoint=Endpoint.chat, prompt_hash=f"h{rid}", output=output, status=200, started_at=0.0,
                       e2e_s=0.1)


# --------------------------------------------------------------------------- the pure rules


def test_a_requests_partition_is_the_routers_hash_modulo_p_and_spreads_sampled_requests() -> None:
    ids = [f"req-{i}" for i in range(40_000)]
    assert all(partition(i, 1) == 0 for i in ids[:100])
    assert [partition(i, 4) for i in ids[:1000]] == [bucket(i) % 4 for i in ids[:1000]]  # the one hash
    # Sampling keeps the lowest buckets; the remainder, not a slice of the range, still spreads them evenly
    # (slices would put every request sampled at 10% in partition 0 of 4).
    kept = [i for i in ids if sampled(i, 0.1)]
    per = Counter(partition(i, 4) for i in kept)
    assert sorted(per) == [0, 1, 2, 3] and all(abs(n / len(kept) - 0.25) < 0.03 for n in per.values()), per
    assert partition_topic(f"{TOPIC}/primary", "req-1", 1) == f"{TOPIC}/primary"
    assert partition_topic(f"{TOPIC}/primary", "req-1", 4) == f"{TOPIC}/primary/{bucket('req-1') % 4}"


def test_workers_get_disjoint_partitions_covering_all_and_their_subscriptions() -> None:
    for workers in (1, 2, 3, 5):
        parts = [assignment(w, workers, 4) for w in range(workers)]
        assert sorted(k for p in parts for k in p) == [0, 1, 2, 3]
    assert assignment(1, 2, 4) == (1, 3)
    assert partition_filters(f"{TOPIC}/+", 1) == [f"{TOPIC}/+"]
    assert partition_filters(f"{TOPIC}/+", 4, (3, 1)) == [f"{TOPIC}/+/1", f"{TOPIC}/+/3"]
    assert shared("pairing", f"{TOPIC}/+/1") == f"$share/pairing/{TOPIC}/+/1"
    with pytest.raises(ValueError, match="ends in '#'"):
        partition_filters("shadowctl/outputs/#", 4)
    with pytest.raises(ValueError, match=r"partition 4 is not in 0\.\.3"):
        partition_filters(f"{TOPIC}/+", 4, (4,))
    with pytest.raises(ValueError, match="one topic level"):
        shared("a/b", TOPIC)
    with pytest.raises(ValueError, match=r"worker 2 is not in 0\.\.1"):
        assignment(2, 2, 4)
    with pytest.raises(ValueError, match="needs a topic that does not end in '#'"):
        Mqtt(broker="mqtt://b:1883", topic="shadowctl/outputs/#", partitions=4)
    with pytest.raises(SourceConfigError, match=r"outputs\.mqtt: .*ends in .#."):
        MqttOutputSource("mqtt://127.0.0.1:1", "shadowctl/outputs/#", [], pair_ttl_s=10, expect_baseline=False,
                         partitions=4)


def test_a_storm_of_unmatched_ids_stays_within_the_pairers_bounds() -> None:
    """90% of primaries never get a partner when 10% is mirrored: ids and the texts they hold are both bounded,
    the oldest evicted and counted, and pairs still form during and after the storm."""
    pairer = Pairer(ttl=600, max_pending=5_000, max_pending_chars=1_000_000)
    answer = "x" * 1_000
    peak_ids = peak_chars = 0
    pairs = 0
    for i in range(50_000):  # all within the TTL: only the bounds can hold memory down
        pairer.add(_event(f"lone-{i}", P, answer), now=i * 0.001)
        if i % 100 == 0:  # a request whose mirrored copy came back at once
            pairer.add(_event(f"pair-{i}", P, answer), now=i * 0.001)
            pairs += len(pairer.add(_event(f"pair-{i}", C, answer), now=i * 0.001))
        peak_ids, peak_chars = max(peak_ids, len(pairer)), max(peak_chars, pairer.held_chars)
    assert pairs == 500
    assert peak_chars <= 1_000_000 and peak_ids <= 1_000  # the character budget binds before the id count
    assert pairer.stats.evicted[P] == 50_000 + 500 - pairs - len(pairer)
    assert pairer.held_chars == sum(len(e.output) for p in pairer._pending.values() for e in p.events.values())
    # The entry an event joins is never the one evicted for it, even when it is the oldest.
    small = Pairer(ttl=600, max_pending_chars=2_500)
    small.add(_event("old", P, "a" * 1_000), now=0)
    small.add(_event("new", P, "b" * 1_000), now=1)
    (pair,) = small.add(_event("old", C, "a" * 1_000), now=2)
    assert pair.request_id == "old" and small.stats.evicted[P] == 1 and len(small) == 0
    # Ids count too, as before: max_pending alone.
    counted = Pairer(ttl=600, max_pending=100)
    for i in range(1_000):
        counted.add(_event(f"n{i}", P, ""), now=0)
    assert len(counted) == 100 and counted.stats.evicted[P] == 900


# --------------------------------------------------------------------------- through a real Mosquitto


def _source(broker: MosquittoBroker, *, mine: tuple[int, ...] | None, partitions: int = 4,
            group: str | None = None) -> MqttOutputSource:
    comparators = build_comparators([Comparator(name=ComparatorName.exact)])
    return MqttOutputSource(broker.url, f"{TOPIC}/+", comparators, pair_ttl_s=60, expect_baseline=False,
                            partitions=partitions, mine=mine, share_group=group)


@contextlib.asynccontextmanager
async def _running(*sources: MqttOutputSource) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run()) for s in sources]
    try:
        await eventually(lambda: all(s.subscribed.is_set() for s in sources), what="every source subscribed")
        yield
    finally:
        await cancel_and_wait(*tasks)


async def _publish(broker: MosquittoBroker, events: list[OutputEvent], partitions: int = 4) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as pub:
        for e in events:
            topic = partition_topic(f"{TOPIC}/{e.variant.value}", e.request_id, partitions)
            await pub.publish(topic, e.to_json(), qos=1)


def _pairs(prefix: str, n: int) -> list[OutputEvent]:
    return [e for i in range(n) for e in (_event(f"{prefix}{i}", P), _event(f"{prefix}{i}", C))]


def _paired(source: MqttOutputSource) -> int:
    return source.pairer.stats.paired[C]


def _received(source: MqttOutputSource) -> int:
    return sum(source.pairer.stats.received.values())


async def test_two_workers_pair_disjoint_partitions_and_every_pair_once(mosquitto: MosquittoBroker) -> None:
    w0, w1 = _source(mosquitto, mine=assignment(0, 2, 4)), _source(mosquitto, mine=assignment(1, 2, 4))
    assert w0.filters == [f"{TOPIC}/+/0", f"{TOPIC}/+/2"] and w1.filters == [f"{TOPIC}/+/1", f"{TOPIC}/+/3"]
    events = _pairs("r", 400)
    async with _running(w0, w1):
        await _publish(mosquitto, events)
        await eventually(lambda: _paired(w0) + _paired(w1) == 400, limit=30, what="400 pairs over both workers")
        await asyncio.sleep(0.2)
    assert _received(w0) + _received(w1) == 800  # each event reached exactly one worker
    expected0 = sum(1 for i in range(400) if partition(f"r{i}", 4) in (0, 2))
    assert _paired(w0) == expected0 and _paired(w1) == 400 - expected0
    assert 120 < expected0 < 280  # both did a share of the work
    total = w0.tally.counts["exact"].candidate_pairs + w1.tally.counts["exact"].candidate_pairs
    assert total == 400 and len(w0.pairer) == len(w1.pairer) == 0  # nothing left waiting for a partner


async def test_a_shared_subscription_delivers_each_event_once_and_the_standby_takes_over(
        mosquitto: MosquittoBroker) -> None:
    """Mosquitto 2.0.11 hands each message of a shared subscription to one member of the group (in turn, as
    this test measures: both members get some), so while two members run a pair may be split between them;
    once one goes away the other gets every event and pairs them all."""
    active, standby = (_source(mosquitto, mine=(0, 1, 2, 3), group="pairing") for _ in range(2))
    assert active.filters[0] == f"$share/pairing/{TOPIC}/+/0"
    async with _running(standby):
        async with _running(active):
            await _publish(mosquitto, _pairs("both", 200))
            await eventually(lambda: _received(active) + _received(standby) == 400, limit=30,
                             what="400 events over the group")
            await asyncio.sleep(0.2)
            assert _received(active) + _received(standby) == 400  # once each, not twice
            assert _received(active) > 0 and _received(standby) > 0  # shared, not copied
        before = _paired(standby)
        # The active member is gone: the standby receives everything from now on and completes every pair.
        await _publish(mosquitto, _pairs("after", 200))
        await eventually(lambda: _paired(standby) - before == 200, limit=30, what="the standby pairs all 200")


async def test_the_tap_publishes_each_event_on_its_requests_partition(
        stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    got: list[tuple[str, bytes]] = []
    ready = asyncio.Event()

    async def collect() -> None:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.subscribe(f"{default_topic('ns', 'chat', P)}/#", qos=1)
            ready.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                got.append((str(message.topic), message.payload))

    collector = asyncio.create_task(collect())
    try:
        await eventually(ready.is_set, what="the collector subscribed")
        async with (running_tap(stub.url, broker=(mosquitto.host, mosquitto.port), partitions=4) as tap,
                    httpx.AsyncClient(timeout=30) as client):
            chat = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}]}
            for i in range(40):
                r = await client.post(tap.url + "/v1/chat/completions", json=chat, headers={"x-request-id": f"t{i}"})
                assert r.status_code == 200
            await eventually(lambda: len(got) == 40, limit=20, what="40 events")
    finally:
        await cancel_and_wait(collector)
    base = default_topic("ns", "chat", P)
    assert {(topic, parse_event(payload).request_id) for topic, payload in got} == {
        (f"{base}/{partition(f't{i}', 4)}", f"t{i}") for i in range(40)}
    assert len({topic for topic, _ in got}) == 4


def test_the_source_takes_what_is_already_queued_in_batches_in_order() -> None:
    """What the client queued behind a message is taken without a wait per message, at most DRAIN_BATCH at a
    time (the loop gets a turn between batches), in arrival order, nothing lost: the real broker tests above
    count every event through this path."""
    source = _source_for_queue()
    inbox = source._inbox_type()(maxsize=0)
    assert source._inbox is inbox
    messages = [aiomqtt.Message(f"{TOPIC}/primary", f"m{i}".encode(), qos=1, retain=False, mid=i, properties=None)
                for i in range(DRAIN_BATCH + 36)]
    for m in messages[1:]:
        inbox.put_nowait(m)
    first = source._received(messages[0])
    assert [m.payload for m in first] == [f"m{i}".encode() for i in range(DRAIN_BATCH)]
    rest = source._received(inbox.get_nowait())
    assert [m.payload for m in rest] == [f"m{i}".encode() for i in range(DRAIN_BATCH, DRAIN_BATCH + 36)]
    assert inbox.empty()


def _source_for_queue() -> MqttOutputSource:
    return MqttOutputSource("mqtt://127.0.0.1:1", f"{TOPIC}/+", [], pair_ttl_s=60, expect_baseline=False)
