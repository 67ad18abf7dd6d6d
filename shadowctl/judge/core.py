"""The judge's entry points: data of both arms in, one :class:`MetricResult` per metric and a :class:`Verdict` out.

Several metrics share the family-wise false-fail budget by Bonferroni: each metric is tested at
alpha/k. A wrong *pass* needs every metric to pass, so the false-pass probability at a metric's margin
stays below beta without splitting it. Missing, NaN or too few data give ``nodata``, never a pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shadowctl.judge import estimators as est
from shadowctl.judge import proportion as prop
from shadowctl.judge.model import (
    MAX_MAGNITUDE,
    ArmData,
    Counts,
    Direction,
    FloatArray,
    Histogram,
    JudgeInputError,
    MetricInput,
    MetricResult,
    MetricSpec,
    NoData,
    Outcome,
    Paired,
    Samples,
    Verdict,
)
from shadowctl.judge.paired import PairedBatch, batch_paired, paired_result
from shadowctl.judge.sequential import FAIL, PASS, BoolArray, Bounds, IntArray, classify, decide

MIN_TAIL_COUNT = 10
"""A quantile q needs n*(1-q) >= this many observations above it in each arm (p99: 1000 samples)."""


NODATA = 3
"""Kernel code for 'no usable data' (too few samples, a zero statistic under a relative margin)."""


@dataclass(frozen=True)
class Batch:
    """Decisions for S streams of one metric: kernel bounds plus per-arm numbers; ``code`` may be NODATA."""

    bounds: Bounds
    code: IntArray
    primary: est.Estimate
    candidate: est.Estimate
    need: int


class _NoDataError(Exception):
    """Internal: this metric has no usable data; the message is the reason."""


def _arm_missing(name: str, data: ArmData) -> str | None:
    if data is None:
        return f"no {name} data"
    if isinstance(data, NoData):
        return f"{name}: {data.reason}"
    if isinstance(data, Samples | Histogram | Counts) and data.has_nan:
        return f"{name} data contain NaN"
    if isinstance(data, Samples) and data.out_of_range:
        return f"{name} data hold a value beyond ±{MAX_MAGNITUDE:g}"
    return None


def _binned(data: Samples | Histogram, le: FloatArray) -> tuple[FloatArray, float | None, float | None]:
    """Cumulative counts of one arm at the bounds ``le`` (a subset of its own bounds for histograms)."""
    if isinstance(data, Samples):
        v = data.values
        return est.sketch_counts(v, le), float(v.sum()), float((v * v).sum())
    idx = np.searchsorted(data.le, le)
    return data.counts[idx], data.sum, data.sum_sq


def _layout(p: Samples | Histogram, c: Samples | Histogram) -> FloatArray:
    if isinstance(p, Histogram) and isinstance(c, Histogram):
        if p.le.shape == c.le.shape and np.array_equal(p.le, c.le):
            return p.le
        common = np.intersect1d(p.le, c.le)
        if common.size < 3:
            raise _NoDataError("primary and candidate histograms share fewer than two finite bucket bounds")
        return common
    if isinstance(p, Histogram):
        return p.le
    if isinstance(c, Histogram):
        return c.le
    return est.SKETCH_LE


@dataclass(frozen=True)
class _Row:
    """One metric's data, made ready for a kernel: counts, or cumulative counts at shared bounds."""

    counts: tuple[float, float, float, float] | None = None
    """(failures, total) of primary then candidate, for a rate or agreement."""
    exact: bool = False
    """The primary's proportion is a known constant (:attr:`Counts.exact`)."""
    le: FloatArray | None = None
    cum: tuple[FloatArray, FloatArray] | None = None
    sums: tuple[float | None, float | None] = (None, None)
    sums_sq: tuple[float | None, float | None] = (None, None)
    paired: Paired | None = None
    """Per-pair log ratios, for a paired metric."""

    def group(self) -> tuple[object, ...]:
        """What rows must share to go through one kernel call (besides the spec and the levels)."""
        if self.paired is not None:
            return ("paired",)
        if self.le is None:
            return ("counts",)
        return ("binned", self.le.tobytes(), tuple(x is None for x in (*self.sums, *self.sums_sq)))


