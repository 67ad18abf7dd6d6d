"""The fixed-horizon, Kayenta-parity judge: Mann-Whitney/Hodges-Lehmann, classification, scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from shadowctl.judge import (
    Classification,
    Direction,
    FixedConfig,
    Histogram,
    JudgeInputError,
    MetricInput,
    MetricOptions,
    MetricSpec,
    NoData,
    Outcome,
    Samples,
    classify,
    judge,
    judge_fixed,
    mann_whitney,
)

PRIMARY = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 1.01, 0.99])
SEVEN_OF_TEN = np.array([100.0, 110.0, 90.0, 105.0, 95.0, 100.0, 102.0, 0.98, 1.01, 0.99])
SLOWER = np.array([1.51, 1.62, 1.4, 1.58, 1.45, 1.53, 1.49, 1.6, 1.56, 1.42])


def test_hodges_lehmann_and_interval_match_brute_force_pairwise_differences() -> None:
    """Estimate: the median of the pairwise differences; bounds: pairwise differences where the
    corrected normal statistic crosses z (with no ties, the classical k-th difference rule up to the
    continuity correction)."""
    x = np.array([3.1, 2.2, 5.0, 4.4, 3.9, 6.1, 2.8])
    y = np.array([1.0, 2.5, 2.0, 3.3, 1.7, 2.9])
    mw = mann_whitney(y, x, confidence=0.90)
    diffs = np.sort(np.subtract.outer(x, y).ravel())
    assert mw.estimate == np.median(diffs)
    nm = x.size * y.size
    z = stats.norm.ppf(0.95)
    sigma = math.sqrt(nm * (x.size + y.size + 1) / 12)
    # lower: the largest k with (#differences >= d_k) - nm/2 - 1/2 > z sigma, i.e. nm - k + 1 > nm/2 + 1/2 + z sigma
    k = nm - math.floor(nm / 2 + 0.5 + z * sigma)
    assert mw.lower == diffs[k - 1] and mw.upper == diffs[nm - k]
    assert mw.p_value == pytest.approx(stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic").pvalue)
    assert mw.cles == pytest.approx(np.mean(np.subtract.outer(x, y) > 0))


def test_seven_of_ten_at_100x_passes_the_fixed_judge_like_the_kayenta_report() -> None:
    """Parity: the interval reaches below 25% of the Hodges-Lehmann shift, so it is not 'High'."""
    fm = classify(PRIMARY, SEVEN_OF_TEN, Direction.increase)
    assert fm.classification is Classification.passed
    assert fm.mw is not None and fm.band is not None and fm.mw.lower < fm.band < fm.mw.upper


def test_classification_high_low_pass_nodata() -> None:
    assert classify(PRIMARY, SLOWER, "increase").classification is Classification.high
    assert classify(SLOWER, PRIMARY, "decrease").classification is Classification.low
    assert classify(SLOWER, PRIMARY, "increase").classification is Classification.passed
    assert classify(PRIMARY, SLOWER, "either").classification is Classification.high
    assert classify(PRIMARY, np.array([math.nan, math.nan]), "increase").classification is Classification.nodata
    assert classify(PRIMARY, PRIMARY[::-1], "increase").classification is Classification.passed


def test_tolerance_and_effect_size_thresholds() -> None:
    # shift ~0.52 with interval ~[0.45, 0.6]: High at tolerance 0.25 (band 0.13), Pass at 0.9 (band 0.47)
    assert classify(PRIMARY, SLOWER, "increase", FixedConfig(tolerance=0.9)).classification is Classification.passed
    # Mean ratio ~1.52: an allowed increase of 1.6 blocks High, 1.4 allows it.
    assert classify(PRIMARY, SLOWER, "increase", options=MetricOptions(allowed_increase=1.6)).classification is (
        Classification.passed
    )
    assert classify(PRIMARY, SLOWER, "increase", options=MetricOptions(allowed_increase=1.4)).classification is (
        Classification.high
    )
    fm = classify(PRIMARY, SLOWER, "increase", options=MetricOptions(effect_measure="cles", allowed_increase=0.9))
    assert fm.effect_size == 1.0 and fm.classification is Classification.high


def test_nan_strategy_and_outlier_removal() -> None:
    with_nan = np.array([1.0, math.nan, 1.1, 0.9, 1.0])
    replaced = classify(np.ones(5), with_nan, "decrease", options=MetricOptions(nan_strategy="replace"))
    removed = classify(np.ones(5), with_nan, "decrease", options=MetricOptions(nan_strategy="remove"))
    assert replaced.n_candidate == 5 and removed.n_candidate == 4
    spiky = np.append(SLOWER[:9], 1000.0)
    kept = classify(PRIMARY, spiky, "increase")
    cut = classify(PRIMARY, spiky, "increase", options=MetricOptions(outliers="remove", outlier_factor=1.5))
    assert kept.n_candidate == 10 and cut.n_candidate == 9
    assert cut.candidate_mean is not None and cut.candidate_mean < 2


def test_group_weighted_score_and_thresholds() -> None:
    def mi(name: str, cand: np.ndarray, critical: bool = False) -> MetricInput:
        return MetricInput(MetricSpec(name, "mean", critical=critical), Samples(PRIMARY), Samples(cand))

    lat, err = MetricOptions(groups=("latency",)), MetricOptions(groups=("errors",))
    metrics = {"lat1": lat, "lat2": lat, "err": err}
    inputs = [mi("lat1", PRIMARY * 1.01), mi("lat2", SLOWER), mi("err", PRIMARY)]
    # latency group 50, errors group 100; equal shares -> 75 (Marginal), latency 75% -> 62.5 (Fail)
    v = judge_fixed(inputs, FixedConfig(metrics=metrics))
    assert v.score == 75.0 and v.outcome is Outcome.inconclusive and "Marginal" in v.reason
    v2 = judge_fixed(inputs, FixedConfig(metrics=metrics, group_weights={"latency": 75, "errors": 25}))
    assert v2.score == 62.5 and v2.outcome is Outcome.failed
    crit = judge_fixed([mi("lat1", PRIMARY * 1.01), mi("lat2", SLOWER, critical=True), mi("err", PRIMARY)])
    assert crit.outcome is Outcome.failed and crit.score == 0.0 and "lat2" in crit.reason
    ok = judge([mi("a", PRIMARY * 1.01), mi("b", PRIMARY)], method="fixed")
    assert ok.outcome is Outcome.passed and ok.score == 100.0 and ok.method == "fixed"
    assert ok.results[0].extra["classification"] == "Pass"


def test_nodata_metrics_follow_kayentas_scorer_and_never_pass() -> None:
    spec = MetricSpec("a", "mean")
    only_missing = judge_fixed([MetricInput(spec, Samples(PRIMARY), NoData("gone"))])
    assert only_missing.outcome is Outcome.failed and only_missing.score == 0.0  # 100% Nodata
    mixed = judge_fixed([MetricInput(spec, Samples(PRIMARY), None), MetricInput(MetricSpec("b", "mean"),
                                                                                 Samples(PRIMARY), Samples(PRIMARY)),
                         MetricInput(MetricSpec("c", "mean"), Samples(PRIMARY), Samples(PRIMARY))])
    assert mixed.score == 100.0 and mixed.outcome is Outcome.nodata


def test_fixed_method_rejects_histograms_and_bad_config() -> None:
    h = Histogram([1.0, math.inf], [1, 2])
    with pytest.raises(JudgeInputError, match="value series"):
        judge_fixed([MetricInput(MetricSpec("a", "p50"), h, h)])
    with pytest.raises(JudgeInputError, match="marginal_score"):
        FixedConfig(pass_score=50, marginal_score=80)


def test_large_samples_use_bounded_memory_bisection() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.3, 1, 20000), rng.normal(0, 1, 20000)
    mw = mann_whitney(y, x)
    assert mw.lower < 0.3 < mw.upper and mw.upper - mw.lower < 0.1
