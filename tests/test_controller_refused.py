"""A spec edited mid-rollout into one the model refuses: the rollout holds, then rolls back at the deadline
the last accepted spec set (never half-moved for good), or goes on once the spec is fixed.

Against the real local API server with the real Istio router on the chat VirtualService; the metric
source is the double at the port (see tests/controller_helpers.py). The refused edit is one the CRD's
schema takes and the model refuses (a progressDeadline shorter than the phases need), as a person's typo
would be.
"""

from __future__ import annotations

import pytest
from conftest_kube import KubeEnv
from controller_helpers import REF, Harness, second_writer

from shadowctl.cli.connect import CliError
from shadowctl.cli.rollout_cmds import send_command
from shadowctl.controller.commands import command_patch, new_command, pending_command
from shadowctl.controller.reconciler import FINALIZER
from shadowctl.controller.status import recorded_deadline
from shadowctl.kube import SHADOW_POLICY, VIRTUAL_SERVICE, KubeClient, NotFound
from shadowctl.policy.status import Command

DEADLINE = "5m"
REFUSED = {"spec": {"progressDeadline": "30s"}}  # the phases need at least 60 s (20 s shadow + 2 x 20 s)


@pytest.fixture
async def h(kube_env: KubeEnv, kube_client: KubeClient) -> Harness:
    return Harness(kube_env, kube_client)


async def _refuse(h: Harness) -> float:
    """Edit the spec into a refused one; the deadline the controller recorded before (epoch seconds)."""
    status = await h.status()
    deadline = recorded_deadline(status)
    assert deadline is not None and status.rollout is not None and status.rollout.rollout_started_at is not None
    assert deadline - status.rollout.rollout_started_at == pytest.approx(300, abs=1)
    assert status.accepted_spec is not None and status.accepted_spec["progressDeadline"] == DEADLINE
    await h.kube.patch_merge(REF, REFUSED)
    return deadline


async def _ready(h: Harness) -> tuple[str, str]:
    cond = (await h.status()).condition("Ready")
    assert cond is not None
    return cond.status, cond.message


async def _hold_until(h: Harness, deadline: float, phase: str, weights: tuple[int, int, float | None]) -> None:
    """Tick (10 s apart) up to the last tick before the deadline: the rollout holds as it is."""
    while h.clock.now() + 10 < deadline:
        result = await h.tick()
        assert result.route_writes == 0
        status = await h.status()
        assert status.phase == phase, h.history[-3:]
        assert await h.weights() == weights
        ready, message = await _ready(h)
        assert ready == "False" and message.startswith("invalid spec: spec: ")
        assert "progressDeadline" in message and f"rolled back at {status.deadline_at}" in message


async def test_refused_mid_shadow_holds_then_rolls_back_at_the_recorded_deadline(h: Harness) -> None:
    await h.setup(progressDeadline=DEADLINE)
    await h.tick()
    assert (await h.status()).phase == "Shadowing" and await h.weights() == (100, 0, 20.0)
    deadline = await _refuse(h)
    await _hold_until(h, deadline, "Shadowing", (100, 0, 20.0))  # the mirror stays while it holds
    assert await h.run_until({"RolledBack"}, max_ticks=3) == "RolledBack"
    assert await h.weights() == (100, 0, None)  # all traffic on the primary, no mirror of ours
    route = await h.vs_route()
    assert "mirror" not in route and [d["destination"]["subset"] for d in route["route"]] == ["v1"]
    status = await h.status()
    assert "spec was refused" in status.message and "progress deadline" in status.message
    rolled = next(t for t in status.history if t.to == "RollingBack")
    assert deadline <= rolled.at < deadline + 10
    assert (await _ready(h))[0] == "False"  # the spec is still refused, and says so
    await h.tick()
    assert (await h.status()).phase == "RolledBack" and await h.weights() == (100, 0, None)
    assert FINALIZER not in ((await h.kube.get(REF))["metadata"].get("finalizers") or [])  # finished: let go


async def test_spec_fixed_before_the_deadline_continues(h: Harness) -> None:
    await h.setup(progressDeadline=DEADLINE)
    await h.tick()
    await _refuse(h)
    for _ in range(3):
        await h.tick()
    assert (await h.status()).phase == "Shadowing" and await h.weights() == (100, 0, 20.0)
    await h.kube.patch_merge(REF, {"spec": {"progressDeadline": "10m"}})
    assert await h.run_until({"Succeeded", "RolledBack"}) == "Succeeded"
    assert await h.weights() == (0, 100, None)
    status = await h.status()
    assert (await _ready(h))[0] == "True"
    assert status.accepted_spec is not None and status.accepted_spec["progressDeadline"] == "10m"
    assert "the policy changed mid-rollout" in " ".join(t.reason for t in status.history)


async def test_refused_mid_canary_at_50_rolls_back_to_the_primary_at_the_deadline(h: Harness) -> None:
    await h.setup(progressDeadline=DEADLINE)
    for _ in range(40):
        await h.tick()
        if (await h.status()).step == 2:
            break
    assert (await h.status()).phase == "Progressing" and await h.weights() == (50, 50, None)
    deadline = await _refuse(h)
    await _hold_until(h, deadline, "Progressing", (50, 50, None))  # no step up, no promotion
    assert await h.run_until({"RolledBack"}, max_ticks=3) == "RolledBack"
    assert await h.weights() == (100, 0, None)
    assert "spec was refused" in (await h.status()).message
    h.check_invariants([10, 50])


