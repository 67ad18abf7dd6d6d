"""Benchmark: error rates with a relative margin, the exact per-arm test against the rule it replaced.

Run by hand (not part of the test suite)::

    nice .venv/bin/python bench/judge/rate_relative.py            # ~15 s on 2 cores
    nice .venv/bin/python bench/judge/rate_relative.py --quick    # ~5 s

Continuous monitoring, margin 10% (relative), direction increase, alpha = beta = 0.05, minSamples 50:
Poisson requests at ``--rate`` per second per arm, a look every 30 s, ``--looks`` looks; the primary's
error rate 0, 0.1%, 1% or 5%; the candidate's the same (A/A: a fail is false), 1.1x (worse by exactly
the margin: a pass is false), 2x, or 100% (a candidate failing every request, 10 looks). Share of runs
that ever fail / ever pass first, median requests per arm to that decision ("-": fewer than half
decided that way).

Methods on the same data: ``now`` = :func:`shadowctl.judge.core.batch_counts` (fails on each arm's
beta-binomial confidence sequence, :mod:`shadowctl.judge.proportion`; passes also from the normal mixture,
intersected at beta/2 each: ``core._pass_sooner``); ``before`` = the normal-mixture
rule on log(candidate/primary) of the shrunk rates (f+1)/(n+2) with the delta-method variance
(``core._finish`` on ``estimators.rate_counts``), still the rule for absolute margins.

Outputs: a table on stdout and ``bench/results/judge_rate_relative.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import shadowctl.judge.core as core  # noqa: E402
from shadowctl.judge import Direction, Margin, MetricSpec  # noqa: E402
from shadowctl.judge import estimators as est  # noqa: E402
from shadowctl.judge.sequential import FAIL, PASS  # noqa: E402

A = B = 0.05
INTERVAL_S = 30.0
SPEC = MetricSpec("errors", "rate", Direction.increase, Margin.parse("10%"), min_samples=50)
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def before(fp: np.ndarray, n_p: np.ndarray, fc: np.ndarray, n_c: np.ndarray) -> core.Batch:
    ep, sp = est.rate_counts(fp, n_p)
    ec, sc = est.rate_counts(fc, n_c)
    with np.errstate(all="ignore"):
        return core._finish(SPEC, ep, ec, np.log(sp), np.log(sc), alpha=A, beta=B)


def now(fp: np.ndarray, n_p: np.ndarray, fc: np.ndarray, n_c: np.ndarray) -> core.Batch:
    return core.batch_counts(SPEC, fp, n_p, fc, n_c, alpha=A, beta=B)


RULES: dict[str, Callable[..., core.Batch]] = {"before": before, "now": now}


def monitor(rule: Callable[..., core.Batch], p: float, p_c: float, runs: int, looks: int, per_look: float,
            seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    f_p, n_p, f_c, n_c = (np.zeros(runs) for _ in range(4))
    first_fail = np.full(runs, np.inf)
    first_pass = np.full(runs, np.inf)
    for k in range(1, looks + 1):
        inc_p = rng.poisson(per_look, runs)
        inc_c = rng.poisson(per_look, runs)
        f_p += rng.binomial(inc_p, p)
        n_p += inc_p
        f_c += rng.binomial(inc_c, p_c)
        n_c += inc_c
        code = rule(f_p, n_p, f_c, n_c).code
        open_ = np.isinf(first_fail) & np.isinf(first_pass)
        first_fail[open_ & (code == FAIL)] = k
        first_pass[open_ & (code == PASS)] = k

    def median_requests(first: np.ndarray) -> float | None:
        return None if np.isinf(first).mean() > 0.5 else float(np.median(first) * per_look)

    return {"fail": float(np.isfinite(first_fail).mean()), "pass": float(np.isfinite(first_pass).mean()),
            "median_requests_to_fail": median_requests(first_fail),
            "median_requests_to_pass": median_requests(first_pass)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs per cell (200 A/A, 100 others)")
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second per arm (default 100)")
    ap.add_argument("--looks", type=int, default=100, help="looks of 30 s per run (default 100)")
    ap.add_argument("--seed", type=int, default=20261206)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "judge_rate_relative.json"),
                    help="where to write the JSON results")
    args = ap.parse_args()
    runs_aa, runs = (200, 100) if args.quick else (1000, 300)
    per_look = args.rate * INTERVAL_S
    t0 = time.perf_counter()
    cells: list[dict[str, Any]] = []
    print(f"{'primary':>8} {'candidate':>9} {'rule':>6} {'fail':>6} {'pass':>6} {'req. to fail':>12} {'req. to pass':>12}")
    for i, p in enumerate((0.0, 0.001, 0.01, 0.05)):
        for j, (label, p_c) in enumerate((("x1", p), ("x1.1", 1.1 * p), ("x2", 2 * p), ("100%", 1.0))):
            if p == 0.0 and label in ("x1.1", "x2"):
                continue
            looks = 10 if label == "100%" else args.looks
            n = runs_aa if label == "x1" else runs
            for rule_name, rule in RULES.items():
                r = monitor(rule, p, p_c, n, looks, per_look, args.seed + 10 * i + j)
                cells.append({"primary_rate": p, "candidate": label, "rule": rule_name, "runs": n, "looks": looks, **r})

                def show(x: float | None) -> str:
                    return "-" if x is None else f"{x:.0f}"

                print(f"{p:>8g} {label:>9} {rule_name:>6} {r['fail']:>6.3f} {r['pass']:>6.3f} "
                      f"{show(r['median_requests_to_fail']):>12} {show(r['median_requests_to_pass']):>12}", flush=True)
    seconds = round(time.perf_counter() - t0, 1)
    meta = {"command": " ".join(["bench/judge/rate_relative.py", *sys.argv[1:]]), "alpha": A, "beta": B,
            "margin": "10%", "requests_per_s": args.rate, "interval_s": INTERVAL_S, "seconds": seconds}
    Path(args.out).write_text(json.dumps({"meta": meta, "cells": cells}, indent=1) + "\n")
    print(f"wrote {args.out} in {seconds} s")


if __name__ == "__main__":
    main()
