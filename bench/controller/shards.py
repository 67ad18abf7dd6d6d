"""Sharded controllers at scale (#19 item 5): N policies split over S shard processes, each ticking only its own.

The parent starts the local control plane (kube-apiserver and etcd from hack/setup.sh, as
bench/controller/run.py does), creates N policies in one namespace, then starts S worker processes at once,
one per shard (`--shard I/S`): each takes the policies whose `shadowctl.controller.shard.shard_of` is I (the
function `shadowctl run --shard` uses) and runs bench/controller/run.py's `measure` on them: rounds of one tick
per policy, staggered over the interval as the manager does, against the same API server. Each worker reports
its tick p50/p99 and its own peak RSS (the worker never creates policies, so this is the shard's controller
alone, without the population step that run.py's figure includes).

Run: nice -n 10 .venv/bin/python bench/controller/shards.py --policies 2000 --shards 2 [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def worker(kubeconfig: Path, policies: int, shard: Shard, rounds: int, spread_s: float) -> dict[str, Any]:
    names = [n for n in (policy_name(i) for i in range(policies)) if shard.owns(NAMESPACE, n)]
    kube = await KubeClient.connect(kubeconfig=kubeconfig)
    try:
        row = await measure(kube, NAMESPACE, names, rounds, spread_s)
    finally:
        await kube.close()
    return {"shard": str(shard), "policies_total": policies, **row}


async def parent(policies: int, shards: int, rounds: int, spread_s: float, out: Path) -> list[dict[str, Any]]:
    cluster = LocalCluster(knative=False)
    await asyncio.to_thread(cluster.start)
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            config = cluster.plane.write_kubeconfig(tmp / "kc", namespace=NAMESPACE)
            kube = await KubeClient.connect(kubeconfig=config)
            t0 = time.perf_counter()
            try:
                await populate(kube, NAMESPACE, policies, concurrency=16)
            finally:
                await kube.close()
            created_s = time.perf_counter() - t0
            print(f"created {policies} policies in {created_s:.0f}s", flush=True)
            procs = []
            for i in range(shards):
                row_file = tmp / f"shard-{i}.json"
                procs.append((row_file, await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--worker", f"{i}/{shards}", "--kubeconfig", str(config),
                    "--policies", str(policies), "--rounds", str(rounds), "--spread", str(spread_s),
                    "--out", str(row_file))))
            rows = []
            for i, (row_file, proc) in enumerate(procs):
                if await proc.wait() != 0:
                    raise SystemExit(f"shard worker {i}/{shards} failed (exit {proc.returncode})")
                rows.append({**json.loads(row_file.read_text()), "api_server": str(cluster.plane.versions),
                             "populate_s": round(created_s, 1)})
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
    parser.add_argument("--worker", metavar="I/N", help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        row = asyncio.run(worker(args.kubeconfig, args.policies, Shard.parse(args.worker), args.rounds, args.spread))
        args.out.write_text(json.dumps(row) + "\n")
    else:
        result = asyncio.run(parent(args.policies, args.shards, args.rounds, args.spread, args.out))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        for r in result:
            print(json.dumps(r))
        print(f"wrote {args.out}")
