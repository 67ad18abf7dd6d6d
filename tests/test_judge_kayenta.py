"""Parity of ``method: fixed`` with Kayenta's NetflixACAJudge, case by case from Kayenta's own suites.

The input arrays of the larger cases are in ``fixtures/kayenta_cases.json`` (copied from spinnaker/kayenta
a69573b, kayenta-judge ClassifierSuite / StatisticSuite and kayenta-mannwhitney MannWhitneySuite);
the expected labels, critical flags, scores and intervals are written here, each with the Kayenta
test it comes from. Intervals: Kayenta's bounds are roots of a step function found by Brent's method
to 1e-4; ours are the exact pairwise differences, so they are asserted exactly, and Kayenta's
numbers within 1e-4 of them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shadowctl.judge import MetricInput, MetricSpec, NoData, Outcome, Samples
from shadowctl.judge.fixed import (
    Classification,
    FixedConfig,
    MetricOptions,
    ScoreEntry,
    classify,
    judge_fixed,
    mean_ratio,
    outlier_fences,
    score,
    transform,
)
from shadowctl.judge.mannwhitney import mann_whitney, rank_statistic

CASES: dict[str, Any] = json.loads((Path(__file__).parent / "fixtures" / "kayenta_cases.json").read_text())
SOLVER_TOL = 1e-4  # Kayenta's BrentSolver tolerance

P, H, L, N, NF = (Classification.passed, Classification.high, Classification.low, Classification.nodata,
                  Classification.nodata_fail)

# ClassifierSuite: (case, tolerance, confidence, direction, options, critical metric, label, critical flag)
_T10 = {"tolerance": 0.10, "confidence": 0.95}
_T20 = {"tolerance": 0.20, "confidence": 0.98}
CLASSIFIER: list[tuple[str, dict[str, float], str, dict[str, Any], bool, Classification, bool]] = [
    ("Mann-Whitney Classifier Test: Pass Metric", _T10, "either", {}, False, P, False),
    ("Mann-Whitney Classifier Test: High Metric", _T10, "either", {}, False, H, False),
    ("Mann-Whitney Classifier Test: Low Metric", _T10, "either", {}, False, L, False),
    ("Mann-Whitney Classifier Directional Test: Increase", _T10, "increase", {}, False, P, False),
    ("Mann-Whitney Classifier Directional Test: Decrease", _T10, "decrease", {}, False, P, False),
    ("Mann-Whitney Classifier Directional Test: High Metric", _T10, "increase", {}, False, H, False),
    ("Mann-Whitney Classifier Directional Test: Low Metric", _T10, "decrease", {}, False, L, False),
    ("Mann-Whitney Classifier Test: High Metric (Large Input)", _T10, "either", {}, False, H, False),
    ("Mann-Whitney Classifier Test - Mean Ratio Effect Size: High", _T10, "either",
     {"allowed_decrease": 0.8, "allowed_increase": 1.2}, False, H, False),
    ("Mann-Whitney Classifier Test - Mean Ratio Effect Size: Low", _T10, "decrease",
     {"allowed_decrease": 0.8, "allowed_increase": 1.2}, False, L, False),
    ("Mann-Whitney Classifier Test - Mean Ratio Effect Size: Pass", _T10, "either",
     {"allowed_decrease": 0.5, "allowed_increase": 1.0}, False, P, False),
    ("Mann-Whitney Classifier Test - Mean Ratio Effect Size: Pass (Large Input)", _T10, "either",
     {"allowed_decrease": 1.0, "allowed_increase": 5.0}, False, P, False),
    ("Mann-Whitney Classifier Test - CLES Effect Size: Pass", _T20, "either",
     {"effect_measure": "cles", "allowed_decrease": 0.5, "allowed_increase": 0.8}, False, P, False),
    ("Mann-Whitney Classifier Test - CLES Effect Size: High", _T20, "either",
     {"effect_measure": "cles", "allowed_decrease": 0.2, "allowed_increase": 0.8}, False, H, False),
    ("Mann-Whitney Classifier Test - CLES Effect Size: Low", _T20, "either",
     {"effect_measure": "cles", "allowed_decrease": 0.2, "allowed_increase": 0.8}, False, L, False),
    ("Mann-Whitney Classifier Test - Critical Effect Size: Critical High", _T10, "either",
     {"critical_decrease": 1.0, "critical_increase": 1.2}, True, H, True),
    ("Mann-Whitney Classifier Test - Critical Effect Size: Critical Low", _T10, "either",
     {"critical_decrease": 1.2, "critical_increase": 1.0}, True, L, True),
    ("Mann-Whitney Classifier Test - Critical Effect Size: High", _T10, "either",
     {"allowed_decrease": 1.0, "allowed_increase": 5.0, "critical_decrease": 1.0, "critical_increase": 13.0},
     True, H, False),
    ("Mann-Whitney Classifier Test - Critical Effect Size: Pass", _T10, "either",
     {"allowed_decrease": 1.0, "allowed_increase": 13.0, "critical_decrease": 1.0, "critical_increase": 15.0},
     True, P, False),
    ("Mann-Whitney Classifier Test - Critical Effect Size: Critical High (Default Thresholds)", _T10, "either", {},
     True, H, True),
    ("Mann-Whitney Tied Observations", _T10, "decrease", {}, False, P, False),
    ("Mann-Whitney Identical Populations", _T10, "decrease", {}, False, P, False),
    ("Mann-Whitney Leading Zero Identical Population", _T10, "decrease", {}, False, P, False),
    ("Mann-Whitney Missing Experiment Data", _T10, "decrease", {}, False, N, False),
    ("Mann-Whitney Missing Experiment Data: Critical Metric", _T10, "decrease", {}, True, N, True),
    ("Mann-Whitney Missing Experiment Data with NaN Replacement", _T10, "decrease", {"nan_strategy": "replace"},
     False, P, False),
    ("Mann-Whitney Missing Data: Reason String", _T10, "decrease", {}, True, N, True),
    ("Mann-Whitney Majority Tied Observations", _T10, "either", {}, False, P, False),
    ("Mann-Whitney Tied Ranks", _T10, "either", {}, False, H, False),
    ("Mann-Whitney Tied Ranks With Zeros", _T10, "either", {}, False, H, False),
    ("Mann-Whitney Zero Mean: High Metric with Effect Size", _T10, "either",
     {"allowed_decrease": 0.8, "allowed_increase": 1.2}, False, H, False),
    ("Mann-Whitney Zero Mean: Low Metric with Effect Size", _T10, "either",
     {"allowed_decrease": 0.8, "allowed_increase": 1.2}, False, L, False),
    ("Mann-Whitney Zero Mean: Critical Metric", _T10, "either",
     {"critical_decrease": 0.8, "critical_increase": 1.2, "nan_strategy": "replace"}, True, H, True),
    ("Mann-Whitney Zero Mean: Pass Metric", _T10, "either",
     {"allowed_decrease": 0.8, "allowed_increase": 1.2}, False, P, False),
]


@pytest.mark.parametrize(("case", "levels", "direction", "opts", "critical", "label", "flag"), CLASSIFIER,
                         ids=[c[0] for c in CLASSIFIER])
def test_classifier_suite(case: str, levels: dict[str, float], direction: str, opts: dict[str, Any],
                          critical: bool, label: Classification, flag: bool) -> None:
    """kayenta-judge ClassifierSuite: every MannWhitneyClassifier case gives Kayenta's label and critical flag."""
    data = CASES["ClassifierSuite"][case]
    fm = classify(np.array(data["control"]), np.array(data["experiment"]), direction, FixedConfig(**levels),
                  MetricOptions(**opts), critical=critical)
    assert (fm.classification, fm.critical) == (label, flag), fm.reason
    assert fm.reason


