"""Pairing events per second with 1 and 2 worker processes over partitioned events (#19 item 2).

Run by hand (from the repository root):

    nice -n 10 .venv/bin/python bench/pairing/workers.py [--pairs 20000] [--rounds 5] [--max-steal 0.05]

What a pairing worker does per event, without the broker: parse the payload strictly (``parse_event``),
pair it (``Pairer`` via ``MqttOutputSource.ingest``) and score each pair with the 8 lexical comparators
(exact, normalized-exact, token-f1, rouge-l, length-ratio, json-valid, json-structure, refusal). The events
are ``--pairs`` primary/candidate pairs of distinct ~30-word answers, serialised as the taps serialise them,
and split by :func:`shadowctl.compare.partitions.partition` over 2 partitions, as the taps would publish
them with ``--partitions 2``.

Each round runs, side by side: one process pairing every event, then two processes at once, each pairing
its own partition (started together on a barrier). Events per second = events / wall time from the start
to the last process's end; CPU seconds per event = the processes' own CPU time (which excludes steal) per
event. The ratio is two workers' events/s over one worker's, per round.

The development machine has 2 cores shared with other work and a hypervisor that steals CPU: each run
reads the machine's steal and busy time from /proc/stat, and a round in which either run had more than
``--max-steal`` cores stolen is left out (listed in the JSON). The load average before each round is
recorded. Results go to bench/results/pairing_workers.json.

The broker is not in the loop: it is a separate process (on another machine in production) and on 2
cores it would compete with the workers; what partitioning spreads is this work. Receiving through
paho/aiomqtt adds its own per-message cost (bench/tap/events.py measures the whole path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

from shadowctl.compare.comparators import build_comparators
from shadowctl.compare.events import Endpoint, OutputEvent, Variant, parse_event
from shadowctl.compare.partitions import partition
from shadowctl.policy.model import Comparator, ComparatorName
from shadowctl.sources.outputs import MqttOutputSource

ROOT = Path(__file__).resolve().parents[2]
LEXICAL = ["exact", "normalized-exact", "token-f1", "rouge-l", "length-ratio", "json-valid", "json-structure",
           "refusal"]
ANSWER = ("The capital of France is Paris. It has been the country's political and cultural centre for "
          "centuries, and it is home to about two million people.")


def payloads(pairs: int) -> list[tuple[int, bytes]]:
    """(partition of 2, payload) for every event, primary and candidate interleaved as they would arrive."""
    out = []
    for i in range(pairs):
        rid = f"r{i}"
        answer = f"{ANSWER} (answer {i})"  # distinct texts: no help from caches across pairs
        for variant, text in ((Variant.primary, answer), (Variant.candidate, answer.replace("two", "2.1"))):
            event = OutputEvent(request_id=rid, variant=variant, shadow=variant is Variant.candidate,
                                service="b/chat", endpoint=Endpoint.chat, prompt_hash="h", output=text, status=200,
                                started_at=1.0, e2e_s=0.5)
            out.append((partition(rid, 2), event.to_json()))
    return out


def source() -> MqttOutputSource:
    comparators = build_comparators([Comparator(name=ComparatorName(n), threshold=0.5) for n in LEXICAL])
    return MqttOutputSource("mqtt://127.0.0.1:1", "t/+", comparators, pair_ttl_s=600, expect_baseline=False,
                            clock=lambda: 0.0)


def pair_all(items: list[bytes]) -> int:
    """The worker's loop: parse, pair, compare; returns the pairs made."""
    s = source()
    for payload in items:
        s.ingest(parse_event(payload))
    return s.pairer.stats.paired[Variant.candidate]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _own_group(nice: int) -> None:
    """Run as its own session, hence its own scheduling group (Linux autogroup, on here), at `nice`.

    With autogroup the scheduler shares the CPU between sessions first: two workers forked in one session
    would split one session's share and could never run faster than one, which separate pods would.
    The group's nice is set to the bench's own (10 under ``nice -n 10``) so as not to take CPU from others."""
    os.setsid()
    group = Path("/proc/self/autogroup")
    if group.exists():
        with contextlib.suppress(OSError):
            group.write_text(str(nice))


