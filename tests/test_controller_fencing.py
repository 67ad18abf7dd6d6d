"""Route writes are fenced, and routes never run ahead of the recorded status (bench/faults' bugs 1 and 2).

Against the real local API server through the fault proxy, as in test_controller_process.py: the paused
leader is a tick held between its decision and its route write; the concurrent writers are real (an admin
edit, a person's command, a second reconciler), so every 409 is the API server's own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest_kube import KubeEnv
from controller_helpers import REF, VS_REF, Harness, second_writer, touch

from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.clock import iso
from shadowctl.controller.commands import command_patch, new_command
from shadowctl.controller.reconciler import Reconciler
from shadowctl.kube import SHADOW_POLICY, VIRTUAL_SERVICE, KubeClient, LeaderElector, ResourceRef
from shadowctl.policy.status import Command, Phase
from shadowctl.routers.factory import router_for


@pytest.fixture
async def h(kube_env: KubeEnv, kube_client: KubeClient) -> Harness:
    return Harness(kube_env, kube_client)


def _hold_before_route_write(kube: KubeClient) -> tuple[asyncio.Event, asyncio.Event, Callable[[], None]]:
    """Hold this client's second read of the VirtualService in a tick (the first is the tick's observation,
    the second the router's read before its write) until `resume` is set: a leader paused (SIGSTOP) between
    its decision and its route write. Returns (held, resume, undo)."""
    held, resume = asyncio.Event(), asyncio.Event()
    original: Callable[..., Awaitable[Any]] = kube.get
    reads = [0]

    async def get(ref: ResourceRef, *args: Any, **kwargs: Any) -> Any:
        if ref == VS_REF and not held.is_set():
            reads[0] += 1
            if reads[0] == 2:
                held.set()
                await resume.wait()
        return await original(ref, *args, **kwargs)

    kube.get = get  # type: ignore[method-assign]
    return held, resume, lambda: delattr(kube, "get")


async def _to_the_end_of_shadowing(h: Harness) -> None:
    """Shadowing, with the shadow phase's minimum duration over: the next tick moves 10% live to v2."""
    await h.run_until({"Shadowing"})
    h.clock.advance(50.5)  # the looks end on 10 s boundaries: the one at +50 s after the start passes


async def _vs_subsets(h: Harness) -> tuple[dict[str, int], str | None]:
    route = await h.vs_route()
    weights = {d["destination"]["subset"]: int(d.get("weight", 0)) for d in route["route"]}
    return weights, (route.get("mirror") or {}).get("subset")


async def test_stale_leader_route_write_is_fenced_by_the_policy_version(h: Harness, kube_env: KubeEnv,
                                                                        tmp_path: Path) -> None:
    """Replica A decides "shadow passed, 10% live to v2" and is paused before its route write. Meanwhile
    the candidate becomes v3 and replica B (the new leader) restarts the analysis for it. A resumes: before
    the fence its write (conditional only on the VirtualService's fresh version) put 10% on v2, which the
    policy no longer names, and every later tick refused the route (stuck, bench/faults r-00155's kind).
    Now A's write is refused before it is sent, and the rollout of v3 goes on."""
    await h.setup()
    await _to_the_end_of_shadowing(h)
    b_kube = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "kc-b"))
    try:
        replica_b = Reconciler(b_kube, router_for, Analyzer(h.source), h.clock)
        held, resume, undo = _hold_before_route_write(h.kube)
        stale = asyncio.create_task(h.reconciler.tick(REF))  # replica A
        await asyncio.wait_for(held.wait(), 30)
        doc = await b_kube.get(REF)
        doc["spec"]["target"]["istio"]["candidate"]["subset"] = "v3"
        doc["spec"]["analysis"]["variants"]["candidate"]["subset"] = "v3"
        await b_kube.replace(SHADOW_POLICY, doc)
        restarted = await replica_b.tick(REF)
        assert restarted.phase is Phase.shadowing and restarted.status_written, restarted
        resume.set()
        a = await stale
        undo()
        assert a.route_writes == 0 and a.conflict, a
        assert a.error is not None and "the policy changed since this tick read it" in a.error
        weights, mirror = await _vs_subsets(h)
        assert weights.get("v2", 0) == 0 and weights.get("v3", 0) == 0 and mirror == "v3", (weights, mirror)
        status = await h.status()
        assert status.phase == "Shadowing" and status.rollout is not None
        assert status.rollout.candidate is not None and status.rollout.candidate.endswith("/v3:8000")
        # The rollout of v3 is not stuck: the next ticks read the route and carry on.
        h.clock.advance(30)
        assert await h.run_until({"Succeeded"}) == "Succeeded"
        assert await _vs_subsets(h) == ({"v1": 0, "v3": 100}, None)
    finally:
        await b_kube.close()


