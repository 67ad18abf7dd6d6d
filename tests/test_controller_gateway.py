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
