"""Record ShadowPolicy objects from real rollouts, one per phase, for the Argo CD health check's fixtures.

Run by hand (pytest does not collect this file on its own; it needs the kube fixtures):

    .venv/bin/pytest tests/argocd_record.py -q -p no:cacheprovider

Each rollout runs through the real reconciler against the local kube-apiserver with the controller
tests' harness (tests/controller_helpers.py: real routers, API server and judge; the metric source is
the double at its port). After every tick the policy is read back from the API server and, for each
phase first seen, written to deploy/argocd/testdata/<name>.yaml as Argo CD would receive it (the whole
object; server-managed metadata such as managedFields, uid and timestamps trimmed). The Knative
"Failed" case is a rollout whose candidate revision disappears (Knative's status names no ready
revision) while its canary runs; the status patch stands in for Knative's controller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from conftest_kube import KubeEnv, eventually
from controller_helpers import REF, VS_REF, Arm, Harness

from shadowctl.controller.commands import command_patch, new_command
from shadowctl.kube import KNATIVE_SERVICE, SHADOW_POLICY, KubeClient, ResourceRef
from shadowctl.policy.status import Command

OUT = Path(__file__).resolve().parent.parent / "deploy" / "argocd" / "testdata"
KEEP_META = ("name", "namespace", "generation", "labels", "annotations")


def trimmed(obj: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items() if k in KEEP_META}
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": meta, "spec": obj["spec"],
            **({"status": obj["status"]} if "status" in obj else {})}


def save(name: str, obj: dict[str, Any], how: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    text = f"# Recorded by tests/argocd_record.py from a real rollout: {how}\n"
    text += yaml.safe_dump(trimmed(obj), sort_keys=False, default_flow_style=False, width=120)
    (OUT / f"{name}.yaml").write_text(text, encoding="utf-8")


async def command(h: Harness, cmd: Command) -> None:
    await h.kube.patch_merge(REF, command_patch(new_command(cmd, "2026-01-01T00:00:00Z", "ana")))


class Recorder:
    def __init__(self, h: Harness, ref: ResourceRef, scenario: str) -> None:
        self.h, self.ref, self.scenario, self.seen = h, ref, scenario, set[str]()

    async def tick(self, name_of: dict[str, str] | None = None) -> str:
        self.h.clock.advance(10)
        await self.h.reconciler.tick(self.ref)
        obj = await self.h.kube.get(self.ref)
        phase = str((obj.get("status") or {}).get("phase"))
        name = (name_of or {}).get(phase)
        if name is not None and name not in self.seen:
            self.seen.add(name)
            save(name, obj, f"{self.scenario}, phase {phase}")
        return phase

    async def until(self, phases: set[str], name_of: dict[str, str] | None = None, ticks: int = 80) -> str:
        for _ in range(ticks):
            phase = await self.tick(name_of)
            if phase in phases:
                return phase
        raise AssertionError(f"{self.scenario}: no phase in {phases} after {ticks} ticks")


async def test_record_manual_promotion(kube_env: KubeEnv, kube_client: KubeClient) -> None:
    h = Harness(kube_env, kube_client)
    await h.setup(promotion="manual")
    save("no-status", await h.kube.get(REF), "the policy as applied, before the controller's first tick")
    rec = Recorder(h, REF, "a good candidate with manual promotion")
    names = {"Shadowing": "shadowing", "Progressing": "progressing", "WaitingPromotion": "waiting-promotion",
             "Promoting": "promoting", "Succeeded": "succeeded"}
    assert await rec.until({"WaitingPromotion"}, names) == "WaitingPromotion"
    await command(h, Command.promote)
    assert await rec.until({"Succeeded"}, names) == "Succeeded"
    # A person edits the spec of a finished rollout: until the controller looks, it is the old status.
    edited = await h.kube.get(REF)
    edited["spec"]["canary"]["steps"] = [10, 30]
    await h.kube.replace(SHADOW_POLICY, edited)
    save("spec-edited", await h.kube.get(REF), "a good candidate with manual promotion, spec edited after Succeeded")
    assert rec.seen == set(names.values())


async def test_record_pause(kube_env: KubeEnv, kube_client: KubeClient) -> None:
    h = Harness(kube_env, kube_client)
    await h.setup()
    rec = Recorder(h, REF, "a canary paused by a person")
    await rec.until({"Progressing"})
    await command(h, Command.pause)
    assert await rec.tick({"Paused": "paused"}) == "Paused"


async def test_record_rollback(kube_env: KubeEnv, kube_client: KubeClient) -> None:
    h = Harness(kube_env, kube_client)
    h.source.candidate = Arm(median=0.6)
    await h.setup()
    rec = Recorder(h, REF, "a slow candidate (TTFT +50%) rolled back during shadow")
    names = {"RollingBack": "rolling-back", "RolledBack": "rolled-back"}
    assert await rec.until({"RolledBack"}, names) == "RolledBack"
    assert rec.seen == set(names.values())


async def test_record_reconcile_error(kube_env: KubeEnv, kube_client: KubeClient) -> None:
    h = Harness(kube_env, kube_client)
    await h.setup()
    await h.kube.delete(VS_REF)  # the VirtualService the policy names is gone: the controller cannot act
    rec = Recorder(h, REF, "the policy's VirtualService does not exist")
    phase = await rec.tick({"Pending": "pending-not-ready"})
    assert phase == "Pending", phase
    assert "pending-not-ready" in rec.seen


KSVC = {
    "apiVersion": "serving.knative.dev/v1",
    "kind": "Service",
    "metadata": {"name": "summarize", "namespace": "llm"},
    "spec": {"template": {"metadata": {"annotations": {"v": "1"}},
                          "spec": {"containers": [{"image": "vllm/vllm-openai:v1"}]}}},
}
KNATIVE_POLICY = """
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {name: summarize, namespace: llm}
spec:
  target:
    knative: {service: summarize}
  canary: {steps: [20, 50], stepDuration: 20s}
  analysis:
    interval: 10s
    variants:
      primary: {revision: summarize-00001}
      candidate: {revision: summarize-00002}
    metrics:
      - {name: ttft-p95, preset: vllm-ttft, statistic: p95, margin: 10%, minSamples: 50}
  progressDeadline: 1h
