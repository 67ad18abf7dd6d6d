"""Fixed-horizon judge that classifies, scores and fails as Kayenta's NetflixACAJudge does.

Per metric (Kayenta's ``MannWhitneyClassifier`` with the judge's transforms):

1. NaN strategy: ``remove`` drops NaN, ``replace`` turns them into 0. Then, with ``outliers: remove``,
   values outside the fences are dropped: the IQR fences (quartiles -+ factor x IQR) widened to at
   least the 1st/99th percentiles, so a small sample keeps its extremes (``IQRDetector`` with
   ``reduceSensitivity``). Percentiles are R-7 (numpy's default), as in Kayenta.
2. An empty arm: ``Nodata`` (critical if the metric is), or ``NodataFailMetric`` when the metric must
   have data and is not critical; with NaN strategy ``replace`` an empty arm is a ``Pass``.
3. Identical samples, or one distinct value across both arms: ``Pass``.
4. Mann-Whitney (:mod:`shadowctl.judge.mannwhitney`): ``High`` when the direction allows it, the
   whole confidence set of the shift lies above ``tolerance x |Hodges-Lehmann estimate|`` and the
   effect size (mean ratio, or CLES) reaches ``allowedIncrease``; ``Low`` symmetrically with
   ``allowedDecrease``. An effect size that cannot be computed (a mean of 0) is not checked.
5. A critical metric's High/Low is *critical* only if the effect size also reaches
   ``criticalIncrease``/``criticalDecrease``.

Score (``WeightedSumScorer``): any critical metric that is not ``Pass`` fails the canary with score 0;
so does 50% or more ``Nodata`` among the metrics; otherwise each group scores the share of ``Pass``
among its Pass/High/Low/NodataFailMetric metrics (a group with none of those counts 100), groups
are summed with their weights in percent (groups without a weight share what is left of 100), and
the sum is rounded to two decimals. Pass at ``passScore``, Marginal (shadowctl: inconclusive) from
``marginalScore``, else Fail. Muted metrics are left out of the score.

One rule is shadowctl's own: no data is never a pass (design invariant 4). Where Kayenta's score
passes although a metric had no data (a Nodata metric below the 50% rule, an empty arm under NaN
strategy ``replace``), the labels and the score stay Kayenta's and the verdict is ``nodata``.

This method is valid for *one* look. Checked at every interval it inflates false failures (that is
why the default judge is sequential); it exists so that results can be compared with Kayenta's.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal

import numpy as np

from shadowctl.judge.mannwhitney import MannWhitney, mann_whitney
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
from shadowctl.policy.model import Analysis, EffectSize, Metric, MetricFixed, Outliers

__all__ = [
    "Classification",
    "FixedConfig",
    "FixedMetric",
    "MannWhitney",
    "MetricOptions",
    "ScoreEntry",
    "ScoreResult",
    "classify",
    "config_from_policy",
    "judge_fixed",
    "mann_whitney",
    "outlier_fences",
    "score",
]

NODATA_SHARE = 50.0
"""Percent of Nodata metrics at or above which Kayenta fails the canary."""


class Classification(str, enum.Enum):
    """Kayenta's metric labels, spelled as Kayenta spells them."""

    passed = "Pass"
    high = "High"
    low = "Low"
    nodata = "Nodata"
    nodata_fail = "NodataFailMetric"


_MEASURES = ("meanRatio", "cles")
_NAN = ("remove", "replace")
_OUTLIERS = ("keep", "remove")


