"""Fixed-horizon judge with the structure of Kayenta's NetflixACAJudge, for parity and comparison.

Per metric: NaN handling (remove, or replace with 0), optional outlier removal (outside the
quartiles by ``outlier_factor`` x IQR), then a Mann-Whitney U test with the Hodges-Lehmann estimate of
the shift candidate - primary and its distribution-free confidence interval (the order statistics of
all pairwise differences; the ranks come from the normal approximation of U). The metric is ``High``
when the interval lies above ``tolerance`` x |primary mean| and the effect size (mean ratio or CLES)
reaches its threshold, ``Low`` symmetrically, ``NoData`` without data, else ``Pass``.

Score: per group, the share of ``Pass`` among classified metrics (NoData excluded), weighted by group
weights; Pass at ``pass_score``, Marginal between, Fail below ``marginal_score``. A critical metric
classified High/Low in its direction fails the whole verdict (score 0).

This method is valid for *one* look. Checked at every interval it inflates false failures (that is
why the default judge is sequential); it exists so that results can be compared with Kayenta's.
The pairwise-difference order statistics are found by bisection on the value axis with sorted
arrays, so memory stays O(n + m) however large the samples.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from shadowctl.judge.model import (
    Counts,
    Direction,
    FloatArray,
    Histogram,
    JudgeInputError,
    Margin,
    MetricInput,
    MetricResult,
    NoData,
    Outcome,
    Samples,
    Verdict,
)


class Classification(str, enum.Enum):
    passed = "Pass"
    high = "High"
    low = "Low"
    nodata = "NoData"


@dataclass(frozen=True)
class FixedConfig:
    """Parameters of the fixed judge (defaults follow Kayenta's)."""

    confidence: float = 0.95
    tolerance: float = 0.25
    effect_measure: str = "meanRatio"  # or "cles"
    # High needs effect >= effect_high, Low needs effect <= effect_low. None: no extra condition
    # (1.0 for the mean ratio, 0.5 for CLES, the probability that a candidate value exceeds a primary one).
    effect_high: float | None = None
    effect_low: float | None = None
    nan_strategy: str = "remove"  # or "replace" (with 0)
    outliers: str = "keep"  # or "remove"
    outlier_factor: float = 3.0
    pass_score: float = 95.0
    marginal_score: float = 75.0
    group_weights: Mapping[str, float] = field(default_factory=dict)
    metric_groups: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise JudgeInputError(f"fixed judge: confidence must be in (0, 1), got {self.confidence}")
        if self.effect_measure not in ("meanRatio", "cles"):
            raise JudgeInputError(f"fixed judge: effect_measure must be 'meanRatio' or 'cles', not {self.effect_measure!r}")
        if self.nan_strategy not in ("remove", "replace"):
            raise JudgeInputError(f"fixed judge: nan_strategy must be 'remove' or 'replace', not {self.nan_strategy!r}")
        if self.outliers not in ("keep", "remove"):
            raise JudgeInputError(f"fixed judge: outliers must be 'keep' or 'remove', not {self.outliers!r}")
        if self.marginal_score > self.pass_score:
            raise JudgeInputError("fixed judge: marginal_score must not be above pass_score")


@dataclass(frozen=True)
class MannWhitney:
    """Result of :func:`mann_whitney`: shift = candidate - primary."""

    u: float
    p_value: float
    estimate: float
    lower: float
    upper: float
    cles: float  # P(candidate > primary) + 0.5 P(equal)


def _kth_difference(x: FloatArray, y_sorted: FloatArray, k: int) -> float:
    """The k-th smallest (1-based) of all differences x_i - y_j, by bisection on the value."""
    lo = float(x.min() - y_sorted[-1])
    hi = float(x.max() - y_sorted[0])
    if lo == hi:
        return lo
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        # number of pairs with x_i - y_j <= mid  <=>  y_j >= x_i - mid
        count = int((y_sorted.size - np.searchsorted(y_sorted, x - mid, side="left")).sum())
        if count >= k:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            break
    return hi


def mann_whitney(primary: FloatArray, candidate: FloatArray, confidence: float = 0.95) -> MannWhitney:
    """Two-sided Mann-Whitney U test with the Hodges-Lehmann shift estimate and its confidence interval."""
    x = np.asarray(candidate, dtype=np.float64)
    y = np.sort(np.asarray(primary, dtype=np.float64))
    n, m = x.size, y.size
    if n == 0 or m == 0:
        raise JudgeInputError("Mann-Whitney needs at least one value per arm")
    res = stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic" if n * m > 400 else "auto")
    u = float(res.statistic)
    nm = n * m
    hl = 0.5 * (_kth_difference(x, y, (nm + 1) // 2) + _kth_difference(x, y, nm // 2 + 1))
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    k = math.floor(nm / 2.0 - z * math.sqrt(nm * (n + m + 1) / 12.0))
    if k < 1:
        lower, upper = -math.inf, math.inf
    else:
        lower = _kth_difference(x, y, k)
        upper = _kth_difference(x, y, nm - k + 1)
    return MannWhitney(u=u, p_value=float(res.pvalue), estimate=hl, lower=lower, upper=upper, cles=u / nm)


def _clean(values: FloatArray, config: FixedConfig) -> FloatArray:
    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isnan(v), 0.0, v) if config.nan_strategy == "replace" else v[~np.isnan(v)]
    if config.outliers == "remove" and v.size >= 4:
        q1, q3 = np.percentile(v, [25, 75])
        iqr = q3 - q1
        v = v[(v >= q1 - config.outlier_factor * iqr) & (v <= q3 + config.outlier_factor * iqr)]
    return v


@dataclass(frozen=True)
class FixedMetric:
    """Classification of one metric with its numbers."""

    classification: Classification
    reason: str
    mw: MannWhitney | None = None
    effect_size: float | None = None
    n_primary: int = 0
    n_candidate: int = 0
    primary_mean: float | None = None
    candidate_mean: float | None = None


def classify(
    primary: FloatArray, candidate: FloatArray, direction: Direction | str, config: FixedConfig = FixedConfig()
) -> FixedMetric:
    """Classify one metric Pass / High / Low / NoData from raw values of both arms."""
    direction = Direction(direction)
    p = _clean(primary, config)
    c = _clean(candidate, config)
    if p.size == 0 or c.size == 0:
        return FixedMetric(Classification.nodata, "no data after NaN/outlier handling", n_primary=p.size, n_candidate=c.size)
    pm, cm = float(p.mean()), float(c.mean())
    if p.size == c.size and np.array_equal(np.sort(p), np.sort(c)):
        return FixedMetric(Classification.passed, "identical values", None, 1.0, p.size, c.size, pm, cm)
    mw = mann_whitney(p, c, config.confidence)
    neutral = 1.0 if config.effect_measure == "meanRatio" else 0.5
    if config.effect_measure == "meanRatio":
        effect = cm / pm if pm != 0 else math.inf
    else:
        effect = mw.cles
    high_ok = effect >= (neutral if config.effect_high is None else config.effect_high)
    low_ok = effect <= (neutral if config.effect_low is None else config.effect_low)
    band = config.tolerance * abs(pm)
    if direction in (Direction.increase, Direction.either) and mw.lower > band and high_ok:
        reason = f"shift interval [{mw.lower:.4g}, {mw.upper:.4g}] above +{band:.4g} (tolerance {config.tolerance:g})"
        return FixedMetric(Classification.high, reason, mw, effect, p.size, c.size, pm, cm)
    if direction in (Direction.decrease, Direction.either) and mw.upper < -band and low_ok:
        reason = f"shift interval [{mw.lower:.4g}, {mw.upper:.4g}] below -{band:.4g} (tolerance {config.tolerance:g})"
        return FixedMetric(Classification.low, reason, mw, effect, p.size, c.size, pm, cm)
    reason = f"shift interval [{mw.lower:.4g}, {mw.upper:.4g}] within the tolerance band ±{band:.4g}"
    return FixedMetric(Classification.passed, reason, mw, effect, p.size, c.size, pm, cm)


def _values(data: object) -> FloatArray | None:
    if data is None or isinstance(data, NoData):
        return None
    if isinstance(data, Samples):
        return data.values
    if isinstance(data, Histogram | Counts):
        raise JudgeInputError(
            "the fixed method compares value series (Samples or Aggregates), not histograms or counts"
        )
    raise JudgeInputError(f"unsupported data {type(data).__name__}")


def judge_fixed(inputs: Sequence[MetricInput], config: FixedConfig = FixedConfig()) -> Verdict:
    """Classify every metric and score them Kayenta-style (Pass/Marginal/Fail -> pass/inconclusive/fail)."""
    results: list[MetricResult] = []
    per_group: dict[str, list[Classification]] = {}
    critical_failed: list[str] = []
    for mi in inputs:
        spec = mi.spec
        p, c = _values(mi.primary), _values(mi.candidate)
        if p is None or c is None:
            fm = FixedMetric(Classification.nodata, "source delivered no data")
        else:
            fm = classify(p, c, spec.direction, config)
        group = config.metric_groups.get(spec.name, "default")
        per_group.setdefault(group, []).append(fm.classification)
        bad = fm.classification in (Classification.high, Classification.low)
        if bad and spec.critical:
            critical_failed.append(spec.name)
        outcome = {
            Classification.passed: Outcome.passed,
            Classification.high: Outcome.failed,
            Classification.low: Outcome.failed,
            Classification.nodata: Outcome.nodata,
        }[fm.classification]
        mw = fm.mw
        sentence = (
            f"{fm.classification.value}: {spec.name}: candidate mean {fm.candidate_mean} vs primary mean "
            f"{fm.primary_mean} ({fm.n_candidate}/{fm.n_primary} values); {fm.reason}"
        )
        results.append(
            MetricResult(
                name=spec.name, outcome=outcome, statistic="hodges-lehmann shift", direction=spec.direction,
                margin=Margin(config.tolerance, relative=True), critical=spec.critical,
                n_primary=fm.n_primary, n_candidate=fm.n_candidate, primary_value=fm.primary_mean,
                candidate_value=fm.candidate_mean, effect=None if mw is None else mw.estimate,
                interval=(None, None) if mw is None else (mw.lower, mw.upper), alpha=1 - config.confidence,
                beta=0.0, crossed=None, threshold=None, sentence=sentence, method="fixed",
                extra={
                    "classification": fm.classification.value,
                    "effectSize": fm.effect_size,
                    "pValue": None if mw is None else mw.p_value,
                    "group": group,
                },
            )
        )
    if critical_failed:
        return Verdict(Outcome.failed, tuple(results), f"critical metric(s) {', '.join(critical_failed)} "
                       "classified High/Low", "fixed", 0.0)
    weighted, weights = 0.0, 0.0
    for group, classes in per_group.items():
        judged = [c for c in classes if c is not Classification.nodata]
        if not judged:
            continue
        w = float(config.group_weights.get(group, 1.0))
        weighted += w * 100.0 * sum(c is Classification.passed for c in judged) / len(judged)
        weights += w
    if weights == 0:
        return Verdict(Outcome.nodata, tuple(results), "no metric had data", "fixed", None)
    score = weighted / weights
    if score >= config.pass_score:
        outcome, word = Outcome.passed, "Pass"
    elif score >= config.marginal_score:
        outcome, word = Outcome.inconclusive, "Marginal"
    else:
        outcome, word = Outcome.failed, "Fail"
    reason = f"score {score:.1f} ({word}; pass >= {config.pass_score:g}, marginal >= {config.marginal_score:g})"
    return Verdict(outcome, tuple(results), reason, "fixed", score)
