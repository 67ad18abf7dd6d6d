"""Whole rollouts through the reconciler against the real local API server, with an injected clock.

Routers, the kube client, kube-apiserver (with the CRDs' OpenAPI and CEL validation, reached through
the fault proxy) and the judge are real; the metric source is a double at the port (see
tests/controller_helpers.py).
"""

from __future__ import annotations

import pytest
from conftest_kube import KubeEnv
from controller_helpers import REF, VS_REF, Arm, FakeMetricSource, Harness

from shadowctl.controller.commands import command_patch, new_command
from shadowctl.kube import VIRTUAL_SERVICE, KubeClient
from shadowctl.policy.status import Command


@pytest.fixture
async def h(kube_env: KubeEnv, kube_client: KubeClient) -> Harness:
    return Harness(kube_env, kube_client)


async def command(h: Harness, cmd: Command) -> None:
    await h.kube.patch_merge(REF, command_patch(new_command(cmd, "2026-01-01T00:00:00Z", "test")))


async def test_good_candidate_shadow_canary_promoted(h: Harness) -> None:
    await h.setup()
    await h.tick()
    assert (await h.status()).phase == "Shadowing"
    assert await h.weights() == (100, 0, 20.0)
    assert await h.run_until({"Succeeded", "RolledBack"}) == "Succeeded"
    assert await h.weights() == (0, 100, None)
    phases = [row["phase"] for row in h.history]
    assert phases.index("Shadowing") < phases.index("Progressing") < phases.index("Promoting")
    assert {row["candidate"] for row in h.history if row["phase"] == "Progressing"} <= {10, 50}
    h.check_invariants([10, 50])
    status = await h.status()
    assert status.last_verdict.metrics, "evidence recorded"
    assert [t.to for t in status.history][-1] == "Succeeded"


async def test_slow_candidate_rolled_back_during_shadow_with_mirror_removed(h: Harness) -> None:
    h.source.candidate = Arm(median=0.6)
    await h.setup()
    assert await h.run_until({"RolledBack", "Succeeded"}) == "RolledBack"
    assert await h.weights() == (100, 0, None)
    assert "Progressing" not in [row["phase"] for row in h.history]
    route = await h.vs_route()
    assert "mirror" not in route
    assert "mirrorPercentage" not in route
    assert [d["destination"]["subset"] for d in route["route"]] == ["v1"]  # candidate destination we added: gone
    status = await h.status()
    assert "ttft-p95" in status.message or "ttft-p95" in str(status.last_verdict)
    h.check_invariants([10, 50])


async def test_canary_step_failure_rolls_back(h: Harness) -> None:
    await h.setup()
    await h.run_until({"Progressing"})
    h.source.candidate = Arm(error_rate=0.08)  # errors appear once it serves live traffic
    assert await h.run_until({"RolledBack", "Succeeded"}) == "RolledBack"
    assert await h.weights() == (100, 0, None)
    h.check_invariants([10, 50])


async def test_metric_source_down_never_passes(h: Harness) -> None:
    h.source.down = True
    await h.setup()
    for _ in range(20):
        await h.tick()
    status = await h.status()
    assert status.phase == "Shadowing"
    assert status.source_errors
    # ... and at the shadow phase's maximum duration it is inconclusive: rolled back (the default).
    assert await h.run_until({"RolledBack", "Progressing"}, advance=30) == "RolledBack"


async def test_manual_gate_waits_for_promote(h: Harness) -> None:
    await h.setup(promotion="manual")
    assert await h.run_until({"WaitingPromotion", "RolledBack"}) == "WaitingPromotion"
    weights = await h.weights()
    for _ in range(3):
        await h.tick()
    assert (await h.status()).phase == "WaitingPromotion"
    assert await h.weights() == weights == (50, 50, None)
    await command(h, Command.promote)
    assert await h.run_until({"Succeeded"}) == "Succeeded"
    assert await h.weights() == (0, 100, None)
    assert (await h.status()).last_command.command == "promote"