@dataclass(frozen=True)
class MetricOptions:
    """One metric's Kayenta options (``analysisConfigurations.canary``); None thresholds: neutral."""

    effect_measure: str = "meanRatio"  # or "cles"
    allowed_increase: float | None = None
    allowed_decrease: float | None = None
    critical_increase: float | None = None
    critical_decrease: float | None = None
    nan_strategy: str = "remove"  # or "replace" (with 0)
    outliers: str = "keep"  # or "remove"
    outlier_factor: float = 3.0
    must_have_data: bool = False
    muted: bool = False
    groups: tuple[str, ...] = ("default",)

    def __post_init__(self) -> None:
        for what, value, allowed in (("effect_measure", self.effect_measure, _MEASURES),
                                     ("nan_strategy", self.nan_strategy, _NAN), ("outliers", self.outliers, _OUTLIERS)):
            if value not in allowed:
                raise JudgeInputError(f"fixed judge: {what} must be one of {', '.join(allowed)}, not {value!r}")
        if not self.outlier_factor > 0:
            raise JudgeInputError(f"fixed judge: outlier_factor must be above 0, got {self.outlier_factor}")
        if not self.groups:
            raise JudgeInputError("fixed judge: a metric needs at least one group")

    @property
    def neutral(self) -> float:
        """The effect size of no change: 1 for the mean ratio, 0.5 for CLES."""
        return 0.5 if self.effect_measure == "cles" else 1.0

    def _or_neutral(self, v: float | None) -> float:
        return self.neutral if v is None else v

    @property
    def allowed(self) -> tuple[float, float]:
        """(allowedDecrease, allowedIncrease)."""
        return self._or_neutral(self.allowed_decrease), self._or_neutral(self.allowed_increase)

    @property
    def critical_thresholds(self) -> tuple[float, float]:
        """(criticalDecrease, criticalIncrease)."""
        return self._or_neutral(self.critical_decrease), self._or_neutral(self.critical_increase)


@dataclass(frozen=True)
class FixedConfig:
    """Parameters of the fixed judge. Defaults are NetflixACAJudge's (confidence 0.98, tolerance 0.25)."""

    confidence: float = 0.98
    tolerance: float = 0.25
    pass_score: float = 95.0
    marginal_score: float = 75.0
    group_weights: Mapping[str, float] = field(default_factory=dict)
    """Percent per group; groups without a weight share 100 minus the sum of these."""
    metrics: Mapping[str, MetricOptions] = field(default_factory=dict)
    """Per metric name; a metric not named here uses ``default``."""
    default: MetricOptions = MetricOptions()

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise JudgeInputError(f"fixed judge: confidence must be in (0, 1), got {self.confidence}")
        if not self.tolerance >= 0:
            raise JudgeInputError(f"fixed judge: tolerance must be at least 0, got {self.tolerance}")
        if self.marginal_score > self.pass_score:
            raise JudgeInputError("fixed judge: marginal_score must not be above pass_score")
        if any(not w >= 0 for w in self.group_weights.values()):
            raise JudgeInputError("fixed judge: group weights must be at least 0")

    def options(self, metric: str) -> MetricOptions:
        return self.metrics.get(metric, self.default)


def _options(effect: EffectSize, nan: str, outliers: Outliers, must: bool, muted: bool,
             groups: tuple[str, ...]) -> MetricOptions:
    return MetricOptions(
        effect_measure=effect.measure.value, allowed_increase=effect.allowed_increase,
        allowed_decrease=effect.allowed_decrease, critical_increase=effect.critical_increase,
        critical_decrease=effect.critical_decrease, nan_strategy=nan, outliers=outliers.strategy.value,
        outlier_factor=outliers.outlier_factor, must_have_data=must, muted=muted, groups=groups,
    )


def metric_options(analysis: Analysis, metric: Metric) -> MetricOptions:
    """One metric's options: its own ``fixed`` block, else ``spec.analysis.fixed``'s (block by block)."""
    f, own = analysis.fixed, metric.fixed or MetricFixed()
    return _options(
        own.effect_size or f.effect_size, (own.nan_strategy or f.nan_strategy).value, own.outliers or f.outliers,
        f.must_have_data if own.must_have_data is None else own.must_have_data, bool(own.muted),
        metric.score_groups,
    )


def config_from_policy(analysis: Analysis) -> FixedConfig:
    """The fixed judge's configuration from a policy's ``spec.analysis`` (``fixed`` and the metrics)."""
    f = analysis.fixed
    default = _options(f.effect_size, f.nan_strategy.value, f.outliers, f.must_have_data, False, ("default",))
    return FixedConfig(
        confidence=f.confidence, tolerance=f.tolerance, pass_score=f.pass_score, marginal_score=f.marginal_score,
        group_weights=dict(f.group_weights), metrics={m.name: metric_options(analysis, m) for m in analysis.metrics},
        default=default,
    )


