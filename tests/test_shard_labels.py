"""Shards filtered by the API server: each shard lists and watches only the policies labelled with its buckets
(``shadowctl.dev/shard-bucket``), labels the policies it owns that have no label yet, and a change of N needs
no relabelling.

Against the real local API server (fixtures in conftest_kube.py): real managers (controller/manager.py), each
with its own client, their reconcilers ticking with a fake clock and the metric source double of
controller_helpers (a boundary; which policies a manager runs is all these tests look at). What each manager
was sent is recorded at its client's list and watch (the API server's answers), so a policy of another shard
reaching a manager would show.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest_kube import KubeEnv, eventually
from controller_helpers import FakeMetricSource, load_vs, policy_doc
from fake_clock import FakeClock

from shadowctl.aio import cancel_and_wait
from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.manager import Manager
from shadowctl.controller.reconciler import Reconciler
from shadowctl.controller.shard import BUCKET_LABEL, BUCKETS, Shard, bucket_of, bucket_table, shard_of
from shadowctl.kube import SHADOW_POLICY, VIRTUAL_SERVICE, KubeClient
from shadowctl.routers.factory import router_for

NS = "llm"


def test_the_buckets_partition_and_the_selectors() -> None:
    for n in (2, 3, 10):
        shards = [Shard(i, n) for i in range(n)]
        owned = [set(s.buckets()) for s in shards]
        assert set().union(*owned) == set(range(BUCKETS)) and sum(map(len, owned)) == BUCKETS
        assert all(shard_of(NS, f"p{i}", n) == bucket_table(n)[bucket_of(NS, f"p{i}")] for i in range(100))
    assert Shard(0, 1).selector("team=a") == "team=a" and Shard(0, 1).selector() is None
    selector = Shard(1, 2).selector("team=a")
    assert selector is not None and selector.startswith(f"team=a,{BUCKET_LABEL} in (")
    assert Shard(1, 2).unlabelled() == f"!{BUCKET_LABEL}"
    with pytest.raises(ValueError, match="at most 1024 shards"):
        Shard.parse("0/1025")


def _names(n: int, per_shard: int, skip: set[str] = frozenset()) -> dict[int, list[str]]:  # type: ignore[assignment]
    out: dict[int, list[str]] = {i: [] for i in range(n)}
    for i in range(1000):
        name = f"chat-{i:03d}"
        if name not in skip and len(out[shard_of(NS, name, n)]) < per_shard:
            out[shard_of(NS, name, n)].append(name)
    return out


class Run:
    """A manager of one shard on its own client, running; `seen`: the policies its list and watch delivered."""

    def __init__(self, kube: KubeClient, shard: Shard) -> None:
        self.kube = kube
        self.seen: set[str] = set()
        source = FakeMetricSource()
        self.manager = Manager(kube, Reconciler(kube, router_for, Analyzer(source), FakeClock()), FakeClock(),
                               namespace=NS, shard=shard)
        self._record()
        self.task = asyncio.create_task(self.manager.run())

    def _record(self) -> None:
        original_list, original_watch = self.kube.list, self.kube.watch
        seen = self.seen

        async def listed(*args: Any, **kwargs: Any) -> Any:
            answer = await original_list(*args, **kwargs)
            if args[0] == SHADOW_POLICY and "!" not in str(kwargs.get("label_selector")):  # not the unlabelled
                seen.update(o["metadata"]["name"] for o in answer.items)
            return answer

        async def watched(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            async for event in original_watch(*args, **kwargs):
                if args[0] == SHADOW_POLICY and "!" not in str(kwargs.get("label_selector")):
                    seen.add(event.object["metadata"]["name"])
                yield event

        self.kube.list = listed  # type: ignore[method-assign]
        self.kube.watch = watched  # type: ignore[method-assign]

    def running(self) -> set[str]:
        return {key.split("/", 1)[1] for key in self.manager.workers}

    async def stop(self) -> None:
        await cancel_and_wait(self.task)


def _create(env: KubeEnv, name: str, labels: dict[str, str] | None = None) -> None:
    vs = load_vs()
    vs["metadata"] = {"name": name, "namespace": NS}
    env.put_object(VIRTUAL_SERVICE, vs)
    doc = copy.deepcopy(policy_doc())
    doc["metadata"] = {"name": name, "namespace": NS, **({"labels": labels} if labels else {})}
    env.put_object(SHADOW_POLICY, doc)


def _label(env: KubeEnv, name: str) -> str | None:
    obj = env.get_object(SHADOW_POLICY, NS, name)
    assert obj is not None
    return ((obj.get("metadata") or {}).get("labels") or {}).get(BUCKET_LABEL)


async def _runs(env: KubeEnv, tmp_path: Path, n: int, tag: str) -> list[Run]:
    runs = []
    for i in range(n):
        kube = await KubeClient.connect(kubeconfig=env.kubeconfig(tmp_path / f"kc-{tag}-{i}", NS))
        runs.append(Run(kube, Shard(i, n)))
    return runs


async def _stop(runs: list[Run]) -> None:
    for run in runs:
        await run.stop()
        await run.kube.close()


def _runs_exactly(run: Run, names: set[str]) -> Callable[[], bool]:
    return lambda: run.running() == names


async def _until(check: Callable[[], bool], what: str) -> None:
    def named() -> bool:
        assert check(), what
        return True
    await eventually(named, timeout=20.0)


async def test_each_shard_gets_only_its_policies_labels_new_ones_and_n_changes_without_relabelling(
        kube_env: KubeEnv, tmp_path: Path) -> None:
    two = _names(2, 3)
    for names in two.values():
        for name in names:
            _create(kube_env, name)  # no label: as kubectl apply creates them
    runs = await _runs(kube_env, tmp_path, 2, "two")
    try:
        # Each shard labels the policies it owns, then runs exactly those, and was sent nothing else.
        for i, run in enumerate(runs):
            await _until(_runs_exactly(run, set(two[i])), f"shard {i}/2 runs its policies")
        for names in two.values():
            assert all(_label(kube_env, name) == str(bucket_of(NS, name)) for name in names)
        assert sum(run.manager.labelled for run in runs) == 6
        for i, run in enumerate(runs):
            assert run.seen <= set(two[i]), (i, run.seen)

        # A policy created later without the label: its owner labels it and runs it.
        late = _names(2, 1, skip={n for names in two.values() for n in names})
        _create(kube_env, late[1][0])
        await _until(lambda: late[1][0] in runs[1].running(), "the late policy runs on shard 1/2")
        assert late[1][0] not in runs[0].seen

        # A label changed by hand to a bucket of the other shard: put back by the shard that was sent it; the
        # owner keeps running the policy (it left its selection for a moment, it was not deleted).
        moved = two[0][0]
        other = next(b for b in range(BUCKETS) if bucket_table(2)[b] == 1)
        kube_env.patch(SHADOW_POLICY, NS, moved, {"metadata": {"labels": {BUCKET_LABEL: str(other)}}})
        await _until(lambda: _label(kube_env, moved) == str(bucket_of(NS, moved)), "the label is put back")
        assert moved in runs[0].running() and moved not in runs[1].running()

        # A real deletion still stops the worker.
        kube_env.delete_object(SHADOW_POLICY, NS, two[1][0])
        await _until(lambda: two[1][0] not in runs[1].running(), "the deleted policy's worker stops")
    finally:
        await _stop(runs)

    # Three shards instead of two: the labels stay as they are, each new shard runs its share by the same
    # function, and none labels anything.
    everything = {_n for names in two.values() for _n in names if _n != two[1][0]} | {late[1][0]}
    runs = await _runs(kube_env, tmp_path, 3, "three")
    try:
        for i, run in enumerate(runs):
            want = {name for name in everything if shard_of(NS, name, 3) == i}
            await _until(_runs_exactly(run, want), f"shard {i}/3 runs its policies")
            assert run.seen <= want, (i, run.seen)
        assert sum(run.manager.labelled for run in runs) == 0
    finally:
        await _stop(runs)
