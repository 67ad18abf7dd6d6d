"""Paired latency survives a controller restart within the shadow phase (and resets with the phase).

The controller runs against the real local API server (reconciler, router, status writes through the
generated CRD's schema) and a real Mosquitto (the OutputHub runs the MQTT output source built from the
policy). Controller A counts the first pairs and writes them to `.status`; it stops; controller B (a
new process's state: its own API connection, analyzer, hub and source) continues the same test.
Beside them a never-restarted analyzer sees every pair: B's decision, e-values and counts must be
its. Nothing is mocked; there is no metric source (the policy's metrics are all paired).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import numpy as np
import pytest
from conftest_kube import KubeEnv
from controller_helpers import REF, Harness
from tap_helpers import eventually

from shadowctl.compare.events import Endpoint, OutputEvent, Variant
from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.commands import command_patch, new_command
from shadowctl.controller.outputs import OutputHub
from shadowctl.controller.reconciler import Reconciler
from shadowctl.controller.status import parse_policy
from shadowctl.judge import MetricResult, Outcome
from shadowctl.kube import KubeClient
from shadowctl.machine import RolloutState
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.status import Command, Phase
from shadowctl.routers.factory import router_for
from shadowctl.sources.outputs import MqttOutputSource

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

TOPIC = "shadowctl/outputs/llm/chat"


def _spec(broker: MosquittoBroker) -> dict[str, Any]:
    return {
        "shadow": {"mirrorPercent": 20, "minDuration": "20s", "maxDuration": "600s", "minPairs": 0},
        "analysis": {
            "metrics": [
                {"name": "ttft-paired", "kind": "paired-latency", "quantity": "ttft", "margin": "10%",
                 "critical": True, "minSamples": 30},
                {"name": "tpot-paired", "kind": "paired-latency", "quantity": "tpot", "statistic": "mean",
                 "margin": "10%", "minSamples": 30},
            ],
            "outputs": {"mqtt": {"broker": broker.url, "topic": f"{TOPIC}/+"},
                        "comparators": [{"name": "token-f1", "threshold": 0.5}],
                        "baseline": {"mode": "fixed", "agreement": 0.8}, "minPairs": 10},
        },
    }


def _event(rid: str, variant: Variant, ttft: float, e2e: float) -> OutputEvent:
    return OutputEvent(request_id=rid, variant=variant, shadow=variant is not Variant.primary, service="llm/chat",
                       endpoint=Endpoint.chat, stream=True, prompt_hash=f"h{rid}", output="same answer",
                       output_tokens=21, status=200, started_at=0.0, ttft_s=ttft, e2e_s=e2e)


def _pairs(prefix: str, n: int, factor: float, seed: int) -> list[OutputEvent]:
    """n requests whose own latency spans a factor of ~50, the candidate `factor` slower on each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        req = float(rng.lognormal(-1.0, 1.0))
        p_ttft, c_ttft = req * float(rng.lognormal(0, 0.1)), req * factor * float(rng.lognormal(0, 0.1))
        p_gen, c_gen = 0.4 * req, 0.4 * req * factor * float(rng.lognormal(0, 0.05))
        out += [_event(f"{prefix}{i}", Variant.primary, p_ttft, p_ttft + p_gen),
                _event(f"{prefix}{i}", Variant.candidate, c_ttft, c_ttft + c_gen)]
    return out


