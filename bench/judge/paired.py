"""Benchmark: the paired latency judge against the unpaired one on the same mirrored traffic, and an oracle.

Run by hand (not part of the test suite)::

    nice .venv/bin/python bench/judge/paired.py            # ~3-5 minutes on 2 cores
    nice .venv/bin/python bench/judge/paired.py --quick    # ~30 s

Simulation. Mirrored requests arrive as a Poisson process (``--rates`` pairs per second); each
request has its own latency factor ``R`` (lognormal, sigma 1.0: prompt and output length), and
each server adds its own noise (lognormal, sigma 0.2): the primary takes ``R e_p``, the candidate
``R x effect x e_c``. Every 30 s the judges look at the cumulative data, up to 100 looks. Effects:
none (A/A), x1.10 (the margin), x1.15. Margin 10%, alpha = beta = 0.05.

Methods, each fed the same simulated requests:
- ``paired-median`` / ``paired-mean``: shadowctl's paired judge on the per-pair log ratios
  (:func:`shadowctl.judge.paired.batch_paired_counts`, the data in the judge's own 0.5% layout).
- ``unpaired-p50`` / ``unpaired-mean``: shadowctl's sequential judge on the same latencies taken as
  two independent arms (what a Prometheus histogram or raw samples per arm give): raw samples in
  the judge's 2% sketch plus exact sums, ``batch_binned``.
- ``oracle``: Wald's SPRT on the same log ratios knowing their distribution (normal, sd 0.2 x sqrt 2,
  mean 0 against the true effect; against the margin in A/A cells): the best any judge of these
  pairs can do.

Also times ``shadowctl judge replay`` of 1,000 paired streams x 40 looks x 100 pairs (``--replay``).

Outputs: a table on stdout and ``bench/results/judge_paired.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shadowctl.judge import Margin, MetricSpec  # noqa: E402
from shadowctl.judge import estimators as est  # noqa: E402
from shadowctl.judge.core import batch_binned  # noqa: E402
from shadowctl.judge.model import LOG_RATIO_LE  # noqa: E402
from shadowctl.judge.paired import batch_paired_counts  # noqa: E402
from shadowctl.judge.sequential import FAIL, PASS  # noqa: E402

INTERVAL_S = 30.0
ALPHA = BETA = 0.05
SIGMA_REQUEST = 1.0
SIGMA_SERVER = 0.2
MARGIN = 0.10
EFFECTS = (1.0, 1.10, 1.15)


def _sketch_le() -> np.ndarray:
    """The judge's raw-sample layout, restricted to where these latencies live (the rest holds no counts)."""
    le = est.SKETCH_LE
    spread = 8.0 * math.hypot(SIGMA_REQUEST, SIGMA_SERVER)
    keep = (le >= math.exp(-spread)) & (le <= math.exp(spread) * 1.5)
    return np.append(le[keep], np.inf)


