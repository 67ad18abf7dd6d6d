"""Deleting a ShadowPolicy never leaves traffic or a mirror on the candidate (the finalizer).

Against the real local API server: a DELETE of an object with finalizers only sets
metadata.deletionTimestamp; removing the last one deletes it.
"""

from __future__ import annotations

import pytest
from conftest_kube import KubeEnv
from controller_helpers import REF, VS_REF, Harness, second_writer

from shadowctl.controller.reconciler import FINALIZER
from shadowctl.kube import VIRTUAL_SERVICE, KubeClient, NotFound


@pytest.fixture
async def h(kube_env: KubeEnv, kube_client: KubeClient) -> Harness:
    return Harness(kube_env, kube_client)


async def _finalizers(h: Harness) -> list[str]:
    return list((await h.kube.get(REF))["metadata"].get("finalizers") or [])


async def test_deleted_while_no_controller_runs_restores_routes_at_the_next_tick(h: Harness) -> None:
    await h.setup()
    await h.tick()
    assert await _finalizers(h) == [FINALIZER]  # held from the first tick, before any route is written
    await h.run_until({"Progressing"})
    assert (await h.weights())[1] == 10
    await h.kube.delete(REF)  # the controller is not running: the object stays, being deleted
    obj = await h.kube.get(REF)
    assert obj["metadata"].get("deletionTimestamp") and (await h.weights())[1] == 10
    h.clock.advance(10)
    result = await h.reconciler.tick(REF)
    assert "Finalize" in result.actions and not result.gone
    assert await h.weights() == (100, 0, None)  # all traffic back on the primary, no mirror
    with pytest.raises(NotFound):
        await h.kube.get(REF)
    after = await h.reconciler.tick(REF)  # what the policy's worker sees next: it stops on `gone`
    assert after.gone and after.error == "the policy is gone" and after.route_writes == 0


async def test_routes_that_cannot_be_restored_keep_the_policy(h: Harness) -> None:
    """The API server is unavailable for the route write (503s injected by the fault proxy: the real server
    does not fail on demand), for the first try and each of the client's retries: the policy stays."""
    await h.setup()
    await h.run_until({"Shadowing"})
    assert (await h.weights())[2] is not None  # mirroring
    await h.kube.delete(REF)
    attempts = h.kube.retry.attempts
    h.env.reset_counts()
    h.env.fail_next(attempts, 503, verb="update", path="virtualservices")  # the first try and its retries
    h.clock.advance(10)
    result = await h.reconciler.tick(REF)
    assert result.error is not None and "cannot restore the routes" in result.error
    writes = [r.status for r in h.env.request_log if r.verb == "update" and "/virtualservices/" in r.path]
    assert writes == [503] * attempts  # none reached the API server
    assert FINALIZER in await _finalizers(h)  # still there: nothing was let go
    assert (await h.weights())[2] is not None
    h.clock.advance(10)
    await h.reconciler.tick(REF)
    assert await h.weights() == (100, 0, None)
    with pytest.raises(NotFound):
        await h.kube.get(REF)


async def test_finished_and_pending_policies_are_deleted_at_once(h: Harness) -> None:
    await h.setup()
    await h.run_until({"Succeeded"})
    await h.tick()  # a terminal phase lets the finalizer go
    assert await _finalizers(h) == []
    await h.kube.delete(REF)
    with pytest.raises(NotFound):
        await h.kube.get(REF)


async def test_deleted_before_its_first_status_restores_the_mirror(h: Harness) -> None:
    """The first tick writes the mirror, but its status (Shadowing) never lands (the API answers the status
    write 503, the first try and each retry); the policy is then deleted. The recorded phase is still
    Pending, but the VirtualService's ownership record says shadowctl added the mirror: the deletion
    restores the route before it lets the finalizer go (the fault campaign's r-00072 kept the mirror)."""
    await h.setup()
    h.clock.advance(10)
    with second_writer(h.kube, "replace", lambda gvr, obj: gvr == VIRTUAL_SERVICE,  # after the start's intent
                       lambda: h.env.fail_next(h.kube.retry.attempts, 503, verb="patch", path="/status$"), times=1):
        first = await h.reconciler.tick(REF)
    assert first.route_writes == 1 and first.error is not None and "cannot write the status" in first.error
    assert (await h.status()).phase == "Pending"
    assert (await h.weights())[2] == 20.0  # our mirror is live
    await h.kube.delete(REF)
    h.clock.advance(10)
    result = await h.reconciler.tick(REF)
    assert "Finalize" in result.actions, result
    assert await h.weights() == (100, 0, None)
    assert "shadowctl.dev/managed" not in ((await h.kube.get(VS_REF))["metadata"].get("annotations") or {})
    with pytest.raises(NotFound):
        await h.kube.get(REF)


async def test_pending_policy_whose_route_holds_nothing_of_ours_is_let_go_without_a_route_write(h: Harness) -> None:
    """The other side of the ownership check: the first tick could not write the route (503s), so the
    policy is Pending with its finalizer and nothing of ours in the VirtualService; deleting it restores
    nothing and lets it go at once."""
    await h.setup()
    h.env.fail_next(h.kube.retry.attempts, 503, verb="update", path="virtualservices")
    h.clock.advance(10)
    first = await h.reconciler.tick(REF)
    assert first.route_writes == 0 and first.error is not None, first
    assert await _finalizers(h) == [FINALIZER] and (await h.status()).phase == "Pending"
    await h.kube.delete(REF)
    before = (await h.kube.get(VS_REF))["metadata"]["resourceVersion"]
    h.clock.advance(10)
    result = await h.reconciler.tick(REF)
    assert result.route_writes == 0 and "Finalize" not in result.actions, result
    assert (await h.kube.get(VS_REF))["metadata"]["resourceVersion"] == before
    with pytest.raises(NotFound):
        await h.kube.get(REF)