def _input_row(mi: MetricInput) -> _Row:
    """:func:`_row` of a metric input, paired or not (raises as _row does)."""
    spec = mi.spec
    if not spec.paired:
        if mi.pairs is not None:
            raise JudgeInputError(f"metric {spec.name!r}: statistic {spec.statistic!r} takes two arms, not pairs")
        return _row(spec, mi.primary, mi.candidate)
    if mi.primary is not None or mi.candidate is not None:
        raise JudgeInputError(f"metric {spec.name!r}: statistic {spec.statistic!r} takes pairs "
                              "(MetricInput.of_pairs), not two arms")
    data = mi.pairs
    if data is None:
        raise _NoDataError("no paired data")
    if isinstance(data, NoData):
        raise _NoDataError(data.reason)
    if not isinstance(data, Paired):
        raise JudgeInputError(f"metric {spec.name!r}: paired data must be Paired, not {type(data).__name__}")
    if data.has_nan:
        raise _NoDataError("paired data contain NaN")
    return _Row(paired=data)


def _row(spec: MetricSpec, p: ArmData, c: ArmData) -> _Row:
    """Raises _NoDataError (no usable data) or JudgeInputError (data of the wrong kind for the statistic)."""
    for name, data in (("primary", p), ("candidate", c)):
        reason = _arm_missing(name, data)
        if reason:
            raise _NoDataError(reason)
    if spec.statistic in ("rate", "agreement"):
        if not (isinstance(p, Counts) and isinstance(c, Counts)):
            raise JudgeInputError(f"metric {spec.name!r}: statistic {spec.statistic!r} needs Counts for both arms")
        return _Row(counts=(p.failures, p.total, c.failures, c.total), exact=p.exact)
    if not (isinstance(p, Samples | Histogram) and isinstance(c, Samples | Histogram)):
        raise JudgeInputError(
            f"metric {spec.name!r}: statistic {spec.statistic!r} needs samples or histograms, not counts"
        )
    le = _layout(p, c)
    cp, sum_p, sq_p = _binned(p, le)
    cc, sum_c, sq_c = _binned(c, le)
    return _Row(le=le, cum=(cp, cc), sums=(sum_p, sum_c), sums_sq=(sq_p, sq_c))


def _batch(spec: MetricSpec, rows: Sequence[_Row], *, alpha: float, beta: float) -> Batch | PairedBatch:
    """One kernel call for rows of the same :meth:`_Row.group`."""
    first = rows[0]
    if first.paired is not None:
        return batch_paired(spec, [r.paired for r in rows if r.paired is not None], alpha=alpha, beta=beta)
    if first.le is None:
        f = np.asarray([r.counts for r in rows], dtype=np.float64)
        exact = np.asarray([r.exact for r in rows], dtype=bool)
        return batch_counts(spec, f[:, 0], f[:, 1], f[:, 2], f[:, 3], alpha=alpha, beta=beta, exact_p=exact)
    cum_p = np.stack([r.cum[0] for r in rows if r.cum is not None])
    cum_c = np.stack([r.cum[1] for r in rows if r.cum is not None])

    def column(values: list[float | None]) -> FloatArray | None:
        return None if values[0] is None else np.asarray(values, dtype=np.float64)

    sums = (column([r.sums[0] for r in rows]), column([r.sums[1] for r in rows]))
    sums_sq = (column([r.sums_sq[0] for r in rows]), column([r.sums_sq[1] for r in rows]))
    return batch_binned(spec, cum_p, cum_c, first.le, alpha=alpha, beta=beta, sums=sums, sums_sq=sums_sq)


def _prepare(spec: MetricSpec, p: ArmData, c: ArmData, *, alpha: float, beta: float) -> Batch | PairedBatch:
    return _batch(spec, [_row(spec, p, c)], alpha=alpha, beta=beta)


def needed_samples(spec: MetricSpec) -> int:
    """Samples needed per arm: ``min_samples``, and for pNN at least MIN_TAIL_COUNT above the quantile."""
    q = spec.quantile
    if q is None:
        return spec.min_samples
    return max(spec.min_samples, math.ceil(MIN_TAIL_COUNT / (1.0 - q) - 1e-9))


