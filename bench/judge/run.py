"""Benchmark: shadowctl's sequential judge against Kayenta-style and window rules, and an oracle SPRT.

Run by hand (not part of the test suite)::

    nice .venv/bin/python bench/judge/run.py --quick      # ~1 minute
    nice .venv/bin/python bench/judge/run.py              # full grid, ~10-15 minutes on 2 cores

Simulation. Latency is lognormal (median 1 s, sigma 0.6 or 1.0); requests arrive as Poisson processes
at the given rate per arm; every 30 s the judge looks at the cumulative data, up to 100 looks. Raw
samples are represented exactly as the judge keeps them, in its fixed 2%-wide log buckets, so each
look draws Poisson counts per bucket (equal in distribution to binning Poisson arrivals); histogram
cells sum those fine counts into coarse Prometheus buckets (the bounds of vLLM's end-to-end latency
histogram, moved to the nearest fine bound) and pass the ``_sum`` series (from fine-bucket midpoints),
as Prometheus would; raw cells also pass the sum of squares, as the judge keeps for raw samples.
Effects: none (A/A), candidate latency x1.05, x1.10, x1.25 (every quantile), +30% at p99 only
(quantile function scaled from 1.0 at p95 to 1.3 at p99 and above; median and p95 unchanged), and
error rate 1% -> 2% (counts). Margins: 10% relative for latency, +0.5 points for the error rate.

Methods, each fed the same simulated data:
- ``shadowctl``: the sequential judge (``shadowctl.judge.core.batch_binned``/``batch_counts``) on the
  cumulative data, alpha = 0.05, beta = 0.05, for the statistics mean, p50, p99 (latency) or rate.
- ``kayenta``: a one-sided 5% Mann-Whitney test (two-proportion z-test for rates) re-run on the
  cumulative data at every look; fails at the first rejection.
- ``window-fl0`` / ``window-fl3``: the same test on each 30 s window alone; fails when more than the
  failure limit (0 or 3) windows were bad (Flagger / Argo Rollouts analysis style).
- ``oracle``: Wald's SPRT knowing both true distributions (H0: candidate distributed as the primary;
  H1: the true candidate distribution, or the margin effect in A/A cells), on the candidate's counts.
  It needs no primary data at all, so it is a lower bound no two-sample judge can reach.
- ``oracle-2s``: Wald's SPRT on the two-sample sufficient statistic (difference of mean log latency,
  sigma known) for the scale effects: knows the shape and the effect but, like every real judge,
  learns the primary's level only from its samples.

Outputs: a table on stdout, ``bench/results/judge.json`` and ``bench/results/judge_delays.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import special, stats

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shadowctl.judge import Margin, MetricSpec  # noqa: E402
from shadowctl.judge import estimators as est  # noqa: E402
from shadowctl.judge.core import batch_binned, batch_counts  # noqa: E402
from shadowctl.judge.sequential import FAIL, PASS  # noqa: E402

INTERVAL_S = 30.0
ALPHA = 0.05
BETA = 0.05
PROM_LE = np.array([0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, np.inf])
LATENCY_STATS = ("mean", "p50", "p99")


@dataclass(frozen=True)
class Cell:
    sigma: float
    rate_p: float
    rate_c: float
    data: str  # raw | hist | counts
    effect: str  # none | x1.05 | x1.10 | x1.25 | p99+30% | err1->2% | err-aa

    @property
    def label(self) -> str:
        rates = f"{self.rate_p:g}/{self.rate_c:g}"
        return f"s={self.sigma:g} r={rates} {self.data} {self.effect}"


# --------------------------------------------------------------------------- distributions


def _ramp(u: np.ndarray) -> np.ndarray:
    return np.clip((u - 0.95) / 0.04, 0.0, 1.0)


def candidate_cdf(x: np.ndarray, sigma: float, effect: str) -> np.ndarray:
    """CDF of the candidate's latency at the points x."""
    with np.errstate(divide="ignore"):
        lx = np.log(x)
    if effect.startswith("x"):
        return special.ndtr((lx - math.log(float(effect[1:]))) / sigma)
    if effect == "p99+30%":
        # Q_c(u) = Q_p(u) * (1 + 0.3 ramp(u)) is increasing: invert by bisection on u.
        lo = np.zeros_like(x)
        hi = np.ones_like(x)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            q = np.exp(sigma * special.ndtri(np.clip(mid, 1e-300, 1 - 1e-16))) * (1 + 0.3 * _ramp(mid))
            below = q <= x
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
        return lo
    return special.ndtr(lx / sigma)