def test_zero_mean_deviation_is_nan_and_equal_zero_arms_have_ratio_one() -> None:
    """ClassifierSuite 'Zero Mean: High/Low Metric with Effect Size' (deviation NaN), 'Zero Mean: Pass' (1.0)."""
    high = classify(np.zeros(5), np.array([54.9, 54.5, 55.1, 55.6, 57.4]), "either")
    assert high.deviation is not None and math.isnan(high.deviation)
    assert classify(np.zeros(5), np.zeros(5), "either").deviation == 1.0


def test_high_metric_large_input_sits_on_the_jump_at_zero() -> None:
    """ClassifierSuite 'High Metric (Large Input)' (mostly zeros): bounds and estimate are all the jump at 0;
    the point 0 itself is rejected on the high side, so the whole confidence set is above 0 = 0.1 x |0|."""
    data = CASES["ClassifierSuite"]["Mann-Whitney Classifier Test: High Metric (Large Input)"]
    mw = mann_whitney(np.array(data["control"]), np.array(data["experiment"]), 0.95)
    assert (mw.lower, mw.upper, mw.estimate) == (0.0, 0.0, 0.0)
    assert mw.lower_open and not mw.upper_open
    # MannWhitneySuite 'Intermediate Values / Variables' (the same arrays): Kayenta's solver stops near 0
    for kayenta in (3.521755377702165e-05, 2.02456461662334e-05, 2.6279243045155653e-05):
        assert abs(kayenta - 0.0) < SOLVER_TOL


