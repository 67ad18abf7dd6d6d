"""Controller scale benchmark: N ShadowPolicies on one controller, against a real kube-apiserver.

Each round ticks every policy once, concurrently, as the manager does at an interval boundary
(all policies share the interval, so their ticks meet and their metric requests are batched). The
metric source is a stub at the port that counts the queries it would send: one per distinct metric
template per batch, which is what the Prometheus adapter sends (bench/prometheus_batching.py
measures the real server). Reported per N: tick duration p50/p99 (wall time of one policy's tick
while all N run), round duration, API requests per tick, metric queries per round, RSS.


The API server is the local control plane of shadowctl.sim.cluster (kube-apiserver and etcd from
hack/setup.sh, started once for the whole run; each run gets a namespace of its own), reached with the
admin's client certificate. Each size is run two ways: all ticks at the boundary, and with the ticks
staggered over the interval as the manager runs them (`Manager.offset`: 1 s to 9 s after the
boundary of a 10 s interval). In every mode the look is fetched and judged for all rollouts at the
boundary (`Manager.scheduler.run(end, Manager.due(end))`, as the manager does there); ticks read it.
The same harness runs an older tree (`PYTHONPATH=<tree> python bench/controller/run.py`, see
bench/controller/compare.py), which did this with `Analyzer.prepare` and a planner on the source.
The stub's counts grow with the window (`--data growing`, as Prometheus' increase does), so every
tick's evidence changes and every tick writes `.status`; `--data static` repeats the same counts.

Run: .venv/bin/python bench/controller/run.py [--sizes 100 1000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from shadowctl.controller.analysis import Analyzer, BatchingSource
from shadowctl.controller.manager import Manager
from shadowctl.controller.reconciler import Reconciler
from shadowctl.controller.shard import BUCKET_LABEL, bucket_of
from shadowctl.kube import NAMESPACE, SHADOW_POLICY, VIRTUAL_SERVICE, KubeClient, ResourceRef
from shadowctl.routers.factory import router_for
from shadowctl.sim.cluster import LocalCluster
from shadowctl.sources.base import (
    HistogramWindow,
    MetricKey,
    SourceUnavailable,
    VariantPair,
    WindowRequest,
    WindowResult,
)
from shadowctl.sources.prometheus import build_requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from fake_clock import FakeClock  # noqa: E402  (a test helper: the bench moves time itself)

LE = (*(round(0.05 * 1.05**i, 6) for i in range(100)), math.inf)

POLICY = """
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {name: NAME, namespace: NS}
spec:
  target:
    istio:
      virtualService: NAME
      route: chat-default
      primary: {host: chat.llm.svc.cluster.local, subset: v1, port: 8000}
      candidate: {host: chat.llm.svc.cluster.local, subset: v2, port: 8000}
  shadow: {mirrorPercent: 20, minDuration: 10m, maxDuration: 1h, minPairs: 0}
  canary: {steps: [10, 50], stepDuration: 10m}
  analysis:
    interval: 10s
    variants:
      primary: {pod: "NAME-v1-.*"}
      candidate: {pod: "NAME-v2-.*"}
    metrics:
      - {name: ttft-p95, preset: vllm-ttft, statistic: p95, margin: 10%}
      - {name: tpot-p50, preset: vllm-tpot, statistic: p50, margin: 10%}
  progressDeadline: 3h
