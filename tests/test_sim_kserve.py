"""The stand-in for KServe's controller (shadowctl/sim/kserve.py) and the mesh simulator routing by it.

The pure part replays KServe's rules (``ksvc_reconciler.go``, ``PropagateStatus``) through the revision
fields step by step: first rollout, a canary, promotion, rollback after a promotion, a revision that
appears mid-canary, a percent Knative would refuse. The live part runs the stand-in on the real local
API server with KServe's CRD and sends real HTTP requests through the mesh simulator to two real
upstreams, which answer with their name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from conftest_kube import REPO, KubeEnv, eventually
from kserve_helpers import kserve  # noqa: F401 - the fixture
from scipy.stats import chisquare
from test_sim_mesh import Recorder

from shadowctl.kube import INFERENCE_SERVICE, KubeClient, ResourceRef
from shadowctl.sim.kserve import inference_service_status
from shadowctl.sim.mesh import KServeSource, MeshSimulator

R1, R2, R3 = "chat-predictor-00001", "chat-predictor-00002", "chat-predictor-00003"
NOW = "2026-01-01T00:00:00Z"


def isvc(ctp: int | str | None = 0, status: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "kserve" / "chat.yaml").read_text())
    if ctp is None:
        del doc["spec"]["predictor"]["canaryTrafficPercent"]
    else:
        doc["spec"]["predictor"]["canaryTrafficPercent"] = ctp
    doc["metadata"]["generation"] = 1
    if status is not None:
        doc["status"] = status
    return doc


def step(status: dict[str, Any] | None, ctp: int | str | None, latest: str) -> dict[str, Any]:
    return inference_service_status(isvc(ctp, status), latest, NOW)


def split(status: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in status["components"]["predictor"]["traffic"]:
        out[t["revisionName"]] = out.get(t["revisionName"], 0) + t["percent"]
    return {k: v for k, v in out.items() if v}


def revisions(status: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    p = status["components"]["predictor"]
    return p.get("latestReadyRevision"), p.get("latestRolledoutRevision"), p.get("previousRolledoutRevision")


def test_kserve_rules_through_a_whole_rollout_and_a_rollback_after_promotion() -> None:
    first = step(None, 0, R1)  # the first revision takes 100% and is rolled out, whatever the percent
    assert split(first) == {R1: 100} and revisions(first) == (R1, R1, None)
    new = step(first, 0, R2)  # a new model applied with canaryTrafficPercent: 0
    assert split(new) == {R1: 100} and revisions(new) == (R2, R1, None)
    canary = step(new, 30, R2)
    assert split(canary) == {R1: 70, R2: 30}
    prev = next(t for t in canary["components"]["predictor"]["traffic"] if t.get("tag") == "prev")
    assert prev == {"revisionName": R1, "latestRevision": False, "percent": 70, "tag": "prev",
                    "url": "http://prev-chat-predictor.llm.example.com"}
    moved = step(canary, 30, R3)  # another revision becomes ready: the floating canary target follows it
    assert split(moved) == {R1: 70, R3: 30}
    back = step(canary, 0, R2)  # rollback before promotion: all to the rolled-out revision
    assert split(back) == {R1: 100} and revisions(back) == (R2, R1, None)
    promoted = step(canary, None, R2)  # promotion as KServe documents it: the field removed
    assert split(promoted) == {R2: 100} and revisions(promoted) == (R2, R2, R1)
    rolled_back = step(promoted, 0, R2)  # 0 re-applied to a rolled-out revision: KServe's rollback
    assert split(rolled_back) == {R1: 100} and revisions(rolled_back) == (R2, R1, R1)
    assert {c["type"]: c["status"] for c in rolled_back["conditions"]}["Ready"] == "True"


def test_a_percent_knative_would_refuse_keeps_the_traffic_and_says_why() -> None:
    canary = step(step(step(None, 0, R1), 0, R2), 30, R2)
    bad = step(canary, 150, R2)
    assert split(bad) == {R1: 70, R2: 30}
    ready = {c["type"]: c for c in bad["conditions"]}["Ready"]
    assert ready["status"] == "False" and "150" in ready["message"]


@pytest_asyncio.fixture
async def upstreams() -> AsyncIterator[dict[str, Recorder]]:
    recs = {name: Recorder(name) for name in (R1, R2)}
    for r in recs.values():
        await r.start()
    yield recs
    for r in recs.values():
        await r.stop()


@pytest.mark.usefixtures("kserve")
async def test_the_mesh_routes_by_the_traffic_the_stand_in_reports(kube_env: KubeEnv, kube_client: KubeClient,
                                                                   upstreams: dict[str, Recorder]) -> None:
    ref = ResourceRef(INFERENCE_SERVICE, "chat", "llm")
    await kube_client.create(INFERENCE_SERVICE, isvc(0))

    async def settled(revision: str, percents: dict[str, int]) -> dict[str, Any]:
        async def check() -> dict[str, Any]:
            obj = await kube_client.get(ref)
            status = obj.get("status") or {}
            ok = (status.get("observedGeneration") == obj["metadata"]["generation"]
                  and revisions(status)[0] == revision and split(status) == percents)
            return obj if ok else {}
        return await eventually(check)

    obj = await settled(R1, {R1: 100})
    obj["spec"]["predictor"]["model"]["storageUri"] = "hf://example/v2"
    await kube_client.replace(INFERENCE_SERVICE, obj)
    obj = await settled(R2, {R1: 100})
    mesh = MeshSimulator(kube_client, [KServeSource("llm", "chat")], seed=7,
                         revisions={R1: upstreams[R1].url, R2: upstreams[R2].url})
    await mesh.start()
    await mesh.wait_ready()
    try:
        async with aiohttp.ClientSession() as session:
            async def send(n: int, host: str = "chat.llm.svc.cluster.local") -> list[str]:
                limit = asyncio.Semaphore(16)

                async def one(i: int) -> str:
                    async with limit, session.post(f"{mesh.url}/v1/completions?i={i}", json={"prompt": "x"},
                                                   headers={"Host": host}) as resp:
                        assert resp.status == 200, await resp.text()
                        return str((await resp.json())["upstream"])
                return list(await asyncio.gather(*(one(i) for i in range(n))))

            assert set(await send(20)) == {R1}
            obj["spec"]["predictor"]["canaryTrafficPercent"] = 30
            await kube_client.replace(INFERENCE_SERVICE, obj)
            obj = await settled(R2, {R1: 70, R2: 30})
            await mesh.wait_for_version(KServeSource("llm", "chat"), obj["metadata"]["resourceVersion"])
            answered = await send(400)
            assert chisquare([answered.count(R1), answered.count(R2)], [280, 120]).pvalue > 0.001
            assert mesh.changes[-1].routes[0]["percents"] == {R1: 70, R2: 30}
            assert set(await send(10, host="prev-chat-predictor.llm.example.com")) == {R1}  # the prev tag
    finally:
        await mesh.stop()
