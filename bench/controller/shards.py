"""Sharded controllers at scale (#19 item 5): N policies split over S shard processes, each ticking only its own.

The parent starts the local control plane (kube-apiserver and etcd from hack/setup.sh, as
bench/controller/run.py does), creates N policies in one namespace, then starts S worker processes at once,
one per shard (`--shard I/S`): each takes the policies whose `shadowctl.controller.shard.shard_of` is I (the
function `shadowctl run --shard` uses) and runs bench/controller/run.py's `measure` on them: rounds of one tick
per policy, staggered over the interval as the manager does, against the same API server. Each worker reports
its tick p50/p99 and its own peak RSS (the worker never creates policies, so this is the shard's controller
alone, without the population step that run.py's figure includes).

Two ways, to compare them side by side on the same control plane (`--ways`):

* `filtered` (what `shadowctl run --shard` does now): the policies carry their bucket label
  (`shadowctl.dev/shard-bucket`, as a sharded controller leaves them once it has seen them), each shard lists with its
  buckets' selector so that the API server sends it only its share, and the reconciler writes figures that alone
  changed at most every max(30 s, 3 intervals) (controller/writes.py);
* `all` (before): each shard lists every policy and keeps its own, and every look's figures are written.

Each way runs on its own namespace of N policies, one after the other; run with `--rounds 7` or more to see the
refresh period's steady state (writes are made at rounds 1, 4, 7, ... of a 10 s interval).

Run: nice -n 10 .venv/bin/python bench/controller/shards.py --policies 2000 --shards 2 [--rounds 7] [--ways filtered all]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import measure, policy_name, populate  # noqa: E402  (the bench next to this one)

from shadowctl.controller.shard import Shard  # noqa: E402
from shadowctl.kube import KubeClient  # noqa: E402
from shadowctl.sim.cluster import LocalCluster  # noqa: E402

NAMESPACE = "shards"


WAYS = {"filtered": (True, None), "all": (False, 0.0)}
"""way: (labels and the shard's selector, the reconciler's status_refresh: None its default, 0 every look)"""


async def worker(kubeconfig: Path, namespace: str, policies: int, shard: Shard, rounds: int, spread_s: float,
                 way: str) -> dict[str, Any]:
    names = [n for n in (policy_name(i) for i in range(policies)) if shard.owns(namespace, n)]
    filtered, refresh = WAYS[way]
    load_before = os.getloadavg()
    kube = await KubeClient.connect(kubeconfig=kubeconfig)
    try:
        row = await measure(kube, namespace, names, rounds, spread_s,
                            label_selector=shard.selector() if filtered else None, status_refresh=refresh)
    finally:
        await kube.close()
    return {"way": way, "shard": str(shard), "policies_total": policies, **row,
            "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}


async def one_way(cluster: LocalCluster, tmp: Path, way: str, policies: int, shards: int, rounds: int,
                  spread_s: float) -> list[dict[str, Any]]:
    namespace = f"{NAMESPACE}-{way}"
    config = cluster.plane.write_kubeconfig(tmp / f"kc-{way}", namespace=namespace)
    kube = await KubeClient.connect(kubeconfig=config)
    t0 = time.perf_counter()
    try:
        await populate(kube, namespace, policies, concurrency=16, labelled=WAYS[way][0])
    finally:
        await kube.close()
    created_s = time.perf_counter() - t0
    print(f"{way}: created {policies} policies in {created_s:.0f}s", flush=True)
    procs = []
    for i in range(shards):
        row_file = tmp / f"shard-{way}-{i}.json"
        procs.append((row_file, await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--worker", f"{i}/{shards}", "--kubeconfig", str(config),
            "--namespace", namespace, "--way", way, "--policies", str(policies), "--rounds", str(rounds),
            "--spread", str(spread_s), "--out", str(row_file))))
    rows = []
    for i, (row_file, proc) in enumerate(procs):
        if await proc.wait() != 0:
            raise SystemExit(f"shard worker {i}/{shards} failed (exit {proc.returncode})")
        rows.append({**json.loads(row_file.read_text()), "api_server": str(cluster.plane.versions),
                     "populate_s": round(created_s, 1)})
    for row in rows:
        print(json.dumps({k: row[k] for k in ("way", "shard", "policies", "tick_p50_s", "tick_p99_s", "tick_p99_per_round_s", "round_s",
                                              "api_writes_per_tick", "max_rss_mib", "cpu_s", "listed_per_round",
                                              "load_average_1m")}), flush=True)
    return rows


async def parent(policies: int, shards: int, rounds: int, spread_s: float, ways: list[str]) -> list[dict[str, Any]]:
    cluster = LocalCluster(knative=False)
    await asyncio.to_thread(cluster.start)
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            rows = []
            for way in ways:
                rows += await one_way(cluster, Path(tmp_name), way, policies, shards, rounds, spread_s)
    finally:
        await asyncio.to_thread(cluster.stop)
    return rows


if __name__ == "__main__":
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--policies", type=int, default=2000, help="policies in all, over every shard")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of ticks per shard (the first is not measured)")
    parser.add_argument("--spread", type=float, default=9.0, help="seconds over which a round's ticks start")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "controller-shards.json")
    parser.add_argument("--ways", nargs="+", choices=sorted(WAYS), default=["filtered"],
                        help="filtered: labels, each shard's selector and the status refresh period (now); all: "
                             "every shard lists every policy and every look's figures are written (before)")
    parser.add_argument("--worker", metavar="I/N", help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    parser.add_argument("--way", choices=sorted(WAYS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        row = asyncio.run(worker(args.kubeconfig, args.namespace, args.policies, Shard.parse(args.worker),
                                 args.rounds, args.spread, args.way))
        args.out.write_text(json.dumps(row) + "\n")
    else:
        result = asyncio.run(parent(args.policies, args.shards, args.rounds, args.spread, args.ways))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        for r in result:
            print(json.dumps(r))
        print(f"wrote {args.out}")
