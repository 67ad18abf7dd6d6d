"""KubeClient (kubernetes.aio underneath) over real HTTP against the real local kube-apiserver (via the fault proxy)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest_kube import KubeEnv

from shadowctl.kube import (
    EVENT,
    LEASE,
    VIRTUAL_SERVICE,
    AlreadyExists,
    ConfigError,
    Conflict,
    Invalid,
    KubeClient,
    NotFound,
    ResourceRef,
    RetryPolicy,
    Unauthorized,
    Unavailable,
)
from shadowctl.kube.retry import parse_retry_after

REF = ResourceRef(VIRTUAL_SERVICE, "reviews", "default")


def vs(weight_primary: int = 100, **extra: Any) -> dict[str, Any]:
    routes = [{"destination": {"host": "reviews", "subset": "primary"}, "weight": weight_primary}]
    if weight_primary < 100:
        routes.append({"destination": {"host": "reviews", "subset": "candidate"}, "weight": 100 - weight_primary})
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {"hosts": ["reviews"], "http": [{"name": "main", "route": routes}]},
        **extra,
    }


async def test_create_sets_identity_and_versions(kube_client: KubeClient) -> None:
    created = await kube_client.create(VIRTUAL_SERVICE, vs())
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    fetched = await kube_client.get(REF)
    assert fetched["metadata"]["resourceVersion"] == meta["resourceVersion"]
    with pytest.raises(AlreadyExists) as info:
        await kube_client.create(VIRTUAL_SERVICE, vs())
    assert info.value.status == 409 and "already exists" in info.value.message


async def test_get_missing_is_not_found(kube_client: KubeClient) -> None:
    with pytest.raises(NotFound) as info:
        await kube_client.get(ResourceRef(VIRTUAL_SERVICE, "nope", "default"))
    assert '"nope" not found' in info.value.message
    assert info.value.__cause__ is not None  # the library's exception is chained


async def test_every_write_bumps_a_global_resource_version(kube_client: KubeClient) -> None:
    a = await kube_client.create(VIRTUAL_SERVICE, vs())
    lease = await kube_client.create(
        LEASE, {"metadata": {"name": "l", "namespace": "default"}, "spec": {"holderIdentity": "x"}}
    )
    b = await kube_client.patch_merge(REF, {"metadata": {"labels": {"x": "1"}}})
    versions = [int(o["metadata"]["resourceVersion"]) for o in (a, lease, b)]
    assert versions == sorted(versions) and len(set(versions)) == 3
    _, list_rv = await kube_client.list(VIRTUAL_SERVICE, "default")
    assert int(list_rv) == versions[-1]


async def test_stale_put_and_stale_patch_conflict(kube_client: KubeClient) -> None:
    first = await kube_client.create(VIRTUAL_SERVICE, vs())
    await kube_client.patch_merge(REF, {"spec": {"hosts": ["reviews", "reviews.default"]}})
    stale = dict(first, spec=vs(90)["spec"])
    with pytest.raises(Conflict) as info:
        await kube_client.replace(VIRTUAL_SERVICE, stale)
    assert "the object has been modified" in info.value.message
    with pytest.raises(Conflict):
        await kube_client.patch_merge(
            REF, {"spec": {"hosts": ["x"]}}, resource_version=first["metadata"]["resourceVersion"]
        )
    # nothing of the stale writes landed
    assert (await kube_client.get(REF))["spec"]["hosts"] == ["reviews", "reviews.default"]
    # a conflict is not retried: it needs a re-read
    assert kube_client.requests_by_verb["update"] == 1


async def test_replace_requires_resource_version(kube_client: KubeClient) -> None:
    await kube_client.create(VIRTUAL_SERVICE, vs())
    with pytest.raises(ValueError, match="resourceVersion"):
        await kube_client.replace(VIRTUAL_SERVICE, vs(90))


async def test_generation_moves_only_on_spec_changes(kube_client: KubeClient) -> None:
    obj = await kube_client.create(VIRTUAL_SERVICE, vs())
    obj = await kube_client.patch_merge(REF, {"metadata": {"annotations": {"a": "b"}}})
    assert obj["metadata"]["generation"] == 1
    obj = await kube_client.patch_status(REF, {"status": {"observedGeneration": 1}})
    assert obj["metadata"]["generation"] == 1
    obj["spec"] = vs(80)["spec"]
    obj = await kube_client.replace(VIRTUAL_SERVICE, obj)
    assert obj["metadata"]["generation"] == 2


async def test_noop_update_writes_nothing(kube_client: KubeClient, kube_env: KubeEnv) -> None:
    obj = await kube_client.create(VIRTUAL_SERVICE, vs())
    before = kube_env.resource_version
    again = await kube_client.replace(VIRTUAL_SERVICE, obj)
    assert again["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
    assert kube_env.resource_version == before
    assert kube_client.write_count == 2 and kube_client.requests_by_verb["update"] == 1


async def test_status_subresource_is_separate(kube_client: KubeClient) -> None:
    created = await kube_client.create(VIRTUAL_SERVICE, vs(status={"observedGeneration": 7}))
    assert "status" not in created  # ignored on the main resource
    with_status = await kube_client.patch_status(REF, {"status": {"observedGeneration": 1}, "spec": {"hosts": ["zz"]}})
    assert with_status["status"] == {"observedGeneration": 1}
    assert with_status["spec"]["hosts"] == ["reviews"]  # spec ignored on /status
    main = dict(with_status, status={"observedGeneration": 99}, spec=vs(70)["spec"])
    written = await kube_client.replace(VIRTUAL_SERVICE, main)
    assert written["status"] == {"observedGeneration": 1}
    assert written["spec"]["http"][0]["route"][0]["weight"] == 70
    written["status"] = {"observedGeneration": 2}
    after = await kube_client.replace_status(VIRTUAL_SERVICE, written)
    assert after["status"] == {"observedGeneration": 2} and after["metadata"]["generation"] == 2


async def test_json_patch_test_op_guards_the_write(kube_client: KubeClient) -> None:
    await kube_client.create(VIRTUAL_SERVICE, vs())
    path = "/spec/http/0/route/0/weight"
    out = await kube_client.patch_json(
        REF, [{"op": "test", "path": path, "value": 100}, {"op": "replace", "path": path, "value": 100}]
    )
    assert out["spec"]["http"][0]["route"][0]["weight"] == 100
    with pytest.raises(Invalid) as info:
        await kube_client.patch_json(
            REF, [{"op": "test", "path": path, "value": 50}, {"op": "replace", "path": "/spec/hosts", "value": ["x"]}]
        )
    # kube-apiserver answers a failed "test" op with a bare 422 Invalid (no causes, a generic message)
    assert info.value.status == 422 and info.value.reason == "Invalid"
    assert (await kube_client.get(REF))["spec"]["hosts"] == ["reviews"]  # the replace op did not land


async def test_merge_patch_null_deletes_and_lists_replace(kube_client: KubeClient) -> None:
    await kube_client.create(
        VIRTUAL_SERVICE, vs(metadata={"name": "reviews", "namespace": "default", "labels": {"a": "1", "b": "2"}})
    )
    out = await kube_client.patch_merge(REF, {"metadata": {"labels": {"a": None}}, "spec": {"hosts": ["only"]}})
    assert out["metadata"]["labels"] == {"b": "2"}
    assert out["spec"]["hosts"] == ["only"]
    assert out["spec"]["http"][0]["name"] == "main"


async def test_strategic_merge_patch_on_custom_resource_is_415(kube_env: KubeEnv) -> None:
    """Raw httpx here: the adapter never sends strategic merge patches, so only a raw client can."""
    kube_env.put_object(VIRTUAL_SERVICE, vs())
    headers = {"Authorization": f"Bearer {kube_env.token}", "Content-Type": "application/strategic-merge-patch+json"}
    async with httpx.AsyncClient(base_url=kube_env.url, timeout=10) as http:
        resp = await http.patch(REF.path(), json={"spec": {"hosts": ["x"]}}, headers=headers)
    body = resp.json()
    assert resp.status_code == 415 and body["kind"] == "Status" and body["reason"] == "UnsupportedMediaType"
    assert "application/merge-patch+json" in body["message"]  # the server lists what a custom resource accepts
    current = kube_env.get_object(VIRTUAL_SERVICE, "default", "reviews")
    assert current is not None and current["spec"]["hosts"] == ["reviews"]


async def test_list_with_label_selector(kube_client: KubeClient) -> None:
    for name, team in (("a", "x"), ("b", "y"), ("c", "x")):
        await kube_client.create(
            VIRTUAL_SERVICE, dict(vs(), metadata={"name": name, "namespace": "default", "labels": {"team": team}})
        )
    items, _ = await kube_client.list(VIRTUAL_SERVICE, "default", label_selector="team=x")
    assert sorted(i["metadata"]["name"] for i in items) == ["a", "c"]
    items, _ = await kube_client.list(VIRTUAL_SERVICE, "other")
    assert items == []


async def test_delete_with_precondition(kube_client: KubeClient) -> None:
    obj = await kube_client.create(VIRTUAL_SERVICE, vs())
    await kube_client.patch_merge(REF, {"metadata": {"labels": {"x": "y"}}})
    with pytest.raises(Conflict):
        await kube_client.delete(REF, resource_version=obj["metadata"]["resourceVersion"])
    await kube_client.delete(REF)
    with pytest.raises(NotFound):
        await kube_client.get(REF)


async def test_events_are_recorded(kube_client: KubeClient) -> None:
    obj = await kube_client.create(VIRTUAL_SERVICE, vs())
    event = await kube_client.create_event(obj, reason="Promoted", message="candidate at 100%")
    assert event["metadata"]["name"].startswith("reviews.")
    assert event["involvedObject"]["uid"] == obj["metadata"]["uid"]
    items, _ = await kube_client.list(EVENT, "default")
    assert [e["reason"] for e in items] == ["Promoted"]


async def test_429_storm_honours_retry_after(
    kube_client: KubeClient, kube_env: KubeEnv, kube_sleeps: list[float]
) -> None:
    await kube_client.create(VIRTUAL_SERVICE, vs())
    kube_env.fail_next(3, status=429, verb="get", retry_after=7)
    obj = await kube_client.get(REF)
    assert obj["metadata"]["name"] == "reviews"
    assert kube_sleeps == [7.0, 7.0, 7.0]
    assert kube_client.requests_by_verb["get"] == 4


async def test_500_storm_backs_off_exponentially_then_gives_up(
    kube_client: KubeClient, kube_env: KubeEnv, kube_sleeps: list[float]
) -> None:
    kube_env.fail_next(10, status=500, verb="list")
    with pytest.raises(Unavailable) as info:
        await kube_client.list(VIRTUAL_SERVICE, "default")
    assert info.value.status == 500
    # attempts=4, base 0.1, jitter 0.5 with rand()=0.5: 0.75 * 0.1 * 2**n
    assert kube_sleeps == pytest.approx([0.075, 0.15, 0.3])
    assert kube_client.requests_by_verb["list"] == 4


async def test_create_is_not_retried_on_500(
    kube_client: KubeClient, kube_env: KubeEnv, kube_sleeps: list[float]
) -> None:
    kube_env.fail_next(1, status=500, verb="create")
    with pytest.raises(Unavailable):
        await kube_client.create(VIRTUAL_SERVICE, vs())
    assert kube_sleeps == [] and kube_client.requests_by_verb["create"] == 1
    kube_env.fail_next(1, status=503, verb="create")
    await kube_client.create(VIRTUAL_SERVICE, vs())  # 503 means "not processed": safe to retry
    assert len(kube_sleeps) == 1


async def test_connection_reset_is_retried_for_reads_but_not_for_creates(
    kube_client: KubeClient, kube_env: KubeEnv, kube_sleeps: list[float]
) -> None:
    """The fault proxy drops the connection with no answer: a read is safe to send again, a create is not
    (the server may have stored it), so the create's reset surfaces as Unavailable, sent once."""
    await kube_client.create(VIRTUAL_SERVICE, vs())
    kube_env.reset_next(2, verb="get")
    assert (await kube_client.get(REF))["metadata"]["name"] == REF.name
    # The proxy saw both resets and the answer (aiohttp itself resends an idempotent request once when a
    # kept-alive connection drops, so the client counts fewer attempts than the proxy sees).
    assert [r.status for r in kube_env.request_log if r.verb == "get"] == [0, 0, 200]
    assert kube_sleeps
    kube_env.reset_next(1, verb="create")
    other = vs()
    other["metadata"]["name"] = "other"
    with pytest.raises(Unavailable) as info:
        await kube_client.create(VIRTUAL_SERVICE, other)
    assert info.value.status is None
    assert kube_client.requests_by_verb["create"] == 2
    assert [r.status for r in kube_env.request_log if r.verb == "create"] == [201, 0]  # sent once, never again


