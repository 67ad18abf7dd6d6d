"""The routers over real HTTP: the real kubernetes.aio client against the emulated API server.

Nothing is mocked. Where a test needs another writer at an exact moment (between
the router's read and its write, or between its write and its read-back), it
wraps the real client's method so that the emulator receives a real write from
"someone else" right then; the router's own requests still go over HTTP.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from routers_util import load

from shadowctl.kube import KNATIVE_SERVICE, VIRTUAL_SERVICE, KubeClient, ResourceRef
from shadowctl.kube.errors import Conflict, Unavailable
from shadowctl.policy.model import Destination, IstioTarget, KnativeTarget, MirrorVirtualService, ShadowPolicy
from shadowctl.routers import (
    MANAGED_ANNOTATION,
    ClusterError,
    ConflictRetriesExhausted,
    RouteNotFound,
    Router,
    RouteState,
    Unsupported,
    VerifyFailed,
)
from shadowctl.routers.factory import router_for
from shadowctl.routers.istio import IstioRouter
from shadowctl.routers.knative import KnativeRouter, KnativeWithIstioMirror
from shadowctl.sim.kubeapi import KubeAPIEmulator

HOST = "llm.models.svc.cluster.local"
TARGET = IstioTarget(
    virtual_service="llm", route="chat",
    primary=Destination(host=HOST, subset="v1", port=8000), candidate=Destination(host=HOST, subset="v2", port=8000),
)
VS_REF = ResourceRef(VIRTUAL_SERVICE, "llm", "models")
KSVC_REF = ResourceRef(KNATIVE_SERVICE, "llm", "models")


def _chat(obj: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in obj["spec"]["http"] if r.get("name") == "chat")


def _stored_vs(emu: KubeAPIEmulator) -> dict[str, Any]:
    obj = emu.get_object(VIRTUAL_SERVICE, "models", "llm")
    assert obj is not None
    return obj


def _intercept(client: KubeClient, name: str, after: Callable[[], None], times: int = 1) -> None:
    """Run ``after`` (a real write by someone else) right after the client's next ``times`` calls of ``name``."""
    original: Callable[..., Awaitable[Any]] = getattr(client, name)
    left = [times]

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        if left[0] > 0:
            left[0] -= 1
            after()
        return result

    setattr(client, name, wrapper)


@pytest.fixture
def vs(kube_emulator: KubeAPIEmulator) -> dict[str, Any]:
    kube_emulator.put_object(VIRTUAL_SERVICE, load("vs-llm.yaml"))
    return _stored_vs(kube_emulator)


