"""The routers over real HTTP: shadowctl's KubeClient against the real local kube-apiserver.

Nothing is mocked. The router's requests go through the fault proxy (which
counts them and injects 429/5xx on demand). Where a test needs another writer
at an exact moment (between the router's read and its write, or between its
write and its read-back), it wraps the client's method so that the API server
receives a real write from "someone else" (the admin, straight to the server)
right then, and the router meets the real 409 or the real changed object.

Knative Services are checked by the stand-in's real admission webhook, and
their status (the latest ready revision) is written by its controller a moment
after each spec write, so the fixtures wait for it to settle.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest_kube import KubeEnv
from routers_util import load

from shadowctl.kube import KNATIVE_SERVICE, VIRTUAL_SERVICE, KubeClient, ResourceRef
from shadowctl.kube.errors import Conflict, Unavailable
from shadowctl.policy.model import Destination, IstioTarget, KnativeTarget, MirrorVirtualService, ShadowPolicy
from shadowctl.routers import (
    MANAGED_ANNOTATION,
    ClusterError,
    ConflictRetriesExhausted,
    DestinationNotFound,
    RouteNotFound,
    Router,
    RouteState,
    Unsupported,
    VerifyFailed,
)
from shadowctl.routers.factory import router_for
from shadowctl.routers.istio import IstioRouter
from shadowctl.routers.knative import KnativeRouter, KnativeWithIstioMirror
from shadowctl.routers.tap import SplitWithTapMirror

HOST = "llm.models.svc.cluster.local"
TARGET = IstioTarget(
    virtual_service="llm", route="chat",
    primary=Destination(host=HOST, subset="v1", port=8000), candidate=Destination(host=HOST, subset="v2", port=8000),
)
VS_REF = ResourceRef(VIRTUAL_SERVICE, "llm", "models")
KSVC_REF = ResourceRef(KNATIVE_SERVICE, "llm", "models")


def _chat(obj: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in obj["spec"]["http"] if r.get("name") == "chat")


def _stored_vs(env: KubeEnv) -> dict[str, Any]:
    obj = env.get_object(VIRTUAL_SERVICE, "models", "llm")
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
def vs(kube_env: KubeEnv) -> dict[str, Any]:
    kube_env.put_object(VIRTUAL_SERVICE, load("vs-llm.yaml"))
    return _stored_vs(kube_env)


async def test_apply_writes_once_and_verifies(kube_client: KubeClient, kube_env: KubeEnv,
                                              vs: dict[str, Any]) -> None:
    router = IstioRouter(kube_client, "models", TARGET)
    assert isinstance(router, Router)
    before = await router.read()
    assert before == RouteState(100, 0, None) and before.resource_version == vs["metadata"]["resourceVersion"]
    result = await router.apply(RouteState(100, 0, 5.0))
    assert result.wrote and result.attempts == 1 and result.state == RouteState(100, 0, 5.0)
    stored = _stored_vs(kube_env)
    assert _chat(stored)["mirrorPercentage"] == {"value": 5.0}
    assert MANAGED_ANNOTATION in stored["metadata"]["annotations"]
    writes = kube_client.write_count
    kube_env.reset_counts()
    again = await router.apply(RouteState(100, 0, 5.0))
    assert not again.wrote and again.written is None
    assert kube_client.write_count == writes
    assert kube_env.verb_counts["update"] == 0 and kube_env.verb_counts["patch"] == 0
    assert _stored_vs(kube_env)["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]


async def test_concurrent_writer_between_read_and_write(kube_client: KubeClient, kube_env: KubeEnv,
                                                        vs: dict[str, Any]) -> None:
    def someone_else() -> None:
        obj = _stored_vs(kube_env)
        obj["spec"]["http"][0]["timeout"] = "7s"
        kube_env.put_object(VIRTUAL_SERVICE, obj)

    _intercept(kube_client, "get", someone_else)
    result = await IstioRouter(kube_client, "models", TARGET).apply(RouteState(80, 20))
    assert result.wrote and result.attempts == 2
    stored = _stored_vs(kube_env)
    assert stored["spec"]["http"][0]["timeout"] == "7s", "the other writer's change was overwritten"
    assert [e["weight"] for e in _chat(stored)["route"]] == [80, 20]


async def test_conflict_storm_writes_nothing(kube_client: KubeClient, kube_env: KubeEnv,
                                             vs: dict[str, Any]) -> None:
    """Another writer changes the VirtualService after every one of the router's reads: five real 409s."""
    writes = [0]

    def someone_else() -> None:
        writes[0] += 1
        kube_env.patch(VIRTUAL_SERVICE, "models", "llm", {"metadata": {"annotations": {"other": str(writes[0])}}})

    _intercept(kube_client, "get", someone_else, times=100)
    with pytest.raises(ConflictRetriesExhausted, match="5 writes in a row") as info:
        await IstioRouter(kube_client, "models", TARGET).apply(RouteState(50, 50, 1.0))
    assert isinstance(info.value.__cause__, Conflict)
    assert info.value.__cause__.status == 409
    assert "the object has been modified" in info.value.__cause__.message  # the API server's own refusal
    assert kube_env.verb_counts["update"] == 5 and writes[0] == 5
    stored = _stored_vs(kube_env)
    assert stored["spec"] == vs["spec"], "a write based on a stale read got through"
    assert MANAGED_ANNOTATION not in stored["metadata"]["annotations"]
    assert stored["metadata"]["annotations"]["other"] == "5"