def _finish(
    spec: MetricSpec, ep: est.Estimate, ec: est.Estimate, log_p: FloatArray, log_c: FloatArray,
    *, alpha: float, beta: float,
) -> Batch:
    need = needed_samples(spec)
    enough = (ep.n >= need) & (ec.n >= need)
    with np.errstate(invalid="ignore", divide="ignore"):
        if spec.margin.relative:
            theta = log_c - log_p
            var = ep.var / np.exp(2 * log_p) + ec.var / np.exp(2 * log_c)
            usable = enough & np.isfinite(log_p) & np.isfinite(log_c)
            # Bucket resolution: how much higher (lower) the true ratio may be than the interpolated one.
            slack_up = np.log(ec.hi_value / ec.value) + np.log(ep.value / ep.lo_value)
            slack_down = np.log(ec.value / ec.lo_value) + np.log(ep.hi_value / ep.value)
        else:
            theta = ec.value - ep.value
            var = ep.var + ec.var
            usable = enough & np.isfinite(theta)
            slack_up = (ec.hi_value - ec.value) + (ep.value - ep.lo_value)
            slack_down = (ec.value - ec.lo_value) + (ep.hi_value - ep.value)
    m_up, m_down = _margins(spec)
    b = decide(
        theta, var, direction=spec.direction.value, margin_up=m_up, margin_down=m_down, tau=m_up,
        alpha=alpha, beta=beta, open_up=ec.open_hi, open_down=ep.open_hi,
        slack_up=np.maximum(slack_up, 0.0), slack_down=np.maximum(slack_down, 0.0),
    )
    code = np.where(usable, b.code, NODATA).astype(np.int64)
    return Batch(b, code, ep, ec, need)


def batch_binned(
    spec: MetricSpec,
    cum_p: FloatArray,
    cum_c: FloatArray,
    le: FloatArray,
    *,
    alpha: float,
    beta: float,
    sums: tuple[FloatArray | None, FloatArray | None] = (None, None),
    sums_sq: tuple[FloatArray | None, FloatArray | None] = (None, None),
) -> Batch:
    """Sequential decisions for S streams of a quantile or mean metric from cumulative bucket counts (S,B)."""
    q = spec.quantile
    if q is not None:
        ep = est.quantile_binned(cum_p, le, q)
        ec = est.quantile_binned(cum_c, le, q)
    elif spec.statistic == "mean":
        ep = est.mean_binned(cum_p, le, sums[0], sums_sq[0])
        ec = est.mean_binned(cum_c, le, sums[1], sums_sq[1])
    else:
        raise JudgeInputError(f"metric {spec.name!r}: statistic {spec.statistic!r} is not computed from buckets")
    with np.errstate(invalid="ignore", divide="ignore"):
        log_p = np.where(ep.value > 0, np.log(np.where(ep.value > 0, ep.value, 1.0)), np.nan)
        log_c = np.where(ec.value > 0, np.log(np.where(ec.value > 0, ec.value, 1.0)), np.nan)
    return _finish(spec, ep, ec, log_p, log_c, alpha=alpha, beta=beta)