def run_cell(rate: float, effect: float, reps: int, looks: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    margin = Margin(MARGIN, relative=True)
    specs_paired = {s: MetricSpec("latency", f"paired-{s}", margin=margin, min_samples=50) for s in ("median", "mean")}
    specs_unpaired = {s: MetricSpec("latency", s, margin=margin, min_samples=50) for s in ("p50", "mean")}
    b_pair = LOG_RATIO_LE.size
    le_raw = _sketch_le()
    b_raw = le_raw.size
    per_pair = np.zeros((reps, b_pair))
    per_p = np.zeros((reps, b_raw))
    per_c = np.zeros((reps, b_raw))
    sums = np.zeros((reps, 4))  # paired: d, d^2, log p, log c
    raw_sums = np.zeros((reps, 4))  # unpaired: sum p, sum c, sum p^2, sum c^2
    first_fail: dict[str, np.ndarray] = {}
    first_pass: dict[str, np.ndarray] = {}

    def mark(name: str, fail: np.ndarray, ok: np.ndarray, k: int) -> None:
        ff = first_fail.setdefault(name, np.full(reps, np.inf))
        fp = first_pass.setdefault(name, np.full(reps, np.inf))
        ff[np.isinf(ff) & fail] = k
        fp[np.isinf(fp) & ok] = k

    # Oracle: Wald's SPRT on d ~ N(theta, 2 sigma_server^2), H0 theta = 0 against H1 theta = the true effect
    # (the margin in A/A cells).
    theta1 = math.log(effect) if effect > 1.0 else math.log1p(MARGIN)
    var_d = 2.0 * SIGMA_SERVER**2
    a_hi, a_lo = math.log((1 - BETA) / ALPHA), math.log(BETA / (1 - ALPHA))
    log_eff = math.log(effect)
    rows = np.arange(reps)
    for k in range(1, looks + 1):
        n = rng.poisson(rate * INTERVAL_S, reps)
        total = int(n.sum())
        rep = np.repeat(rows, n)
        log_r = rng.normal(0.0, SIGMA_REQUEST, total)
        lp = log_r + rng.normal(0.0, SIGMA_SERVER, total)
        lc = log_r + log_eff + rng.normal(0.0, SIGMA_SERVER, total)
        d = lc - lp
        idx = np.searchsorted(LOG_RATIO_LE, d, side="left")
        per_pair += np.bincount(rep * b_pair + idx, minlength=reps * b_pair).reshape(reps, b_pair)
        for j, w in enumerate((d, d * d, lp, lc)):
            sums[:, j] += np.bincount(rep, weights=w, minlength=reps)
        p, c = np.exp(lp), np.exp(lc)
        per_p += np.bincount(rep * b_raw + np.searchsorted(le_raw, p, side="left"),
                             minlength=reps * b_raw).reshape(reps, b_raw)
        per_c += np.bincount(rep * b_raw + np.searchsorted(le_raw, c, side="left"),
                             minlength=reps * b_raw).reshape(reps, b_raw)
        for j, w in enumerate((p, c, p * p, c * c)):
            raw_sums[:, j] += np.bincount(rep, weights=w, minlength=reps)

        cum_pair = np.cumsum(per_pair, axis=1)
        for s, spec in specs_paired.items():
            b = batch_paired_counts(spec, cum_pair, sums, alpha=ALPHA, beta=BETA)
            mark(f"paired-{s}", b.code == FAIL, b.code == PASS, k)
        cp, cc = np.cumsum(per_p, axis=1), np.cumsum(per_c, axis=1)
        for s, spec in specs_unpaired.items():
            b2 = batch_binned(spec, cp, cc, le_raw, alpha=ALPHA, beta=BETA, sums=(raw_sums[:, 0], raw_sums[:, 1]),
                              sums_sq=(raw_sums[:, 2], raw_sums[:, 3]))
            mark(f"unpaired-{s}", b2.code == FAIL, b2.code == PASS, k)
        llr = (theta1 * sums[:, 0] - cum_pair[:, -1] * theta1**2 / 2.0) / var_d
        mark("oracle", llr >= a_hi, llr <= a_lo, k)

    out: dict[str, Any] = {}
    for name, ff in first_fail.items():
        fp = first_pass[name]
        detected = ff < fp  # failed, and before any pass
        fail_any = float(np.isfinite(ff).mean())
        out[name] = {
            "fail_any": fail_any,
            "fail_any_se": math.sqrt(max(fail_any * (1 - fail_any), 1e-12) / reps),
            "detected": float(detected.mean()),
            "detected_within_10min": float((detected & (ff <= 600 / INTERVAL_S)).mean()),
            "pass_any": float(np.isfinite(fp).mean()),
            "median_fail_delay_s": _finite(float(np.median(ff)) * INTERVAL_S),
            "median_pass_delay_s": _finite(float(np.median(fp)) * INTERVAL_S),
        }
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _ratio(a: float | None, b: float | None, horizon_s: float) -> str | None:
    """a/b as text; "<x" where b never came within the looks (its median delay is beyond the horizon)."""
    if a is None:
        return None
    if b is None:
        return f"<{a / horizon_s:.3g}"
    return f"{a / b:.3g}"


def replay_timing(streams: int, looks: int, pairs: int, seed: int) -> list[dict[str, Any]]:
    """Time `shadowctl judge replay` on a generated file (one process, wall and CPU time), as is (streams
    stop at their decision) and with ``--min-samples`` above what any stream reaches, so that every
    stream is judged at every look (the most work a file of this size can make)."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "paired.jsonl"
        with path.open("w") as f:
            for k in range(looks):
                for s in range(streams):
                    r = rng.lognormal(0.0, SIGMA_REQUEST, pairs)
                    factor = 1.15 if s % 4 == 0 else 1.0
                    p = (r * rng.lognormal(0.0, SIGMA_SERVER, pairs)).round(5)
                    c = (r * factor * rng.lognormal(0.0, SIGMA_SERVER, pairs)).round(5)
                    pairs_text = ",".join(f"[{a:g},{b:g}]" for a, b in zip(p.tolist(), c.tolist(), strict=True))
                    f.write(f'{{"stream":"s{s}","t":{30 * (k + 1)},"paired":[{pairs_text}]}}\n')
        size = path.stat().st_size
        out = []
        for extra in ([], ["--min-samples", str(looks * pairs + 1)]):
            cmd = [str(ROOT / ".venv" / "bin" / "shadowctl"), "judge", "replay", str(path), "--statistic", "median",
                   "--margin", "10%", *extra]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "NO_COLOR": "1"})
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            decisions: dict[str, int] = {}
            for line in proc.stdout.splitlines():
                dec = json.loads(line)["decision"]
                decisions[dec] = decisions.get(dec, 0) + 1
            out.append({
                "streams": streams, "looks": looks, "pairs_per_look": pairs, "file_mb": round(size / 1e6, 1),
                "wall_s": round(wall, 2),
                "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
                "decisions": decisions, "command": " ".join(["shadowctl", *cmd[1:3], "FILE", *cmd[4:]]),
            })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and one rate")
    ap.add_argument("--rates", default="1,10", help="mirrored pairs per second, comma-separated")
    ap.add_argument("--reps-aa", type=int, default=None, help="A/A repetitions (default 2000; quick 300)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions with an effect (default 500; quick 150)")
    ap.add_argument("--looks", type=int, default=100)
    ap.add_argument("--seed", type=int, default=20251215)
    ap.add_argument("--replay", action=argparse.BooleanOptionalAction, default=True,
                    help="also time judge replay of 1,000 streams x 40 looks x 100 pairs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "judge_paired.json")
    args = ap.parse_args()
    rates = [1.0] if args.quick else [float(r) for r in args.rates.split(",")]
    reps_aa = args.reps_aa or (300 if args.quick else 2000)
    reps = args.reps or (150 if args.quick else 500)
    t0 = time.perf_counter()
    cells = []
    header = (f"{'cell':<22} {'method':<15} {'fail':>6} {'±se':>5} {'detect':>6} {'<=10m':>6} {'med.fail':>8} "
              f"{'pass':>5} {'med.pass':>8}")
    print(header)
    print("-" * len(header))
    for i, rate in enumerate(rates):
        for j, effect in enumerate(EFFECTS):
            n = reps_aa if effect == 1.0 else reps
            tc = time.perf_counter()
            res = run_cell(rate, effect, n, args.looks, args.seed + 10 * i + j)
            label = f"r={rate:g}/s x{effect:.2f}"
            for name, r in res.items():
                med = "-" if r["median_fail_delay_s"] is None else f"{r['median_fail_delay_s']:.0f}s"
                medp = "-" if r["median_pass_delay_s"] is None else f"{r['median_pass_delay_s']:.0f}s"
                print(f"{label:<22} {name:<15} {r['fail_any']:6.3f} {r['fail_any_se'] * 100:5.2f} {r['detected']:6.3f} "
                      f"{r['detected_within_10min']:6.3f} {med:>8} {r['pass_any']:5.2f} {medp:>8}")
            ratios: dict[str, Any] = {}
            if effect > 1.0:
                for paired, unpaired in (("paired-median", "unpaired-p50"), ("paired-mean", "unpaired-mean")):
                    mine = res[paired]["median_fail_delay_s"]
                    horizon = args.looks * INTERVAL_S
                    ratios[paired] = {
                        f"delay_vs_{unpaired}": _ratio(mine, res[unpaired]["median_fail_delay_s"], horizon),
                        "delay_vs_oracle": _ratio(mine, res["oracle"]["median_fail_delay_s"], horizon),
                    }
                    print(f"{'':<22} {paired}: median delay {ratios[paired][f'delay_vs_{unpaired}']} x {unpaired}, "
                          f"{ratios[paired]['delay_vs_oracle']} x oracle")
            print(f"{'':<22} ({n} runs, {time.perf_counter() - tc:.1f}s)", flush=True)
            cells.append({"rate_pairs_per_s": rate, "effect": effect, "reps": n, "methods": res, "ratios": ratios})
    replay = replay_timing(1000, 40, 100, args.seed) if args.replay else None
    for run in replay or []:
        print(f"judge replay: {run['streams']} streams x {run['looks']} looks x {run['pairs_per_look']} pairs "
              f"({run['file_mb']} MB): {run['wall_s']} s wall, {run['cpu_s']} s CPU; {run['decisions']}; "
              f"{run['command']}")
    meta = {
        "command": " ".join(["bench/judge/paired.py", *sys.argv[1:]]),
        "alpha": ALPHA, "beta": BETA, "margin": MARGIN, "interval_s": INTERVAL_S, "looks": args.looks,
        "sigma_request": SIGMA_REQUEST, "sigma_server": SIGMA_SERVER,
        "seconds": round(time.perf_counter() - t0, 1), "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "cells": cells, "replay": replay}, indent=1))
    print(f"wrote {args.out} in {meta['seconds']}s")


if __name__ == "__main__":
    main()
