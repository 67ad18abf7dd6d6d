"""Lease-based leader election on KubeClient against the real kube-apiserver (short real durations)."""

from __future__ import annotations

import asyncio

import pytest
from conftest_kube import KubeEnv

from shadowctl.kube import LEASE, KubeClient, LeaderElector


def elector(client: KubeClient, identity: str, *, release: bool = True) -> LeaderElector:
    return LeaderElector(
        client,
        name="shadowctl",
        namespace="default",
        identity=identity,
        lease_duration=0.6,
        renew_deadline=0.4,
        retry_period=0.05,
        release_on_cancel=release,
    )


async def wait_for(cond: asyncio.Event) -> None:
    async with asyncio.timeout(5):
        await cond.wait()


async def test_one_leader_then_handover_when_leader_stops_renewing(
    kube_env: KubeEnv, kube_client: KubeClient
) -> None:
    async with KubeClient.for_url(kube_env.url, token=kube_env.token) as other:
        a, b = elector(kube_client, "a", release=False), elector(other, "b")
        started = {"a": asyncio.Event(), "b": asyncio.Event()}

        def on_start(name: str):  # type: ignore[no-untyped-def]
            async def run() -> None:
                started[name].set()
                await asyncio.Event().wait()

            return run

        task_a = asyncio.create_task(a.run(on_start("a")))
        await wait_for(started["a"])
        assert not await b.try_acquire_or_renew()  # a holds an unexpired lease
        assert a.is_leader and not b.is_leader and b.observed_holder == "a"
        task_b = asyncio.create_task(b.run(on_start("b")))
        task_a.cancel()  # a crashes: no release, the lease must expire
        with pytest.raises(asyncio.CancelledError):
            await task_a
        await wait_for(started["b"])
        lease = kube_env.get_object(LEASE, "default", "shadowctl")
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
        task_b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task_b
        lease = kube_env.get_object(LEASE, "default", "shadowctl")
        assert lease is not None and lease["spec"]["holderIdentity"] == ""  # released on a clean stop


async def test_racing_candidates_only_one_wins(kube_client: KubeClient) -> None:
    contenders = [elector(kube_client, f"c{i}") for i in range(4)]
    results = await asyncio.gather(*(c.try_acquire_or_renew() for c in contenders))
    assert sum(results) == 1
    results = await asyncio.gather(*(c.try_acquire_or_renew() for c in contenders))
    assert sum(results) == 1  # the leader renews, the others see an unexpired lease


async def test_leader_that_cannot_renew_steps_down(kube_env: KubeEnv, kube_client: KubeClient) -> None:
    """The lost permission is injected at the boundary: the fault proxy answers every Lease call with 403."""
    a = elector(kube_client, "a")
    started, stopped = asyncio.Event(), asyncio.Event()

    async def on_started() -> None:
        started.set()
        await asyncio.Event().wait()

    async def on_stopped() -> None:
        stopped.set()

    task = asyncio.create_task(a.run(on_started, on_stopped))
    await wait_for(started)
    kube_env.fail_next(10_000, status=403, path="/leases/")
    await wait_for(stopped)
    await asyncio.wait_for(task, 5)
    assert not a.is_leader


def test_durations_must_be_ordered(kube_client: KubeClient) -> None:
    with pytest.raises(ValueError, match="retry_period"):
        LeaderElector(
            kube_client, name="x", namespace="d", identity="i", lease_duration=1, renew_deadline=2, retry_period=0.1
        )
