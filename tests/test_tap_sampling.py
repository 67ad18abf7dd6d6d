"""Consistent sampling in the tap (`shadowctl tap --sample F`): the primary's and the candidate's taps publish
the events of the same fraction of requests, and every request still passes through.

Real parts: two taps in this process (the primary's, which mirrors every request to the candidate's tap as
Istio would, and the candidate's), the OpenAI stub behind them, and a real Mosquitto; nothing is mocked.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httpx
import pytest
from openai_stub import OpenAIStub
from tap_helpers import RunningTap, collecting, eventually, running_tap

from shadowctl.compare.events import Variant, parse_event
from shadowctl.compare.routing import in_share
from shadowctl.tap.proxy import MirrorConfig, default_topic
from shadowctl.tap.sampling import Sampler, check_fraction, sampled

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "stream": False}
N = 1000
F = 0.1


def test_the_decision_is_the_routers_hash_and_nests_in_the_mirrored_share() -> None:
    ids = [f"req-{i}" for i in range(20_000)]
    assert all(sampled(i, 1.0) for i in ids[:100])
    assert [sampled(i, 0.1) for i in ids] == [in_share(i, 10.0) for i in ids]  # one hash with the tap router
    # Sampling 10% of what a router mirrors at 20%: every sampled request was mirrored (its pair exists).
    assert all(in_share(i, 20.0) for i in ids if sampled(i, 0.1))
    share = sum(sampled(i, 0.25) for i in ids) / len(ids)
    assert abs(share - 0.25) < 0.02, share
    for bad in (0.0, -0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"--sample: .* not a fraction in \(0, 1\]"):
            check_fraction(bad)
    sampler = Sampler(0.5)
    kept = sum(sampler.keep(i) for i in ids[:1000])
    assert sampler.requests.labels("sampled")._value.get() == kept
    assert sampler.requests.labels("skipped")._value.get() == 1000 - kept


async def test_primary_and_candidate_taps_publish_the_same_tenth(stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    broker = (mosquitto.host, mosquitto.port)
    async with (
        running_tap(stub.url, broker=broker, variant=Variant.candidate, sample=F, queue_size=2 * N) as candidate,
        running_tap(stub.url, broker=broker, sample=F, queue_size=2 * N,
                    mirror=MirrorConfig(url=candidate.url, percent=100.0, max_in_flight=256)) as primary,
        collecting(mosquitto.host, mosquitto.port, default_topic("ns", "chat", Variant.primary)) as got_primary,
        collecting(mosquitto.host, mosquitto.port, default_topic("ns", "chat", Variant.candidate)) as got_candidate,
        httpx.AsyncClient(timeout=30) as client,
    ):
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> tuple[int, bytes]:
            async with gate:
                r = await client.post(primary.url + "/v1/chat/completions", json=CHAT,
                                      headers={"x-request-id": f"sample-{i:04d}"})
                return r.status_code, r.content

        answers = await asyncio.gather(*(one(i) for i in range(N)))
        # Unsampled requests pass through unchanged: every one answered, with the upstream's own body.
        assert {status for status, _ in answers} == {200}
        assert {body for _, body in answers} == {stub.body("chat")}

        def counted(tap: RunningTap) -> float:
            return sum(tap.sample("shadowctl_tap_sampled_requests_total", {"decision": d}) for d in ("sampled", "skipped"))

        await eventually(lambda: counted(primary) == N and counted(candidate) == N, limit=60,
                         what="both taps decided for every request (the mirror copies included)")
        expected = primary.sample("shadowctl_tap_sampled_requests_total", {"decision": "sampled"})
        await eventually(lambda: len(got_primary.messages) >= expected and len(got_candidate.messages) >= expected,
                         limit=30, what="the sampled events on the broker")
        await asyncio.sleep(0.3)  # anything published beyond the sampled ones would show up by now

    primary_ids = {parse_event(m).request_id for m in got_primary.messages}
    candidate_ids = {parse_event(m).request_id for m in got_candidate.messages}
    assert abs(len(primary_ids) - F * N) <= 0.03 * N, len(primary_ids)  # 10% +- 3 points
    assert primary_ids == candidate_ids  # no pair broken
    assert len(got_primary.messages) == len(primary_ids) == expected
    assert primary.sample("shadowctl_tap_sampled_requests_total", {"decision": "skipped"}) == N - expected
    assert candidate.sample("shadowctl_tap_sampled_requests_total", {"decision": "sampled"}) == expected
    assert all(parse_event(m).shadow for m in got_candidate.messages)  # the candidate's events are the mirror's