async def test_rollback_command_works_on_a_refused_spec(h: Harness) -> None:
    """Through the CLI's own path (`shadowctl rollback` writes the command after checking the phase); a pause
    sent while the spec is refused waits for a valid spec instead of being recorded as carried out."""
    await h.setup(progressDeadline=DEADLINE)
    await h.tick()
    await _refuse(h)
    await h.tick()
    await h.kube.patch_merge(REF, command_patch(new_command(Command.pause, "2026-01-01T00:00:00Z", "test")))
    await h.tick()
    obj = await h.kube.get(REF)
    assert (await h.status()).phase == "Shadowing" and pending_command(obj) is not None  # waiting, not done
    with pytest.raises(CliError, match=r"has a spec the model refuses \(spec: .*progressDeadline.*only rollback"):
        await send_command(h.kube, "llm", "chat", Command.resume)  # refused up front, with what works instead
    sent = await send_command(h.kube, "llm", "chat", Command.rollback)
    assert await h.run_until({"RolledBack"}, max_ticks=3) == "RolledBack"
    assert await h.weights() == (100, 0, None)
    status = await h.status()
    assert status.last_command is not None and status.last_command.id == sent.id
    assert "rolled back by a person while the spec is refused" in " ".join(t.reason for t in status.history)


async def test_deleting_a_policy_with_a_refused_spec_restores_the_routes(h: Harness) -> None:
    await h.setup(progressDeadline=DEADLINE)
    for _ in range(40):
        await h.tick()
        if (await h.status()).phase == "Progressing":
            break
    assert (await h.weights())[1] == 10
    await _refuse(h)
    await h.tick()
    await h.kube.delete(REF)
    h.clock.advance(10)
    result = await h.reconciler.tick(REF)
    assert "Finalize" in result.actions
    assert await h.weights() == (100, 0, None)
    with pytest.raises(NotFound):
        await h.kube.get(REF)


async def test_refused_between_the_first_route_write_and_its_status_still_rolls_back_at_the_deadline(
        h: Harness) -> None:
    """bench/faults r-00027 (seed 3): the first tick wrote the mirror, and the edit that made the spec refused
    landed between that route write and its status write (a real 409). The status recorded after the conflict
    was built from the re-read, refused spec, so it carried no acceptedSpec nor deadlineAt, and the rollout
    then held in Shadowing with our mirror on for good ("no accepted spec is recorded to undo the rollout
    with"). The retry now carries the spec the routes were written from: the rollout holds, then rolls back
    at that spec's deadline, restoring the route."""
    await h.setup(progressDeadline=DEADLINE)

    def refuse() -> None:
        h.env.patch(SHADOW_POLICY, "llm", "chat", REFUSED)

    with second_writer(h.kube, "replace", lambda gvr, obj: gvr == VIRTUAL_SERVICE, refuse, times=1) as edits:
        first = await h.tick()
    assert edits[0] == 1 and first.route_writes == 1 and first.status_written, first
    status = await h.status()
    assert status.phase == "Shadowing" and await h.weights() == (100, 0, 20.0)
    assert status.accepted_spec is not None and status.accepted_spec["progressDeadline"] == DEADLINE
    assert status.accepted_generation == 1
    deadline = recorded_deadline(status)
    assert status.rollout is not None and status.rollout.rollout_started_at is not None and deadline is not None
    assert deadline - status.rollout.rollout_started_at == pytest.approx(300, abs=1)
    await _hold_until(h, deadline, "Shadowing", (100, 0, 20.0))
    assert await h.run_until({"RolledBack"}, max_ticks=3) == "RolledBack"
    assert await h.weights() == (100, 0, None)
    assert "mirror" not in await h.vs_route()


async def test_refused_after_a_first_route_write_whose_status_write_failed_still_rolls_back(h: Harness) -> None:
    """The same edit, but the status write after the first route write fails outright (503s through the fault
    proxy, every retry), so nothing is recorded after the routes. The first start records its intent (with
    the accepted spec and the deadline) before any route write, so the next tick, with the spec refused,
    finds the routes holding that intent, adopts Shadowing, holds, and rolls back at the deadline."""
    await h.setup(progressDeadline=DEADLINE)

    def refuse_and_fail() -> None:
        h.env.patch(SHADOW_POLICY, "llm", "chat", REFUSED)
        h.env.fail_next(h.kube.retry.attempts, 503, verb="patch", path="/status$")

    with second_writer(h.kube, "replace", lambda gvr, obj: gvr == VIRTUAL_SERVICE, refuse_and_fail, times=1):
        first = await h.tick()
    assert first.route_writes == 1 and first.actions[0] == "Intent", first
    status = await h.status()
    assert status.phase == "Pending" and status.pending_route is not None and await h.weights() == (100, 0, 20.0)
    assert status.accepted_spec is not None and status.accepted_spec["progressDeadline"] == DEADLINE
    deadline = recorded_deadline(status)
    assert deadline is not None
    settled = await h.tick()
    assert "AdoptIntent" in settled.actions and (await h.status()).phase == "Shadowing", settled
    await _hold_until(h, deadline, "Shadowing", (100, 0, 20.0))
    assert await h.run_until({"RolledBack"}, max_ticks=3) == "RolledBack"
    assert await h.weights() == (100, 0, None)
