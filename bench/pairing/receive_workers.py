"""Pairing through Mosquitto with 1 and 2 worker processes on partitions (#19: events/s per worker process).

Run by hand (from the repository root):

    nice -n 10 .venv/bin/python bench/pairing/receive_workers.py [--pairs 10000] [--rounds 5]

What ``bench/pairing/workers.py`` measures without the broker, measured here with it: each worker process runs
one ``MqttOutputSource`` (the 8 lexical comparators) subscribed to its partitions of 2, as ``shadowctl run
--pairing-workers`` starts them; a separate publisher process writes the events of ``--pairs`` primary/candidate
pairs, each on its request's partition (``<topic>/<k>``, as taps with ``--partitions 2`` publish), as fast as
Mosquitto takes them (the raw QoS 1 publisher of ``bench/tap/events.py``). Each round runs, side by side, one
worker subscribed to both partitions, then two workers with one partition each.

Per run: events per second of wall time from the first event any worker received to the last pair any made,
and each worker's own CPU time over the same span (``time.process_time`` in the worker, which excludes steal
and time spent waiting for a core). On this 2-core machine the broker, the publisher and the workers share
the cores, so the wall-clock ratio of two workers to one measures the scheduler, not the work; CPU per event
per worker is what this bench can say (equal with one and two workers: the work spreads). Results go to
bench/results/pairing_receive_workers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shadowctl.compare.comparators import build_comparators
from shadowctl.compare.events import Variant
from shadowctl.policy.model import Comparator, ComparatorName
from shadowctl.sim.cluster import free_port
from shadowctl.sim.mosquitto import start_broker
from shadowctl.sources.outputs import MqttOutputSource

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "pairing"))
sys.path.insert(0, str(ROOT / "bench" / "tap"))
from events import RAW_PUBLISHER  # type: ignore[import-not-found]  # noqa: E402  (bench/tap/events.py)
from workers import LEXICAL, machine, payloads, summarize  # noqa: E402

TOPIC = "shadowctl/outputs/b/chat"


def events_file(path: Path, pairs: int) -> list[int]:
    """Write `topic payload` lines (partition in the topic); return the pairs per partition."""
    per = [0, 0]
    with path.open("wb") as f:
        for k, payload in payloads(pairs):
            variant = Variant.candidate.value if b'"variant":"candidate"' in payload else Variant.primary.value
            per[k] += variant == Variant.candidate.value
            f.write(f"{TOPIC}/{variant}/{k} ".encode() + payload + b"\n")
    return per


async def _pair(port: int, mine: Sequence[int] | None, pairs: int, ready: Any) -> dict[str, float]:
    comparators = build_comparators([Comparator(name=ComparatorName(n), threshold=0.5) for n in LEXICAL])
    source = MqttOutputSource(f"mqtt://127.0.0.1:{port}", f"{TOPIC}/+", comparators, pair_ttl_s=600,
                              expect_baseline=False, partitions=2, mine=mine)
    first: list[float] = []
    done = asyncio.Event()
    original = source.ingest

    def ingest(event: Any) -> None:
        if not first:
            first.extend((time.perf_counter(), time.process_time()))
        original(event)
        if source.pairer.stats.paired[Variant.candidate] >= pairs:
            done.set()

    source.ingest = ingest  # type: ignore[method-assign]
    task = asyncio.create_task(source.run())
    await asyncio.wait_for(source.subscribed.wait(), 10)
    ready.set()
    await done.wait()
    end, cpu = time.perf_counter(), time.process_time() - first[1]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return {"start": first[0], "end": end, "cpu_s": cpu, "events": 2 * pairs}


def _worker(port: int, mine: Sequence[int] | None, pairs: int, ready: Any, results: Any) -> None:
    os.setsid()  # its own scheduling group, as a separate pod would be (see bench/pairing/workers.py)
    results.put(asyncio.run(_pair(port, mine, pairs, ready)))


def run(port: int, path: Path, groups: list[tuple[Sequence[int] | None, int]]) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    readies = [ctx.Event() for _ in groups]
    procs = [ctx.Process(target=_worker, args=(port, mine, n, ready, results))
             for (mine, n), ready in zip(groups, readies, strict=True)]
    for p in procs:
        p.start()
    for ready in readies:
        if not ready.wait(20):
            raise SystemExit("a worker did not subscribe")
    busy0, steal0 = machine()
    t0 = time.perf_counter()
    if subprocess.run([sys.executable, "-c", RAW_PUBLISHER, str(port), str(path)], check=False).returncode:
        raise SystemExit("the publisher failed")
    done = [results.get(timeout=300) for _ in procs]
    wall = time.perf_counter() - t0
    busy1, steal1 = machine()
    for p in procs:
        p.join()
    return summarize(done, wall, busy1 - busy0, steal1 - steal0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000, help="primary/candidate pairs per run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (1 worker then 2 workers each)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pairing_receive_workers.json",
                        help="where the results go (JSON)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    port = free_port()
    (tmp / "m.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
                                "max_inflight_messages 20\n")
    broker = start_broker(tmp / "m.conf", tmp / "m.log", "127.0.0.1", port)
    rows = []
    try:
        per = events_file(tmp / "events.txt", args.pairs)
        for i in range(args.rounds):
            load = os.getloadavg()[0]
            one = run(port, tmp / "events.txt", [(None, args.pairs)])
            two = run(port, tmp / "events.txt", [([0], per[0]), ([1], per[1])])
            row = {"round": i, "load_avg_1m": round(load, 2), "one": one, "two": two,
                   "ratio": round(two["events_per_s"] / one["events_per_s"], 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        broker.terminate()
        broker.wait(timeout=10)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    out = args.out.resolve()
    summary = {
        "what": "pairing through Mosquitto (receive + parse + pair + 8 lexical comparators), 1 worker process "
                "vs 2 on disjoint partitions of 2",
        "command": f"nice -n 10 .venv/bin/python bench/pairing/receive_workers.py --pairs {args.pairs} "
                   f"--rounds {args.rounds} --out {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}",
        "machine": {"cpus": os.cpu_count(), "nice": os.nice(0)},
        "rounds": rows,
        "median_ratio": median([r["ratio"] for r in rows]),
        "median_us_per_event_cpu": {
            "one": median([r["one"]["us_per_event_cpu_each"][0] for r in rows]),
            "two": median([x for r in rows for x in r["two"]["us_per_event_cpu_each"]]),
        },
    }
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("median_ratio", "median_us_per_event_cpu")}))


if __name__ == "__main__":
    main()
