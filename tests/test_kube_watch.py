"""Watch through KubeClient against the real kube-apiserver: resume, 410 after compaction, cut streams, timeouts.

The client reaches the server through the fault proxy; cut streams, injected
500s and the 410 of a compacted revision come from the proxy (see
shadowctl/sim/faultproxy.py: the real server's watch cache makes a real
compaction's 410 depend on its history size, which a test cannot pin).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest_kube import KubeEnv

from shadowctl.kube import VIRTUAL_SERVICE, KubeClient, ResourceRef, WatchEvent, WatchExpired


def vs(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"hosts": [name]},
    }


async def collect(client: KubeClient, rv: str | None, count: int, **kw: Any) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    async with asyncio.timeout(5):
        async for ev in client.watch(VIRTUAL_SERVICE, "default", rv, **kw):
            out.append(ev)
            if len(out) == count:
                break
    return out


async def test_watch_from_list_version_sees_later_changes_in_order(kube_client: KubeClient) -> None:
    await kube_client.create(VIRTUAL_SERVICE, vs("a"))
    _, rv = await kube_client.list(VIRTUAL_SERVICE, "default")
    task = asyncio.create_task(collect(kube_client, rv, 3))
    await kube_client.create(VIRTUAL_SERVICE, vs("b"))
    await kube_client.patch_merge(ResourceRef(VIRTUAL_SERVICE, "a", "default"), {"spec": {"hosts": ["z"]}})
    await kube_client.delete(ResourceRef(VIRTUAL_SERVICE, "b", "default"))
    events = await task
    assert [(e.type, e.object["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    rvs = [int(e.resource_version) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)


async def test_watch_without_version_starts_with_current_state(kube_client: KubeClient) -> None:
    await kube_client.create(VIRTUAL_SERVICE, vs("a"))
    await kube_client.create(VIRTUAL_SERVICE, vs("b"))
    events = await collect(kube_client, None, 2)
    assert {(e.type, e.object["metadata"]["name"]) for e in events} == {("ADDED", "a"), ("ADDED", "b")}


async def test_resume_after_a_seen_version_replays_what_was_missed(kube_client: KubeClient) -> None:
    _, rv = await kube_client.list(VIRTUAL_SERVICE, "default")
    await kube_client.create(VIRTUAL_SERVICE, vs("a"))
    first = await collect(kube_client, rv, 1)
    await kube_client.create(VIRTUAL_SERVICE, vs("b"))
    await kube_client.create(VIRTUAL_SERVICE, vs("c"))
    resumed = await collect(kube_client, first[-1].resource_version, 2)
    assert [e.object["metadata"]["name"] for e in resumed] == ["b", "c"]


async def test_too_old_version_raises_watch_expired(kube_client: KubeClient, kube_env: KubeEnv) -> None:
    """The compaction is injected at the boundary (the fault proxy's 410 Expired event); the rest is the real server."""
    await kube_client.create(VIRTUAL_SERVICE, vs("seed"))
    _, rv = await kube_client.list(VIRTUAL_SERVICE, "default")
    await kube_client.create(VIRTUAL_SERVICE, vs("a"))
    kube_env.compact()
    with pytest.raises(WatchExpired) as info:
        await collect(kube_client, rv, 1)
    assert info.value.status == 410
    # the recovery: list again, watch from the list's version
    items, rv2 = await kube_client.list(VIRTUAL_SERVICE, "default")
    assert [i["metadata"]["name"] for i in items] == ["a", "seed"]
    task = asyncio.create_task(collect(kube_client, rv2, 1))
    await kube_client.create(VIRTUAL_SERVICE, vs("b"))
    assert [e.object["metadata"]["name"] for e in await task] == ["b"]


async def test_compaction_expires_older_versions_only(kube_client: KubeClient, kube_env: KubeEnv) -> None:
    """A slow resumer from before a compaction gets 410; one from after it still gets every event it missed.

    The compaction is injected at the boundary (the fault proxy answers watches
    from before the compacted revision with 410 Expired); the replay after it
    is the real server's.
    """
    await kube_client.create(VIRTUAL_SERVICE, vs("seed"))
    _, rv = await kube_client.list(VIRTUAL_SERVICE, "default")
    created = {name: await kube_client.create(VIRTUAL_SERVICE, vs(name)) for name in "abcde"}
    compacted_at = int(created["b"]["metadata"]["resourceVersion"])
    kube_env.compact(compacted_at)  # history up to b's write is gone, c, d, e remain
    with pytest.raises(WatchExpired):
        await collect(kube_client, rv, 1)
    with pytest.raises(WatchExpired):
        await collect(kube_client, created["a"]["metadata"]["resourceVersion"], 1)
    events = await collect(kube_client, str(compacted_at), 3)
    assert [(e.type, e.object["metadata"]["name"]) for e in events] == [("ADDED", "c"), ("ADDED", "d"), ("ADDED", "e")]


async def test_cut_watch_ends_stream_and_resume_loses_nothing(
    kube_client: KubeClient, kube_env: KubeEnv
) -> None:
    _, rv = await kube_client.list(VIRTUAL_SERVICE, "default")
    seen: list[WatchEvent] = []
    first_seen = asyncio.Event()

    async def consume(since: str) -> None:
        async for ev in kube_client.watch(VIRTUAL_SERVICE, "default", since):
            seen.append(ev)
            first_seen.set()

    task = asyncio.create_task(consume(rv))
    await kube_client.create(VIRTUAL_SERVICE, vs("a"))
    async with asyncio.timeout(5):
        await first_seen.wait()
    kube_env.cut_watches()
    async with asyncio.timeout(5):
        await task  # the iterator ends on a dropped connection
    await kube_client.create(VIRTUAL_SERVICE, vs("b"))  # happens while nobody watches
    resumed = await collect(kube_client, seen[-1].resource_version, 1)
    assert [e.object["metadata"]["name"] for e in seen + resumed] == ["a", "b"]


async def test_timeout_seconds_ends_the_stream(kube_client: KubeClient) -> None:
    _, rv = await kube_client.list(VIRTUAL_SERVICE, "default")
    events = []
    async with asyncio.timeout(5):
        async for ev in kube_client.watch(VIRTUAL_SERVICE, "default", rv, timeout_seconds=1):
            events.append(ev)
    assert events == []


async def test_watch_open_is_retried_on_500(
    kube_client: KubeClient, kube_env: KubeEnv, kube_sleeps: list[float]
) -> None:
    await kube_client.create(VIRTUAL_SERVICE, vs("a"))
    kube_env.fail_next(2, status=500, verb="watch")
    events = await collect(kube_client, None, 1)
    assert events[0].object["metadata"]["name"] == "a"
    assert len(kube_sleeps) == 2 and kube_client.requests_by_verb["watch"] == 3