def _mw(case: str, control: str, experiment: str, confidence: float) -> Any:
    d = CASES["MannWhitneySuite"][case]
    return mann_whitney(np.array(d[control]), np.array(d[experiment]), confidence)


@pytest.mark.parametrize(("case", "names", "confidence", "exact", "kayenta"), [
    ("Mann-Whitney Confidence Interval & Estimate", ("controlData", "experimentData"), 0.95,
     (6.0, 39.0, 22.5), (6.0, 39.0, 22.5)),
    ("Mann-Whitney Confidence Interval & Estimate: Tie out with R Version", ("control", "experiment"), 0.95,
     (-0.5, 0.0, -0.5), (-0.500002521696696, -3.486287505871302e-05, -0.4999393907180323)),
    ("Mann-Whitney Confidence Interval & Estimate: Tie out with R Version (Large)", ("control", "experiment"), 0.98,
     (-0.5, 0.0, 0.0), (-0.4999173250549087, -6.912685789769486e-06, -3.45044082729315e-05)),
])
def test_mann_whitney_suite_intervals(case: str, names: tuple[str, str], confidence: float,
                                      exact: tuple[float, float, float], kayenta: tuple[float, float, float]) -> None:
    """kayenta-mannwhitney MannWhitneySuite: exact order statistics; Kayenta's solver output within 1e-4."""
    mw = _mw(case, names[0], names[1], confidence)
    assert (mw.lower, mw.upper, mw.estimate) == exact
    for ours, theirs in zip((mw.lower, mw.upper, mw.estimate), kayenta, strict=True):
        assert abs(ours - theirs) < SOLVER_TOL


def test_mann_whitney_suite_problem_case() -> None:
    """MannWhitneySuite 'Problem Case' (850 values per arm near 1/30, conf 0.98): Kayenta reports
    [-1.48e-5, 1.81e-5] and estimate 1.81e-5, each within the solver's 1e-4 of the exact values."""
    mw = _mw("Mann-Whitney Confidence Interval & Estimate: Problem Case", "control", "experiment", 0.98)
    assert mw.lower <= mw.estimate <= mw.upper
    assert abs(mw.lower - -1.4808028936386108e-05) < SOLVER_TOL
    assert abs(mw.upper - 1.808255910873413e-05) < SOLVER_TOL
    assert abs(mw.estimate - 1.808255910873413e-05) < SOLVER_TOL


def test_rank_statistic_matches_wilcoxon_diff() -> None:
    """MannWhitneySuite 'Wilcoxon Diff Function' and 'Intermediate Values / Variables' (to 1e-6)."""
    d = CASES["MannWhitneySuite"]["Wilcoxon Diff Function"]
    x, y = np.array(d["x"]), np.array(d["y"])
    assert rank_statistic(0, 0, x, y) == pytest.approx(-1.229416, abs=1e-6)
    assert rank_statistic(5, 0, x, y) == pytest.approx(-35.80606, abs=1e-6)
    d = CASES["MannWhitneySuite"]["Mann-Whitney Intermediate Values / Variables"]
    x, y = np.array(d["x"]), np.array(d["y"])
    lo, hi, z = x.min() - y.max(), x.max() - y.min(), 1.9599639845400536
    assert lo == pytest.approx(-3.124999999999986) and hi == pytest.approx(5.555555555555557)
    got = [rank_statistic(lo, z, x, y), rank_statistic(hi, z, x, y), rank_statistic(lo, -z, x, y),
           rank_statistic(hi, -z, x, y)]
    want = [17.090968923762254, -20.997687930433106, 21.01089689284236, -17.077759961353]
    assert got == pytest.approx(want, abs=1e-6)