# --------------------------------------------------------------------------- transforms


def outlier_fences(values: FloatArray, factor: float, reduce_sensitivity: bool = True) -> tuple[float, float]:
    """Tukey's fences (quartiles -+ factor x IQR); with ``reduce_sensitivity`` widened to the 1st/99th percentiles."""
    q1, q3, p1, p99 = np.percentile(values, [25, 75, 1, 99])
    lo, hi = float(q1 - factor * (q3 - q1)), float(q3 + factor * (q3 - q1))
    if reduce_sensitivity:
        lo, hi = min(float(p1), lo), max(float(p99), hi)
    return lo, hi


def transform(values: FloatArray, options: MetricOptions) -> FloatArray:
    """NaN strategy, then outlier removal (the judge's order)."""
    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isnan(v), 0.0, v) if options.nan_strategy == "replace" else v[~np.isnan(v)]
    if options.outliers == "remove" and v.size:
        lo, hi = outlier_fences(v, options.outlier_factor)
        v = v[(v >= lo) & (v <= hi)]
    return v


# --------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class FixedMetric:
    """Classification of one metric with its numbers. ``critical``: Kayenta's flag (fails the canary)."""

    classification: Classification
    reason: str
    critical: bool = False
    mw: MannWhitney | None = None
    effect_size: float | None = None
    deviation: float | None = None  # the mean ratio, NaN when a mean is 0
    n_primary: int = 0
    n_candidate: int = 0
    primary_mean: float | None = None
    candidate_mean: float | None = None
    band: float | None = None  # tolerance x |estimate|
    had_data: bool = True  # both arms held a value that is not NaN before the transforms


def mean_ratio(primary: FloatArray, candidate: FloatArray) -> float:
    """Candidate mean / primary mean; NaN when either mean is 0 (Kayenta's ``EffectSizes.meanRatio``)."""
    pm, cm = float(primary.mean()), float(candidate.mean())
    return math.nan if pm == 0.0 or cm == 0.0 else cm / pm


def _same(bound: float, limit: float) -> bool:
    """Equal up to the rounding of a difference of two floats (0.06000000000000005 is 1.16 - 1.10 = 0.06)."""
    return math.isclose(bound, limit, rel_tol=1e-9)


def _above(bound: float, is_open: bool, limit: float) -> bool:
    """The confidence set lies above ``limit``: its bound is above, or on it and the bound itself is rejected."""
    return is_open if _same(bound, limit) else bound > limit


def _below(bound: float, is_open: bool, limit: float) -> bool:
    return is_open if _same(bound, limit) else bound < limit


def _meets(effect: float, threshold: float, high: bool) -> bool:
    if math.isnan(effect):
        return True
    return effect >= threshold if high else effect <= threshold


def _empty(options: MetricOptions, critical: bool, base: FixedMetric) -> FixedMetric:
    if options.nan_strategy == "replace":
        return replace(base, reason="an arm is empty and the NaN strategy is replace")
    if options.must_have_data and not critical:
        return replace(base, classification=Classification.nodata_fail,
                       reason="missing data in an arm that must have data")
    return replace(base, classification=Classification.nodata, reason="missing data in an arm", critical=critical)