def batch_counts(
    spec: MetricSpec,
    failures_p: FloatArray,
    totals_p: FloatArray,
    failures_c: FloatArray,
    totals_c: FloatArray,
    *,
    alpha: float,
    beta: float,
    exact_p: BoolArray | None = None,
) -> Batch:
    """Sequential decisions for S streams of a rate or agreement metric from cumulative counts.

    ``exact_p``: per stream, whether the primary's proportion is a known constant (:attr:`Counts.exact`;
    only agreement reads it)."""
    agree = spec.statistic == "agreement"
    if spec.statistic not in ("rate", "agreement"):
        raise JudgeInputError(f"metric {spec.name!r}: statistic {spec.statistic!r} is not computed from counts")
    ep, sp = est.rate_counts(failures_p, totals_p, agreement=agree)
    ec, sc = est.rate_counts(failures_c, totals_c, agreement=agree)
    if agree or spec.margin.relative:
        # Agreement, and a rate with a relative margin: exact per-arm confidence sequences (a ratio of
        # proportions near 0 defeats the normal approximation; see shadowctl.judge.proportion).
        exact = np.zeros(ep.n.shape, dtype=bool)
        if agree and exact_p is not None:
            exact = np.asarray(exact_p, dtype=bool)
        counts = tuple(np.asarray(x, dtype=np.float64) for x in (failures_p, totals_p, failures_c, totals_c))
        exact_batch = _agreement(spec, counts, ep, ec, exact, alpha=alpha, beta=beta / 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            normal = _finish(spec, ep, ec, np.log(sp), np.log(sc), alpha=alpha, beta=beta / 2)
        return _pass_sooner(spec, exact_batch, normal)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _finish(spec, ep, ec, np.log(sp), np.log(sc), alpha=alpha, beta=beta)


def _pass_sooner(spec: MetricSpec, exact: Batch, normal: Batch) -> Batch:
    """The exact sequences' decision, with the normal mixture's pass bounds intersected in.

    The exact per-arm sequences (:mod:`shadowctl.judge.proportion`) are right at the edges (0 or all of n
    agreeing pairs or failures), where the normal mixture's delta-method variance is infinite: that rule
    could never fail a candidate that never agrees, or one failing every request against a primary with
    none. So a *fail* rests on the exact sequences alone, at the whole alpha: monotone in the counts (one
    more agreeing pair never brings a fail nearer) and valid at every look. But they are slow to *pass*
    in the interior (a uniform prior, Bonferroni over two arms: about 6 times the requests to pass an A/A
    at 1% errors, `bench/judge/rate_relative.py`), where the normal mixture is quick. The pass bounds are
    therefore the intersection of both rules' bounds, each at beta/2: a union bound keeps the false-pass
    error within beta, and a pass comes as soon as either rule shows the effect inside the margin."""
    e, n = exact.bounds, normal.bounds
    with np.errstate(invalid="ignore"):
        lower_pass = np.fmax(e.lower_pass, n.lower_pass)
        upper_pass = np.fmin(e.upper_pass, n.upper_pass)
    m_up, m_down = _margins(spec)
    b = classify(e.theta, e.lower_fail, e.upper_fail, lower_pass, upper_pass,
                 direction=spec.direction.value, margin_up=m_up, margin_down=m_down)
    code = np.where(exact.code == NODATA, NODATA, b.code).astype(np.int64)
    return Batch(b, code, exact.primary, exact.candidate, exact.need)


def _agreement(spec: MetricSpec, counts: tuple[FloatArray, ...], ep: est.Estimate, ec: est.Estimate,
               exact: BoolArray, *, alpha: float, beta: float) -> Batch:
    """Agreement, or an error rate with a relative margin: each arm's beta-binomial confidence sequence,
    combined into bounds on the ratio (or the difference), see :mod:`shadowctl.judge.proportion`. A
    sampled baseline splits each level over the two arms; a known one (``exact``, agreement only) is a
    constant, and the prior of the candidate's sequence sits between its fail and pass lines. For a rate
    the proportion is the failures' (``ep``/``ec`` hold rates), for agreement the agreeing pairs'."""
    f_b, n_b, f_c, n_c = counts
    k_b, k_c = (n_b - f_b, n_c - f_c) if spec.statistic == "agreement" else (f_b, f_c)
    p_b = np.nan_to_num(ep.value)
    m = spec.margin
    relative = m.relative

    def ends(level: float) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """Lower and upper ends for the candidate, then the baseline, at `level` for the metric."""
        lc = np.empty_like(p_b)
        uc = np.empty_like(p_b)
        lb = p_b.copy()
        ub = p_b.copy()
        if exact.any():  # a constant baseline: one sequence at the whole level, its prior where the lines are
            pe = p_b[exact]
            center = pe * (1.0 - m.value / 2) if relative else pe - m.value / 2
            sd = m.value * pe if relative else np.full_like(pe, m.value)
            lc[exact], uc[exact] = prop.confidence_sequence(k_c[exact], n_c[exact], level, prop.prior_near(center, sd))
        sampled = ~exact
        if sampled.any():  # Bonferroni over the two arms' sequences
            lc[sampled], uc[sampled] = prop.confidence_sequence(k_c[sampled], n_c[sampled], level / 2)
            lb[sampled], ub[sampled] = prop.confidence_sequence(k_b[sampled], n_b[sampled], level / 2)
        return lc, uc, lb, ub

    def effect(c: FloatArray, b: FloatArray) -> FloatArray:
        if not relative:
            return c - b
        with np.errstate(divide="ignore", invalid="ignore"):
            out: FloatArray = np.log(c) - np.log(b)
        return out

    a_fail = alpha / 2.0 if spec.direction is Direction.either else alpha
    lc, uc, lb, ub = ends(a_fail)
    lower_fail, upper_fail = effect(lc, ub), effect(uc, lb)
    lc, uc, lb, ub = ends(beta)
    lower_pass, upper_pass = effect(lc, ub), effect(uc, lb)
    theta = effect(np.nan_to_num(ec.value), p_b)
    m_up, m_down = _margins(spec)
    # An undefined end (0/0: neither arm has agreeing pairs) says nothing: the widest.
    b = classify(theta, np.where(np.isnan(lower_fail), -np.inf, lower_fail),
                 np.where(np.isnan(upper_fail), np.inf, upper_fail),
                 np.where(np.isnan(lower_pass), -np.inf, lower_pass),
                 np.where(np.isnan(upper_pass), np.inf, upper_pass),
                 direction=spec.direction.value, margin_up=m_up, margin_down=m_down)
    need = needed_samples(spec)
    enough = (ep.n >= need) & (ec.n >= need)
    code = np.where(enough, b.code, NODATA).astype(np.int64)
    return Batch(b, code, ep, ec, need)


def _margins(spec: MetricSpec) -> tuple[float, float]:
    m = spec.margin
    if m.relative:
        return math.log1p(m.value), math.log1p(-m.value)
    return m.value, -m.value


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "undefined"  # 0/0: neither arm has a failure (or an agreeing pair)
    if not math.isfinite(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.4g}"


def _count(x: float) -> str:
    return f"{x:.0f}" if math.isfinite(x) and float(x).is_integer() else _fmt(x)


def _to_user(spec: MetricSpec, theta: float) -> float:
    return math.exp(theta) if spec.margin.relative else theta


def nodata_result(spec: MetricSpec, reason: str, *, alpha: float, beta: float, n_p: float = 0, n_c: float = 0) -> MetricResult:
    """A ``nodata`` result with its reason, for a metric whose source gave nothing usable."""
    return MetricResult(
        name=spec.name, outcome=Outcome.nodata, statistic=spec.statistic, direction=spec.direction,
        margin=spec.margin, critical=spec.critical, n_primary=n_p, n_candidate=n_c, primary_value=None,
        candidate_value=None, effect=None, interval=(None, None), alpha=alpha, beta=beta, crossed=None,
        threshold=None, sentence=f"{spec.name}: no data ({reason}); never a pass.",
    )


def judge_metric(
    spec: MetricSpec, primary: ArmData, candidate: ArmData, *, alpha: float, beta: float, final: bool = False
) -> MetricResult:
    """Judge one metric sequentially at false-fail level ``alpha`` (already split) and false-pass ``beta``."""
    try:
        batch = _prepare(spec, primary, candidate, alpha=alpha, beta=beta)
    except _NoDataError as exc:
        return nodata_result(spec, str(exc), alpha=alpha, beta=beta)
    return result_of(spec, batch, 0, alpha=alpha, beta=beta, final=final)


def result_of(
    spec: MetricSpec, batch: Batch | PairedBatch, i: int, *, alpha: float, beta: float, final: bool
) -> MetricResult:
    """The :class:`MetricResult` of stream ``i`` of a batch."""
    if isinstance(batch, PairedBatch):
        return paired_result(spec, batch, i, alpha=alpha, beta=beta, final=final)
    ep, ec = batch.primary, batch.candidate
    n_p, n_c = float(ep.n[i]), float(ec.n[i])
    vp, vc = float(ep.value[i]), float(ec.value[i])
    code = int(batch.code[i])
    if code == NODATA:
        if n_p < batch.need or n_c < batch.need:
            why = f"{_count(n_p)} primary and {_count(n_c)} candidate samples, {batch.need} needed per arm"
            q = spec.quantile
            if q is not None and batch.need > spec.min_samples:
                why += f" (p{q * 100:g} needs {MIN_TAIL_COUNT} above it)"
        else:
            why = f"primary {_fmt(vp)}, candidate {_fmt(vc)}: a relative margin needs both statistics above 0"
        return nodata_result(spec, why, alpha=alpha, beta=beta, n_p=n_p, n_c=n_c)
    return _sequential_result(spec, code, batch.bounds, i, n_p, n_c, vp, vc, alpha, beta, final)


def _sequential_result(
    spec: MetricSpec, code: int, b: Bounds, i: int, n_p: float, n_c: float, vp: float, vc: float,
    alpha: float, beta: float, final: bool,
) -> MetricResult:
    d = spec.direction
    theta = float(b.theta[i])
    m_up, m_down = _margins(spec)
    lf, uf = float(b.lower_fail[i]), float(b.upper_fail[i])
    lp, up = float(b.lower_pass[i]), float(b.upper_pass[i])
    if d is Direction.increase:
        lower, upper = lf, up
    elif d is Direction.decrease:
        lower, upper = lp, uf
    else:
        lower, upper = min(lf, lp), max(uf, up)
    scale = "ratio" if spec.margin.relative else "difference"
    stat = spec.statistic
    base = (
        f"{spec.name} {stat}: candidate {_fmt(vc)} vs primary {_fmt(vp)} "
        f"({_count(n_c)}/{_count(n_p)} samples), {scale} {_fmt(_to_user(spec, theta))}"
    )
    crossed: str | None = None
    threshold: float | None = None
    if code == PASS:
        outcome = Outcome.passed
        if d is Direction.decrease:
            crossed, threshold = "lower bound (beta)", _to_user(spec, m_down)
            why = f"lower bound {_fmt(_to_user(spec, lp))} > margin {_fmt(threshold)}"
        elif d is Direction.increase:
            crossed, threshold = "upper bound (beta)", _to_user(spec, m_up)
            why = f"upper bound {_fmt(_to_user(spec, up))} < margin {_fmt(threshold)}"
        else:
            crossed, threshold = "both bounds (beta)", _to_user(spec, m_up)
            why = (f"bounds [{_fmt(_to_user(spec, lp))}, {_fmt(_to_user(spec, up))}] inside "
                   f"[{_fmt(_to_user(spec, m_down))}, {_fmt(threshold)}]")
        sentence = f"pass: {base}; {why}, so not worse by the margin {spec.margin} (false-pass risk <= {beta:g})."
    elif code == FAIL:
        outcome = Outcome.failed
        zero = _to_user(spec, 0.0)
        threshold = zero
        if lf > 0:
            crossed = "lower bound (alpha)"
            why = f"lower bound {_fmt(_to_user(spec, lf))} > {_fmt(zero)}"
        else:
            crossed = "upper bound (alpha)"
            why = f"upper bound {_fmt(_to_user(spec, uf))} < {_fmt(zero)}"
        sentence = f"fail: {base}; {why}, so the candidate is worse (false-fail risk <= {alpha:g})."
    else:
        outcome = Outcome.inconclusive if final else Outcome.cont
        word = "inconclusive" if final else "continue"
        sentence = (
            f"{word}: {base}; interval [{_fmt(_to_user(spec, lower))}, {_fmt(_to_user(spec, upper))}] "
            f"still holds both 'not worse' and 'worse by {spec.margin}'."
        )
    return MetricResult(
        name=spec.name, outcome=outcome, statistic=stat, direction=d, margin=spec.margin,
        critical=spec.critical, n_primary=n_p, n_candidate=n_c, primary_value=vp, candidate_value=vc,
        effect=_to_user(spec, theta), interval=(_to_user(spec, lower), _to_user(spec, upper)),
        alpha=alpha, beta=beta, crossed=crossed, threshold=threshold, sentence=sentence,
    )


def combine(results: Sequence[MetricResult], *, final: bool, method: str = "sequential") -> Verdict:
    """The verdict over metric results (critical fail > nodata > continue > fail > pass)."""
    res = tuple(results)
    if not res:
        return Verdict(Outcome.nodata, res, "no metrics to judge", method)

    def names(outcome: Outcome, critical: bool | None = None) -> list[str]:
        return [r.name for r in res if r.outcome is outcome and (critical is None or r.critical == critical)]

    crit = names(Outcome.failed, critical=True)
    if crit:
        return Verdict(Outcome.failed, res, f"critical metric(s) failed: {', '.join(crit)}", method)
    nod = names(Outcome.nodata)
    if nod:
        return Verdict(Outcome.nodata, res, f"no usable data for: {', '.join(nod)} (never a pass)", method)
    failed = names(Outcome.failed)
    open_ = names(Outcome.cont) + names(Outcome.inconclusive)
    if open_ and not final:
        extra = f"; already failed: {', '.join(failed)}" if failed else ""
        return Verdict(Outcome.cont, res, f"still undecided: {', '.join(open_)}{extra}", method)
    if failed:
        return Verdict(Outcome.failed, res, f"metric(s) failed: {', '.join(failed)}", method)
    if open_:
        return Verdict(Outcome.inconclusive, res, f"undecided at the maximum duration: {', '.join(open_)}", method)
    return Verdict(Outcome.passed, res, f"all {len(res)} metric(s) passed", method)


@dataclass(frozen=True)
class LookInput:
    """All metrics of one look of one rollout, and the levels to judge them at."""

    inputs: Sequence[MetricInput]
    alpha: float = 0.05
    beta: float = 0.05
    final: bool = False
    """The last look of the phase: an undecided metric is inconclusive."""


def check_levels(alpha: float, beta: float) -> None:
    """Raise JudgeInputError unless both error levels are probabilities strictly between 0 and 1."""
    if not (0 < alpha < 1 and 0 < beta < 1):
        raise JudgeInputError(f"alpha and beta must be in (0, 1), got alpha={alpha}, beta={beta}")


def judge_many(looks: Sequence[LookInput]) -> list[Verdict | JudgeInputError]:
    """The sequential verdict of every look: ``judge(look.inputs, alpha=..., beta=..., final=...)`` each.

    Bonferroni is applied here, per look (each metric at alpha/k, k the look's metrics), and each
    metric's data are checked here (missing, NaN, too few, bucket layouts). Metrics of many looks with
    the same spec, level and bucket layout go through one vectorized kernel call; a kernel works row
    by row, so a look's verdict does not depend on which other looks were judged with it. A look whose
    levels or data are of the wrong kind gets its JudgeInputError instead of a verdict.
    """
    results: list[list[MetricResult | None]] = [[None] * len(look.inputs) for look in looks]
    errors: dict[int, JudgeInputError] = {}
    groups: dict[tuple[MetricSpec, float, float, tuple[object, ...]], list[tuple[int, int, _Row]]] = {}
    for i, look in enumerate(looks):
        try:
            check_levels(look.alpha, look.beta)
            alpha = look.alpha / max(len(look.inputs), 1)
            prepared: list[tuple[int, tuple[MetricSpec, float, float, tuple[object, ...]], _Row]] = []
            for j, mi in enumerate(look.inputs):
                try:
                    row = _input_row(mi)
                except _NoDataError as exc:
                    results[i][j] = nodata_result(mi.spec, str(exc), alpha=alpha, beta=look.beta)
                    continue
                prepared.append((j, (mi.spec, alpha, look.beta, row.group()), row))
        except JudgeInputError as exc:
            errors[i] = exc
            continue
        for j, key, row in prepared:
            groups.setdefault(key, []).append((i, j, row))
    for (spec, level, beta, _), members in groups.items():
        batch = _batch(spec, [row for _, _, row in members], alpha=level, beta=beta)
        for n, (i, j, _) in enumerate(members):
            results[i][j] = result_of(spec, batch, n, alpha=level, beta=beta, final=looks[i].final)
    out: list[Verdict | JudgeInputError] = []
    for i, look in enumerate(looks):
        if i in errors:
            out.append(errors[i])
            continue
        done = [r for r in results[i] if r is not None]
        assert len(done) == len(look.inputs)
        out.append(combine(done, final=look.final))
    return out


def judge(
    inputs: Sequence[MetricInput],
    *,
    alpha: float = 0.05,
    beta: float = 0.05,
    method: str = "sequential",
    final: bool = False,
) -> Verdict:
    """Judge all metrics of one look. ``final``: this is the last look (undecided -> inconclusive).

    ``method="fixed"`` runs the Kayenta-parity judge with its default configuration (NetflixACAJudge's:
    confidence 0.98, tolerance 0.25; ``alpha`` and ``beta`` are not used); use
    :func:`shadowctl.judge.fixed.judge_fixed` to configure it. The sequential judge is
    :func:`judge_many` of this one look.
    """
    check_levels(alpha, beta)
    if method == "fixed":
        from shadowctl.judge.fixed import FixedConfig, judge_fixed

        return judge_fixed(inputs, FixedConfig())
    if method != "sequential":
        raise JudgeInputError(f"unknown method {method!r}: use 'sequential' or 'fixed'")
    [verdict] = judge_many([LookInput(inputs, alpha, beta, final)])
    if isinstance(verdict, JudgeInputError):
        raise verdict
    return verdict