# ScorerSuite: (case, [(label, critical, group)], group weights, summary score)
SCORER: list[tuple[str, list[tuple[Classification, bool, str]], dict[str, float], float]] = [
    ("Single Metric Pass", [(P, False, "g")], {}, 100.0),
    ("Single Metric Fail", [(H, False, "g")], {}, 0.0),
    ("Single group Nodata", [(N, False, "g")], {}, 0.0),
    ("Two Groups, one Pass, one Nodata", [(P, False, "pass"), (P, False, "pass"), (N, False, "nodata")], {}, 100.0),
    ("One Group, Two Metrics", [(P, False, "g"), (H, False, "g")], {}, 50.0),
    ("One Group, Three Metrics", [(P, False, "g"), (H, False, "g"), (L, False, "g")], {}, 33.33),
    ("Two Groups, Three Metrics", [(P, False, "group-1"), (P, False, "group-1"), (H, False, "group-2")],
     {"group-1": 75.0, "group-2": 25.0}, 75.0),
    ("Two Groups, Three Metrics (Equal Weight)", [(P, False, "group-1"), (H, False, "group-1"),
                                                  (H, False, "group-2")], {"group-1": 50.0, "group-2": 50.0}, 25.0),
    ("Two Groups, Three Metrics (Equal Weight), one NoData", [(P, False, "group-1"), (N, False, "group-1"),
                                                              (H, False, "group-2")],
     {"group-1": 50.0, "group-2": 50.0}, 50.0),
    ("Two Metrics, one good (normal), one fail (critical)", [(P, False, "g"), (H, True, "g")], {}, 0.0),
    ("Two Metrics, one low (normal), one good (critical)", [(L, False, "g"), (P, True, "g")], {}, 50.0),
    ("Two Metrics, one good (normal), one nodata (critical)", [(P, False, "g"), (N, True, "g")], {}, 0.0),
    ("Two Groups (Unequal Weight), Four Metrics", [(H, False, "group1"), (L, False, "group1"), (P, False, "group1"),
                                                   (H, False, "group2")], {"group1": 15.0, "group2": 85.0}, 5.0),
]


@pytest.mark.parametrize(("case", "metrics", "weights", "expected"), SCORER, ids=[c[0] for c in SCORER])
def test_scorer_suite(case: str, metrics: list[tuple[Classification, bool, str]], weights: dict[str, float],
                      expected: float) -> None:
    """kayenta-judge ScorerSuite ('Weighted Sum Group Scorer: ...'): Kayenta's summary score, exactly."""
    entries = [ScoreEntry(f"m{i}", label, crit, (group,)) for i, (label, crit, group) in enumerate(metrics)]
    assert score(entries, weights).score == expected


def test_scorer_group_scores_for_a_nodata_group() -> None:
    """ScorerSuite 'Single group Nodata' and 'Two Groups, one Pass, one Nodata': the group reports 0."""
    two = score([ScoreEntry("a", P, groups=("pass",)), ScoreEntry("b", P, groups=("pass",)),
                 ScoreEntry("c", N, groups=("nodata",))])
    assert sorted(two.group_scores.values()) == [0.0, 100.0]


def test_nodata_fail_metric_counts_against_its_group_and_muted_metrics_are_left_out() -> None:
    entries = [ScoreEntry("a", P), ScoreEntry("b", NF), ScoreEntry("c", H, critical=True, muted=True)]
    assert score(entries).score == 50.0


