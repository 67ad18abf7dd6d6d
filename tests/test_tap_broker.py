"""The tap never hurts user traffic: a broker that is absent or frozen costs events, not requests.

Real Mosquitto (started late, or frozen with SIGSTOP to play a broker that accepts connections
but answers nothing) and the OpenAI stub upstream; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httpx
from openai_stub import OpenAIStub
from tap_helpers import collecting, eventually, running_tap

from shadowctl.compare.events import parse_event

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker


CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
# Generous: far above a proxied request on a loaded 2-core machine, far below the broker stall
# the requests would otherwise wait for (the frozen broker never answers at all).
BOUND_S = 15.0


async def _burst(client: httpx.AsyncClient, url: str, n: int, prefix: str) -> list[int]:
    async def one(i: int) -> int:
        r = await client.post(url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": f"{prefix}{i}"})
        return r.status_code

    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), BOUND_S)


async def test_absent_broker_then_recovery(stub: OpenAIStub, mosquitto_broker: MosquittoBroker) -> None:
    broker = mosquitto_broker  # not started yet: connection refused
    async with (
        running_tap(stub.url, broker=(broker.host, broker.port), queue_size=3) as tap,
        httpx.AsyncClient() as client,
    ):
        assert await _burst(client, tap.url, 10, "down-") == [200] * 10
        dropped = tap.sample("shadowctl_tap_events_dropped_total", {"reason": "queue_full"})
        # 3 fit in the queue; a 4th may be held by the publisher's connect attempt when the burst arrives.
        assert dropped in (6, 7)
        assert tap.sample("shadowctl_tap_broker_connected") == 0

        broker.start()  # the broker comes back on the same port
        async with collecting(broker.host, broker.port, tap.topic) as got:
            assert tap.publisher is not None
            await asyncio.wait_for(tap.publisher.connected.wait(), BOUND_S)
            assert await _burst(client, tap.url, 2, "up-") == [200, 200]
            await eventually(lambda: {"up-0", "up-1"} <= {parse_event(m).request_id for m in got.messages},
                             what="events after recovery")
            await eventually(lambda: tap.sample("shadowctl_tap_events_published_total") >= (10 - dropped) + 2,
                             what="the queued events published")
        # the three events queued while the broker was down were published once it was back
        assert tap.sample("shadowctl_tap_events_published_total") == (10 - dropped) + 2


async def test_frozen_broker_does_not_slow_requests(stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    async with (
        running_tap(stub.url, broker=(mosquitto.host, mosquitto.port), queue_size=5, broker_timeout_s=1.0) as tap,
        httpx.AsyncClient() as client,
    ):
        assert tap.publisher is not None
        await asyncio.wait_for(tap.publisher.connected.wait(), BOUND_S)
        mosquitto.pause()
        try:
            start = time.monotonic()
            assert await _burst(client, tap.url, 30, "frozen-") == [200] * 30
            assert time.monotonic() - start < BOUND_S
            assert tap.sample("shadowctl_tap_events_dropped_total", {"reason": "queue_full"}) >= 30 - 5 - 1
        finally:
            mosquitto.resume()
        async with collecting(mosquitto.host, mosquitto.port, tap.topic) as got:
            await eventually(lambda: tap.sample("shadowctl_tap_broker_connected") == 1, limit=BOUND_S)
            assert await _burst(client, tap.url, 1, "thawed-") == [200]
            await eventually(lambda: any(parse_event(m).request_id == "thawed-0" for m in got.messages),
                             limit=BOUND_S, what="an event after the broker thawed")