def _worker(items: list[bytes], barrier: Any, results: Any, nice: int) -> None:
    _own_group(nice)
    barrier.wait()
    t0, c0 = time.perf_counter(), _cpu()
    pairs = pair_all(items)
    results.put({"start": t0, "end": time.perf_counter(), "cpu_s": _cpu() - c0, "pairs": pairs,
                 "events": len(items)})


def machine() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def run(groups: list[list[bytes]]) -> dict[str, float]:
    """Pair each group in its own process, all at once; events/s over the wall time of the slowest."""
    ctx = mp.get_context("fork")  # the children inherit the payloads; nothing to send
    barrier, results = ctx.Barrier(len(groups) + 1), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(g, barrier, results, os.nice(0))) for g in groups]
    for p in procs:
        p.start()
    busy0, steal0 = machine()
    t0 = time.perf_counter()
    barrier.wait()
    done = [results.get() for _ in procs]
    wall = time.perf_counter() - t0
    busy1, steal1 = machine()
    for p in procs:
        p.join()
    return summarize(done, wall, busy1 - busy0, steal1 - steal0)


def summarize(done: list[dict[str, Any]], wall: float, busy: float, steal: float) -> dict[str, Any]:
    """One run's row from its workers' reports (events, pairs, cpu_s, start, end each) and the machine's
    busy and stolen core-seconds over `wall` seconds."""
    events = sum(d["events"] for d in done)
    span = max(d["end"] for d in done) - min(d["start"] for d in done)
    cpu = sum(d["cpu_s"] for d in done)
    pairs = {"pairs": sum(d["pairs"] for d in done)} if all("pairs" in d for d in done) else {}
    return {"workers": len(done), "events": events, **pairs,
            "wall_s": round(span, 3), "events_per_s": round(events / span),
            "cpu_s": round(cpu, 3), "us_per_event_cpu": round(cpu / events * 1e6, 2),
            "us_per_event_cpu_each": [round(d["cpu_s"] / d["events"] * 1e6, 1) for d in done],
            "events_per_cpu_s": round(events / cpu),
            "machine_busy_cores": round(busy / wall, 2),
            "machine_steal_cores": round(steal / wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20_000, help="primary/candidate pairs per run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds kept (1 worker then 2 workers each)")
    parser.add_argument("--max-steal", type=float, default=0.05,
                        help="leave out a round whose runs had more than this many cores stolen")
    parser.add_argument("--attempts", type=int, default=3, help="give up after rounds x this many rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pairing_workers.json",
                        help="where the results go (JSON)")
    args = parser.parse_args()

    items = payloads(args.pairs)
    everything = [p for _, p in items]
    halves = [[p for k, p in items if k == 0], [p for k, p in items if k == 1]]
    kept: list[dict[str, Any]] = []
    left_out: list[dict[str, Any]] = []
    for attempt in range(args.rounds * args.attempts):
        if len(kept) == args.rounds:
            break
        load = os.getloadavg()[0]
        one, two = run([everything]), run(halves)
        row = {"round": attempt, "load_avg_1m": round(load, 2), "one": one, "two": two,
               "ratio": round(two["events_per_s"] / one["events_per_s"], 3)}
        steal = max(one["machine_steal_cores"], two["machine_steal_cores"])
        (kept if steal <= args.max_steal else left_out).append(row)
        print(json.dumps(row), flush=True)
    ratios = sorted(r["ratio"] for r in kept)
    out = args.out.resolve()
    shown_out = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    summary = {
        "what": "pairing events/s (parse + pair + 8 lexical comparators), 1 process vs 2 on disjoint partitions",
        "command": "nice -n 10 .venv/bin/python bench/pairing/workers.py "
                   f"--pairs {args.pairs} --rounds {args.rounds} --max-steal {args.max_steal} --out {shown_out}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "nice": os.nice(0)},
        "rounds": kept, "left_out_for_steal": left_out,
        "median_ratio": ratios[len(ratios) // 2] if ratios else None,
        "median_one_worker_events_per_s": sorted(r["one"]["events_per_s"] for r in kept)[len(kept) // 2]
        if kept else None,
        "median_one_worker_events_per_cpu_s": sorted(r["one"]["events_per_cpu_s"] for r in kept)[len(kept) // 2]
        if kept else None,
    }
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("median_ratio", "median_one_worker_events_per_s",
                                               "median_one_worker_events_per_cpu_s")}))


if __name__ == "__main__":
    main()