def test_outlier_fences_detector_suite() -> None:
    """DetectorSuite 'IQR Detection', 'IQR Detect Two Sided', 'IQR NIST Test' (factor 1.5, plain IQR), and
    TransformSuite 'IQR Outlier Removal'."""
    data = np.array([21.0, 23.0, 24.0, 25.0, 50.0, 29.0, 23.0, 21.0])
    lo, hi = outlier_fences(data, 1.5, reduce_sensitivity=False)
    assert list((data < lo) | (data > hi)) == [False, False, False, False, True, False, False, False]
    two = np.array([1.0, 1.0, 1.0, 5.0, -1.0, -1.0, -1.0, -5.0])
    lo, hi = outlier_fences(two, 1.5, reduce_sensitivity=False)
    assert list((two < lo) | (two > hi)) == [False, False, False, True, False, False, False, True]
    nist = np.array([30, 171, 184, 201, 212, 250, 265, 270, 272, 289, 305, 306, 322, 322, 336, 346, 351, 370, 390,
                     404, 409, 411, 436, 437, 439, 441, 444, 448, 451, 453, 470, 480, 482, 487, 494, 495, 499, 503,
                     514, 521, 522, 527, 548, 550, 559, 560, 570, 572, 574, 578, 585, 592, 592, 607, 616, 618, 621,
                     629, 637, 638, 640, 656, 668, 707, 709, 719, 737, 739, 752, 758, 766, 792, 792, 794, 802, 818,
                     830, 832, 843, 858, 860, 869, 918, 925, 953, 991, 1000, 1005, 1068, 1441], dtype=float)
    lo, hi = outlier_fences(nist, 1.5, reduce_sensitivity=False)
    assert list(np.flatnonzero((nist < lo) | (nist > hi))) == [nist.size - 1]


def test_judge_outlier_fences_reach_the_1st_and_99th_percentiles() -> None:
    """NetflixACAJudge builds IQRDetector(factor, reduceSensitivity = true): the IQR fences of ten 1s and
    two 2s are [1, 1] and would drop the 2s; the fences widened to the 99th percentile (2) keep them."""
    data = np.array([1.0] * 10 + [2.0, 2.0])
    lo, hi = outlier_fences(data, 3.0, reduce_sensitivity=False)
    assert (lo, hi) == (1.0, 1.0)
    assert outlier_fences(data, 3.0) == (1.0, 2.0)
    assert transform(data, MetricOptions(outliers="remove")).tolist() == data.tolist()
    spike = np.append(data, 50.0)  # p99 = 44.24: the 50 goes, the 2s stay
    assert transform(spike, MetricOptions(outliers="remove")).tolist() == data.tolist()
    assert transform(spike, MetricOptions()).size == 13  # outliers: keep (Kayenta's default)


def test_transform_suite_nan_handling() -> None:
    """TransformSuite 'Remove Single NaN', 'Remove Multiple NaN', 'Replace NANs'."""
    assert transform(np.array([0.0, 1.0, math.nan, 1.0, 0.0]), MetricOptions()).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert transform(np.array([math.nan] * 3), MetricOptions()).size == 0
    replaced = transform(np.array([math.nan, 10.10, 20.20, 30.30, math.nan, 40.40]), MetricOptions(nan_strategy="replace"))
    assert replaced.tolist() == [0.0, 10.10, 20.20, 30.30, 0.0, 40.40]


def test_statistic_suite_effect_sizes() -> None:
    """StatisticSuite 'Effect Size: Mean Ratio (...)' and 'CLES Effect Size: ...'."""
    ones, tens = np.ones(5), np.full(5, 10.0)
    assert mean_ratio(ones, ones) == 1.0 and mean_ratio(ones, tens) == 10.0
    assert mean_ratio(np.full(5, 100.0), tens) == 0.1 and math.isnan(mean_ratio(np.zeros(5), tens))
    cles = {name: mann_whitney(np.array(d["control"]), np.array(d["experiment"])).cles
            for name, d in CASES["StatisticSuite"].items()}
    assert cles["CLES Effect Size: Identical"] == 0.5
    assert cles["CLES Effect Size: Different (No Overlap)"] == 0.0
    assert cles["CLES Effect Size: High Metric"] == pytest.approx(0.771, abs=0.001)
    assert cles["CLES Effect Size: Low Metric"] == 0.12


