"""The mesh simulator routing by a Gateway API HTTPRoute stored in the real local API server, over real HTTP.

As tests/test_sim_mesh.py does for VirtualServices: the upstreams are small real aiohttp servers that
record what reached them, the HTTPRoute is changed by the admin in the API server (validated by
Gateway API v1.6.1's CRD), and the mesh follows it with a list and a watch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest_asyncio
from conftest_kube import KubeEnv
from scipy.stats import chisquare
from test_sim_mesh import Recorder

from shadowctl.kube import HTTP_ROUTE, KubeClient
from shadowctl.sim.mesh import GatewaySource, MeshSimulator, RequestView, parse_http_route, select_rule

HOST = "chat.llm.svc.cluster.local"
SRC = GatewaySource("llm", "chat")
V1, V2 = "chat-v1.llm.svc.cluster.local:8000", "chat-v2.llm.svc.cluster.local:8000"


def route(rules: list[dict[str, Any]], hostnames: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"parentRefs": [{"name": "gw", "namespace": "gateway-system"}], "rules": rules}
    if hostnames is not None:
        spec["hostnames"] = hostnames
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "chat", "namespace": "llm"}, "spec": spec}


def split(primary: int | None, candidate: int, **extra: Any) -> dict[str, Any]:
    v1: dict[str, Any] = {"name": "chat-v1", "port": 8000}
    if primary is not None:
        v1["weight"] = primary
    return {"name": "main", "backendRefs": [v1, {"name": "chat-v2", "port": 8000, "weight": candidate}], **extra}


def mirror(**share: Any) -> dict[str, Any]:
    return {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "chat-v2", "port": 8000}, **share}}


def view(path: str = "/v1/chat/completions", method: str = "POST", query: dict[str, str] | None = None,
         **headers: str) -> RequestView:
    return RequestView(method, path, query or {}, {k.lower(): v for k, v in headers.items()}, HOST)


@pytest_asyncio.fixture
async def upstreams() -> AsyncIterator[dict[str, Recorder]]:
    recs = {name: Recorder(name) for name in ("primary", "candidate")}
    for r in recs.values():
        await r.start()
    yield recs
    for r in recs.values():
        await r.stop()


@pytest_asyncio.fixture
async def kube(kube_env: KubeEnv) -> AsyncIterator[KubeClient]:
    client = KubeClient.for_url(kube_env.url, token=kube_env.token)
    yield client
    await client.close()


async def start_mesh(kube: KubeClient, upstreams: dict[str, Recorder]) -> MeshSimulator:
    mesh = MeshSimulator(kube, [SRC], seed=7, upstreams={
        ("chat-v1", None, 8000): upstreams["primary"].url, ("chat-v2", None, 8000): upstreams["candidate"].url})
    await mesh.start()
    await mesh.wait_ready()
    return mesh


async def send(session: aiohttp.ClientSession, mesh: MeshSimulator, n: int, *, status: int = 200,
               host: str = HOST, **headers: str) -> list[str]:
    limit = asyncio.Semaphore(16)

    async def one(i: int) -> str:
        async with limit, session.post(f"{mesh.url}/v1/completions?i={i}", json={"prompt": "x"},
                                       headers={"Host": host, **headers}) as resp:
            assert resp.status == status, await resp.text()
            return str((await resp.json())["upstream"]) if status == 200 else ""

    return list(await asyncio.gather(*(one(i) for i in range(n))))


# ----------------------------------------------------------------------------- pure parts


def test_rule_precedence_follows_the_gateway_api() -> None:
    table = parse_http_route(route([
        {"name": "catch-all", "backendRefs": [{"name": "chat-v1", "port": 8000}]},  # matches: default PathPrefix /
        {"name": "prefix", "matches": [{"path": {"type": "PathPrefix", "value": "/v1/chat"}}],
         "backendRefs": [{"name": "chat-v1", "port": 8000}]},
        {"name": "longer-prefix", "matches": [{"path": {"type": "PathPrefix", "value": "/v1/chat/completions/"}}],
         "backendRefs": [{"name": "chat-v2", "port": 8000}]},
        {"name": "header", "matches": [{"path": {"type": "PathPrefix", "value": "/v1/chat"},
                                        "headers": [{"name": "X-Canary", "value": "1"}]}],
         "backendRefs": [{"name": "chat-v2", "port": 8000}]},
        {"name": "method", "matches": [{"path": {"type": "PathPrefix", "value": "/v1/chat"}, "method": "GET"}],
         "backendRefs": [{"name": "chat-v2", "port": 8000}]},
        {"name": "exact", "matches": [{"path": {"type": "Exact", "value": "/health"}}],
         "backendRefs": [{"name": "chat-v1", "port": 8000}]},
        {"name": "query", "matches": [{"path": {"type": "PathPrefix", "value": "/v1/chat"},
                                       "headers": [{"name": "x-canary", "value": "1"}],
                                       "queryParams": [{"name": "debug", "type": "RegularExpression",
                                                        "value": "^y"}]}],
         "backendRefs": [{"name": "chat-v2", "port": 8000}]},
    ]), SRC)
    names = {r.name: r for r in table.rules}
    assert table.hosts == ()  # no hostnames: every Host
    assert names["catch-all"].backends[0] == (names["catch-all"].backends[0][0], 1.0)  # absent weight: 1
    assert names["catch-all"].backends[0][0].key == V1
    assert select_rule(table.rules, view("/other")).name == "catch-all"
    assert select_rule(table.rules, view("/v1/chatter")).name == "catch-all", "a prefix matches whole elements"
    assert select_rule(table.rules, view("/v1/chat/completions")).name == "longer-prefix"  # trailing / ignored
    assert select_rule(table.rules, view("/v1/chat/x")).name == "prefix"
    assert select_rule(table.rules, view("/v1/chat/x", method="GET")).name == "method"  # method before headers
    assert select_rule(table.rules, view("/v1/chat/x", **{"X-CANARY": "1"})).name == "header"
    assert select_rule(table.rules, view("/v1/chat/x", query={"debug": "yes"}, **{"x-canary": "1"})).name == "query"
    assert select_rule(table.rules, view("/health")).name == "exact"
    assert select_rule(table.rules[1:2], view("/other")) is None


def test_weights_are_proportions_and_mirrors_percent_or_fraction() -> None:
    table = parse_http_route(route([split(None, 0, filters=[
        mirror(percent=5), mirror(fraction={"numerator": 25, "denominator": 1000}), mirror(fraction={"numerator": 3}),
        mirror(), {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "a", "value": "b"}]}},
    ])]), SRC)
    rule = table.rules[0]
    assert [(d.key, w) for d, w in rule.backends] == [(V1, 1.0), (V2, 0.0)]
    assert [p for _, p in rule.mirrors] == [5.0, 2.5, 3.0, 100.0]


# ----------------------------------------------------------------------------- end to end


async def test_routes_by_weight_proportions_and_follows_changes(kube_env: KubeEnv, kube: KubeClient,
                                                                upstreams: dict[str, Recorder]) -> None:
    kube_env.put_object(HTTP_ROUTE, route([split(9, 1)], hostnames=[HOST]))
    mesh = await start_mesh(kube, upstreams)
    try:
        async with aiohttp.ClientSession() as session:
            answered = await send(session, mesh, 400)
            observed = [answered.count("primary"), answered.count("candidate")]
            assert chisquare(observed, [360, 40]).pvalue > 0.001  # 9:1 is 90/10, not 9% and 1%
            assert mesh.changes[-1].routes[0]["weights"] == {V1: 90.0, V2: 10.0}
            assert mesh.changes[-1].routes[0]["total_weight"] == 10.0
            await send(session, mesh, 3, status=404, host="other.example.com")  # not one of its hostnames
            obj = kube_env.put_object(HTTP_ROUTE, route([split(0, 3)], hostnames=[HOST]))
            change = await mesh.wait_for_version(SRC, obj["metadata"]["resourceVersion"])
            assert change.routes[0]["weights"] == {V1: 0.0, V2: 100.0} and change.routes[0]["weight_sum"] == 100
            assert set(await send(session, mesh, 30)) == {"candidate"}
            obj = kube_env.put_object(HTTP_ROUTE, route([split(0, 0)], hostnames=[HOST]))
            await mesh.wait_for_version(SRC, obj["metadata"]["resourceVersion"])
            await send(session, mesh, 3, status=500)  # every weight 0: the Gateway API's 500
    finally:
        await mesh.stop()


async def test_mirrors_each_filter_at_its_share_with_the_shadow_host(kube_env: KubeEnv, kube: KubeClient,
                                                                     upstreams: dict[str, Recorder]) -> None:
    kube_env.put_object(HTTP_ROUTE, route([split(None, 0, filters=[
        mirror(fraction={"numerator": 250, "denominator": 1000})])]))
    mesh = await start_mesh(kube, upstreams)
    try:
        async with aiohttp.ClientSession() as session:
            answered = await send(session, mesh, 400)
            assert set(answered) == {"primary"}  # users only see the primary; a weight-0 backend gets nothing
            await mesh.drain_mirrors(10)
            mirrored = upstreams["candidate"].seen
            assert 60 <= len(mirrored) <= 140  # binomial(400, 0.25): mean 100, sd 8.7
            primary_ids = {rid for _, rid, _ in upstreams["primary"].seen}
            assert all(host == HOST + "-shadow" and rid in primary_ids for host, rid, _ in mirrored)
            assert mesh.changes[-1].routes[0]["mirrors"] == {V2: 25.0}
    finally:
        await mesh.stop()
