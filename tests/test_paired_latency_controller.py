"""Paired latency from output events to the controller's verdict, through a real Mosquitto.

The taps' events are published to the broker as a tap publishes them; the controller's OutputHub
runs the real MQTT output source built from the policy, and the Analyzer judges its look. Nothing is
mocked: there is no metric source (the policy's metrics are all paired), which the analyzer allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import numpy as np
import yaml
from tap_helpers import eventually

from shadowctl.compare.events import Endpoint, OutputEvent, Variant
from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.outputs import OutputHub
from shadowctl.judge import Outcome
from shadowctl.machine import RolloutState
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.status import Phase
from shadowctl.sources.outputs import MqttOutputSource

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]


def _policy(broker: MosquittoBroker) -> ShadowPolicy:
    doc: dict[str, Any] = yaml.safe_load((REPO / "policies" / "chat-paired-latency.yaml").read_text())
    analysis = doc["spec"]["analysis"]
    analysis["outputs"]["mqtt"] = {"broker": broker.url, "topic": "shadowctl/outputs/llm/chat/+"}
    analysis["outputs"]["minPairs"] = 10
    analysis["metrics"] = [
        {"name": "ttft-paired", "kind": "paired-latency", "quantity": "ttft", "margin": "10%", "minSamples": 30},
        {"name": "tpot-paired", "kind": "paired-latency", "quantity": "tpot", "statistic": "mean", "margin": "10%",
         "minSamples": 30},
    ]
    return ShadowPolicy.model_validate(doc)


def _event(rid: str, variant: Variant, ttft: float | None, e2e: float, *, tokens: int = 21,
           status: int = 200) -> OutputEvent:
    return OutputEvent(request_id=rid, variant=variant, shadow=variant is not Variant.primary, service="llm/chat",
                       endpoint=Endpoint.chat, stream=ttft is not None, prompt_hash=f"h{rid}", output="same answer",
                       output_tokens=tokens, status=status, started_at=0.0, ttft_s=ttft, e2e_s=e2e)


async def _publish(broker: MosquittoBroker, events: list[OutputEvent]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as pub:
        for e in events:
            await pub.publish(f"shadowctl/outputs/llm/chat/{e.variant.value}", e.to_json(), qos=1)


def _pairs(prefix: str, n: int, factor: float, seed: int) -> list[OutputEvent]:
    """n requests whose own latency spans a factor of ~50, the candidate `factor` slower on each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        req = float(rng.lognormal(-1.0, 1.0))
        p_ttft, c_ttft = req * float(rng.lognormal(0, 0.1)), req * factor * float(rng.lognormal(0, 0.1))
        p_gen, c_gen = 20 * 0.02 * req, 20 * 0.02 * req * factor * float(rng.lognormal(0, 0.05))
        out += [_event(f"{prefix}{i}", Variant.primary, p_ttft, p_ttft + p_gen),
                _event(f"{prefix}{i}", Variant.candidate, c_ttft, c_ttft + c_gen)]
    return out


async def test_paired_latency_reaches_the_verdict_through_the_broker(mosquitto: MosquittoBroker) -> None:
    policy = _policy(mosquitto)
    hub = OutputHub(lambda p: MqttOutputSource.from_policy(p))
    analyzer = Analyzer(None, hub)
    since = 1_000.0
    state = RolloutState(phase=Phase.shadowing, phase_started_at=since, rollout_started_at=since, candidate="v2")
    try:
        first = await analyzer.look(policy, state, since + 30)  # starts the source; no pairs yet
        assert first.verdict.outcome is Outcome.nodata
        assert "no pairs yet" in {r.name: r for r in first.verdict.results}["ttft-paired"].sentence
        source = hub._entries[policy.key].source
        assert isinstance(source, MqttOutputSource) and source.quantities == ("ttft", "tpot")
        await eventually(lambda: source.subscribed.is_set(), what="the source subscribed")

        slow = _pairs("s", 60, 1.3, seed=1)
        # Three pairs whose candidate failed (not latency pairs), two non-streamed ones (no TTFT, no TPOT),
        # and one with a single output token (a TTFT but no TPOT).
        odd = [_event("e1", Variant.primary, 0.5, 1.0), _event("e1", Variant.candidate, 0.5, 1.0, status=500),
               _event("e2", Variant.primary, 0.5, 1.0), _event("e2", Variant.candidate, 0.5, 1.0, status=503),
               _event("e3", Variant.primary, 0.5, 1.0, status=500), _event("e3", Variant.candidate, 0.5, 1.0),
               _event("n1", Variant.primary, None, 1.0), _event("n1", Variant.candidate, None, 1.1),
               _event("n2", Variant.primary, None, 1.0), _event("n2", Variant.candidate, None, 1.1),
               _event("t1", Variant.primary, 0.5, 0.5, tokens=1), _event("t1", Variant.candidate, 0.6, 0.6, tokens=1)]
        await _publish(mosquitto, slow + odd)
        await eventually(lambda: (hub.latency(policy.key, since) or {}).get("ttft") is not None
                         and hub.latency(policy.key, since)["ttft"].n == 61, what="61 TTFT pairs")  # type: ignore[index]

        look = await analyzer.look(policy, state, since + 60)
        by = {r.name: r for r in look.verdict.results}
        assert by["ttft-paired"].outcome is Outcome.failed and by["tpot-paired"].outcome is Outcome.failed
        assert look.verdict.outcome is Outcome.failed
        ttft = by["ttft-paired"].to_record()
        assert ttft.statistic == "paired-median" and ttft.effect is not None and 1.2 < ttft.effect < 1.4
        assert ttft.extra is not None and ttft.extra["pairs"] == 61
        assert ttft.extra["pairsErrored"] == 3 and ttft.extra["pairsDropped"] == 2
        tpot = by["tpot-paired"].to_record()
        assert tpot.extra is not None and tpot.extra["pairs"] == 60 and tpot.extra["pairsDropped"] == 3
        assert tpot.statistic == "paired-mean" and tpot.interval[0] is not None and tpot.interval[0] > 1.0
        # Bonferroni over the look: two paired metrics and one comparator.
        assert ttft.alpha == 0.05 / 3

        # A new phase counts afresh: the same requests without a slowdown pass.
        since2 = since + 100
        state2 = RolloutState(phase=Phase.shadowing, phase_started_at=since2, rollout_started_at=since,
                              candidate="v2")
        await analyzer.look(policy, state2, since2 + 1)
        assert hub.latency(policy.key, since2) == {} or hub.latency(policy.key, since2)["ttft"].n == 0  # type: ignore[index]
        await _publish(mosquitto, _pairs("a", 120, 1.0, seed=2))
        await eventually(lambda: hub.latency(policy.key, since2)["ttft"].n == 120,  # type: ignore[index]
                         what="120 A/A pairs")
        aa = await analyzer.look(policy, state2, since2 + 60)
        by = {r.name: r for r in aa.verdict.results}
        assert by["ttft-paired"].outcome is Outcome.passed and by["tpot-paired"].outcome is Outcome.passed

        # The canary phase has no twin requests: paired metrics are not judged there.
        canary = RolloutState(phase=Phase.progressing, step=0, weight=5, phase_started_at=since2 + 200,
                              rollout_started_at=since, candidate="v2")
        later = await analyzer.look(policy, canary, since2 + 260)
        assert [r.name for r in later.verdict.results] == []
    finally:
        await hub.close()