async def test_apply_writes_once_and_verifies(kube_client: KubeClient, kube_emulator: KubeAPIEmulator,
                                              vs: dict[str, Any]) -> None:
    router = IstioRouter(kube_client, "models", TARGET)
    assert isinstance(router, Router)
    before = await router.read()
    assert before == RouteState(100, 0, None) and before.resource_version == vs["metadata"]["resourceVersion"]
    result = await router.apply(RouteState(100, 0, 5.0))
    assert result.wrote and result.attempts == 1 and result.state == RouteState(100, 0, 5.0)
    stored = _stored_vs(kube_emulator)
    assert _chat(stored)["mirrorPercentage"] == {"value": 5.0}
    assert MANAGED_ANNOTATION in stored["metadata"]["annotations"]
    writes = kube_client.write_count
    kube_emulator.reset_counts()
    again = await router.apply(RouteState(100, 0, 5.0))
    assert not again.wrote and again.written is None
    assert kube_client.write_count == writes
    assert kube_emulator.verb_counts["update"] == 0 and kube_emulator.verb_counts["patch"] == 0
    assert _stored_vs(kube_emulator)["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]


async def test_concurrent_writer_between_read_and_write(kube_client: KubeClient, kube_emulator: KubeAPIEmulator,
                                                        vs: dict[str, Any]) -> None:
    def someone_else() -> None:
        obj = _stored_vs(kube_emulator)
        obj["spec"]["http"][0]["timeout"] = "7s"
        kube_emulator.put_object(VIRTUAL_SERVICE, obj)

    _intercept(kube_client, "get", someone_else)
    result = await IstioRouter(kube_client, "models", TARGET).apply(RouteState(80, 20))
    assert result.wrote and result.attempts == 2
    stored = _stored_vs(kube_emulator)
    assert stored["spec"]["http"][0]["timeout"] == "7s", "the other writer's change was overwritten"
    assert [e["weight"] for e in _chat(stored)["route"]] == [80, 20]


async def test_conflict_storm_writes_nothing(kube_client: KubeClient, kube_emulator: KubeAPIEmulator,
                                             vs: dict[str, Any]) -> None:
    kube_emulator.fail_next(100, status=409, verb="update")
    with pytest.raises(ConflictRetriesExhausted, match="5 writes in a row") as info:
        await IstioRouter(kube_client, "models", TARGET).apply(RouteState(50, 50, 1.0))
    assert isinstance(info.value.__cause__, Conflict)
    assert kube_emulator.verb_counts["update"] == 5
    assert _stored_vs(kube_emulator) == vs


async def test_throttling_is_retried_then_succeeds(kube_client: KubeClient, kube_emulator: KubeAPIEmulator,
                                                   kube_sleeps: list[float], vs: dict[str, Any]) -> None:
    kube_emulator.fail_next(2, status=429, verb="update", retry_after=1)
    kube_emulator.fail_next(2, status=500, verb="get")
    result = await IstioRouter(kube_client, "models", TARGET).apply(RouteState(90, 10))
    assert result.wrote
    assert len(kube_sleeps) == 4
    assert [e["weight"] for e in _chat(_stored_vs(kube_emulator))["route"]] == [90, 10]


async def test_server_errors_past_retries_are_a_cluster_error(kube_client: KubeClient,
                                                              kube_emulator: KubeAPIEmulator,
                                                              vs: dict[str, Any]) -> None:
    kube_emulator.fail_next(100, status=500, verb="get")
    with pytest.raises(ClusterError, match="reading VirtualService models/llm") as info:
        await IstioRouter(kube_client, "models", TARGET).apply(RouteState(90, 10))
    assert isinstance(info.value.__cause__, Unavailable)
    assert kube_emulator.verb_counts["update"] == 0


async def test_change_after_write_fails_verification(kube_client: KubeClient, kube_emulator: KubeAPIEmulator,
                                                     vs: dict[str, Any]) -> None:
    def webhook_like() -> None:
        obj = _stored_vs(kube_emulator)
        _chat(obj)["route"][0]["weight"], _chat(obj)["route"][1]["weight"] = 99, 1
        kube_emulator.put_object(VIRTUAL_SERVICE, obj)

    _intercept(kube_client, "replace", webhook_like)
    with pytest.raises(VerifyFailed, match="reads back differently"):
        await IstioRouter(kube_client, "models", TARGET).apply(RouteState(90, 10))


async def test_finalize_restores_and_is_idempotent(kube_client: KubeClient, kube_emulator: KubeAPIEmulator,
                                                   vs: dict[str, Any]) -> None:
    router = IstioRouter(kube_client, "models", TARGET)
    await router.apply(RouteState(100, 0, 10.0))
    await router.apply(RouteState(75, 25))
    result = await router.finalize()
    assert result.wrote and result.state == RouteState.primary_only()
    stored = _stored_vs(kube_emulator)
    assert stored["spec"] == vs["spec"]
    assert stored["metadata"].get("annotations") == vs["metadata"].get("annotations")
    assert not (await router.finalize()).wrote


async def test_missing_virtual_service(kube_client: KubeClient) -> None:
    with pytest.raises(RouteNotFound, match="VirtualService models/llm not found"):
        await IstioRouter(kube_client, "models", TARGET).read()


# --------------------------------------------------------------------------- Knative


@pytest.fixture
def ksvc(kube_emulator: KubeAPIEmulator) -> dict[str, Any]:
    """A Service whose controller made llm-00001 (pinned, 100%) and then llm-00002 (latest ready, 0%)."""
    base = load("ksvc-llm.yaml")
    del base["status"]
    first = copy.deepcopy(base)
    first["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.example.com/llm:1.0"
    del first["spec"]["traffic"]
    kube_emulator.put_object(KNATIVE_SERVICE, first)
    kube_emulator.put_object(KNATIVE_SERVICE, base)
    obj = kube_emulator.get_object(KNATIVE_SERVICE, "models", "llm")
    assert obj is not None and obj["status"]["latestReadyRevisionName"] == "llm-00002"
    return obj


def _traffic(emu: KubeAPIEmulator) -> list[dict[str, Any]]:
    obj = emu.get_object(KNATIVE_SERVICE, "models", "llm")
    assert obj is not None
    return [{k: v for k, v in t.items() if k in ("revisionName", "tag", "percent")} for t in obj["spec"]["traffic"]]


async def test_knative_rollout_and_rollback(kube_client: KubeClient, kube_emulator: KubeAPIEmulator,
                                            ksvc: dict[str, Any]) -> None:
    router = KnativeRouter(kube_client, "models", KnativeTarget(service="llm"))
    assert not router.capabilities.can_mirror
    with pytest.raises(Unsupported):
        await router.apply(RouteState(100, 0, 5.0))
    assert (await router.apply(RouteState(70, 30))).wrote
    assert _traffic(kube_emulator)[-1] == {"tag": "candidate", "revisionName": "llm-00002", "percent": 30}
    kube_emulator.reset_counts()
    assert not (await router.apply(RouteState(70, 30))).wrote
    assert kube_emulator.verb_counts["update"] == 0
    result = await router.finalize()
    assert result.wrote and result.state == RouteState(100, 0)
    assert _traffic(kube_emulator) == [
        {"revisionName": "llm-00001", "percent": 100}, {"tag": "latest", "percent": 0},
        {"tag": "stable", "revisionName": "llm-00001", "percent": 0},
    ]


async def test_knative_promote(kube_client: KubeClient, kube_emulator: KubeAPIEmulator,
                               ksvc: dict[str, Any]) -> None:
    router = KnativeRouter(kube_client, "models", KnativeTarget(service="llm"))
    await router.apply(RouteState(50, 50))
    assert (await router.promote()).wrote
    assert _traffic(kube_emulator)[0] == {"revisionName": "llm-00002", "percent": 100}
    assert not (await router.promote()).wrote


async def test_knative_with_istio_mirror(kube_client: KubeClient, kube_emulator: KubeAPIEmulator,
                                         ksvc: dict[str, Any], vs: dict[str, Any]) -> None:
    mirror = MirrorVirtualService(name="llm", route="chat", candidate=Destination(host="candidate-llm.models"))
    router = KnativeWithIstioMirror(KnativeRouter(kube_client, "models", KnativeTarget(service="llm")),
                                    IstioRouter(kube_client, "models", mirror))
    assert router.capabilities.can_mirror
    result = await router.apply(RouteState(100, 0, 20.0))
    assert result.wrote and len(result.objects) == 2
    assert (await router.read()) == RouteState(100, 0, 20.0)
    assert _chat(_stored_vs(kube_emulator))["mirror"] == {"host": "candidate-llm.models"}
    assert _chat(_stored_vs(kube_emulator))["route"] == _chat(vs)["route"]
    await router.finalize()
    assert _stored_vs(kube_emulator)["spec"] == vs["spec"]
    assert all(t.get("tag") != "candidate" for t in _traffic(kube_emulator))


def _policy(target: dict[str, Any], shadow: dict[str, Any] | None) -> ShadowPolicy:
    spec: dict[str, Any] = {"target": target, "canary": {"steps": [10, 50]},
                            "analysis": {"metrics": [{"name": "ttft", "preset": "vllm-ttft"}]}}
    if shadow:
        spec["shadow"] = shadow
    return ShadowPolicy.model_validate({"apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy",
                                        "metadata": {"name": "p", "namespace": "models"}, "spec": spec})


def test_router_for_picks_by_target(kube_client: KubeClient) -> None:
    istio = _policy({"istio": TARGET.model_dump(by_alias=True, exclude_none=True)}, None)
    assert type(router_for(istio, kube_client)) is IstioRouter
    knative = _policy({"knative": {"service": "llm"}}, {"mirrorPercent": 5, "mode": "tap"})
    assert type(router_for(knative, kube_client)) is KnativeRouter
    mirrored = _policy({"knative": {"service": "llm"}}, {"mirrorPercent": 5, "virtualService": {
        "name": "llm", "candidate": {"host": "candidate-llm.models"}}})
    router = router_for(mirrored, kube_client)
    assert type(router) is KnativeWithIstioMirror and router.capabilities.can_mirror