async def _publish(broker: MosquittoBroker, events: list[OutputEvent]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as pub:
        for e in events:
            await pub.publish(f"{TOPIC}/{e.variant.value}", e.to_json(), qos=1)


def _hub() -> OutputHub:
    return OutputHub(lambda p: MqttOutputSource.from_policy(p))


async def _subscribed(hub: OutputHub, key: str) -> None:
    source = hub._entries[key].source
    assert isinstance(source, MqttOutputSource)
    await eventually(lambda: source.subscribed.is_set(), what="the source subscribed")


async def _pairs_seen(hub: OutputHub, key: str, since: float, n: int) -> None:
    def seen() -> bool:
        latency = hub.latency(key, since) or {}
        return all(q in latency and latency[q].n == n for q in ("ttft", "tpot"))
    await eventually(seen, what=f"{n} pairs in the hub")


def _by_name(results: tuple[MetricResult, ...]) -> dict[str, MetricResult]:
    return {r.name: r for r in results}


async def test_a_restarted_controller_continues_the_paired_test(kube_env: KubeEnv, kube_client: KubeClient,
                                                                mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """25 pairs (a 30% slowdown) before the restart, 10 after: only together do they reach the 30 pairs a
    decision needs. Controller B fails the candidate on all 35, exactly as the never-restarted analyzer
    does (the same e-values and counts), and the evidence says how many pairs came from `.status`. A
    new phase afterwards (retry) starts from no pairs although `.status` still holds the old ones."""
    h = Harness(kube_env, kube_client)
    hub_a, hub_ref = _hub(), _hub()
    # A and B write every look's figures (status_refresh=0), so that each look's pairs and evidence are read back
    # from .status: with the default refresh period (controller/writes.py) figures that alone changed are written
    # at most every 30 s, and a restart forgets the pairs counted since; this test is about the rest.
    h.reconciler = Reconciler(h.kube, router_for, Analyzer(None, hub_a), h.clock, status_refresh=0)
    client_b = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "kc-b"))
    hub_b = _hub()
    try:
        await h.setup(**_spec(mosquitto))
        await h.tick()
        status = await h.status()
        assert status.phase is Phase.shadowing and status.rollout is not None
        since = status.rollout.phase_started_at
        assert since is not None
        policy: ShadowPolicy = parse_policy(await h.kube.get(REF))
        shadow = RolloutState(phase=Phase.shadowing, phase_started_at=since, rollout_started_at=since,
                              candidate=status.rollout.candidate)
        reference = Analyzer(None, hub_ref)  # never restarted: sees every pair
        await reference.look(policy, shadow, h.clock.now())
        await h.tick()  # controller A starts its output source
        await _subscribed(hub_a, policy.key)
        await _subscribed(hub_ref, policy.key)

        await _publish(mosquitto, _pairs("a", 25, 1.3, seed=1))
        await _pairs_seen(hub_a, policy.key, since, 25)
        await h.tick()
        status = await h.status()
        assert status.phase is Phase.shadowing  # 25 pairs: too few to decide
        stored = status.paired_latency
        assert stored is not None and stored.phase_started_at == since
        assert stored.ttft is not None and stored.ttft.pairs == 25 and stored.tpot is not None
        assert 0.0 in stored.ttft.le and len(stored.ttft.le) <= 64

        # Controller A stops (its source with it); B starts with nothing in memory.
        await hub_a.close()
        h.kube = client_b
        h.reconciler = Reconciler(client_b, router_for, Analyzer(None, hub_b), h.clock, status_refresh=0)
        await h.tick()  # B's first look: the 25 pairs come back from .status, its source starts
        status = await h.status()
        assert status.paired_latency is not None and status.paired_latency.ttft is not None
        assert status.paired_latency.ttft.pairs == 25
        assert status.last_verdict is not None
        ttft = {m.name: m for m in status.last_verdict.metrics}["ttft-paired"]
        assert ttft.samples.candidate == 25 and ttft.extra is not None and ttft.extra["pairsRestored"] == 25
        await _subscribed(hub_b, policy.key)

        await _publish(mosquitto, _pairs("b", 10, 1.3, seed=2))
        await _pairs_seen(hub_b, policy.key, since, 35)  # 25 restored + 10 new
        await _pairs_seen(hub_ref, policy.key, since, 35)
        result = await h.tick()
        now = h.clock.now()
        assert result.phase is Phase.rolling_back
        status = await h.status()
        assert status.last_verdict is not None and status.last_verdict.outcome == "fail"
        got = {m.name: m for m in status.last_verdict.metrics}

        expected = await reference.look(policy, shadow, now)
        assert expected.verdict.outcome is Outcome.failed
        want = _by_name(expected.verdict.results)
        for name in ("ttft-paired", "tpot-paired"):
            assert got[name].outcome == want[name].outcome.value == "fail"
            assert got[name].samples.candidate == want[name].n_candidate == 35
            assert got[name].extra is not None and got[name].extra["pairsRestored"] == 25
            assert got[name].extra["candidateSlower"] == want[name].extra["candidateSlower"]
            assert got[name].alpha == want[name].alpha
        for key in ("logEValueFail", "logEValuePass"):  # the median's sign test: exactly the same counts
            assert got["ttft-paired"].extra is not None
            assert got["ttft-paired"].extra[key] == pytest.approx(want["ttft-paired"].extra[key], rel=1e-12)
        # The mean's sequence: the same sums (up to the order of the additions).
        assert got["tpot-paired"].effect == pytest.approx(want["tpot-paired"].effect, rel=1e-9)
        assert got["tpot-paired"].interval == pytest.approx(list(want["tpot-paired"].interval), rel=1e-9)
        assert "restored from .status" in got["ttft-paired"].sentence

        # A new phase starts from no pairs: the record of the last one is kept, but not restored.
        await h.tick()
        assert (await h.status()).phase is Phase.rolled_back
        await h.kube.patch_merge(REF, command_patch(new_command(Command.retry, "now", "test")))
        await h.tick()
        status = await h.status()
        assert status.phase is Phase.shadowing and status.rollout is not None
        assert status.rollout.phase_started_at != since
        assert status.paired_latency is not None and status.paired_latency.phase_started_at == since
        await h.tick()
        status = await h.status()
        assert status.paired_latency is not None and status.rollout is not None
        assert status.paired_latency.phase_started_at == status.rollout.phase_started_at
        assert status.paired_latency.ttft is not None and status.paired_latency.ttft.pairs == 0
        assert status.last_verdict is not None
        fresh = {m.name: m for m in status.last_verdict.metrics}["ttft-paired"]
        assert fresh.outcome == "nodata" and "no pairs yet" in fresh.sentence
    finally:
        await hub_a.close()
        await hub_b.close()
        await hub_ref.close()
        await client_b.close()
