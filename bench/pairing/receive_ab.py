"""The output source's CPU per event through a real Mosquitto, old code against new, side by side.

Run by hand (from the repository root):

    git archive REV shadowctl | tar -x -C /tmp/base     # the old code
    nice -n 10 .venv/bin/python bench/pairing/receive_ab.py --baseline-src /tmp/base [--pairs 10000] [--rounds 3]

Each round runs ``bench/tap/events.py`` (N primary/candidate pairs through Mosquitto into one
``MqttOutputSource`` scoring the 8 lexical comparators) once with the old code (``PYTHONPATH`` set to
``--baseline-src``) and once with this tree, alternating which goes first. The figure compared is the
source process's own CPU time per event (``source_cpu_share`` x seconds / events), which does not count
steal or time waiting for a core, so it holds on this loaded 2-core machine where events per second of
wall time measure the neighbours. Events per CPU second is its inverse: the events one core could take.
A run with more than ``--max-steal`` cores stolen (/proc/stat) is listed but left out of the medians.
Results go to bench/results/pairing_receive.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def machine() -> tuple[float, float]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return sum(fields[:3]) / tick, fields[7] / tick


def one(src: Path | None, pairs: int) -> dict[str, Any]:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    _, steal0 = machine()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "bench/tap/events.py"), "--pairs", str(pairs), "--out", str(out)],
                   env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    _, steal1 = machine()
    r = json.loads(out.read_text())
    out.unlink()
    cpu = r["source_cpu_share"] * r["seconds"]
    return {"events": r["events"], "seconds": r["seconds"], "events_per_s": r["events_per_s"],
            "source_cpu_s": round(cpu, 3), "us_per_event_cpu": round(cpu / r["events"] * 1e6, 1),
            "events_per_cpu_s": round(r["events"] / cpu), "steal_cores": round((steal1 - steal0) / wall, 3),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", type=Path, required=True, help="a folder holding the old shadowctl/")
    parser.add_argument("--baseline-rev", default=None,
                        help="the commit --baseline-src was archived from (recorded in the results)")
    parser.add_argument("--pairs", type=int, default=10_000, help="primary/candidate pairs per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running the old and the new code once")
    parser.add_argument("--max-steal", type=float, default=0.05,
                        help="leave out of the medians a round whose runs had more cores stolen than this")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pairing_receive.json",
                        help="where the results go (JSON)")
    args = parser.parse_args()
    rows = []
    for i in range(args.rounds):
        order = [("old", args.baseline_src), ("new", None)]
        if i % 2:
            order.reverse()
        row: dict[str, Any] = {name: one(src, args.pairs) for name, src in order}
        row["cpu_ratio_new_over_old"] = round(row["new"]["us_per_event_cpu"] / row["old"]["us_per_event_cpu"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    kept = [r for r in rows if max(r["old"]["steal_cores"], r["new"]["steal_cores"]) <= args.max_steal]

    def median(key: str, side: str) -> float | None:
        values = sorted(r[side][key] for r in kept)
        return values[len(values) // 2] if values else None

    rev = f" --baseline-rev {args.baseline_rev}" if args.baseline_rev else ""
    out = args.out.resolve()
    shown_out = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    summary = {
        "command": f"nice -n 10 .venv/bin/python bench/pairing/receive_ab.py --baseline-src {args.baseline_src}{rev} "
                   f"--pairs {args.pairs} --rounds {args.rounds} --out {shown_out}",
        "baseline_rev": args.baseline_rev,
        "new_rev": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip() or None,
        "rounds": rows, "kept": len(kept),
        "median_events_per_cpu_s": {"old": median("events_per_cpu_s", "old"),
                                    "new": median("events_per_cpu_s", "new")},
        "median_cpu_ratio_new_over_old": sorted(r["cpu_ratio_new_over_old"] for r in kept)[len(kept) // 2]
        if kept else None,
    }
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("median_events_per_cpu_s", "median_cpu_ratio_new_over_old")}))


if __name__ == "__main__":
    main()
