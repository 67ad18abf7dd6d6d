"""The Knative stand-in on the real API server, through KubeClient: webhook rules, status following spec.

The webhook is a real ValidatingWebhookConfiguration, so its refusals come back
from kube-apiserver as they would from Knative's; the controller writes status
asynchronously after a spec write, so status is awaited with ``eventually``.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest_kube import KubeEnv, eventually

from shadowctl.kube import KNATIVE_REVISION, KNATIVE_SERVICE, Conflict, Invalid, KubeClient, ResourceRef

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


async def observed(client: KubeClient, generation: int) -> dict[str, Any]:
    """The Service once the stand-in has written status for ``generation``."""

    async def check() -> dict[str, Any] | None:
        svc = await client.get(REF)
        status = svc.get("status") or {}
        ok = svc["metadata"]["generation"] == generation and status.get("observedGeneration") == generation
        return svc if ok and status.get("traffic") is not None else None

    return await eventually(check)


async def test_create_makes_a_ready_revision_and_status(kube_client: KubeClient) -> None:
    created = await kube_client.create(KNATIVE_SERVICE, ksvc())
    assert "status" not in created or not created["status"].get("traffic")  # written later, by the controller
    svc = await observed(kube_client, 1)
    status = svc["status"]
    assert status["latestReadyRevisionName"] == status["latestCreatedRevisionName"] == "llm-00001"
    assert status["observedGeneration"] == svc["metadata"]["generation"]
    assert status["traffic"] == [{"revisionName": "llm-00001", "percent": 100, "latestRevision": True}]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    rev = await kube_client.get(ResourceRef(KNATIVE_REVISION, "llm-00001", "default"))
    assert rev["spec"]["containers"][0]["image"] == "llm:1"
    assert rev["metadata"]["labels"]["serving.knative.dev/service"] == "llm"
    assert {c["type"]: c["status"] for c in rev["status"]["conditions"]}["Ready"] == "True"


async def test_template_change_creates_next_revision_traffic_change_does_not(
    kube_client: KubeClient, kube_env: KubeEnv
) -> None:
    await kube_client.create(KNATIVE_SERVICE, ksvc())
    svc = await observed(kube_client, 1)
    svc["spec"]["template"]["spec"]["containers"][0]["image"] = "llm:2"
    svc["spec"]["traffic"] = [
        {"revisionName": "llm-00001", "percent": 90},
        {"latestRevision": True, "percent": 10, "tag": "candidate"},
    ]
    await kube_client.replace(KNATIVE_SERVICE, svc)
    svc = await observed(kube_client, 2)
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
    svc = await observed(kube_client, 3)
    assert svc["status"]["traffic"] == [{"revisionName": "llm-00002", "percent": 100, "latestRevision": False}]
    assert svc["status"]["latestReadyRevisionName"] == "llm-00002"
    names = [r["metadata"]["name"] for r in kube_env.list_objects(KNATIVE_REVISION, "default")]
    assert names == ["llm-00001", "llm-00002"]  # the traffic-only change made no Revision


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
    await observed(kube_client, 1)  # llm-00001 exists: only the rule under test can refuse
    with pytest.raises(Invalid) as info:
        await kube_client.patch_merge(REF, {"spec": {"traffic": traffic}})
    assert info.value.status == 422
    assert 'admission webhook "validation.webhook.serving.knative.dev" denied the request' in info.value.message
    assert needle in info.value.message
    assert info.value.causes and info.value.causes[0]["field"].startswith("spec.traffic")
    assert (await kube_client.get(REF))["metadata"]["generation"] == 1  # nothing was stored


async def test_spec_write_response_is_already_stale(kube_client: KubeClient) -> None:
    """Knative's controller writes status right after a spec write, so the write's own version is stale."""
    created = await kube_client.create(KNATIVE_SERVICE, ksvc())

    async def moved_on() -> dict[str, Any] | None:
        current = await kube_client.get(REF)
        newer = int(current["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
        return current if newer else None

    current = await eventually(moved_on)
    assert current["metadata"]["generation"] == created["metadata"]["generation"]  # a status write, not spec
    with pytest.raises(Conflict):
        await kube_client.replace(KNATIVE_SERVICE, dict(created, spec=ksvc("llm:2")["spec"]))