async def test_request_timeout_is_unavailable(kube_env: KubeEnv, tmp_path: Path) -> None:
    kube_env.set_latency(5.0, verb="get")
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    client = await KubeClient.connect(
        kubeconfig=kube_env.kubeconfig(tmp_path / "kc"),
        timeout=0.2,
        retry=RetryPolicy(attempts=2),
        sleep=record,
    )
    try:
        with pytest.raises(Unavailable) as info:
            await client.get(REF)
        assert info.value.status is None and "0.2s" in info.value.message
        assert len(sleeps) == 1 and client.requests_by_verb["get"] == 2
    finally:
        await client.close()
        kube_env.set_latency(0)


async def test_wrong_token_is_unauthorized(kube_env: KubeEnv) -> None:
    kube_env.put_object(VIRTUAL_SERVICE, vs())
    # not a token the API server issued (the real admin token with its signature spoiled)
    wrong = kube_env.token[:-4] + ("AAAA" if not kube_env.token.endswith("AAAA") else "BBBB")
    async with KubeClient.for_url(kube_env.url, token=wrong) as client:
        with pytest.raises(Unauthorized) as info:
            await client.get(REF)
    assert info.value.status == 401
    async with KubeClient.for_url(kube_env.url, token=kube_env.token) as client:  # the real token passes
        assert (await client.get(REF))["metadata"]["name"] == "reviews"


async def test_bad_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="missing"):
        await KubeClient.connect(kubeconfig=missing)
    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nkind: Config\ncurrent-context: nope\n")
    with pytest.raises(ConfigError):
        await KubeClient.connect(kubeconfig=broken)


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert (
        parse_retry_after(
            "Wed, 21 Oct 2015 07:28:00 GMT",
            now=__import__("datetime").datetime(2015, 10, 21, 7, 27, 50, tzinfo=__import__("datetime").UTC),
        )
        == 10.0
    )
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


async def test_concurrent_writers_exactly_one_wins(kube_client: KubeClient) -> None:
    obj = await kube_client.create(VIRTUAL_SERVICE, vs())

    async def write(weight: int) -> str:
        try:
            await kube_client.replace(VIRTUAL_SERVICE, dict(obj, spec=vs(weight)["spec"]))
            return "ok"
        except Conflict:
            return "conflict"

    results = await asyncio.gather(*(write(w) for w in (90, 80, 70, 60)))
    assert sorted(results) == ["conflict", "conflict", "conflict", "ok"]