async def test_throttling_is_retried_then_succeeds(kube_client: KubeClient, kube_env: KubeEnv,
                                                   kube_sleeps: list[float], vs: dict[str, Any]) -> None:
    kube_env.fail_next(2, status=429, verb="update", retry_after=1)
    kube_env.fail_next(2, status=500, verb="get")
    result = await IstioRouter(kube_client, "models", TARGET).apply(RouteState(90, 10))
    assert result.wrote
    assert len(kube_sleeps) == 4
    assert [e["weight"] for e in _chat(_stored_vs(kube_env))["route"]] == [90, 10]


async def test_server_errors_past_retries_are_a_cluster_error(kube_client: KubeClient,
                                                              kube_env: KubeEnv,
                                                              vs: dict[str, Any]) -> None:
    kube_env.fail_next(100, status=500, verb="get")
    with pytest.raises(ClusterError, match="reading VirtualService models/llm") as info:
        await IstioRouter(kube_client, "models", TARGET).apply(RouteState(90, 10))
    assert isinstance(info.value.__cause__, Unavailable)
    assert kube_env.verb_counts["update"] == 0


async def test_change_after_write_fails_verification(kube_client: KubeClient, kube_env: KubeEnv,
                                                     vs: dict[str, Any]) -> None:
    def webhook_like() -> None:
        obj = _stored_vs(kube_env)
        _chat(obj)["route"][0]["weight"], _chat(obj)["route"][1]["weight"] = 99, 1
        kube_env.put_object(VIRTUAL_SERVICE, obj)

    _intercept(kube_client, "replace", webhook_like)
    with pytest.raises(VerifyFailed, match="reads back differently"):
        await IstioRouter(kube_client, "models", TARGET).apply(RouteState(90, 10))


async def test_finalize_restores_and_is_idempotent(kube_client: KubeClient, kube_env: KubeEnv,
                                                   vs: dict[str, Any]) -> None:
    router = IstioRouter(kube_client, "models", TARGET)
    await router.apply(RouteState(100, 0, 10.0))
    await router.apply(RouteState(75, 25))
    result = await router.finalize()
    assert result.wrote and result.state == RouteState.primary_only()
    stored = _stored_vs(kube_env)
    assert stored["spec"] == vs["spec"]
    assert stored["metadata"].get("annotations") == vs["metadata"].get("annotations")
    assert not (await router.finalize()).wrote


async def test_missing_virtual_service(kube_client: KubeClient) -> None:
    with pytest.raises(RouteNotFound, match="VirtualService models/llm not found"):
        await IstioRouter(kube_client, "models", TARGET).read()


# --------------------------------------------------------------------------- Knative


