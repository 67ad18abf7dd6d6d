"""Benchmark: the agreement test (exact beta-binomial confidence sequences) against the rule it replaced.

Run by hand (not part of the test suite)::

    nice .venv/bin/python bench/judge/agreement.py            # ~1-2 minutes on 2 cores
    nice .venv/bin/python bench/judge/agreement.py --quick    # ~15 s

Two parts, margin 10% (minRelativeAgreement 0.9), alpha = beta = 0.05, minPairs 20:

1. ``steps``: pairs per arm until the decision when the candidate's share is exactly its true value at
   every look (deterministic), baseline agreement 0.95, fixed or sampled (primary-replica, as many
   pairs as the candidate), candidate 0.97 ... 0. This is the table in docs/judge.md.
2. ``monitoring``: Poisson pairs at ``--rates`` pairs/s per arm, a look every 30 s up to 100 looks,
   baseline 0.9 (fixed, or a replica with as many pairs), candidate 0.9 (A/A: a fail is false), 0.855
   (inside the margin), 0.81 (worse by exactly the margin: a pass is false), 0.5 and 0 (never agrees).
   Share of runs that ever fail / ever pass first, median time to that decision.

Methods on the same data: ``now`` = :func:`shadowctl.judge.core.batch_counts` (the agreement test of
shadowctl.judge.proportion for fails; passes also from the normal mixture, ``core._pass_sooner``); ``before`` = the normal-mixture rule on log(candidate/baseline) with the
delta-method variance, which is the judge's count rule still used for error rates
(``core._finish`` on ``estimators.rate_counts``), the fixed baseline as a sampled arm of a million pairs.

Outputs: tables on stdout and ``bench/results/judge_agreement.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import shadowctl.judge.core as core  # noqa: E402
from shadowctl.judge import Direction, Margin, MetricSpec  # noqa: E402
from shadowctl.judge import estimators as est  # noqa: E402
from shadowctl.judge.sequential import FAIL, PASS  # noqa: E402

ALPHA = BETA = 0.05
INTERVAL_S = 30.0
FIXED_N = 1e6
SPEC = MetricSpec("agreement/x", "agreement", Direction.decrease, Margin.parse("10%"), min_samples=20)


def before(f_b: np.ndarray, n_b: np.ndarray, f_c: np.ndarray, n_c: np.ndarray) -> np.ndarray:
    """The rule agreement had until #16/#13 (still the error-rate rule): codes per row."""
    ep, sp = est.rate_counts(f_b, n_b, agreement=True)
    ec, sc = est.rate_counts(f_c, n_c, agreement=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: np.ndarray = core._finish(SPEC, ep, ec, np.log(sp), np.log(sc), alpha=ALPHA, beta=BETA).code
    return out


def now(f_b: np.ndarray, n_b: np.ndarray, f_c: np.ndarray, n_c: np.ndarray, exact: bool) -> np.ndarray:
    out: np.ndarray = core.batch_counts(SPEC, f_b, n_b, f_c, n_c, alpha=ALPHA, beta=BETA,
                                        exact_p=np.full(f_b.shape, exact)).code
    return out


def steps() -> list[dict[str, Any]]:
    ns = np.array(list(range(20, 1000, 10)) + list(range(1000, 20001, 100)), dtype=np.float64)
    pb = 0.95
    rows = []
    for pc in (0.97, 0.95, 0.92, 0.88, 0.80, 0.50, 0.01, 0.0):
        f_c = ns - np.round(pc * ns)
        row: dict[str, Any] = {"candidate": pc, "baseline": pb}
        for mode in ("fixed", "replica"):
            if mode == "fixed":
                f_b, n_b = np.full(ns.shape, round((1 - pb) * FIXED_N)), np.full(ns.shape, FIXED_N)
            else:
                f_b, n_b = ns - np.round(pb * ns), ns
            for name, codes in (("before", before(f_b, n_b, f_c, ns)), ("now", now(f_b, n_b, f_c, ns, mode == "fixed"))):
                decided = np.flatnonzero((codes == PASS) | (codes == FAIL))
                if decided.size:
                    i = int(decided[0])
                    row[f"{mode}_{name}"] = {"decision": "pass" if codes[i] == PASS else "fail", "pairs": int(ns[i])}
                else:
                    row[f"{mode}_{name}"] = {"decision": "none", "pairs": None}
        rows.append(row)
    return rows


def monitoring(rate: float, p_candidate: float, mode: str, reps: int, looks: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    p_b = 0.9
    n_c = np.zeros(reps)
    k_c = np.zeros(reps)
    n_b = np.zeros(reps)
    k_b = np.zeros(reps)
    first: dict[str, np.ndarray] = {m: np.zeros(reps, dtype=np.int64) for m in ("before", "now")}
    when: dict[str, np.ndarray] = {m: np.full(reps, np.nan) for m in ("before", "now")}
    for look in range(1, looks + 1):
        new_c = rng.poisson(rate * INTERVAL_S, reps).astype(np.float64)
        n_c += new_c
        k_c += rng.binomial(new_c.astype(np.int64), p_candidate)
        if mode == "fixed":
            fb, nb = np.full(reps, round((1 - p_b) * FIXED_N)), np.full(reps, FIXED_N)
        else:
            new_b = rng.poisson(rate * INTERVAL_S, reps).astype(np.float64)
            n_b += new_b
            k_b += rng.binomial(new_b.astype(np.int64), p_b)
            fb, nb = n_b - k_b, n_b
        codes = {"before": before(fb, nb, n_c - k_c, n_c), "now": now(fb, nb, n_c - k_c, n_c, mode == "fixed")}
        for m, code in codes.items():
            open_ = first[m] == 0
            hit = open_ & ((code == PASS) | (code == FAIL))
            first[m][hit] = code[hit]
            when[m][hit] = look * INTERVAL_S
    out: dict[str, Any] = {"rate_pairs_per_s": rate, "candidate": p_candidate, "baseline": p_b, "mode": mode,
                           "reps": reps, "looks": looks}
    for m in ("before", "now"):
        failed, passed = first[m] == FAIL, first[m] == PASS
        out[m] = {
            "fail_first": float(failed.mean()), "pass_first": float(passed.mean()),
            "undecided": float((first[m] == 0).mean()),
            "median_fail_s": float(np.median(when[m][failed])) if failed.any() else None,
            "median_pass_s": float(np.median(when[m][passed])) if passed.any() else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (300 A/A, 100 others), 1 pair/s only")
    ap.add_argument("--rates", default="1,10", help="pairs per second per arm, comma-separated (default 1,10)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "judge_agreement.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    table = steps()
    print("| candidate | fixed 0.95: before | now | replica 0.95: before | now |")
    for r in table:
        shown = [f"{r[k]['decision']} {r[k]['pairs']}" for k in ("fixed_before", "fixed_now", "replica_before", "replica_now")]
        print(f"| {r['candidate']:.2f} | " + " | ".join(shown) + " |")
    rates = [1.0] if args.quick else [float(x) for x in args.rates.split(",")]
    cells: list[dict[str, Any]] = []
    seed = 100
    for rate in rates:
        for mode in ("fixed", "replica"):
            for pc in (0.9, 0.855, 0.81, 0.5, 0.0):
                reps = (300 if args.quick else 2000) if pc == 0.9 else (100 if args.quick else 500)
                seed += 1
                c = monitoring(rate, pc, mode, reps, 100, seed)
                cells.append(c)
                b, n = c["before"], c["now"]
                print(f"{rate:>4g}/s {mode:<8} cand {pc:<5} reps {reps:<5} "
                      f"before: fail {b['fail_first']:.3f} ({b['median_fail_s']}) pass {b['pass_first']:.3f} "
                      f"({b['median_pass_s']})  now: fail {n['fail_first']:.3f} ({n['median_fail_s']}) "
                      f"pass {n['pass_first']:.3f} ({n['median_pass_s']})")
    seconds = round(time.perf_counter() - t0, 1)
    result = {"meta": {"command": "bench/judge/agreement.py" + (" --quick" if args.quick else ""), "alpha": ALPHA,
                       "beta": BETA, "margin": 0.1, "min_pairs": 20, "interval_s": INTERVAL_S, "seconds": seconds},
              "steps": table, "monitoring": cells}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {seconds}s")


if __name__ == "__main__":
    main()
