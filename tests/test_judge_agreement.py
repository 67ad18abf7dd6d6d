"""The agreement test: exact confidence sequences per proportion, right at 0 and n agreeing pairs.

Pure core, nothing mocked: the controller's own `agreement_input` builds the judge's input from the
tally's numbers, as in a look. The seeded simulations are small (a few hundred streams, every look's
bounds computed in one vectorized call) and their bounds tolerant; they check the error rates under
continuous monitoring, not their exact values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shadowctl.controller.analysis as analysis
from shadowctl.compare.comparators import AgreementTally, judge_inputs
from shadowctl.judge import Counts, Direction, Margin, MetricSpec, Outcome, judge, judge_metric
from shadowctl.judge.core import batch_counts
from shadowctl.judge.proportion import UNIFORM_PRIOR, confidence_sequence, prior_near
from shadowctl.judge.sequential import FAIL, PASS
from shadowctl.policy.model import Outputs
from shadowctl.policy.status import ComparatorCounts

A, B = 0.05, 0.05
FIXED = {"mode": "fixed", "agreement": 0.95}
REPLICA = {"mode": "primary-replica"}


def _look(baseline: dict[str, object], pairs: int, agree: int, *, baseline_pairs: int = 200,
          baseline_agree: int = 190, min_pairs: int = 20) -> tuple[Outcome, tuple[float | None, float | None]]:
    """One look of a policy comparing outputs with token-f1 (margin: the default minRelativeAgreement)."""
    outputs = Outputs.model_validate({"mqtt": {"broker": "mqtt://h:1883"}, "comparators": [{"name": "token-f1"}],
                                      "baseline": baseline, "minPairs": min_pairs})
    tally = AgreementTally(counts={"token-f1": ComparatorCounts(
        candidate_pairs=pairs, candidate_agree=agree, baseline_pairs=baseline_pairs,
        baseline_agree=baseline_agree, redacted_pairs=0)})
    verdict = judge([analysis.agreement_input(i, outputs.min_pairs) for i in judge_inputs(tally, outputs)])
    [metric] = verdict.results
    return verdict.outcome, metric.interval


@pytest.mark.parametrize("baseline", [FIXED, REPLICA], ids=["fixed", "primary-replica"])
@pytest.mark.parametrize("agree", [0, 1, 10])
def test_a_candidate_that_rarely_or_never_agrees_fails(baseline: dict[str, object], agree: int) -> None:
    """The reported case: 0 of 1,000 agreeing pairs gave the ratio [0, 7.9e6] and never failed."""
    outcome, (lower, upper) = _look(baseline, 1000, agree)
    assert outcome is Outcome.failed
    assert lower is not None and upper is not None and 0.0 <= lower <= agree / 1000 / 0.95 <= upper < 0.1


@pytest.mark.parametrize("baseline", [FIXED, REPLICA], ids=["fixed", "primary-replica"])
def test_never_agreeing_fails_at_the_minimum_number_of_pairs(baseline: dict[str, object]) -> None:
    assert _look(baseline, 20, 0)[0] is Outcome.failed
    assert _look(baseline, 19, 0)[0] is Outcome.nodata  # fewer than minPairs: never a decision


@pytest.mark.parametrize("baseline", [FIXED, REPLICA], ids=["fixed", "primary-replica"])
def test_as_good_as_the_baseline_passes_and_few_pairs_continue(baseline: dict[str, object]) -> None:
    outcome, (lower, upper) = _look(baseline, 1000, 950, baseline_pairs=1000, baseline_agree=950)
    assert outcome is Outcome.passed
    assert lower is not None and upper is not None and 0.9 < lower < 1.0 < upper
    assert _look(baseline, 30, 28)[0] is Outcome.cont  # 28 of 30 agree: too few pairs to tell yet
    assert _look(baseline, 200, 100)[0] is Outcome.failed  # 50% against 95%


def test_the_fixed_baseline_is_a_constant_not_a_sample() -> None:
    """Counts.exact: a fixed baseline costs the candidate no share of alpha; the same counts as a
    sampled arm of a million pairs give a wider interval (half the level per arm)."""
    spec = MetricSpec("agreement/x", "agreement", Direction.decrease, Margin.parse("10%"))
    exact = judge_metric(spec, Counts(50_000, 1_000_000, exact=True), Counts(60, 1000), alpha=A, beta=B)
    sampled = judge_metric(spec, Counts(50_000, 1_000_000), Counts(60, 1000), alpha=A, beta=B)
    assert exact.interval[1] is not None and sampled.interval[1] is not None
    assert exact.interval[1] < sampled.interval[1]
    assert Counts(1, 2, exact=True) + Counts(1, 2, exact=True) == Counts(2, 4, exact=True)


def test_a_model_judge_is_judged_against_an_even_match_with_an_absolute_margin() -> None:
    spec = MetricSpec("agreement/llm-judge", "agreement", Direction.decrease, Margin(0.05, relative=False))
    even = Counts(500_000, 1_000_000, exact=True)
    lost_all = judge_metric(spec, even, Counts(200, 200), alpha=A, beta=B)
    assert lost_all.outcome is Outcome.failed and lost_all.effect == pytest.approx(-0.5)
    assert judge_metric(spec, even, Counts(60, 200), alpha=A, beta=B).outcome is Outcome.passed  # 70% win or tie
    assert judge_metric(spec, even, Counts(160, 200), alpha=A, beta=B).outcome is Outcome.failed  # 20%


# --------------------------------------------------------------------------- properties


@given(st.integers(0, 5000).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))),
       st.sampled_from([0.001, 0.025, 0.05, 0.2]))
@settings(max_examples=200, deadline=None)
def test_the_sequence_holds_the_estimate_and_is_exact_at_the_edges(nk: tuple[int, int], level: float) -> None:
    n, k = nk
    [lo], [hi] = confidence_sequence(np.array([k]), np.array([n]), level)
    assert 0.0 <= lo <= hi <= 1.0
    if n == 0:
        assert (lo, hi) == (0.0, 1.0)
        return
    assert lo <= k / n <= hi
    assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n)
    if k == 0:  # the closed form of the uniform prior's upper end
        assert hi == pytest.approx(1.0 - (level / (n + 1)) ** (1.0 / n), rel=1e-9, abs=1e-12)


_ARMS = st.integers(20, 3000).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n)))


@given(_ARMS, _ARMS, st.sampled_from([FIXED, REPLICA]))
@settings(max_examples=150, deadline=None)
def test_the_interval_is_finite_and_moves_up_with_agreeing_pairs(
    candidate: tuple[int, int], base: tuple[int, int], baseline: dict[str, object],
) -> None:
    """Finite whenever the baseline has agreeing pairs; one more agreeing candidate pair (of as many)
    never moves either end down."""
    n, k = candidate
    nb, kb = base
    outcome, (lower, upper) = _look(baseline, n, k, baseline_pairs=nb, baseline_agree=kb)
    if baseline is REPLICA and kb == 0:
        assert outcome is not Outcome.failed  # a baseline that never agrees cannot show a candidate worse
        return
    assert lower is not None and upper is not None and math.isfinite(upper) and 0.0 <= lower <= upper
    if k < n:
        _, (lower2, upper2) = _look(baseline, n, k + 1, baseline_pairs=nb, baseline_agree=kb)
        assert lower2 is not None and upper2 is not None
        assert lower2 >= lower - 1e-12 and upper2 >= upper - 1e-12


def test_a_prior_near_a_point_has_that_mean_and_spread() -> None:
    a, b = (float(x) for x in prior_near(0.9, 0.05))
    assert a / (a + b) == pytest.approx(0.9)
    assert math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1))) == pytest.approx(0.05)
    assert sum(float(x) for x in prior_near(0.5, 10.0)) == pytest.approx(2.0)  # never flatter than uniform
    assert UNIFORM_PRIOR == (1.0, 1.0)


# --------------------------------------------------------------------------- continuous monitoring


def _monitor(p_candidate: float, p_baseline: float | None, *, streams: int = 300, looks: int = 60,
             per_look: int = 25, seed: int) -> tuple[float, float]:
    """Share of streams that ever fail / ever pass within `looks` looks (cumulative counts, 10% margin).
    `p_baseline` None: a fixed baseline of 0.9; else a sampled one (primary-replica) with that agreement."""
    rng = np.random.default_rng(seed)
    spec = MetricSpec("agreement/x", "agreement", Direction.decrease, Margin.parse("10%"), min_samples=20)
    k_c = np.zeros(streams)
    k_b = np.zeros(streams)
    failed = np.zeros(streams, dtype=bool)
    passed = np.zeros(streams, dtype=bool)
    for look in range(1, looks + 1):
        n = float(look * per_look)
        k_c += rng.binomial(per_look, p_candidate, streams)
        if p_baseline is None:
            f_b, n_b, exact = np.full(streams, 100_000.0), np.full(streams, 1e6), np.ones(streams, dtype=bool)
        else:
            k_b += rng.binomial(per_look, p_baseline, streams)
            f_b, n_b, exact = n - k_b, np.full(streams, n), np.zeros(streams, dtype=bool)
        b = batch_counts(spec, f_b, n_b, n - k_c, np.full(streams, n), alpha=A, beta=B, exact_p=exact)
        failed |= (b.code == FAIL) & ~passed
        passed |= (b.code == PASS) & ~failed
    return float(failed.mean()), float(passed.mean())


@pytest.mark.parametrize("p_baseline", [None, 0.9], ids=["fixed", "primary-replica"])
def test_looking_every_interval_keeps_both_error_rates(p_baseline: float | None) -> None:
    """300 streams x 60 looks of 25 pairs: as good as the baseline (0.9) rarely fails; worse by exactly
    the margin (0.81) rarely passes; half as good fails every time; all within nominal 5%."""
    aa_fail, aa_pass = _monitor(0.9, p_baseline, seed=1)
    assert aa_fail <= A and aa_pass >= 0.9
    edge_fail, edge_pass = _monitor(0.81, p_baseline, seed=2)
    assert edge_pass <= B and edge_fail >= 0.9  # 0.81 is worse than 0.9: failing it is right
    worse_fail, _ = _monitor(0.45, p_baseline, seed=3, looks=5)
    assert worse_fail == 1.0
    never_fail, _ = _monitor(0.0, p_baseline, seed=4, looks=1)
    assert never_fail == 1.0  # at the first look, 25 pairs


def test_an_as_good_candidate_passes_against_a_replica_as_soon_as_the_normal_mixture_shows_it() -> None:
    """Pass bounds intersect the exact ones with the normal mixture's (core._pass_sooner): 0.95 against a
    replica at 0.95 passes at 150 pairs each; the exact bounds alone needed 290."""
    assert _look(REPLICA, 150, 143, baseline_pairs=150, baseline_agree=143)[0] is Outcome.passed
