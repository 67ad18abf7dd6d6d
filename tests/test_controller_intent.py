"""A raise of the candidate's live share is recorded before its route write (``status.pendingRoute``), and a
controller killed anywhere between the two writes leaves nothing live that the status does not allow (the
last violation class of bench/faults: r-00096, a leader SIGKILLed between its 10% route write and its status
write, after which the next leader decided from Shadowing while 10% was live and unrecorded).

Against the real local API server. The kill is a :class:`Killed` (a BaseException, which no handler in the
controller catches, as nothing runs after a SIGKILL) raised at an exact point of a tick by wrapping the
controller's client; then a fresh reconciler on its own client (the next leader, or the restarted process)
goes on. Every 409 or drift here is the API server's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest_kube import KubeEnv
from controller_helpers import REF, Harness, load_vs, policy_doc
from fake_clock import FakeClock

from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.commands import command_patch, new_command
from shadowctl.controller.reconciler import Reconciler
from shadowctl.kube import SHADOW_POLICY, VIRTUAL_SERVICE, KubeClient
from shadowctl.policy.status import Command, Phase
from shadowctl.routers.factory import router_for


class Killed(BaseException):
    """The controller process died here: nothing after this point of the tick runs."""


@pytest.fixture
async def h(kube_env: KubeEnv, kube_client: KubeClient) -> Harness:
    return Harness(kube_env, kube_client)


@pytest.fixture
async def next_leader(h: Harness, kube_env: KubeEnv, tmp_path: Path) -> AsyncIterator[Reconciler]:
    """A second reconciler on its own client: the replica that takes over (or the restarted process)."""
    kube = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "kc-next"))
    try:
        yield Reconciler(kube, router_for, Analyzer(h.source), h.clock)
    finally:
        await kube.close()


@contextlib.contextmanager
def killed_at(kube: KubeClient, method: str, when: Callable[..., bool], *, after: bool) -> Iterator[list[int]]:
    """Raise :class:`Killed` at the first call of ``kube.<method>(...)`` for which ``when(*args)`` holds:
    before the call is sent (``after`` False) or once it has landed (``after`` True)."""
    original = getattr(kube, method)
    kills = [0]

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        hit = not kills[0] and when(*args)
        if hit and not after:
            kills[0] += 1
            raise Killed
        answer = await original(*args, **kwargs)
        if hit:
            kills[0] += 1
            raise Killed
        return answer

    setattr(kube, method, wrapped)
    try:
        yield kills
    finally:
        delattr(kube, method)


def _is_vs(gvr: Any, *_: Any) -> bool:
    return bool(gvr == VIRTUAL_SERVICE)


async def _at_the_end_of_shadowing(h: Harness, **spec: Any) -> None:
    await h.setup(**spec)
    await h.run_until({"Shadowing"})
    h.clock.advance(50.5)  # the next tick passes the shadow phase and moves 10% live to v2


async def test_killed_after_the_raising_route_write_the_next_leader_adopts_it(h: Harness,
                                                                              next_leader: Reconciler) -> None:
    """Killed right after the 10% route write landed, before the status write: the status already allows
    the live 10% (the intent), and the next leader adopts it as reached instead of deciding from Shadowing."""
    await _at_the_end_of_shadowing(h)
    with killed_at(h.kube, "replace", _is_vs, after=True) as kills, contextlib.suppress(Killed):
        await h.reconciler.tick(REF)
    assert kills[0] == 1
    assert await h.weights() == (90, 10, None)  # live, not yet recorded as reached
    status = await h.status()
    assert status.phase == "Shadowing"  # the state decided from ...
    intent = status.pending_route  # ... and the raise recorded before the route write
    assert intent is not None and intent.candidate_weight == 10 and intent.primary_weight == 90
    assert intent.rollout.phase is Phase.progressing and intent.rollout.canary_weight == 10
    assert status.last_verdict is not None and status.last_verdict.outcome == "pass"  # what the raise rests on

    settled = await next_leader.tick(REF)  # settles first, then decides from the adopted step (just started)
    assert settled.actions == ["AdoptIntent"] and settled.route_writes == 0, settled
    status = await h.status()
    assert status.phase == "Progressing" and status.canary_weight == 10 and status.step == 1
    assert status.pending_route is None
    assert await h.weights() == (90, 10, None)
    # The rollout goes on from the adopted step (no second write of the same step, no rollback to Shadowing).
    h.reconciler = next_leader
    assert await h.run_until({"Succeeded"}) == "Succeeded"
    h.check_invariants([10, 50])


async def test_killed_before_the_raising_route_write_the_intent_is_dropped(h: Harness,
                                                                          next_leader: Reconciler) -> None:
    """Killed after the intent was recorded but before the route write was sent: the routes do not hold
    it, so it was never applied; the next leader drops it and decides again from Shadowing."""
    await _at_the_end_of_shadowing(h)
    with killed_at(h.kube, "replace", _is_vs, after=False) as kills, contextlib.suppress(Killed):
        await h.reconciler.tick(REF)
    assert kills[0] == 1
    assert await h.weights() == (100, 0, 20.0)
    assert (await h.status()).pending_route is not None

    settled = await next_leader.tick(REF)  # settles first, then decides again from Shadowing: it passes again
    assert settled.actions == ["DropIntent", "Intent", "SetRoutes"] and settled.route_writes == 1, settled
    status = await h.status()
    assert status.phase == "Progressing" and status.canary_weight == 10 and status.pending_route is None
    assert await h.weights() == (90, 10, None)
    h.reconciler = next_leader
    assert await h.run_until({"Succeeded"}) == "Succeeded"
    h.check_invariants([10, 50])


@pytest.mark.parametrize("applied", [True, False], ids=["applied-then-reverted", "never-applied"])
async def test_an_outstanding_intent_is_told_from_gitops_drift(h: Harness, next_leader: Reconciler,
                                                               applied: bool) -> None:
    """Killed around the raising route write, then GitOps puts the manifest in git back (100% primary, no
    mirror) before anyone ticks. The routes hold neither the intent nor the recorded Shadowing state: the
    intent is dropped (nothing of it is live), and the next tick treats the routes as drift from the
    recorded state: with ``onDrift: pause`` it pauses from Shadowing and writes nothing (it neither
    re-applies the dropped 10% nor takes the drift for the intent's outcome)."""
    await _at_the_end_of_shadowing(h, onDrift="pause")
    with killed_at(h.kube, "replace", _is_vs, after=applied), contextlib.suppress(Killed):
        await h.reconciler.tick(REF)
    assert (await h.weights())[1] == (10 if applied else 0)
    h.env.put_object(VIRTUAL_SERVICE, load_vs())  # the manifest in git, as an admin (not the controller)
    assert await h.weights() == (100, 0, None)

    drift = await next_leader.tick(REF)  # settles, then sees the routes against the recorded Shadowing
    assert drift.actions == ["DropIntent"] and drift.route_writes == 0 and drift.phase is Phase.paused, drift
    status = await h.status()
    assert status.pending_route is None
    assert status.rollout is not None and status.rollout.paused_from is Phase.shadowing
    assert "someone else changed the managed routes" in status.message
    assert await h.weights() == (100, 0, None)



async def test_a_route_write_in_flight_cannot_land_after_another_replica_dropped_its_intent(
        h: Harness, kube_env: KubeEnv, tmp_path: Path) -> None:
    """Replica A records its intent (10% live), passes its fence and sends its route write, which is held
    (a paused process, a slow API) while replica B takes over: B finds the routes without the intent and
    drops it. Without more, A's write (conditional only on the VirtualService's version, which B did not
    change) lands afterwards: 10% live with no intent in the status (bench/faults r-00001, r-00103: a
    leadership handover under load). B marks the route object before dropping, so A's write meets a 409
    and, read again, is refused; nothing goes live."""
    await _at_the_end_of_shadowing(h)
    kube_b = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "kc-b"))
    held, resume = asyncio.Event(), asyncio.Event()
    original = h.kube.replace

    async def replace(gvr: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        if gvr == VIRTUAL_SERVICE and not held.is_set():
            held.set()
            await resume.wait()
        return await original(gvr, obj, *args, **kwargs)

    h.kube.replace = replace  # type: ignore[method-assign]
    try:
        # B's clock is 40 s behind: its shadow phase has not passed, so B itself writes no route.
        replica_b = Reconciler(kube_b, router_for, Analyzer(h.source), FakeClock(h.clock.now() - 40))
        stale = asyncio.create_task(h.reconciler.tick(REF))
        await asyncio.wait_for(held.wait(), 30)
        assert (await h.status()).pending_route is not None
        dropped = await replica_b.tick(REF)
        assert dropped.actions == ["DropIntent"] and dropped.route_writes == 0, dropped
        resume.set()
        a = await stale
    finally:
        resume.set()
        del h.kube.replace
        await kube_b.close()
    assert a.route_writes == 0 and a.conflict, a
    assert await h.weights() == (100, 0, 20.0)
    status = await h.status()
    assert status.phase == "Shadowing" and status.pending_route is None


def test_only_a_raise_above_the_recorded_share_is_recorded_first() -> None:
    """Which route actions need an intent: those ending above the recorded state's weight (pure)."""
    from controller_helpers import policy_doc

    from shadowctl.controller.reconciler import raised_routes
    from shadowctl.controller.status import parse_policy
    from shadowctl.machine import Finalize, Promote, RolloutState, SetRoutes, StepResult
    from shadowctl.routers.base import RouteState

    policy = parse_policy(policy_doc())
    router = router_for(policy, None)  # type: ignore[arg-type]  # builds no request: only its capabilities are read
    shadowing = RolloutState(phase=Phase.shadowing, weight=0, mirror_percent=20.0)
    step_one = RolloutState(phase=Phase.progressing, step=0, weight=10)
    step_two = RolloutState(phase=Phase.progressing, step=1, weight=50)

    def raised(state: RolloutState, *actions: Any) -> RouteState | None:
        return raised_routes(router, policy, state, StepResult(state, actions))

    assert raised(shadowing, SetRoutes(10, None)) == RouteState(90, 10, None)  # the shadow phase passed
    assert raised(step_one, SetRoutes(50, None)) == RouteState(50, 50, None)  # a step up
    assert raised(step_two, Promote()) == RouteState(0, 100, None)  # a promotion
    assert raised(step_one, SetRoutes(10, None)) is None  # re-asserting the recorded step after drift
    assert raised(step_two, Finalize(False)) is None  # a rollback lowers
    assert raised(step_two, Finalize(False), SetRoutes(10, None)) is None  # a restart at a lower step
    assert raised(shadowing, SetRoutes(0, 20.0)) is None  # the mirror is not live traffic
    assert raised(RolloutState(), Finalize(False), SetRoutes(10, None)) == RouteState(90, 10, None)  # canary start


async def test_a_start_whose_status_never_landed_is_undone_before_another_candidate_starts(
        h: Harness, next_leader: Reconciler) -> None:
    """The first tick writes the shadow phase's mirror to v2 and is killed before its status write (the
    policy still reads Pending); then the candidate becomes v3. Before: the next start, from Pending, undid
    nothing, v3's write took our v2 mirror for one it replaced, and its rollback put the v2 mirror back
    (bench/faults seed 16, r-00034: RolledBack recorded with a mirror on the route). Now the routes' ownership
    record shows the unrecorded start, which is undone first; after the rollback no mirror is left."""
    await h.setup()
    # Killed before the status write that follows the route write (a start's intent is recorded before it).
    with killed_at(h.kube, "patch_status", lambda _ref, body, *a: not isinstance(
            (body.get("status") or {}).get("pendingRoute"), dict), after=False), contextlib.suppress(Killed):
        await h.reconciler.tick(REF)
    assert (await h.vs_route())["mirror"]["subset"] == "v2"
    assert (await h.status()).phase == "Pending"
    doc = h.env.get_object(SHADOW_POLICY, "llm", "chat")
    assert doc is not None
    doc["spec"]["target"]["istio"]["candidate"]["subset"] = "v3"
    doc["spec"]["analysis"]["variants"]["candidate"]["subset"] = "v3"
    h.env.put_object(SHADOW_POLICY, doc)

    started = await next_leader.tick(REF)
    # The start's intent is adopted (the routes hold it), then the v2 rollout is undone before v3's starts.
    assert started.actions[:3] == ["AdoptIntent", "Finalize", "SetRoutes"], started
    route = await h.vs_route()
    assert route["mirror"]["subset"] == "v3"
    assert (await h.status()).phase == "Shadowing"
    h.env.patch(SHADOW_POLICY, "llm", "chat", command_patch(new_command(Command.rollback, "", "a person")))
    h.reconciler = next_leader
    assert await h.run_until({"RolledBack"}) == "RolledBack"
    route = await h.vs_route()
    assert "mirror" not in route, route
    assert await h.weights() == (100, 0, None)


async def test_a_start_is_recorded_first_only_on_routes_that_can_be_read(h: Harness) -> None:
    """A start records its intent before its route write (so a lost status write and a refused edit cannot leave
    our mirror with no accepted spec to undo it: test_controller_refused.py). A policy whose VirtualService does
    not exist yet records none: its write would fail anyway, and an intent per tick would only add the intent's
    and its drop's status writes to every tick. Once the route exists, the start goes intent first."""
    await h.kube.create(SHADOW_POLICY, policy_doc())
    for _ in range(2):
        h.clock.advance(10)
        missing = await h.reconciler.tick(REF)
        assert "Intent" not in missing.actions and missing.route_writes == 0 and missing.error, missing
        status = await h.status()
        assert status.phase == "Pending" and status.pending_route is None
    await h.kube.create(VIRTUAL_SERVICE, load_vs())
    started = await h.tick()
    assert started.actions[:2] == ["Intent", "SetRoutes"], started
    assert (await h.status()).phase == "Shadowing" and await h.weights() == (100, 0, 20.0)