def classify(
    primary: FloatArray,
    candidate: FloatArray,
    direction: Direction | str,
    config: FixedConfig = FixedConfig(),
    options: MetricOptions | None = None,
    critical: bool = False,
) -> FixedMetric:
    """Classify one metric Pass / High / Low / Nodata / NodataFailMetric from raw values of both arms."""
    direction = Direction(direction)
    options = options or config.default
    raw_p, raw_c = np.asarray(primary, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    had_data = bool((~np.isnan(raw_p)).any() and (~np.isnan(raw_c)).any())
    p, c = transform(raw_p, options), transform(raw_c, options)
    base = FixedMetric(Classification.passed, "", n_primary=p.size, n_candidate=c.size, had_data=had_data)
    if p.size == 0 or c.size == 0:
        return _empty(options, critical, base)
    base = replace(base, primary_mean=float(p.mean()), candidate_mean=float(c.mean()), deviation=1.0)
    if p.size == c.size and np.array_equal(np.sort(p), np.sort(c)):
        return replace(base, reason="the two arms hold identical values")
    if np.unique(np.concatenate([p, c])).size == 1:
        return replace(base, reason="one distinct value across both arms")
    mw = mann_whitney(p, c, config.confidence)
    deviation = mean_ratio(p, c)
    effect = mw.cles if options.effect_measure == "cles" else deviation
    band = config.tolerance * abs(mw.estimate)
    low_t, high_t = options.allowed
    label, reason = Classification.passed, f"shift interval [{mw.lower:.4g}, {mw.upper:.4g}] within ±{band:.4g}"
    if (direction is not Direction.decrease and _above(mw.lower, mw.lower_open, band)
            and _meets(effect, high_t, high=True)):
        label, reason = Classification.high, f"shift interval [{mw.lower:.4g}, {mw.upper:.4g}] above +{band:.4g}"
    elif (direction is not Direction.increase and _below(mw.upper, mw.upper_open, -band)
            and _meets(effect, low_t, high=False)):
        label, reason = Classification.low, f"shift interval [{mw.lower:.4g}, {mw.upper:.4g}] below -{band:.4g}"
    crit_low, crit_high = options.critical_thresholds
    is_critical = critical and (
        (label is Classification.high and _meets(effect, crit_high, high=True))
        or (label is Classification.low and _meets(effect, crit_low, high=False))
    )
    return replace(base, classification=label, reason=reason, critical=is_critical, mw=mw, effect_size=effect,
                   deviation=deviation, band=band)


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ScoreEntry:
    """One metric as the scorer sees it: label, critical flag, groups, muted."""

    name: str
    classification: Classification
    critical: bool = False
    groups: tuple[str, ...] = ("default",)
    muted: bool = False


@dataclass(frozen=True)
class ScoreResult:
    """The summary score, why it is 0 when a rule forced it, and the score of each group."""

    score: float
    forced: str | None
    group_scores: Mapping[str, float]


def _round2(x: float) -> float:
    return float(Decimal(repr(x)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def _group_scores(entries: Sequence[ScoreEntry]) -> dict[str, float | None]:
    """Per group, the percent of Pass among Pass/High/Low/NodataFailMetric; None when it has none."""
    labels: dict[str, list[Classification]] = {}
    for e in entries:
        for g in e.groups:
            labels.setdefault(g, []).append(e.classification)
    out: dict[str, float | None] = {}
    for g, ls in labels.items():
        counted = [c for c in ls if c is not Classification.nodata]
        out[g] = 100.0 * sum(c is Classification.passed for c in counted) / len(counted) if counted else None
    return out


def score(entries: Sequence[ScoreEntry], group_weights: Mapping[str, float] | None = None) -> ScoreResult:
    """Kayenta's ``WeightedSumScorer`` over the metrics that are not muted."""
    live = [e for e in entries if not e.muted]
    weights = dict(group_weights or {})
    groups = _group_scores(live)
    shown = {g: (0.0 if s is None else s) for g, s in groups.items()}
    critical = [e.name for e in live if e.critical and e.classification is not Classification.passed]
    if critical:
        return ScoreResult(0.0, f"critical metric(s) {', '.join(critical)} not Pass", shown)
    nodata = [e.name for e in live if e.classification is Classification.nodata]
    if live and 100.0 * len(nodata) / len(live) >= NODATA_SHARE:
        return ScoreResult(0.0, f"{len(nodata)} of {len(live)} metrics Nodata (>= {NODATA_SHARE:g}%)", shown)
    unweighted = [g for g in groups if g not in weights]
    share = (100.0 - sum(weights.values())) / len(unweighted) if unweighted else 0.0
    total = sum((100.0 if s is None else s) * weights.get(g, share) / 100.0 for g, s in groups.items())
    return ScoreResult(_round2(total), None, shown)


# --------------------------------------------------------------------------- verdict


def _values(data: object) -> FloatArray:
    if data is None or isinstance(data, NoData):
        return np.zeros(0)
    if isinstance(data, Samples):
        return data.values
    if isinstance(data, Histogram | Counts):
        raise JudgeInputError(
            "the fixed method compares value series (Samples or Aggregates), not histograms or counts"
        )
    raise JudgeInputError(f"unsupported data {type(data).__name__}")


_OUTCOMES = {
    Classification.passed: Outcome.passed,
    Classification.high: Outcome.failed,
    Classification.low: Outcome.failed,
    Classification.nodata: Outcome.nodata,
    Classification.nodata_fail: Outcome.nodata,
}


def _result(mi: MetricInput, fm: FixedMetric, options: MetricOptions, config: FixedConfig) -> MetricResult:
    spec, mw = mi.spec, fm.mw
    sentence = (
        f"{fm.classification.value}{' (critical)' if fm.critical else ''}: {spec.name}: candidate mean "
        f"{fm.candidate_mean} vs primary mean {fm.primary_mean} ({fm.n_candidate}/{fm.n_primary} values); {fm.reason}"
    )
    return MetricResult(
        name=spec.name, outcome=_OUTCOMES[fm.classification], statistic="hodges-lehmann shift",
        direction=spec.direction, margin=Margin(config.tolerance, relative=True), critical=spec.critical,
        n_primary=fm.n_primary, n_candidate=fm.n_candidate, primary_value=fm.primary_mean,
        candidate_value=fm.candidate_mean, effect=None if mw is None else mw.estimate,
        interval=(None, None) if mw is None else (mw.lower, mw.upper), alpha=round(1 - config.confidence, 12),
        beta=0.0, crossed=None, threshold=fm.band, sentence=sentence, method="fixed",
        extra={
            "classification": fm.classification.value,
            "criticalFailure": fm.critical,
            "effectSize": fm.effect_size,
            "effectMeasure": options.effect_measure,
            "deviation": fm.deviation,
            "groups": list(options.groups),
            "muted": options.muted,
        },
    )


def _word(value: float, config: FixedConfig) -> tuple[Outcome, str]:
    if value >= config.pass_score:
        return Outcome.passed, "Pass"
    if value >= config.marginal_score:
        return Outcome.inconclusive, "Marginal"
    return Outcome.failed, "Fail"


def judge_fixed(inputs: Sequence[MetricInput], config: FixedConfig = FixedConfig()) -> Verdict:
    """Classify every metric and score them as NetflixACAJudge does (Pass/Marginal/Fail ->
    passed/inconclusive/failed); a Pass with a metric that had no data is ``nodata`` instead."""
    results: list[MetricResult] = []
    entries: list[ScoreEntry] = []
    missing: list[str] = []
    for mi in inputs:
        options = config.options(mi.spec.name)
        fm = classify(_values(mi.primary), _values(mi.candidate), mi.spec.direction, config, options,
                      critical=mi.spec.critical)
        results.append(_result(mi, fm, options, config))
        entries.append(ScoreEntry(mi.spec.name, fm.classification, fm.critical, options.groups, options.muted))
        if not options.muted and (not fm.had_data or fm.classification in (Classification.nodata,
                                                                             Classification.nodata_fail)):
            missing.append(mi.spec.name)
    if not any(not e.muted for e in entries):
        return Verdict(Outcome.nodata, tuple(results), "no metric to score (none, or all muted)", "fixed", None)
    scored = score(entries, config.group_weights)
    outcome, word = _word(scored.score, config)
    reason = f"score {scored.score:g} ({word}; pass >= {config.pass_score:g}, marginal >= {config.marginal_score:g})"
    if scored.forced is not None:
        reason = f"score 0 (Fail): {scored.forced}"
    elif outcome is Outcome.passed and missing:
        outcome = Outcome.nodata
        reason += f", but {', '.join(missing)} had no data: no data is never a pass"
    return Verdict(outcome, tuple(results), reason, "fixed", scored.score)