"""


class StubSource:
    """Answers every request with histograms and counts the queries a batch costs.

    `growing` (the default): the counts grow with the window, as Prometheus' `increase(...[since])` does,
    so the evidence changes at every look and every tick writes `.status`; `static`: the same counts at
    every look (after the first look with evidence nothing changes, so no tick writes).
    """

    plan = staticmethod(build_requests)  # requests as the Prometheus source makes them

    def __init__(self, growing: bool = True) -> None:
        self.calls = 0
        self.queries = 0
        self.growing = growing

    async def fetch(self, request: WindowRequest) -> WindowResult:
        return (await self.fetch_many([request]))[request.key]

    async def fetch_many(self, requests: Sequence[WindowRequest]) -> dict[MetricKey, WindowResult]:
        self.calls += 1
        self.queries += len({(r.template, r.kind) for r in requests})
        out: dict[MetricKey, WindowResult] = {}
        for r in requests:
            scale = (r.end - r.start).total_seconds() / 10.0 if self.growing else 1.0
            hist = HistogramWindow(LE, tuple(float(i * 10) * scale for i in range(len(LE))))
            out[r.key] = VariantPair(hist, hist)
        return out

    async def check(self) -> SourceUnavailable | None:
        return None

    async def aclose(self) -> None:
        return None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def policy_name(i: int) -> str:
    return f"p{i:04d}"


async def populate(kube: KubeClient, namespace: str, n: int, concurrency: int = 1, labelled: bool = False) -> None:
    """Create `namespace` and `n` policies in it, each with its VirtualService (`concurrency` at a time);
    `labelled`: each with its shard bucket label, as a sharded controller leaves them once it has seen them."""
    vs = next(d for d in yaml.safe_load_all((REPO / "istio" / "chat.yaml").read_text()) if d["kind"] == "VirtualService")
    # A real API server stores objects only in a Namespace that exists.
    await kube.create(NAMESPACE, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            name = policy_name(i)
            obj = copy.deepcopy(vs)
            obj["metadata"] = {"name": name, "namespace": namespace}
            await kube.create(VIRTUAL_SERVICE, obj, namespace=namespace)
            policy = yaml.safe_load(POLICY.replace("NAME", name).replace("NS", namespace))
            if labelled:
                policy["metadata"]["labels"] = {BUCKET_LABEL: str(bucket_of(namespace, name))}
            await kube.create(SHADOW_POLICY, policy, namespace=namespace)

    if concurrency == 1:
        for i in range(n):
            await one(i)
    else:
        await asyncio.gather(*(one(i) for i in range(n)))


async def bench(cluster: LocalCluster, namespace: str, n: int, rounds: int, spread_s: float,
                growing: bool = True) -> dict[str, Any]:
    """Tick `n` policies (in `namespace`, created here) `rounds` times; ticks all at once at the boundary
    (`spread_s` 0) or staggered over `spread_s` seconds."""
    with tempfile.TemporaryDirectory() as tmp_name:
        config = cluster.plane.write_kubeconfig(Path(tmp_name) / "kc", namespace=namespace)
        kube = await KubeClient.connect(kubeconfig=config)
        try:
            await populate(kube, namespace, n)
            row = await measure(kube, namespace, [policy_name(i) for i in range(n)], rounds, spread_s, growing)
            return {**row, "api_server": str(cluster.plane.versions)}
        finally:
            await kube.close()


async def measure(kube: KubeClient, namespace: str, names: Sequence[str], rounds: int, spread_s: float,
                  growing: bool = True, label_selector: str | None = None,
                  status_refresh: float | None = None) -> dict[str, Any]:
    """Tick the policies `names` of `namespace` (created before) `rounds` times, as one controller (or one shard
    of them: bench/controller/shards.py) does; what the per-round list (the watch's stand-in) returns beyond
    them is decoded but not kept or ticked. `label_selector`: the list's (a shard's buckets: the API server
    filters). `status_refresh`: the reconciler's (None: its default; 0 writes every look's figures)."""
    n = len(names)
    mine = set(names)
    stub = StubSource(growing)
    source = BatchingSource(stub)
    clock = FakeClock()
    analyzer = Analyzer(source)
    refresh: dict[str, Any] = {} if status_refresh is None else {"status_refresh": status_refresh}
    reconciler = Reconciler(kube, router_for, analyzer, clock, **refresh)
    refs = [ResourceRef(SHADOW_POLICY, name, namespace) for name in names]
    manager = Manager(kube, reconciler, clock)
    if hasattr(source, "planner"):  # the older tree: the planner gives the batching source the whole look
        source.planner = manager.plan
    # The manager's own offsets (a hash of the key, uniform in [lead, spread) x the 10 s interval, the
    # lead left to the look's pass), scaled so that the last tick starts `spread_s` after the boundary.
    offsets = {ref.name: manager.offset(f"{namespace}/{ref.name}", 1.0) / manager.spread * spread_s for ref in refs}
    ticks: list[float] = []
    p99_per_round: list[float] = []
    round_s: list[float] = []
    requests_per_round: list[int] = []
    writes_per_round: list[int] = []
    queries_per_round: list[int] = []
    pauses: list[float] = []  # full (generation 2) collections during the measured rounds, seconds
    started: list[float] = []

    def probe(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            pauses.append(time.perf_counter() - started[0])

    for r in range(rounds):
        if r == 1:
            gc.callbacks.append(probe)
        clock.advance(10.0)
        before_req, before_q, before_w = kube.request_count, stub.queries, kube.write_count
        # The manager ticks from its watch cache; a list stands in for it here (not counted).
        listed = await kube.list(SHADOW_POLICY, namespace, label_selector=label_selector)
        listed_objects = len(listed.items)
        cache = {obj["metadata"]["name"]: obj for obj in listed.items if obj["metadata"]["name"] in mine}
        del listed
        manager.last_objects = {f"{namespace}/{name}": obj for name, obj in cache.items()}
        listed_requests = kube.request_count - before_req

        async def timed(ref: ResourceRef, cache: dict[str, Any] = cache, start: float = 0.0) -> float:
            await asyncio.sleep(start)  # staggered: each policy at its own offset after the boundary
            t0 = time.perf_counter()
            await reconciler.tick(ref, cache[ref.name])
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        # As the manager does at each boundary: fetch and judge the whole look in one pass.
        end = clock.now()
        prepare = asyncio.create_task(
            manager.scheduler.run(end, manager.due(end)) if hasattr(manager, "scheduler")
            else analyzer.prepare(end))
        durations = await asyncio.gather(*(timed(ref, start=offsets[ref.name] if spread_s else 0.0)
                                           for ref in refs))
        await prepare
        round_s.append(time.perf_counter() - t0)
        if r > 0:  # the first round starts every rollout (route writes); later rounds are steady state
            ticks.extend(durations)
            p99_per_round.append(round(_pct(list(durations), 0.99), 3))
            requests_per_round.append(kube.request_count - before_req - listed_requests)
            writes_per_round.append(kube.write_count - before_w)
            queries_per_round.append(stub.queries - before_q)
    gc.callbacks.remove(probe)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss_mib = usage.ru_maxrss / 1024
    return {
        "policies": n,
        "ticks": f"staggered over {spread_s:g}s" if spread_s else "all at the boundary",
        "rounds_measured": rounds - 1,
        "tick_p50_s": round(statistics.median(ticks), 4),
        "tick_p99_s": round(_pct(ticks, 0.99), 4),
        "tick_p99_per_round_s": p99_per_round,
        "round_s": [round(x, 3) for x in round_s[1:]],
        "data": "growing" if growing else "static",
        "api_requests_per_tick": round(statistics.mean(requests_per_round) / n, 2),
        "api_writes_per_tick": round(statistics.mean(writes_per_round) / n, 2),
        "metric_queries_per_round": queries_per_round,
        "batches_per_round": source.batches / rounds,
        "judge_passes_per_round": getattr(analyzer, "looks_judged", 0) / rounds,
        "ticks_using_the_shared_look": getattr(analyzer, "shared_verdicts", getattr(analyzer, "rows_used", 0)),
        "tree": str(Path(sys.modules["shadowctl"].__file__ or "").parent.parent),
        "max_rss_mib": round(rss_mib, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "listed_per_round": listed_objects,
        "status_refresh": "default" if status_refresh is None else status_refresh,
        "full_collections": len(pauses),
        "full_collection_max_s": round(max(pauses, default=0.0), 4),
    }


async def main(sizes: list[int], rounds: int, spread_s: float, growing: bool,
               modes: Sequence[str] = ("boundary", "staggered")) -> list[dict[str, Any]]:
    cluster = LocalCluster(knative=False)
    await asyncio.to_thread(cluster.start)
    try:
        # A namespace per run: a namespace cannot be emptied by deleting it (no namespace controller runs).
        spreads = [s for mode, s in (("boundary", 0.0), ("staggered", spread_s)) if mode in modes]
        runs = [(spread, n) for spread in spreads for n in sizes]
        return [await bench(cluster, f"bench-{i}", n, rounds, spread, growing) for i, (spread, n) in enumerate(runs)]
    finally:
        await asyncio.to_thread(cluster.stop)


if __name__ == "__main__":
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--spread", type=float, default=9.0,
                        help="seconds over which staggered ticks start (the manager's default: 0.9 of the 10 s interval)")
    parser.add_argument("--data", choices=["growing", "static"], default="growing",
                        help="growing: counts grow with the window as in Prometheus (every tick writes .status); "
                             "static: the same counts every look (no status writes after the first look)")
    parser.add_argument("--modes", nargs="+", choices=["boundary", "staggered"], default=["boundary", "staggered"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "controller.json")
    parser.add_argument("--status-schema", choices=["model", "free"], default="model",
                        help="model: the CRD's status schema generated from PolicyStatus (what deploy/crd.yaml has); "
                             "free: an unchecked status (preserve-unknown-fields), to measure what the API "
                             "server's validation of each status write costs")
    args = parser.parse_args()
    if args.status_schema == "free":
        import shadowctl.policy.crd

        def unchecked() -> dict[str, Any]:
            return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}

        shadowctl.policy.crd.status_openapi_schema = unchecked  # the CRD the local cluster installs
    results = asyncio.run(main(args.sizes, args.rounds, args.spread, args.data == "growing", args.modes))
    for row in results:
        row["status_schema"] = args.status_schema
    out = args.out
    out.write_text(json.dumps(results, indent=2) + "\n")
    for row in results:
        print(json.dumps(row))
    print(f"wrote {out}")