async def test_promote_full_skips_analysis(h: Harness) -> None:
    await h.setup()
    await h.tick()
    await command(h, Command.promote_full)
    assert await h.run_until({"Succeeded"}) == "Succeeded"
    assert await h.weights() == (0, 100, None)


@pytest.mark.parametrize("when", ["Shadowing", "Progressing"])
async def test_rollback_command_in_any_phase(h: Harness, when: str) -> None:
    await h.setup()
    await h.run_until({when})
    await command(h, Command.rollback)
    assert await h.run_until({"RolledBack"}) == "RolledBack"
    assert await h.weights() == (100, 0, None)


async def test_pause_and_resume(h: Harness) -> None:
    await h.setup()
    await h.run_until({"Progressing"})
    await command(h, Command.pause)
    await h.tick()
    assert (await h.status()).phase == "Paused"
    paused_weights = await h.weights()
    h.source.candidate = Arm(median=5.0)  # analysis is ignored while paused
    for _ in range(3):
        await h.tick()
    assert (await h.status()).phase == "Paused"
    assert await h.weights() == paused_weights
    h.source.candidate = Arm()
    await command(h, Command.resume)
    await h.tick()
    assert (await h.status()).phase == "Progressing"
    assert await h.run_until({"Succeeded"}) == "Succeeded"


async def test_command_is_carried_out_once(h: Harness) -> None:
    await h.setup()
    await h.run_until({"Shadowing"})
    await command(h, Command.pause)
    await h.tick()
    await command(h, Command.resume)
    await h.tick()
    assert (await h.status()).phase == "Shadowing"
    for _ in range(3):  # the resume annotation stays on the object, but is not applied again
        await h.tick()
    history = [t.to for t in (await h.status()).history]
    assert history.count("Paused") == 1


async def test_progress_deadline_ends_in_rollback(h: Harness) -> None:
    h.source.down = True  # no decision is ever possible; only the deadline can end it
    await h.setup(progressDeadline="2m", shadow={"maxDuration": "10m"})
    assert await h.run_until({"RolledBack", "Succeeded"}, advance=30) == "RolledBack"
    status = await h.status()
    assert "progress deadline" in status.message
    assert await h.weights() == (100, 0, None)
    assert h.clock.now() - status.rollout.rollout_started_at < 200


async def _hand_edit_weights(h: Harness) -> None:
    vs = await h.kube.get(VS_REF)
    route = next(r for r in vs["spec"]["http"] if r["name"] == "chat-default")
    for d in route["route"]:
        d["weight"] = 100 if d["destination"]["subset"] == "v1" else 0
    await h.kube.replace(VIRTUAL_SERVICE, vs)


async def test_drift_is_reasserted(h: Harness) -> None:
    await h.setup()
    await h.run_until({"Progressing"})
    await _hand_edit_weights(h)
    assert (await h.weights())[1] == 0
    await h.tick(advance=1)
    assert (await h.status()).phase == "Progressing"
    assert (await h.weights())[1] == 10


async def test_drift_pauses_when_asked(h: Harness) -> None:
    await h.setup(onDrift="pause")
    await h.run_until({"Progressing"})
    await _hand_edit_weights(h)
    await h.tick(advance=1)
    assert (await h.status()).phase == "Paused"
    assert (await h.weights())[1] == 0  # someone else's change is left alone while paused


async def test_idle_tick_makes_no_route_write(h: Harness) -> None:
    await h.setup()
    await h.tick()
    before = (await h.kube.get(VS_REF))["metadata"]["resourceVersion"]
    h.source.candidate = Arm(median=0.42)  # undecided: nothing to change
    for _ in range(3):
        result = await h.tick(advance=1)
        assert result.route_writes == 0
        assert not result.transitioned
    assert (await h.kube.get(VS_REF))["metadata"]["resourceVersion"] == before


async def test_fake_source_is_batched_per_look(kube_env: KubeEnv, kube_client: KubeClient) -> None:
    src = FakeMetricSource()
    h = Harness(kube_env, kube_client, src)
    await h.setup()
    await h.tick()
    calls = src.calls
    await h.tick()
    assert src.calls == calls + 1  # both metrics of one look in one call
