"""The Gateway API router over real HTTP: shadowctl's KubeClient against the real local kube-apiserver.

Nothing is mocked: the HTTPRoute is stored and validated by Gateway API v1.6.1's CRD (OpenAPI and
CEL), which also fills in its defaults (weight 1, group "", kind Service) that the router must read
back without wanting to write again. Another writer is a real write by the admin at an exact moment
(as in tests/test_routers_adapters.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest_kube import KubeEnv
from routers_util import load

from shadowctl.kube import HTTP_ROUTE, KubeClient, ResourceRef
from shadowctl.policy.model import BackendRef, GatewayAPITarget, ShadowPolicy
from shadowctl.routers import MANAGED_ANNOTATION, ConflictRetriesExhausted, RouteNotFound, Router, RouteState
from shadowctl.routers.factory import router_for
from shadowctl.routers.gateway import GatewayAPIRouter

TARGET = GatewayAPITarget(http_route="llm", rule="chat", primary=BackendRef(name="llm-v1"),
                          candidate=BackendRef(name="llm-v2"))
REF = ResourceRef(HTTP_ROUTE, "llm", "models")


def _chat(obj: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in obj["spec"]["rules"] if r.get("name") == "chat")


def _stored(env: KubeEnv) -> dict[str, Any]:
    obj = env.get_object(HTTP_ROUTE, "models", "llm")
    assert obj is not None
    return obj


def _intercept(client: KubeClient, name: str, after: Callable[[], None], times: int = 1) -> None:
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
def route(kube_env: KubeEnv) -> dict[str, Any]:
    kube_env.put_object(HTTP_ROUTE, load("httproute-llm.yaml"))
    return _stored(kube_env)


async def test_a_whole_rollout_writes_once_per_change_and_restores(kube_client: KubeClient, kube_env: KubeEnv,
                                                                   route: dict[str, Any]) -> None:
    router = GatewayAPIRouter(kube_client, "models", TARGET)
    assert isinstance(router, Router) and router.capabilities.can_mirror and router.capabilities.can_split
    assert _chat(route)["backendRefs"][0]["weight"] == 1, "the server fills in the default weight"
    assert await router.read() == RouteState(100, 0)
    for state in (RouteState(100, 0, 2.5), RouteState(90, 10), RouteState(50, 50)):
        result = await router.apply(state)
        assert result.wrote and result.attempts == 1 and result.state == state
        kube_env.reset_counts()
        assert not (await router.apply(state)).wrote, "the server's defaults must not look like a change"
        assert kube_env.verb_counts["update"] == 0
    stored = _stored(kube_env)
    assert [(r["name"], r["weight"]) for r in _chat(stored)["backendRefs"]] == [("llm-v1", 5), ("llm-v2", 5)]  # the total stays 10
    result = await router.finalize()
    assert result.wrote and result.state == RouteState.primary_only()
    after = _stored(kube_env)
    assert after["spec"] == route["spec"]
    assert after["metadata"].get("annotations") == route["metadata"].get("annotations")
    assert not (await router.finalize()).wrote


async def test_mirror_fraction_is_stored_and_read_back_exactly(kube_client: KubeClient, kube_env: KubeEnv,
                                                              route: dict[str, Any]) -> None:
    router = GatewayAPIRouter(kube_client, "models", TARGET)
    await router.apply(RouteState(100, 0, 33.3333333))
    mirror = _chat(_stored(kube_env))["filters"][-1]["requestMirror"]
    assert mirror["fraction"] == {"numerator": 333333333, "denominator": 1000000000}
    assert (await router.read()).mirror_percent == 33.3333333


async def test_promote_then_promote_again(kube_client: KubeClient, kube_env: KubeEnv,
                                          route: dict[str, Any]) -> None:
    router = GatewayAPIRouter(kube_client, "models", TARGET)
    await router.apply(RouteState(100, 0, 10.0))
    await router.apply(RouteState(80, 20))
    result = await router.promote()
    assert result.wrote and result.state == RouteState(0, 100)
    stored = _stored(kube_env)
    assert [(r["name"], r["weight"]) for r in _chat(stored)["backendRefs"]] == [("llm-v1", 0), ("llm-v2", 5)]
    assert [f["type"] for f in _chat(stored)["filters"]] == ["RequestHeaderModifier", "RequestMirror"]
    assert MANAGED_ANNOTATION not in stored["metadata"]["annotations"]
    assert not (await router.promote()).wrote


async def test_another_writer_between_read_and_write(kube_client: KubeClient, kube_env: KubeEnv,
                                                     route: dict[str, Any]) -> None:
    def someone_else() -> None:
        obj = _stored(kube_env)
        _chat(obj)["timeouts"]["request"] = "400s"
        kube_env.put_object(HTTP_ROUTE, obj)

    _intercept(kube_client, "get", someone_else)
    result = await GatewayAPIRouter(kube_client, "models", TARGET).apply(RouteState(70, 30))
    assert result.wrote and result.attempts == 2
    stored = _stored(kube_env)
    assert _chat(stored)["timeouts"]["request"] == "400s", "the other writer's change was overwritten"
    assert [r["weight"] for r in _chat(stored)["backendRefs"]] == [7, 3]


async def test_conflict_storm_writes_nothing(kube_client: KubeClient, kube_env: KubeEnv,
                                             route: dict[str, Any]) -> None:
    writes = [0]

    def someone_else() -> None:
        writes[0] += 1
        kube_env.patch(HTTP_ROUTE, "models", "llm", {"metadata": {"annotations": {"other": str(writes[0])}}})

    _intercept(kube_client, "get", someone_else, times=100)
    with pytest.raises(ConflictRetriesExhausted, match="5 writes in a row"):
        await GatewayAPIRouter(kube_client, "models", TARGET).apply(RouteState(50, 50, 1.0))
    stored = _stored(kube_env)
    assert stored["spec"] == route["spec"]
    assert MANAGED_ANNOTATION not in stored["metadata"]["annotations"]


async def test_missing_route(kube_client: KubeClient) -> None:
    with pytest.raises(RouteNotFound, match="HTTPRoute models/llm not found"):
        await GatewayAPIRouter(kube_client, "models", TARGET).read()


def test_router_for_picks_the_gateway_api_router(kube_client: KubeClient) -> None:
    policy = ShadowPolicy.model_validate({
        "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy", "metadata": {"name": "p", "namespace": "models"},
        "spec": {"target": {"gatewayAPI": TARGET.model_dump(by_alias=True, exclude_none=True)},
                 "shadow": {"mirrorPercent": 5}, "canary": {"steps": [10, 50]},
                 "analysis": {"metrics": [{"name": "ttft", "preset": "vllm-ttft"}]}}})
    router = router_for(policy, kube_client)
    assert type(router) is GatewayAPIRouter and router.ref == REF
