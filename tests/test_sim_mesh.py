"""The mesh simulator: routing by objects in the real local API server, over real HTTP.

Upstreams are small real aiohttp servers that record what reached them (they
stand for the pods behind a destination); the routing objects live in the
local kube-apiserver, are changed there by the admin, and the mesh follows them
with a real list and watch through the fault proxy (which can cut watches and
make them expire, as after an etcd compaction). Knative Service status comes
from the stand-in's controller a moment after each spec write.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from conftest_kube import KubeEnv
from scipy.stats import chisquare

from shadowctl.kube import KNATIVE_SERVICE, VIRTUAL_SERVICE, KubeClient
from shadowctl.sim.errors import SimError
from shadowctl.sim.mesh import (
    HttpRoute,
    IstioSource,
    KnativeSource,
    MeshSimulator,
    RequestView,
    parse_virtual_service,
    pick_weighted,
    select_route,
    shadow_host,
)
from shadowctl.sim.modelserver import ModelKnobs, SimModelServer

HOST = "chat.llm.svc.cluster.local"
SRC = IstioSource("llm", "chat")


@dataclass
class Recorder:
    """A real upstream that records Host, x-request-id and path of every request; ``gate`` can hold responses."""

    name: str
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    runner: web.AppRunner | None = None
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.headers.get("Host", ""), request.headers.get("x-request-id", ""), request.path))
        if self.gate is not None:
            await self.gate.wait()
        return web.json_response({"upstream": self.name})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        if self.runner is not None:
            await self.runner.cleanup()


def vs(http: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "chat", "namespace": "llm"},
        "spec": {"hosts": ["chat"], "http": http},
    }


def split(primary: int, candidate: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": "main",
        "route": [
            {"destination": {"host": "chat", "subset": "primary"}, "weight": primary},
            {"destination": {"host": "chat", "subset": "candidate"}, "weight": candidate},
        ],
        **extra,
    }


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


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def start_mesh(kube: KubeClient, upstreams: dict[str, Recorder], **kw: Any) -> MeshSimulator:
    mesh = MeshSimulator(
        kube, [SRC], seed=7,
        upstreams={(HOST, name): rec.url for name, rec in upstreams.items()}, **kw,
    )
    await mesh.start()
    try:
        await mesh.wait_ready()
    except SimError:
        await mesh.stop()
        raise
    return mesh


async def send(session: aiohttp.ClientSession, mesh: MeshSimulator, n: int, **headers: str) -> list[str]:
    """Send n requests (16 at a time) and return which upstream answered each."""
    limit = asyncio.Semaphore(16)

    async def one(i: int) -> str:
        async with limit, session.post(f"{mesh.url}/v1/completions?i={i}", json={"prompt": "x"},
                                       headers={"Host": HOST, **headers}) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["upstream"])

    return list(await asyncio.gather(*(one(i) for i in range(n))))


# ----------------------------------------------------------------------------- pure parts


def view(path: str = "/v1/chat/completions", **headers: str) -> RequestView:
    return RequestView("POST", path, {}, {k.lower(): v for k, v in headers.items()}, HOST)


def test_route_selection_follows_istio_order_and_matches() -> None:
    table = parse_virtual_service(
        vs([
            {"name": "canary-header", "match": [{"headers": {"x-canary": {"exact": "1"}}}],
             "route": [{"destination": {"host": "chat", "subset": "candidate"}}]},
            {"name": "models", "match": [{"uri": {"prefix": "/v1/models"}}, {"uri": {"exact": "/health"}}],
             "route": [{"destination": {"host": "chat", "subset": "primary"}}]},
            {"name": "unsupported", "match": [{"sourceLabels": {"app": "x"}}],
             "route": [{"destination": {"host": "chat", "subset": "candidate"}}]},
            split(90, 10),
        ]),
        SRC,
    )
    routes: tuple[HttpRoute, ...] = table.http
    assert table.hosts == (HOST,)
    assert routes[0].destinations[0][0].host == HOST  # short host expanded in the VS namespace
    assert select_route(routes, view(**{"X-Canary": "1"})) is routes[0]
    assert select_route(routes, view(**{"X-Canary": "2"})) is routes[3]
    assert select_route(routes, view("/v1/models/x")) is routes[1]
    assert select_route(routes, view("/health")) is routes[1]
    assert select_route(routes[:3], view()) is None  # nothing matches: 404 at the front door
    assert routes[0].weight_sum == 100 and routes[3].weight_sum == 100


def test_weights_mirrors_and_shadow_host() -> None:
    a, b = ("a", 70.0), ("b", 30.0)
    assert pick_weighted([a, b], 0.0) == "a" and pick_weighted([a, b], 0.6999) == "a"
    assert pick_weighted([a, b], 0.7001) == "b"
    assert pick_weighted([("only", 0.0)], 0.99) == "only"  # a single destination takes everything
    assert pick_weighted([("a", 0.0), ("b", 0.0)], 0.5) is None
    route = parse_virtual_service(vs([{
        "route": [{"destination": {"host": "chat", "subset": "primary"}}],
        "mirror": {"host": "chat", "subset": "candidate"},
        "mirrors": [{"destination": {"host": "other.ns.svc.cluster.local"}, "percentage": {"value": 2.5}}],
    }]), SRC).http[0]
    assert [(d.key, p) for d, p in route.mirrors] == [(f"{HOST}/candidate", 100.0), ("other.ns.svc.cluster.local", 2.5)]
    old = parse_virtual_service(vs([{**split(100, 0), "mirror": {"host": "chat"}, "mirrorPercent": 20}]), SRC).http[0]
    assert old.mirrors[0][1] == 20.0 and old.deprecated_mirror_percent
    assert shadow_host("chat.llm") == "chat.llm-shadow"
    assert shadow_host("127.0.0.1:8080") == "127.0.0.1-shadow:8080"
    assert shadow_host("[::1]:80") == "[::1]-shadow:80"


# ----------------------------------------------------------------------------- Istio, end to end


async def test_routes_by_weights(
    kube_env: KubeEnv, kube: KubeClient, upstreams: dict[str, Recorder], session: aiohttp.ClientSession
) -> None:
    kube_env.put_object(VIRTUAL_SERVICE, vs([split(70, 30)]))
    mesh = await start_mesh(kube, upstreams)
    try:
        answered = await send(session, mesh, 400)
        observed = [answered.count("primary"), answered.count("candidate")]
        assert chisquare(observed, [280, 120]).pvalue > 0.001
        assert len(upstreams["primary"].seen) == observed[0]
        assert mesh.stats.routed == {f"{HOST}/primary": observed[0], f"{HOST}/candidate": observed[1]}
        async with session.get(mesh.url + "/mesh/stats") as resp:
            stats = await resp.json()
        assert stats["routed"][f"{HOST}/candidate"] == observed[1] and stats["requests"] == 400
        # every request carried an x-request-id, generated at the front door, unique
        ids = [rid for _, rid, _ in upstreams["primary"].seen + upstreams["candidate"].seen]
        assert all(ids) and len(set(ids)) == 400
    finally:
        await mesh.stop()


async def test_follows_a_change_and_records_every_version(
    kube_env: KubeEnv, kube: KubeClient, upstreams: dict[str, Recorder], session: aiohttp.ClientSession
) -> None:
    kube_env.put_object(VIRTUAL_SERVICE, vs([split(100, 0)]))
    mesh = await start_mesh(kube, upstreams)
    try:
        assert set(await send(session, mesh, 30)) == {"primary"}
        versions = []
        for primary in (75, 50, 0):
            obj = kube_env.put_object(VIRTUAL_SERVICE, vs([split(primary, 100 - primary)]))
            versions.append(obj["metadata"]["resourceVersion"])
        change = await mesh.wait_for_version(SRC, versions[-1], within=10)
        assert change.routes[0]["weights"] == {f"{HOST}/primary": 0.0, f"{HOST}/candidate": 100.0}
        assert set(await send(session, mesh, 30)) == {"candidate"}
        # the watch saw every version, in order, each with weights summing to 100
        seen = [c.resource_version for c in mesh.changes]
        assert seen[-3:] == versions and len(seen) == 4
        assert all(r["weight_sum"] == 100 for c in mesh.changes for r in c.routes)
        async with session.get(mesh.url + "/mesh/changes") as resp:
            assert [c["resource_version"] for c in await resp.json()] == seen
        kube_env.delete_object(VIRTUAL_SERVICE, "llm", "chat")
        await mesh.wait_for(lambda: mesh.tables[SRC] is None, 10, "the deletion")
        async with session.post(mesh.url + "/v1/completions", json={}, headers={"Host": HOST}) as resp:
            assert resp.status == 404
    finally:
        await mesh.stop()


async def test_relists_after_the_watch_history_is_compacted(
    kube_env: KubeEnv, kube: KubeClient, upstreams: dict[str, Recorder]
) -> None:
    """The watch is cut and every resourceVersion up to now expires (410, as after etcd compacts): only a relist
    can bring the next version."""
    kube_env.put_object(VIRTUAL_SERVICE, vs([split(100, 0)]))
    mesh = await start_mesh(kube, upstreams, watch_timeout=1)
    try:
        kube_env.reset_counts()
        kube_env.expire_watches()
        kube_env.cut_watches()
        await asyncio.sleep(0.2)
        kube_env.cut_watches()  # also a watch that was being opened (past the expiry check) at the first cut
        obj = kube_env.put_object(VIRTUAL_SERVICE, vs([split(40, 60)]))
        await mesh.wait_for_version(SRC, obj["metadata"]["resourceVersion"], within=10)
        assert mesh.tables[SRC] is not None and mesh.tables[SRC].http[0].destinations[1][1] == 60
        assert mesh.changes[-1].event == "LIST"  # not from the expired watch
        assert kube_env.verb_counts["list"] >= 1
    finally:
        await mesh.stop()


async def test_mirrors_at_the_percentage_with_shadow_host_and_same_request_id(
    kube_env: KubeEnv, kube: KubeClient, upstreams: dict[str, Recorder], session: aiohttp.ClientSession
) -> None:
    kube_env.put_object(VIRTUAL_SERVICE, vs([{
        "route": [{"destination": {"host": "chat", "subset": "primary"}}],
        "mirror": {"host": "chat", "subset": "candidate"},
        "mirrorPercentage": {"value": 25.0},
    }]))
    mesh = await start_mesh(kube, upstreams)
    try:
        answered = await send(session, mesh, 400)
        assert set(answered) == {"primary"}  # users only ever see the primary
        await mesh.drain_mirrors(10)
        mirrored = upstreams["candidate"].seen
        assert 60 <= len(mirrored) <= 140  # binomial(400, 0.25): mean 100, sd 8.7
        counts = mesh.stats.mirrors[f"{HOST}/candidate"]
        assert counts.sent == counts.ok == len(mirrored) and counts.failed == 0
        primary_ids = {rid: host for host, rid, _ in upstreams["primary"].seen}
        for host, rid, path in mirrored:
            assert host == HOST + "-shadow"
            assert primary_ids[rid] == HOST  # the same x-request-id as the user's request
            assert path == "/v1/completions"
        # a client-supplied x-request-id is kept on both copies
        kube_env.put_object(VIRTUAL_SERVICE, vs([{
            "route": [{"destination": {"host": "chat", "subset": "primary"}}],
            "mirrors": [{"destination": {"host": "chat", "subset": "candidate"}}],  # no percentage: 100%
        }]))
        await mesh.wait_for(lambda: bool(mesh.tables[SRC] and mesh.tables[SRC].http[0].mirrors[0][1] == 100.0), 10)
        await send(session, mesh, 1, **{"x-request-id": "req-42"})
        await mesh.drain_mirrors(10)
        assert upstreams["candidate"].seen[-1][:2] == (HOST + "-shadow", "req-42")
    finally:
        await mesh.stop()


async def test_a_slow_mirror_does_not_hold_the_users_response(
    kube_env: KubeEnv, kube: KubeClient, upstreams: dict[str, Recorder], session: aiohttp.ClientSession
) -> None:
    """The mirror target holds every response until the test releases it: users must be answered before that."""
    upstreams["candidate"].gate = asyncio.Event()
    kube_env.put_object(VIRTUAL_SERVICE, vs([{
        "route": [{"destination": {"host": "chat", "subset": "primary"}}],
        "mirror": {"host": "chat", "subset": "candidate"},
    }]))
    mesh = await start_mesh(kube, upstreams)
    try:
        answered = await asyncio.wait_for(send(session, mesh, 20), 30)
        assert answered == ["primary"] * 20
        counts = mesh.stats.mirrors[f"{HOST}/candidate"]
        assert counts.sent == 20 and counts.ok == 0  # every copy is still waiting at the mirror
        upstreams["candidate"].gate.set()
        await mesh.drain_mirrors(10)
        assert counts.ok == 20
    finally:
        await mesh.stop()


async def test_streams_chunk_by_chunk_and_handles_missing_routes(
    kube_env: KubeEnv, kube: KubeClient, upstreams: dict[str, Recorder], session: aiohttp.ClientSession
) -> None:
    model = SimModelServer("m", knobs=ModelKnobs(time_scale=0.01, output_words_median=15))
    await model.start()
    kube_env.put_object(VIRTUAL_SERVICE, vs([
        {"match": [{"headers": {"x-variant": {"exact": "model"}}}],
         "route": [{"destination": {"host": "chat", "subset": "model"}}]},
        {"match": [{"headers": {"x-variant": {"exact": "nowhere"}}}],
         "route": [{"destination": {"host": "chat", "subset": "unknown"}}]},
        {"match": [{"uri": {"prefix": "/v1"}}], "route": [{"destination": {"host": "chat", "subset": "primary"}}]},
    ]))
    mesh = MeshSimulator(kube, [SRC], upstreams={("chat", "model"): model.url, (HOST, "primary"): upstreams["primary"].url})
    await mesh.start()
    await mesh.wait_ready()
    try:
        body = {"prompt": "Is it safe to retry POST requests?", "stream": True}
        chunks = []
        async with session.post(mesh.url + "/v1/completions", json=body, headers={"x-variant": "model"}) as resp:
            assert resp.status == 200 and resp.headers["x-sim-mesh-destination"] == f"{HOST}/model"
            async for raw in resp.content:
                if raw.startswith(b"data: {"):
                    chunks.append(json.loads(raw[6:])["choices"][0]["text"])
        assert len(chunks) == 17  # 16 tokens (max_tokens default) and the finishing chunk, each its own event
        async with session.post(mesh.url + "/v1/completions", json={}, headers={"x-variant": "nowhere"}) as resp:
            assert resp.status == 503
        async with session.get(mesh.url + "/metrics-not-routed") as resp:
            assert resp.status == 404
        assert mesh.stats.no_upstream == 1 and mesh.stats.no_route == 1
    finally:
        await mesh.stop()
        await model.stop()


async def test_mesh_needs_a_source(kube: KubeClient) -> None:
    with pytest.raises(SimError, match="at least one routing source"):
        MeshSimulator(kube, [])


# ----------------------------------------------------------------------------- Knative


def ksvc(template_name: str, traffic: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"template": {"metadata": {"name": template_name},
                                         "spec": {"containers": [{"image": f"llm:{template_name}"}]}}}
    if traffic is not None:
        spec["traffic"] = traffic
    return {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
            "metadata": {"name": "chat", "namespace": "llm"}, "spec": spec}


async def test_knative_split_and_tag_routes(
    kube_env: KubeEnv, kube: KubeClient, upstreams: dict[str, Recorder], session: aiohttp.ClientSession
) -> None:
    kube_env.put_object(KNATIVE_SERVICE, ksvc("chat-v1"))
    source = KnativeSource("llm", "chat")
    mesh = MeshSimulator(kube, [source], seed=3,
                         revisions={"chat-v1": upstreams["primary"].url, "chat-v2": upstreams["candidate"].url})
    await mesh.start()
    await mesh.wait_ready()
    try:
        # Until Knative's controller reports a ready revision nothing routes; then 100% to the latest.
        settled = kube_env.wait_knative_settled("llm", "chat")
        assert settled["status"]["latestReadyRevisionName"] == "chat-v1"
        await mesh.wait_for_version(source, settled["metadata"]["resourceVersion"], within=10)
        assert set(await send(session, mesh, 20)) == {"primary"}  # default traffic: 100% latest
        obj = kube_env.put_object(KNATIVE_SERVICE, ksvc("chat-v2", [
            {"revisionName": "chat-v1", "percent": 80, "tag": "stable"},
            {"revisionName": "chat-v2", "percent": 20, "tag": "candidate"},
        ]))
        await mesh.wait_for_version(source, obj["metadata"]["resourceVersion"], within=10)
        # the spec (and, once written, the status for it) split 80/20 with both tags
        assert mesh.changes[-1].routes[0]["percent_sum"] == 100
        obj = kube_env.wait_knative_settled("llm", "chat")  # no status write races the next change
        await mesh.wait_for_version(source, obj["metadata"]["resourceVersion"], within=10)
        change = mesh.changes[-1]
        assert change.routes[0]["percent_sum"] == 100
        answered = await send(session, mesh, 400, Host="chat.llm.example.com")
        observed = [answered.count("primary"), answered.count("candidate")]
        assert chisquare(observed, [320, 80]).pvalue > 0.001
        assert set(await send(session, mesh, 20, Host="candidate-chat.llm.example.com")) == {"candidate"}
        assert set(await send(session, mesh, 20, Host="stable-chat.llm.svc.cluster.local")) == {"primary"}
        assert set(await send(session, mesh, 20, **{"Knative-Serving-Tag": "candidate"})) == {"candidate"}
        async with session.post(mesh.url + "/", headers={"Host": "nosuchtag-chat.llm.example.com"}) as resp:
            assert resp.status == 404
        # every version routed 100% in all, once the controller had first reported a ready revision
        routing = [bool(c.routes[0]["percents"]) for c in mesh.changes]
        assert routing[-1] and routing == sorted(routing), routing
        assert all(c.routes[0]["percent_sum"] == 100 for c in mesh.changes if c.routes[0]["percents"])
        obj = kube_env.put_object(KNATIVE_SERVICE, ksvc("chat-v2", [
            {"revisionName": "chat-v1", "percent": 100},
            {"revisionName": "chat-v2", "percent": 0, "tag": "candidate"},
        ]))
        await mesh.wait_for_version(source, obj["metadata"]["resourceVersion"], within=10)
        assert set(await send(session, mesh, 40)) == {"primary"}
        assert set(await send(session, mesh, 5, Host="candidate-chat.llm")) == {"candidate"}  # tag kept at 0%
    finally:
        await mesh.stop()


async def test_a_client_that_hangs_up_mid_stream_is_not_an_error(
    kube_env: KubeEnv, kube: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    model = SimModelServer("m", knobs=ModelKnobs(time_scale=0.2, output_words_median=40))
    await model.start()
    kube_env.put_object(VIRTUAL_SERVICE, vs([{"route": [{"destination": {"host": "chat", "subset": "model"}}]}]))
    mesh = MeshSimulator(kube, [SRC], upstreams={("chat", "model"): model.url})
    await mesh.start()
    await mesh.wait_ready()
    try:
        body = {"prompt": "Explain retries.", "stream": True, "max_tokens": 200}
        for _ in range(3):
            async with aiohttp.ClientSession() as client, client.post(mesh.url + "/v1/completions", json=body) as resp:
                await resp.content.readline()  # the first event, then hang up mid-stream
        await asyncio.sleep(0.5)  # the mesh notices the closed transport on its next write
        async with aiohttp.ClientSession() as client, client.post(mesh.url + "/v1/completions",
                                                                  json={"prompt": "ok"}) as resp:
            assert resp.status == 200
        errors = [r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("aiohttp")]
        assert errors == []  # no "Error handling request" traceback from the mesh
    finally:
        await mesh.stop()
        await model.stop()
