"""Whole rollouts on a Gateway API HTTPRoute through the reconciler, against the real local API server.

As tests/test_controller_rollouts.py does for Istio: routers, the kube client, kube-apiserver (Gateway
API v1.6.1's HTTPRoute CRD with its OpenAPI and CEL validation, reached through the fault proxy) and
the judge are real; the metric source is a double at the port (tests/controller_helpers.py). Every
HTTPRoute write is checked against the invariants (tests/gateway_helpers.py).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
from conftest_kube import KubeEnv
from controller_helpers import REF, Arm
from gateway_helpers import ROUTE_REF, GatewayHarness, rule_of, shares

from shadowctl.controller.commands import command_patch, new_command
from shadowctl.kube import HTTP_ROUTE, KubeClient
from shadowctl.policy.status import Command
from shadowctl.routers import MANAGED_ANNOTATION


@pytest.fixture(params=[0, 10], ids=["two-backends", "third-backend-10pct"])
async def h(request: pytest.FixtureRequest, kube_env: KubeEnv, kube_client: KubeClient) -> GatewayHarness:
    return GatewayHarness(kube_env, kube_client, third=request.param)


async def command(h: GatewayHarness, cmd: Command) -> None:
    await h.kube.patch_merge(REF, command_patch(new_command(cmd, "2026-01-01T00:00:00Z", "test")))


def _restored(h: GatewayHarness, route: dict) -> None:  # type: ignore[type-arg]
    """The route is as it was before the rollout, apart from metadata the server keeps."""
    assert route["spec"] == h.original["spec"]
    assert MANAGED_ANNOTATION not in (route["metadata"].get("annotations") or {})


async def test_good_candidate_shadow_canary_promoted(h: GatewayHarness) -> None:
    await h.setup()
    await h.tick()
    assert (await h.status()).phase == "Shadowing"
    route = await h.route()
    assert [f["type"] for f in rule_of(route)["filters"]] == ["RequestMirror", "RequestMirror"]
    assert rule_of(route)["filters"][0] == rule_of(h.original)["filters"][0]  # someone else's, first
    assert rule_of(h.original)["filters"][0]["requestMirror"]["backendRef"]["name"] == "analytics"
    assert (await h.weights())[1:] == (0, 20.0)
    assert await h.run_until({"Succeeded", "RolledBack"}) == "Succeeded"
    s = shares(await h.route())
    assert s["chat-v2"] == 100 - h.third and s["chat-v1"] == 0
    assert s.get("chat-previous", Fraction(0)) == h.third
    assert (await h.weights())[2] is None
    phases = [row["phase"] for row in h.history]
    assert phases.index("Shadowing") < phases.index("Progressing") < phases.index("Promoting")
    assert {int(w["shares"].get("chat-v2", 0)) for w in h.writes} >= {0, 10, 50, 100 - h.third}
    h.check_invariants([10, 50])
    assert [t.to for t in (await h.status()).history][-1] == "Succeeded"


async def test_slow_candidate_rolled_back_during_shadow(h: GatewayHarness) -> None:
    h.source.candidate = Arm(median=0.6)
    await h.setup()
    assert await h.run_until({"RolledBack", "Succeeded"}) == "RolledBack"
    assert "Progressing" not in [row["phase"] for row in h.history]
    _restored(h, await h.route())
    h.check_invariants([10, 50])


async def test_canary_step_failure_rolls_back_and_restores_the_weights(h: GatewayHarness) -> None:
    await h.setup()
    await h.run_until({"Progressing"})
    h.source.candidate = Arm(error_rate=0.08)
    assert await h.run_until({"RolledBack", "Succeeded"}) == "RolledBack"
    _restored(h, await h.route())
    h.check_invariants([10, 50])


@pytest.mark.parametrize("when", ["Shadowing", "Progressing"])
async def test_rollback_command_in_any_phase(h: GatewayHarness, when: str) -> None:
    await h.setup()
    await h.run_until({when})
    await command(h, Command.rollback)
    assert await h.run_until({"RolledBack"}) == "RolledBack"
    _restored(h, await h.route())
    h.check_invariants([10, 50])


async def test_drift_is_reasserted(h: GatewayHarness) -> None:
    await h.setup()
    await h.run_until({"Progressing"})
    route = await h.route()
    refs = {ref["name"]: ref for ref in rule_of(route)["backendRefs"]}
    refs["chat-v1"]["weight"] += refs["chat-v2"]["weight"]  # a person gives the candidate's share back
    refs["chat-v2"]["weight"] = 0
    await h.kube.replace(HTTP_ROUTE, route)
    assert (await h.weights())[1] == 0
    await h.tick(advance=1)
    assert (await h.status()).phase == "Progressing"
    assert (await h.weights())[1] == 10
    assert shares(await h.kube.get(ROUTE_REF)).get("chat-previous", Fraction(0)) == h.third


@pytest.mark.parametrize("resume", [True, False], ids=["resumed", "left-paused"])
async def test_a_candidate_changed_while_paused_mid_canary_restarts_and_leaves_nothing_of_the_old_one(
        h: GatewayHarness, resume: bool) -> None:
    """bench/faults r-00201: paused at step 2 (chat-v2 at 50%, a backendRef shadowctl added), the policy then
    names chat-v3 and a person resumes. Before: the resume tick wrote step 2 for chat-v3 (with no intent
    recorded, the primary at 0) and the restart that followed kept chat-v2 as someone else's backend, so it
    served 50% for good. Now the changed candidate is handled first, Paused included (with or without the
    resume): chat-v2's share goes back to the primary and its backendRef is removed, chat-v3 starts from
    the shadow phase, and only ever gets the steps its own analysis reached."""
    await h.setup()
    await h.run_until({"Progressing"})
    while (await h.status()).canary_weight != 50:
        await h.tick()
    await command(h, Command.pause)
    await h.tick()
    assert (await h.status()).phase == "Paused"
    assert shares(await h.route())["chat-v2"] == 50
    changed_at = len(h.writes)
    await h.kube.patch_merge(REF, {"spec": {"target": {"gatewayAPI": {
        "candidate": {"name": "chat-v3", "port": 8000}}}}})
    if resume:
        await command(h, Command.resume)
    await h.tick()
    status = await h.status()
    assert status.phase == "Shadowing" and status.rollout is not None, status
    assert status.rollout.candidate is not None and "chat-v3" in status.rollout.candidate
    s = shares(await h.route())
    assert "chat-v2" not in s and s.get("chat-v3", Fraction(0)) == 0
    assert s["chat-v1"] == 100 - h.third and s.get("chat-previous", Fraction(0)) == h.third
    mirrors = [f["requestMirror"]["backendRef"]["name"] for f in rule_of(await h.route())["filters"]]
    assert mirrors == ["analytics", "chat-v3"]
    assert await h.run_until({"Succeeded", "RolledBack"}) == "Succeeded"
    s = shares(await h.route())
    assert "chat-v2" not in s and s["chat-v3"] == 100 - h.third and s["chat-v1"] == 0
    passed = False
    for w in h.writes[changed_at:]:  # every HTTPRoute write after the change, as the server stored it
        ws = w["shares"]
        assert ws.get("chat-v2", Fraction(0)) == 0, w["shares"]
        assert sum(ws.values()) == 100 and ws.get("chat-previous", Fraction(0)) == h.third, ws
        passed = passed or "Progressing" in (w["phase"], w["decided"])
        v3 = ws.get("chat-v3", Fraction(0))
        assert v3 in (0, 100 - h.third) or (passed and v3 in (10, 50)), (w["phase"], ws)
    assert MANAGED_ANNOTATION not in ((await h.route())["metadata"].get("annotations") or {})