# --------------------------------------------------------------------------- whole verdicts


def _mi(name: str, primary: Any, candidate: Any, critical: bool = False, direction: str = "increase") -> MetricInput:
    def arm(v: Any) -> Any:
        return v if v is None or isinstance(v, NoData) else Samples(np.asarray(v, dtype=float))
    return MetricInput(MetricSpec(name, "mean", direction, critical=critical), arm(primary), arm(candidate))


BASE = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 1.01, 0.99]


def test_critical_metric_without_data_fails_with_score_0() -> None:
    """ScorerSuite 'Two Metrics, one good (normal), one nodata (critical)', through the whole judge:
    Kayenta scores 0 and fails; shadowctl used to score 100 and pass."""
    v = judge_fixed([_mi("ok", BASE, BASE[::-1]), _mi("crit", BASE, [], critical=True)])
    assert v.outcome is Outcome.failed and v.score == 0.0 and "crit" in v.reason
    assert [r.extra["classification"] for r in v.results] == ["Pass", "Nodata"]
    assert v.results[1].extra["criticalFailure"] is True


def test_half_or_more_nodata_fails() -> None:
    """WeightedSumScorer.tooManyNodata: 1 of 2 metrics Nodata (50%) fails with 0; 1 of 3 does not."""
    two = judge_fixed([_mi("a", BASE, BASE[::-1]), _mi("b", BASE, NoData("gone"))])
    assert two.outcome is Outcome.failed and two.score == 0.0 and "Nodata" in two.reason
    three = judge_fixed([_mi("a", BASE, BASE[::-1]), _mi("b", BASE, BASE), _mi("c", None, BASE)])
    # Kayenta passes this with 100; a metric without data is never a pass in shadowctl (invariant 4)
    assert three.score == 100.0 and three.outcome is Outcome.nodata and "c had no data" in three.reason


def test_nan_replace_with_an_empty_arm_scores_like_kayenta_but_never_passes() -> None:
    """ClassifierSuite 'Missing Experiment Data with NaN Replacement': Pass, score 100; the verdict is nodata."""
    config = FixedConfig(default=MetricOptions(nan_strategy="replace"))
    v = judge_fixed([_mi("a", BASE, [])], config)
    assert v.results[0].extra["classification"] == "Pass" and v.score == 100.0
    assert v.outcome is Outcome.nodata
    nan_only = judge_fixed([_mi("a", BASE, [math.nan, math.nan])], config)
    assert nan_only.outcome is Outcome.nodata


def test_must_have_data_turns_nodata_into_a_failing_metric() -> None:
    config = FixedConfig(metrics={"b": MetricOptions(must_have_data=True)})
    v = judge_fixed([_mi("a", BASE, BASE[::-1]), _mi("b", BASE, [])], config)
    assert [r.extra["classification"] for r in v.results] == ["Pass", "NodataFailMetric"]
    assert v.score == 50.0 and v.outcome is Outcome.failed


def test_groups_weights_and_thresholds() -> None:
    slower = [x * 1.5 for x in BASE]
    lat, err = MetricOptions(groups=("latency",)), MetricOptions(groups=("errors",))
    inputs = [_mi("lat1", BASE, BASE[::-1]), _mi("lat2", BASE, slower), _mi("err", BASE, BASE[::-1])]
    metrics = {"lat1": lat, "lat2": lat, "err": err}
    even = judge_fixed(inputs, FixedConfig(metrics=metrics))  # 50 x 0.5 + 100 x 0.5
    assert even.score == 75.0 and even.outcome is Outcome.inconclusive and "Marginal" in even.reason
    weighted = judge_fixed(inputs, FixedConfig(metrics=metrics, group_weights={"latency": 80}))  # 40 + 20
    assert weighted.score == 60.0 and weighted.outcome is Outcome.failed
    lenient = judge_fixed(inputs, FixedConfig(metrics=metrics, pass_score=70, marginal_score=50))
    assert lenient.outcome is Outcome.passed


def test_default_confidence_and_tolerance_are_kayentas() -> None:
    config = FixedConfig()
    assert (config.confidence, config.tolerance) == (0.98, 0.25)
