"""Knative Service webhook rules and status following spec, in the emulator, through KubeClient."""

from __future__ import annotations

from typing import Any

import pytest

from shadowctl.kube import KNATIVE_REVISION, KNATIVE_SERVICE, Invalid, KubeClient, ResourceRef
from shadowctl.sim.kubeapi import KubeAPIEmulator

REF = ResourceRef(KNATIVE_SERVICE, "llm", "default")


def ksvc(image: str = "llm:1", traffic: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"template": {"spec": {"containers": [{"image": image}]}}}
    if traffic is not None:
        spec["traffic"] = traffic
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": "llm", "namespace": "default"},
        "spec": spec,
    }


async def test_create_makes_a_ready_revision_and_status(kube_client: KubeClient) -> None:
    await kube_client.create(KNATIVE_SERVICE, ksvc())
    svc = await kube_client.get(REF)
    status = svc["status"]
    assert status["latestReadyRevisionName"] == status["latestCreatedRevisionName"] == "llm-00001"
    assert status["observedGeneration"] == svc["metadata"]["generation"]
    assert status["traffic"] == [{"revisionName": "llm-00001", "percent": 100, "latestRevision": True}]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    rev = await kube_client.get(ResourceRef(KNATIVE_REVISION, "llm-00001", "default"))
    assert rev["spec"]["containers"][0]["image"] == "llm:1"
    assert rev["metadata"]["labels"]["serving.knative.dev/service"] == "llm"


async def test_template_change_creates_next_revision_traffic_change_does_not(
    kube_client: KubeClient, kube_emulator: KubeAPIEmulator
) -> None:
    await kube_client.create(KNATIVE_SERVICE, ksvc())
    svc = await kube_client.get(REF)
    svc["spec"]["template"]["spec"]["containers"][0]["image"] = "llm:2"
    svc["spec"]["traffic"] = [
        {"revisionName": "llm-00001", "percent": 90},
        {"latestRevision": True, "percent": 10, "tag": "candidate"},
    ]
    await kube_client.replace(KNATIVE_SERVICE, svc)
    svc = await kube_client.get(REF)
    assert svc["status"]["latestReadyRevisionName"] == "llm-00002"
    assert svc["status"]["traffic"][1] == {
        "revisionName": "llm-00002",
        "percent": 10,
        "latestRevision": True,
        "tag": "candidate",
        "url": "http://candidate-llm.default.example.com",
    }
    svc["spec"]["traffic"] = [{"revisionName": "llm-00002", "percent": 100}]
    out = await kube_client.replace(KNATIVE_SERVICE, svc)
    assert out["metadata"]["generation"] == 3
    names = [r["metadata"]["name"] for r in kube_emulator.list_objects(KNATIVE_REVISION, "default")]
    assert names == ["llm-00001", "llm-00002"]
    svc = await kube_client.get(REF)
    assert svc["status"]["observedGeneration"] == 3
    assert svc["status"]["traffic"] == [{"revisionName": "llm-00002", "percent": 100, "latestRevision": False}]


@pytest.mark.parametrize(
    ("traffic", "needle"),
    [
        ([{"latestRevision": True, "percent": 90}], "sum to 90"),
        ([{"revisionName": "llm-00001", "latestRevision": True, "percent": 100}], "may not set revisionName"),
        ([{"latestRevision": False, "percent": 100}], "expected exactly one"),
        (
            [
                {"revisionName": "llm-00001", "percent": 50, "tag": "a"},
                {"latestRevision": True, "percent": 50, "tag": "a"},
            ],
            "Multiple definitions",
        ),
        ([{"revisionName": "ghost-00009", "percent": 100}], "not found"),
    ],
)
async def test_webhook_rejects(kube_client: KubeClient, traffic: list[dict[str, Any]], needle: str) -> None:
    await kube_client.create(KNATIVE_SERVICE, ksvc())
    with pytest.raises(Invalid) as info:
        await kube_client.patch_merge(REF, {"spec": {"traffic": traffic}})
    assert needle in info.value.message
    assert info.value.causes and info.value.causes[0]["field"].startswith("spec.traffic")


async def test_spec_write_response_is_already_stale(kube_client: KubeClient) -> None:
    """Knative's controller writes status right after a spec write, so the write's own version is stale."""
    created = await kube_client.create(KNATIVE_SERVICE, ksvc())
    current = await kube_client.get(REF)
    assert int(current["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