@pytest.fixture
def ksvc(kube_env: KubeEnv) -> dict[str, Any]:
    """A Service whose controller made llm-00001 (pinned, 100%) and then llm-00002 (latest ready, 0%).

    Each write waits for the stand-in's controller: the second names llm-00001,
    which the webhook refuses until the controller has created it.
    """
    base = load("ksvc-llm.yaml")
    del base["status"]
    first = copy.deepcopy(base)
    first["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.example.com/llm:1.0"
    del first["spec"]["traffic"]
    kube_env.put_object(KNATIVE_SERVICE, first)
    assert kube_env.wait_knative_settled("models", "llm")["status"]["latestReadyRevisionName"] == "llm-00001"
    kube_env.put_object(KNATIVE_SERVICE, base)
    obj = kube_env.wait_knative_settled("models", "llm")
    assert obj["metadata"]["generation"] == 2 and obj["status"]["latestReadyRevisionName"] == "llm-00002"
    return obj


def _traffic(env: KubeEnv) -> list[dict[str, Any]]:
    obj = env.get_object(KNATIVE_SERVICE, "models", "llm")
    assert obj is not None
    return [{k: v for k, v in t.items() if k in ("revisionName", "tag", "percent")} for t in obj["spec"]["traffic"]]


async def test_knative_rollout_and_rollback(kube_client: KubeClient, kube_env: KubeEnv,
                                            ksvc: dict[str, Any]) -> None:
    router = KnativeRouter(kube_client, "models", KnativeTarget(service="llm"))
    assert not router.capabilities.can_mirror
    with pytest.raises(Unsupported):
        await router.apply(RouteState(100, 0, 5.0))
    assert (await router.apply(RouteState(70, 30))).wrote
    assert _traffic(kube_env)[-1] == {"tag": "candidate", "revisionName": "llm-00002", "percent": 30}
    kube_env.reset_counts()
    assert not (await router.apply(RouteState(70, 30))).wrote
    assert kube_env.verb_counts["update"] == 0
    result = await router.finalize()
    assert result.wrote and result.state == RouteState(100, 0)
    assert _traffic(kube_env) == [
        {"revisionName": "llm-00001", "percent": 100}, {"tag": "latest", "percent": 0},
        {"tag": "stable", "revisionName": "llm-00001", "percent": 0},
    ]


async def test_knative_promote(kube_client: KubeClient, kube_env: KubeEnv,
                               ksvc: dict[str, Any]) -> None:
    router = KnativeRouter(kube_client, "models", KnativeTarget(service="llm"))
    await router.apply(RouteState(50, 50))
    assert (await router.promote()).wrote
    assert _traffic(kube_env)[0] == {"revisionName": "llm-00002", "percent": 100}
    assert not (await router.promote()).wrote


def _new_template(ksvc: dict[str, Any]) -> dict[str, Any]:
    svc = copy.deepcopy(ksvc)
    svc["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.example.com/llm:3.0"
    return svc


async def test_knative_step_right_after_a_deploy_never_takes_the_stale_candidate(
        kube_client: KubeClient, kube_env: KubeEnv, ksvc: dict[str, Any]) -> None:
    """A new template makes llm-00003, which the controller reports a moment later; a step whose read lands in
    between must not roll out llm-00002, which the stale status still calls the latest ready revision.

    The router refuses a status that has not observed the Service's generation. (Were it to compute from it,
    the controller's status write would still make its PUT a 409 here, but only because the stand-in is
    fast: real Knative reports the new revision minutes later, after it is ready.)
    """
    original = kube_client.get

    async def deploy_then_get(*args: Any, **kwargs: Any) -> Any:
        if kube_client.get is deploy_then_get:  # once: the new template lands just before the router reads
            kube_client.get = original  # type: ignore[method-assign]
            kube_env.put_object(KNATIVE_SERVICE, _new_template(ksvc))
        return await original(*args, **kwargs)

    kube_client.get = deploy_then_get  # type: ignore[method-assign]
    router = KnativeRouter(kube_client, "models", KnativeTarget(service="llm"))
    try:
        result = await router.apply(RouteState(90, 10))
    except DestinationNotFound as exc:  # the usual outcome: the read saw the status of generation 2
        assert "has not reconciled generation 3 yet" in str(exc)
        assert all(t.get("tag") != "candidate" for t in _traffic(kube_env))  # nothing was written
        kube_env.wait_knative_settled("models", "llm")
        result = await router.apply(RouteState(90, 10))
    assert result.wrote
    assert _traffic(kube_env)[-1] == {"tag": "candidate", "revisionName": "llm-00003", "percent": 10}


async def test_knative_waits_for_the_latest_revision_to_be_ready(kube_client: KubeClient, kube_env: KubeEnv,
                                                                ksvc: dict[str, Any]) -> None:
    """While the newest revision starts, Knative reports it as latest created but not latest ready."""
    kube_env.put_object(KNATIVE_SERVICE, _new_template(ksvc))
    settled = kube_env.wait_knative_settled("models", "llm")
    assert settled["status"]["latestReadyRevisionName"] == "llm-00003"
    starting = copy.deepcopy(settled)  # the status real Knative writes until llm-00003 is ready
    starting["status"]["latestReadyRevisionName"] = "llm-00002"
    starting["status"]["conditions"] = [{"type": "Ready", "status": "Unknown", "reason": "RevisionMissing"}]
    kube_env.put_object(KNATIVE_SERVICE, starting)
    router = KnativeRouter(kube_client, "models", KnativeTarget(service="llm"))
    with pytest.raises(DestinationNotFound, match="latest created revision llm-00003 is not ready yet"):
        await router.apply(RouteState(90, 10))
    assert all(t.get("tag") != "candidate" for t in _traffic(kube_env))
    ready = kube_env.get_object(KNATIVE_SERVICE, "models", "llm")
    assert ready is not None and ready["status"]["latestReadyRevisionName"] == "llm-00002"  # the status held
    kube_env.put_object(KNATIVE_SERVICE, {**ready, "status": settled["status"]})  # llm-00003 is ready now
    assert (await router.apply(RouteState(90, 10))).wrote
    assert _traffic(kube_env)[-1] == {"tag": "candidate", "revisionName": "llm-00003", "percent": 10}


async def test_knative_with_istio_mirror(kube_client: KubeClient, kube_env: KubeEnv,
                                         ksvc: dict[str, Any], vs: dict[str, Any]) -> None:
    mirror = MirrorVirtualService(name="llm", route="chat", candidate=Destination(host="candidate-llm.models"))
    router = KnativeWithIstioMirror(KnativeRouter(kube_client, "models", KnativeTarget(service="llm")),
                                    IstioRouter(kube_client, "models", mirror))
    assert router.capabilities.can_mirror
    result = await router.apply(RouteState(100, 0, 20.0))
    assert result.wrote and len(result.objects) == 2
    assert (await router.read()) == RouteState(100, 0, 20.0)
    assert _chat(_stored_vs(kube_env))["mirror"] == {"host": "candidate-llm.models"}
    assert _chat(_stored_vs(kube_env))["route"] == _chat(vs)["route"]
    await router.finalize()
    assert _stored_vs(kube_env)["spec"] == vs["spec"]
    assert all(t.get("tag") != "candidate" for t in _traffic(kube_env))


def _policy(target: dict[str, Any], shadow: dict[str, Any] | None,
            outputs: dict[str, Any] | None = None) -> ShadowPolicy:
    spec: dict[str, Any] = {"target": target, "canary": {"steps": [10, 50]},
                            "analysis": {"metrics": [{"name": "ttft", "preset": "vllm-ttft"}]}}
    if outputs is not None:
        spec["analysis"]["outputs"] = outputs
    if shadow:
        spec["shadow"] = shadow
    return ShadowPolicy.model_validate({"apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy",
                                        "metadata": {"name": "p", "namespace": "models"}, "spec": spec})


def test_router_for_picks_by_target(kube_client: KubeClient) -> None:
    istio = _policy({"istio": TARGET.model_dump(by_alias=True, exclude_none=True)}, None)
    assert type(router_for(istio, kube_client)) is IstioRouter
    knative = _policy({"knative": {"service": "llm"}}, {"mirrorPercent": 5, "mode": "tap"},
                      outputs={"mqtt": {"broker": "mqtt://mosquitto:1883"}, "comparators": [{"name": "exact"}]})
    tapped = router_for(knative, kube_client)  # shadow.mode: tap: Knative for the shares, the tap for the mirror
    assert type(tapped) is SplitWithTapMirror and type(tapped.split) is KnativeRouter and tapped.capabilities.can_mirror
    mirrored = _policy({"knative": {"service": "llm"}}, {"mirrorPercent": 5, "virtualService": {
        "name": "llm", "candidate": {"host": "candidate-llm.models"}}})
    router = router_for(mirrored, kube_client)
    assert type(router) is KnativeWithIstioMirror and router.capabilities.can_mirror