"""


async def _knative_service_with_candidate(kube: KubeClient, ksvc: ResourceRef, *, candidate: bool) -> None:
    """The Service with revision 1 serving and, if ``candidate``, revision 2 deployed with no traffic."""

    async def ready(name: str) -> bool:
        return ((await kube.get(ksvc)).get("status") or {}).get("latestReadyRevisionName") == name

    await kube.create(KNATIVE_SERVICE, KSVC)
    await eventually(lambda: ready("summarize-00001"))
    if candidate:
        svc = await kube.get(ksvc)
        svc["spec"]["template"]["metadata"]["annotations"]["v"] = "2"
        svc["spec"]["template"]["spec"]["containers"][0]["image"] = "vllm/vllm-openai:v2"
        svc["spec"]["traffic"] = [{"revisionName": "summarize-00001", "percent": 100}]
        await kube.replace(KNATIVE_SERVICE, svc)
        await eventually(lambda: ready("summarize-00002"))
    await kube.create(SHADOW_POLICY, yaml.safe_load(KNATIVE_POLICY))


async def test_record_nothing_to_roll_out(kube_env: KubeEnv, kube_client: KubeClient) -> None:
    h = Harness(kube_env, kube_client)
    ksvc = ResourceRef(KNATIVE_SERVICE, "summarize", "llm")
    await _knative_service_with_candidate(h.kube, ksvc, candidate=False)
    rec = Recorder(h, ResourceRef(SHADOW_POLICY, "summarize", "llm"),
                   "a Knative Service whose only revision is the primary (nothing to roll out)")
    assert await rec.tick({"Pending": "pending"}) == "Pending"
    assert "pending" in rec.seen


async def test_record_candidate_gone(kube_env: KubeEnv, kube_client: KubeClient) -> None:
    h = Harness(kube_env, kube_client)
    ksvc = ResourceRef(KNATIVE_SERVICE, "summarize", "llm")
    await _knative_service_with_candidate(h.kube, ksvc, candidate=True)
    rec = Recorder(h, ResourceRef(SHADOW_POLICY, "summarize", "llm"),
                   "a Knative canary whose candidate revision disappeared")
    await rec.until({"Progressing"})
    kube_env.patch_status(KNATIVE_SERVICE, "llm", "summarize", {"status": {"latestReadyRevisionName": None}})
    assert await rec.until({"Failed"}, {"Failed": "failed"}, ticks=5) == "Failed"
