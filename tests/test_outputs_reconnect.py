"""The MQTT output source comes back after its broker does: stopped, or restarted with its sessions lost.

A real Mosquitto (tests/conftest_mqtt.py, persistence off, so a restart forgets every session and
subscription). The source's subscription is a clean session: after the broker comes back nothing of it
is left on the broker, so unless the source reconnects *and subscribes again*, no event reaches it and a
rollout comparing outputs waits in Shadowing for pairs that never come (the fault campaign's
``mqtt-down`` and ``mqtt-restart``, bench/faults). Nothing is mocked.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiomqtt
from tap_helpers import eventually

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.comparators import build_comparators
from shadowctl.compare.events import Endpoint, OutputEvent, Variant
from shadowctl.policy.model import Comparator, ComparatorName
from shadowctl.sources.outputs import MqttOutputSource

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

pytest_plugins = ["conftest_mqtt"]

TOPIC = "shadowctl/outputs/ns/chat/+"


def _event(rid: str, variant: Variant, output: str = "Paris.") -> OutputEvent:
    return OutputEvent(request_id=rid, variant=variant, shadow=variant is not Variant.primary, service="ns/chat",
                       endpoint=Endpoint.chat, prompt_hash="h", output=output, status=200, started_at=0.0, e2e_s=0.1)


async def _publish_pairs(broker: MosquittoBroker, prefix: str, n: int) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as pub:
        for i in range(n):
            for variant in (Variant.primary, Variant.candidate):
                await pub.publish(f"shadowctl/outputs/ns/chat/{variant.value}",
                                  _event(f"{prefix}-{i}", variant).to_json(), qos=1)


def _counts(source: MqttOutputSource) -> tuple[int, int]:
    """(candidate pairs, of which agreeing) as the token-f1 comparator counted them."""
    counts = source.snapshot().tally.counts.get("token-f1")
    return (counts.candidate_pairs, counts.candidate_agree) if counts is not None else (0, 0)


def _pairs(source: MqttOutputSource) -> int:
    return _counts(source)[0]


async def _back_and_counting(source: MqttOutputSource, broker: MosquittoBroker, before: int, prefix: str) -> None:
    """The source subscribed again, and pairs published now are counted on top of `before`."""
    await asyncio.wait_for(source.subscribed.wait(), 20)
    await _publish_pairs(broker, prefix, 5)
    await eventually(lambda: _pairs(source) == before + 5, what=f"5 more pairs after {prefix}", limit=20)


async def test_the_source_subscribes_again_after_the_broker_restarts_with_its_sessions_lost(
        mosquitto: MosquittoBroker) -> None:
    source = MqttOutputSource(mosquitto.url, TOPIC,
                              build_comparators([Comparator(name=ComparatorName.token_f1, threshold=0.5)]),
                              pair_ttl_s=30, expect_baseline=False, backoff_max_s=1.0)
    task = asyncio.create_task(source.run())
    try:
        await asyncio.wait_for(source.subscribed.wait(), 10)
        await _publish_pairs(mosquitto, "before", 5)
        await eventually(lambda: _pairs(source) == 5, what="5 pairs before the restart")

        # Restarted at once: the broker forgets the source's session and its subscription.
        mosquitto.stop()
        mosquitto.start()
        await eventually(lambda: not source.subscribed.is_set() or source.last_error is not None,
                         what="the source seeing the broker go", limit=10)
        await _back_and_counting(source, mosquitto, 5, "after-restart")
        assert source.connected and source.last_error is None

        # Down for a while (connections refused), then started again on the same port.
        mosquitto.stop()
        await eventually(lambda: not source.connected, what="the source seeing the broker down", limit=10)
        await asyncio.sleep(2.0)
        assert not source.subscribed.is_set()
        mosquitto.start()
        await _back_and_counting(source, mosquitto, 10, "after-down")
        assert _counts(source) == (15, 15)
    finally:
        await cancel_and_wait(task)