async def test_replica_that_lost_the_lease_writes_no_route(h: Harness, kube_env: KubeEnv, tmp_path: Path) -> None:
    """Nothing changed in the policy, but the replica's Lease ran out while it was paused (its renew deadline
    passed on its own clock): it may no longer act as the leader, so its route write is not sent."""
    await h.setup()
    elector = LeaderElector(h.kube, name="shadowctl", namespace="llm", identity="replica-a", lease_duration=0.6,
                            renew_deadline=0.4, retry_period=0.1)
    assert await elector.try_acquire_or_renew() and elector.holds()
    h.reconciler = Reconciler(h.kube, router_for, Analyzer(h.source), h.clock, leading=elector.holds)
    await _to_the_end_of_shadowing(h)
    assert await elector.try_acquire_or_renew() and elector.holds()
    held, resume, undo = _hold_before_route_write(h.kube)
    stale = asyncio.create_task(h.reconciler.tick(REF))
    await asyncio.wait_for(held.wait(), 30)
    await asyncio.sleep(elector.renew_deadline + 0.1)  # paused past the renew deadline; no renewal ran
    assert not elector.holds() and elector.is_leader  # it still believes it leads
    resume.set()
    result = await stale
    undo()
    assert result.route_writes == 0 and result.conflict, result
    assert result.error is not None and "no longer holds the leader Lease" in result.error
    assert await h.weights() == (100, 0, 20.0)  # still shadowing, no live traffic moved
    assert (await h.status()).phase == "Shadowing"
    # Renewed (or led again): the same tick goes through.
    assert await elector.try_acquire_or_renew()
    after = await h.tick(advance=0)
    assert after.route_writes == 1 and after.phase is Phase.progressing, after
    assert (await h.weights())[1] == 10


async def test_pause_between_route_write_and_status_write_is_recorded_from_the_new_state(h: Harness) -> None:
    """A tick moves 10% live to the candidate; a person's pause command lands between its route write and
    its status write (a real 409). Before: the next tick paused from the recorded Shadowing state while 10%
    stayed live (bench/faults r-00155: Paused from Shadowing with live candidate traffic for 7.7 s). Now
    the tick re-reads the policy, finds no other decision recorded, and records its own on the fresh
    version; the pause is then carried out from Progressing, and status and routes agree."""
    await h.setup()
    await _to_the_end_of_shadowing(h)

    def pause() -> None:
        h.env.patch(SHADOW_POLICY, "llm", "chat", command_patch(new_command(Command.pause, iso(time.time()), "a person")))

    with second_writer(h.kube, "replace", lambda gvr, obj: gvr == VIRTUAL_SERVICE, pause, times=1) as edits:
        moved = await h.tick(advance=0)
    assert edits[0] == 1
    assert moved.route_writes == 1 and moved.status_written and not moved.conflict, moved
    status = await h.status()
    assert status.phase == "Progressing" and status.canary_weight == 10
    assert status.last_command is None  # the pause came after this tick read the policy: still pending
    paused = await h.tick(advance=0.5)
    assert paused.phase is Phase.paused, paused
    status = await h.status()
    assert status.rollout is not None and status.rollout.paused_from == Phase.progressing
    assert status.canary_weight == 10 == (await h.weights())[1]


async def test_routes_put_back_when_the_decision_cannot_be_recorded(h: Harness) -> None:
    """The same, but the policy changes again after every read of it (another writer in a loop): the tick
    cannot record its decision in its attempts, so it puts the routes back to what the recorded status
    (Shadowing) holds them at; nothing runs ahead of `.status`, and a later tick decides again."""
    await h.setup()
    await _to_the_end_of_shadowing(h)
    armed = [False]  # from the route write on, every read of the policy is followed by another edit

    def edit_after_route_write() -> None:
        armed[0] = True
        touch(h.env, SHADOW_POLICY, "llm", "chat")

    with second_writer(h.kube, "get", lambda ref, *a: ref == REF and armed[0],
                       lambda: touch(h.env, SHADOW_POLICY, "llm", "chat")), \
            second_writer(h.kube, "replace", lambda gvr, obj: gvr == VIRTUAL_SERVICE, edit_after_route_write,
                          times=1):
        result = await h.tick(advance=0)
    assert result.conflict and "Undo" in result.actions, result
    status = await h.status()
    assert status.phase == "Shadowing"
    assert await h.weights() == (100, 0, 20.0)  # the 10% was taken back
    assert await h.run_until({"Succeeded"}) == "Succeeded"
    h.check_invariants([10, 50])