def bucket_probs(le: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    """Per-bucket probabilities from the CDF at the upper bounds (last bound +Inf)."""
    c = np.append(cdf[:-1], 1.0)
    return np.clip(np.diff(c, prepend=0.0), 0.0, None)


def layout(cell: Cell) -> np.ndarray:
    if cell.data == "hist":
        return PROM_LE
    # The judge's own sketch layout, restricted to where the data live (the rest holds no counts).
    le = est.SKETCH_LE
    lo_x, hi_x = math.exp(-7.5 * cell.sigma), math.exp(7.5 * cell.sigma) * 1.35
    keep = (le >= lo_x) & (le <= hi_x)
    first, last = np.argmax(keep), len(keep) - 1 - np.argmax(keep[::-1])
    return np.append(le[first : last + 1], np.inf)


# --------------------------------------------------------------------------- comparison tests


def mw_z(per_p: np.ndarray, per_c: np.ndarray) -> np.ndarray:
    """Mann-Whitney z (candidate > primary) from bucket counts with ties (S,B), normal approximation."""
    n = per_p.sum(axis=1)
    m = per_c.sum(axis=1)
    below_p = np.cumsum(per_p, axis=1) - per_p
    u = (per_c * (below_p + 0.5 * per_p)).sum(axis=1)
    t = per_p + per_c
    big_n = n + m
    with np.errstate(invalid="ignore", divide="ignore"):
        tie = (t * (t * t - 1)).sum(axis=1) / (big_n * (big_n - 1))
        var = n * m / 12.0 * ((big_n + 1) - tie)
        z = (u - n * m / 2.0) / np.sqrt(var)
    return np.nan_to_num(z, nan=0.0)


def prop_z(f_p: np.ndarray, n_p: np.ndarray, f_c: np.ndarray, n_c: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        pool = (f_p + f_c) / (n_p + n_c)
        se = np.sqrt(pool * (1 - pool) * (1 / n_p + 1 / n_c))
        z = (f_c / n_c - f_p / n_p) / se
    return np.nan_to_num(z, nan=0.0)


Z05 = float(stats.norm.ppf(0.95))


# --------------------------------------------------------------------------- one cell


def run_cell(cell: Cell, reps: int, looks: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    first_fail: dict[str, np.ndarray] = {}
    first_pass: dict[str, np.ndarray] = {}

    def mark(name: str, fail: np.ndarray, ok: np.ndarray | None, k: int) -> None:
        ff = first_fail.setdefault(name, np.full(reps, np.inf))
        fp = first_pass.setdefault(name, np.full(reps, np.inf))
        ff[np.isinf(ff) & fail] = k
        if ok is not None:
            fp[np.isinf(fp) & ok] = k

    a_lo, a_hi = math.log((1 - BETA) / ALPHA), math.log(BETA / (1 - ALPHA))
    if cell.data == "counts":
        p0 = 0.01
        p1 = 0.02 if cell.effect == "err1->2%" else 0.01
        h1 = 0.02 if cell.effect == "err-aa" else p1
        spec = MetricSpec("errors", "rate", margin=Margin(0.005, relative=False), min_samples=50)
        fp_, np_, fc_, nc_ = (np.zeros(reps) for _ in range(4))
        llr = np.zeros(reps)
        bad = np.zeros(reps)
        for k in range(1, looks + 1):
            inc_np = rng.poisson(cell.rate_p * INTERVAL_S, reps).astype(float)
            inc_nc = rng.poisson(cell.rate_c * INTERVAL_S, reps).astype(float)
            inc_fp = rng.binomial(inc_np.astype(np.int64), p0).astype(float)
            inc_fc = rng.binomial(inc_nc.astype(np.int64), p1).astype(float)
            fp_ += inc_fp
            np_ += inc_np
            fc_ += inc_fc
            nc_ += inc_nc
            b = batch_counts(spec, fp_, np_, fc_, nc_, alpha=ALPHA, beta=BETA)
            mark("shadowctl:rate", b.code == FAIL, b.code == PASS, k)
            mark("kayenta", prop_z(fp_, np_, fc_, nc_) > Z05, None, k)
            bad += prop_z(inc_fp, inc_np, inc_fc, inc_nc) > Z05
            mark("window-fl0", bad > 0, None, k)
            mark("window-fl3", bad > 3, None, k)
            llr += inc_fc * math.log(h1 / p0) + (inc_nc - inc_fc) * math.log((1 - h1) / (1 - p0))
            mark("oracle", llr >= a_lo, llr <= a_hi, k)
    else:
        le = layout(cell)
        mid = np.append(np.sqrt(le[:-1] * np.append(le[0] / 1.02, le[:-2])), le[-2])
        if cell.data == "hist":
            # Prometheus buckets: the fine counts summed up to the sketch bounds nearest to PROM_LE.
            pick = np.unique(np.searchsorted(le[:-1], PROM_LE[:-1]).clip(0, le.size - 2))
            view_idx = np.append(pick, le.size - 1)
        else:
            view_idx = np.arange(le.size)
        view_le = le[view_idx]
        probs_p = bucket_probs(le, special.ndtr(np.log(np.where(np.isinf(le), 1.0, le)) / cell.sigma))
        probs_c = bucket_probs(le, candidate_cdf(np.where(np.isinf(le), 1.0, le), cell.sigma, cell.effect))
        h1_effect = "x1.10" if cell.effect == "none" else cell.effect
        probs_h1 = bucket_probs(le, candidate_cdf(np.where(np.isinf(le), 1.0, le), cell.sigma, h1_effect))

        def view_probs(pr: np.ndarray) -> np.ndarray:
            return np.diff(np.cumsum(pr)[view_idx], prepend=0.0)

        vp0, vp1 = view_probs(probs_p), view_probs(probs_h1)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.log(np.maximum(vp1, 1e-300) / np.maximum(vp0, 1e-300))
        w = np.where((vp1 > 0) | (vp0 > 0), w, 0.0)
        specs = {s: MetricSpec("latency", s, margin=Margin(0.10, relative=True), min_samples=50) for s in LATENCY_STATS}
        cum_p = np.zeros((reps, le.size))
        cum_c = np.zeros((reps, le.size))
        prev_vp = np.zeros((reps, view_idx.size))
        prev_vc = np.zeros((reps, view_idx.size))
        llr = np.zeros(reps)
        bad = np.zeros(reps)
        # Two-sample oracle: sums of log-latency (Gaussian given the counts), sigma and effect known.
        shift = math.log(float(cell.effect[1:])) if cell.effect.startswith("x") else math.log(1.10)
        true_shift = math.log(float(cell.effect[1:])) if cell.effect.startswith("x") else 0.0
        slog_p = np.zeros(reps)
        slog_c = np.zeros(reps)
        for k in range(1, looks + 1):
            inc_p = rng.poisson(cell.rate_p * INTERVAL_S * probs_p, (reps, le.size)).astype(float)
            inc_c = rng.poisson(cell.rate_c * INTERVAL_S * probs_c, (reps, le.size)).astype(float)
            cum_p += inc_p
            cum_c += inc_c
            # What the judge sees: cumulative counts per bound of its layout, and the _sum series.
            cp = np.cumsum(cum_p, axis=1)[:, view_idx]
            cc = np.cumsum(cum_c, axis=1)[:, view_idx]
            sums = (cum_p @ mid, cum_c @ mid)
            sums_sq = (cum_p @ mid**2, cum_c @ mid**2) if cell.data == "raw" else (None, None)
            for s, spec in specs.items():
                b = batch_binned(spec, cp, cc, view_le, alpha=ALPHA, beta=BETA, sums=sums, sums_sq=sums_sq)
                mark(f"shadowctl:{s}", b.code == FAIL, b.code == PASS, k)
            per_p = np.diff(cp, axis=1, prepend=0.0)
            per_c = np.diff(cc, axis=1, prepend=0.0)
            win_p, win_c = per_p - prev_vp, per_c - prev_vc
            prev_vp, prev_vc = per_p, per_c
            mark("kayenta", mw_z(per_p, per_c) > Z05, None, k)
            bad += mw_z(win_p, win_c) > Z05
            mark("window-fl0", bad > 0, None, k)
            mark("window-fl3", bad > 3, None, k)
            llr += win_c @ w
            mark("oracle", llr >= a_lo, llr <= a_hi, k)
            if cell.effect == "none" or cell.effect.startswith("x"):
                n_p = cum_p.sum(axis=1)
                n_c = cum_c.sum(axis=1)
                ip, ic = inc_p.sum(axis=1), inc_c.sum(axis=1)
                slog_p += rng.normal(0.0, 1.0, reps) * cell.sigma * np.sqrt(ip)
                slog_c += ic * true_shift + rng.normal(0.0, 1.0, reps) * cell.sigma * np.sqrt(ic)
                with np.errstate(invalid="ignore", divide="ignore"):
                    d = slog_c / n_c - slog_p / n_p
                    v = cell.sigma**2 * (1 / n_c + 1 / n_p)
                    llr2 = np.nan_to_num((shift * d - shift**2 / 2) / v)
                mark("oracle-2s", llr2 >= a_lo, llr2 <= a_hi, k)
    out: dict[str, Any] = {}
    for name in first_fail:
        ff, fp = first_fail[name], first_pass[name]
        fail_before_pass = ff < fp
        delays = ff[np.isfinite(ff)] * INTERVAL_S
        fail_any = float(np.isfinite(ff).mean())
        se = math.sqrt(max(fail_any * (1 - fail_any), 1e-12) / reps)
        out[name] = {
            "fail_any_100": fail_any,
            "fail_any_se": se,
            "fail_before_pass": float(fail_before_pass.mean()),
            "fail_within_10min": float(((ff <= 600 / INTERVAL_S) & fail_before_pass).mean()),
            "pass_any": float(np.isfinite(fp).mean()),
            "median_fail_delay_s": _finite_or_none(float(np.median(ff)) * INTERVAL_S),
            "median_pass_delay_s": _finite_or_none(float(np.median(fp)) * INTERVAL_S),
            "delays_s": np.round(delays).astype(int).tolist() if cell.effect != "none" else [],
        }
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def grid(quick: bool) -> list[Cell]:
    cells: list[Cell] = []
    sigmas = (0.6,) if quick else (0.6, 1.0)
    rates = ((10.0, 10.0),) if quick else ((1.0, 1.0), (10.0, 10.0), (100.0, 100.0), (90.0, 10.0))
    effects = ("none", "x1.05", "x1.10", "x1.25", "p99+30%")
    for sigma in sigmas:
        for rp, rc in rates:
            for data in ("raw", "hist"):
                for eff in effects:
                    cells.append(Cell(sigma, rp, rc, data, eff))
    for rp, rc in rates:
        for eff in ("err-aa", "err1->2%"):
            cells.append(Cell(0.0, rp, rc, "counts", eff))
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one sigma, 10 req/s, fewer repetitions")
    ap.add_argument("--reps-aa", type=int, default=None, help="repetitions of A/A cells (default 2000; quick 300)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of effect cells (default 400; quick 150)")
    ap.add_argument("--looks", type=int, default=100)
    ap.add_argument("--seed", type=int, default=20251128)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--only", default=None, help="run only cells whose label contains this text")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON in --out")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads((args.out / "judge.json").read_text())["cells"], args.out / "judge_delays.png")
        return
    reps_aa = args.reps_aa or (300 if args.quick else 2000)
    reps = args.reps or (150 if args.quick else 400)
    cells = [c for c in grid(args.quick) if args.only is None or args.only in c.label]
    t0 = time.perf_counter()
    results = []
    header = f"{'cell':<34} {'method':<15} {'fail<=100':>9} {'±se':>5} {'fail<=10m':>9} {'med.fail':>8} {'pass':>5} {'med.pass':>8}"
    print(header)
    print("-" * len(header))
    for i, cell in enumerate(cells):
        aa = cell.effect in ("none", "err-aa")
        n = reps_aa if aa else reps
        tc = time.perf_counter()
        res = run_cell(cell, n, args.looks, args.seed + i)
        for name, r in res.items():
            med = "-" if r["median_fail_delay_s"] is None else f"{r['median_fail_delay_s']:.0f}s"
            medp = "-" if r["median_pass_delay_s"] is None else f"{r['median_pass_delay_s']:.0f}s"
            print(
                f"{cell.label:<34} {name:<15} {r['fail_any_100']:9.3f} {r['fail_any_se'] * 100:5.2f} "
                f"{r['fail_within_10min']:9.3f} {med:>8} {r['pass_any']:5.2f} {medp:>8}"
            )
        print(f"{'':<34} ({n} runs, {time.perf_counter() - tc:.1f}s)", flush=True)
        results.append({"cell": cell.__dict__ | {"label": cell.label}, "reps": n, "methods": res})
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["bench/judge/run.py", *sys.argv[1:]]),
        "alpha": ALPHA, "beta": BETA, "interval_s": INTERVAL_S, "looks": args.looks,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "judge.json").write_text(json.dumps({"meta": meta, "cells": results}, indent=1))
    plot(results, args.out / "judge_delays.png")
    print(f"wrote {args.out / 'judge.json'} and judge_delays.png in {meta['seconds']}s")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in results if r["cell"]["effect"] in ("x1.10", "p99+30%", "err1->2%")
              and r["cell"]["rate_c"] == 10.0 and r["cell"]["data"] in ("raw", "counts")
              and r["cell"]["sigma"] in (0.6, 0.0)]
    cols = 3
    rows = max(1, -(-len(chosen) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(chosen):]:
        ax.set_visible(False)
    for ax, r in zip(axes.ravel(), chosen, strict=False):
        names = [n for n in r["methods"] if r["methods"][n]["delays_s"]]
        data = [r["methods"][n]["delays_s"] for n in names]
        if data:
            ax.boxplot(data, orientation="horizontal", tick_labels=names)
        ax.set_title(r["cell"]["label"], fontsize=9)
        ax.set_xlabel("detection delay (s), failing runs only")
        ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
