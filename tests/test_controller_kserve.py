"""Whole rollouts on a KServe InferenceService through the reconciler, against the real local API server.

As tests/test_controller_gateway.py does for an HTTPRoute: the KServe router, the kube client,
kube-apiserver (KServe's InferenceService CRD, reached through the fault proxy), the KServe stand-in
(shadowctl/sim/kserve.py, which writes the status KServe's controller writes after every spec write)
and the judge are real; the metric source is a double at the port (tests/controller_helpers.py).

The policy's shadow phase goes through the tap (``shadow.mode: tap``); the reconciler here is given the
KServe router alone, so these tests hold the KServe side to account whatever the tap does (the tap router
and its composition are tested in tests/test_tap_router.py). Every InferenceService write is checked
against the invariants, and so is the traffic the stand-in reports after each tick.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import yaml
from conftest_kube import KubeEnv, eventually
from controller_helpers import REF, REPO, Arm, FakeMetricSource, Harness, policy_doc
from kserve_helpers import kserve  # noqa: F401 - the fixture

from shadowctl.compare.comparators import AgreementTally, PairResult
from shadowctl.compare.events import Variant
from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.commands import command_patch, new_command
from shadowctl.controller.reconciler import Reconciler
from shadowctl.kube import INFERENCE_SERVICE, SHADOW_POLICY, KubeClient, ResourceRef
from shadowctl.kube.refs import GVR
from shadowctl.policy.model import ComparatorName, ShadowPolicy
from shadowctl.policy.status import Command
from shadowctl.routers import MANAGED_ANNOTATION, Router
from shadowctl.routers.kserve import KServeRouter

ISVC_REF = ResourceRef(INFERENCE_SERVICE, "chat", "llm")
R1, R2, R3 = "chat-predictor-00001", "chat-predictor-00002", "chat-predictor-00003"
STEPS = [10, 50]


def _kserve_router(policy: ShadowPolicy, kube: KubeClient) -> Router:
    assert policy.spec.target.kserve is not None
    return KServeRouter(kube, policy.metadata.namespace, policy.spec.target.kserve)


def ctp(isvc: dict[str, Any]) -> int | None:
    value = isvc["spec"]["predictor"].get("canaryTrafficPercent")
    return value if isinstance(value, int) else None


def live(isvc: dict[str, Any]) -> dict[str, int]:
    """The percent each revision gets, as the stand-in (KServe) reports it."""
    out: dict[str, int] = {}
    for t in isvc["status"]["components"]["predictor"]["traffic"]:
        out[t["revisionName"]] = out.get(t["revisionName"], 0) + int(t.get("percent") or 0)
    return {k: v for k, v in out.items() if v}



class AgreeingOutputs:
    """The analyzer's output port as taps that always agree would fill it (a double: these tests hold the KServe
    side to account; real taps and pairing are tested in tests/test_controller_tap.py)."""

    def ensure(self, policy: Any, since: float, carried: Any = None) -> None:
        pass

    def tally(self, policy_key: str, since: float) -> AgreementTally:
        results = [PairResult(f"r{i}-{variant.value}", variant, {ComparatorName.exact: 1.0},
                              {ComparatorName.exact: True})
                   for variant in (Variant.candidate, Variant.baseline) for i in range(400)]
        return AgreementTally().add_many(results)

    def latency(self, policy_key: str, since: float) -> None:
        return None

    def error(self, policy_key: str) -> None:
        return None

    def judge_problem(self, policy_key: str) -> None:
        return None

    async def stop(self, policy_key: str) -> None:
        pass

class KServeHarness(Harness):
    """The controller harness on kserve/chat.yaml's InferenceService; ``writes`` holds every write to it."""

    def __init__(self, env: KubeEnv, kube: KubeClient, source: FakeMetricSource | None = None) -> None:
        super().__init__(env, kube, source)
        self.reconciler = Reconciler(kube, _kserve_router, Analyzer(self.source, AgreeingOutputs()), self.clock)
        self.writes: list[dict[str, Any]] = []
        self.observed: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        original_replace = kube.replace

        async def replace(gvr: GVR, obj: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
            stored = await original_replace(gvr, obj, *args, **kwargs)
            if gvr == INFERENCE_SERVICE:
                self._pending.append(stored)
            return stored

        kube.replace = replace  # type: ignore[method-assign]

    async def settled(self) -> dict[str, Any]:
        """The InferenceService once the stand-in has written the status of its current generation."""
        async def check() -> dict[str, Any]:
            isvc = await self.kube.get(ISVC_REF)
            status = isvc.get("status") or {}
            return isvc if status.get("observedGeneration") == isvc["metadata"]["generation"] else {}

        return await eventually(check, timeout=15.0)

    async def new_model(self, uri: str) -> dict[str, Any]:
        """A person applies a new model version (as git holds it: canaryTrafficPercent 0)."""
        isvc = await self.kube.get(ISVC_REF)
        isvc["spec"]["predictor"]["model"]["storageUri"] = uri
        isvc["spec"]["predictor"]["canaryTrafficPercent"] = 0
        await self.env_replace(isvc)
        return await self.settled()

    async def env_replace(self, isvc: dict[str, Any]) -> None:
        self.env.put_object(INFERENCE_SERVICE, {k: v for k, v in isvc.items() if k != "status"})

    async def setup(self, **spec: Any) -> None:
        doc = yaml.safe_load((REPO / "kserve" / "chat.yaml").read_text())
        await self.kube.create(INFERENCE_SERVICE, doc)
        first = await self.settled()
        assert live(first) == {R1: 100}
        await self.new_model("hf://example/llama-chat-v2")
        policy = policy_doc(**spec)
        policy["spec"]["target"] = {"kserve": {"inferenceService": "chat"}}
        if policy["spec"].get("shadow"):
            policy["spec"]["shadow"]["mode"] = "tap"
            # The taps' route channel; no tap runs here (the reconciler has the KServe router alone): the
            # agreement counts come from AgreeingOutputs, a double at the analyzer's port.
            policy["spec"]["analysis"]["outputs"] = {
                "mqtt": {"broker": "mqtt://127.0.0.1:1883", "topic": "shadowctl/outputs/llm/chat/+"},
                "comparators": [{"name": "exact"}]}
        policy["spec"]["analysis"]["variants"] = {"primary": {"workload": "chat-v1"},
                                                  "candidate": {"workload": "chat-v2"}}
        await self.kube.create(SHADOW_POLICY, policy)

    async def weights(self) -> tuple[int, int, float | None]:
        """(primary, candidate) from the live traffic the stand-in reports for the recorded revisions."""
        isvc = await self.kube.get(ISVC_REF)
        shares = live(isvc) if (isvc.get("status") or {}).get("components") else {}
        candidate = sum(v for k, v in shares.items() if k != R1)
        return 100 - candidate, candidate, None

    async def tick(self, advance: float = 10.0) -> Any:
        self._pending = []
        self.clock.advance(advance)
        result = await self.reconciler.tick(REF)
        isvc = await self.settled()
        status = await self.status()
        row = {"phase": status.phase.value, "decided": result.phase.value if result.phase else None,
               "candidate": status.rollout.candidate if status.rollout else None}
        for stored in self._pending:
            self.writes.append({**row, "ctp": ctp(stored), "isvc": stored})
        self.observed.append({**row, "ctp": ctp(isvc), "live": live(isvc),
                              "rolled": isvc["status"]["components"]["predictor"].get("latestRolledoutRevision")})
        self.history.append({**row, "primary": 0, "step": status.step})
        return result

    def check_invariants(self, steps: Sequence[int]) -> None:
        """DESIGN.md invariants at every InferenceService write and in the traffic KServe reports after each
        tick: only canaryTrafficPercent (and our record) changes, always 0..100; the candidate gets a live share
        only after the shadow phase passed and never more than a step reached, until the promotion; after a
        rollback everything goes to the rolled-out revision."""
        assert self.writes, "the controller wrote the InferenceService"
        passed_shadow = promoted = False
        for w in self.writes:
            spec = copy.deepcopy(w["isvc"]["spec"])
            spec["predictor"].pop("canaryTrafficPercent", None)
            assert spec["predictor"]["model"]["storageUri"].startswith("hf://"), w
            assert w["ctp"] is None or 0 <= w["ctp"] <= 100, w
            if "Progressing" in (w["phase"], w["decided"]):
                passed_shadow = True
            if "Promoting" in (w["phase"], w["decided"]) or w["phase"] == "Succeeded":
                promoted = True
            if w["ctp"] is None:
                assert promoted, w  # the field removed: only a promotion does that
            elif w["ctp"] > 0:
                assert passed_shadow and w["ctp"] in steps, w
            if w["phase"] == "RolledBack":
                assert w["ctp"] == 0, w
        for row in self.observed:
            if row["phase"] in ("Pending", "Shadowing", "RolledBack"):
                assert set(row["live"]) == {row["rolled"]}, row  # all to the rolled-out revision
            if row["phase"] == "Progressing":
                assert row["ctp"] in steps, row


@pytest.fixture
async def h(request: pytest.FixtureRequest, kube_env: KubeEnv, kube_client: KubeClient) -> KServeHarness:
    request.getfixturevalue("kserve")
    return KServeHarness(kube_env, kube_client)


async def command(h: KServeHarness, cmd: Command) -> None:
    await h.kube.patch_merge(REF, command_patch(new_command(cmd, "2026-01-01T00:00:00Z", "test")))


async def test_good_candidate_shadow_canary_promoted(h: KServeHarness) -> None:
    await h.setup()
    await h.tick()
    assert (await h.status()).phase == "Shadowing"
    assert ctp(await h.kube.get(ISVC_REF)) == 0
    assert await h.run_until({"Succeeded", "RolledBack"}) == "Succeeded"
    isvc = await h.settled()
    assert ctp(isvc) is None and MANAGED_ANNOTATION not in (isvc["metadata"].get("annotations") or {})
    predictor = isvc["status"]["components"]["predictor"]
    assert (predictor["latestRolledoutRevision"], predictor["previousRolledoutRevision"]) == (R2, R1)
    assert live(isvc) == {R2: 100}
    assert {w["ctp"] for w in h.writes} == {0, 10, 50, None}
    phases = [row["phase"] for row in h.history]
    assert phases.index("Shadowing") < phases.index("Progressing") < phases.index("Promoting")
    h.check_invariants(STEPS)


async def test_canary_step_failure_rolls_back_to_the_rolled_out_revision(h: KServeHarness) -> None:
    await h.setup()
    await h.run_until({"Progressing"})
    assert live(await h.kube.get(ISVC_REF)) == {R1: 90, R2: 10}
    h.source.candidate = Arm(error_rate=0.08)
    assert await h.run_until({"RolledBack", "Succeeded"}) == "RolledBack"
    isvc = await h.settled()
    assert ctp(isvc) == 0 and live(isvc) == {R1: 100}
    assert MANAGED_ANNOTATION not in (isvc["metadata"].get("annotations") or {})
    assert isvc["status"]["components"]["predictor"]["latestRolledoutRevision"] == R1
    h.check_invariants(STEPS)


@pytest.mark.parametrize("when", ["Shadowing", "Progressing"])
async def test_rollback_command_in_any_phase(h: KServeHarness, when: str) -> None:
    await h.setup()
    await h.run_until({when})
    await command(h, Command.rollback)
    assert await h.run_until({"RolledBack"}) == "RolledBack"
    isvc = await h.settled()
    assert ctp(isvc) == 0 and live(isvc) == {R1: 100}
    h.check_invariants(STEPS)


async def test_a_new_revision_mid_analysis_restarts_it(h: KServeHarness) -> None:
    await h.setup()
    await h.run_until({"Progressing"})
    assert (await h.status()).rollout.candidate == R2  # type: ignore[union-attr]
    # A person applies a third model while the second is at 10%, without canaryTrafficPercent: 0 in the
    # manifest (a kubectl edit): KServe hands the 10% to the new latest ready revision at once.
    isvc = await h.kube.get(ISVC_REF)
    isvc["spec"]["predictor"]["model"]["storageUri"] = "hf://example/llama-chat-v3"
    await h.env_replace(isvc)
    moved = await h.settled()
    assert live(moved) == {R1: 90, R3: 10}
    await h.tick()
    status = await h.status()
    assert status.phase == "Shadowing" and status.rollout.candidate == R3  # type: ignore[union-attr]
    isvc = await h.settled()
    assert ctp(isvc) == 0 and live(isvc) == {R1: 100}
    assert f'"candidateRevision":"{R3}"' in isvc["metadata"]["annotations"][MANAGED_ANNOTATION]
    assert await h.run_until({"Succeeded", "RolledBack"}) == "Succeeded"
    predictor = (await h.settled())["status"]["components"]["predictor"]
    assert predictor["latestRolledoutRevision"] == R3
    h.check_invariants(STEPS)


@pytest.mark.parametrize("resume", [False, True], ids=["left-paused", "resumed"])
async def test_a_new_revision_while_paused_restarts_it(h: KServeHarness, resume: bool) -> None:
    """As above, but the rollout was paused at 10% first (bench/faults r-00201 on an HTTPRoute). KServe hands
    the paused share to the new revision at once; before, Paused held it there (a resume then wrote the step
    for it, refused as RevisionsChanged until the deadline). Now the changed candidate restarts the rollout in
    Paused too, with or without a resume: the share goes back to 0 and R3's analysis starts from its shadow
    phase."""
    await h.setup()
    await h.run_until({"Progressing"})
    await command(h, Command.pause)
    await h.tick()
    assert (await h.status()).phase == "Paused"
    isvc = await h.kube.get(ISVC_REF)
    isvc["spec"]["predictor"]["model"]["storageUri"] = "hf://example/llama-chat-v3"
    await h.env_replace(isvc)
    assert live(await h.settled()) == {R1: 90, R3: 10}
    if resume:
        await command(h, Command.resume)
    await h.tick()
    status = await h.status()
    assert status.phase == "Shadowing" and status.rollout.candidate == R3  # type: ignore[union-attr]
    isvc = await h.settled()
    assert ctp(isvc) == 0 and live(isvc) == {R1: 100}
    assert await h.run_until({"Succeeded", "RolledBack"}) == "Succeeded"
    h.check_invariants(STEPS)


async def test_drift_is_reasserted(h: KServeHarness) -> None:
    await h.setup()
    await h.run_until({"Progressing"})
    isvc = await h.kube.get(ISVC_REF)
    isvc["spec"]["predictor"]["canaryTrafficPercent"] = 0  # a sync from git, without ignoreDifferences
    await h.env_replace(isvc)
    assert live(await h.settled()) == {R1: 100}
    await h.tick(advance=1)
    assert (await h.status()).phase == "Progressing"
    isvc = await h.settled()
    assert ctp(isvc) == 10 and live(isvc) == {R1: 90, R2: 10}
