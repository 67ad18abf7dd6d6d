"""The paired judge: per-pair log ratios, the sign-test e-process for the median, the mean's
confidence sequence, and what is left out (dropped, errored, no pairs).

Pure core, literal data; the one seeded simulation is small and its bound tolerant (the rates are
measured by bench/judge/paired.py).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import integrate

from shadowctl.judge import (
    Counts,
    Direction,
    JudgeInputError,
    Margin,
    MetricInput,
    MetricResult,
    MetricSpec,
    NoData,
    Outcome,
    Paired,
    PairedSketch,
    judge,
    judge_many,
)
from shadowctl.judge.core import LookInput
from shadowctl.judge.model import LOG_RATIO_LE
from shadowctl.judge.paired import batch_paired, critical_count, decision_bounds, log_sign_evalue
from shadowctl.judge.sequential import FAIL
from shadowctl.policy.status import PairedCounts

STATS = ("paired-median", "paired-mean")
PRIMARY = [0.2 * (1 + (i * 37) % 50) for i in range(200)]  # request-dominated: 0.2 s .. 10 s
JITTER = [1.04, 1 / 1.04, 1.02, 1 / 1.02, 1.0]  # server noise, symmetric in the log


def _spec(stat: str, margin: str = "10%", **kw: object) -> MetricSpec:
    return MetricSpec("ttft", stat, margin=Margin.parse(margin), **kw)  # type: ignore[arg-type]


def _candidate(factor: float) -> list[float]:
    return [p * factor * JITTER[i % len(JITTER)] for i, p in enumerate(PRIMARY)]


def test_sign_evalue_is_the_uniform_mixture_integral() -> None:
    for k, n in ((0, 0), (0, 5), (3, 5), (5, 5), (30, 40), (12, 40), (70, 100)):
        exact, _ = integrate.quad(lambda p, k=k, n=n: 2 * (2 * p) ** k * (2 * (1 - p)) ** (n - k), 0.5, 1.0)
        assert math.exp(float(log_sign_evalue(np.array([k]), np.array([n]))[0])) == pytest.approx(exact, rel=1e-9)
    # Increasing in k, and a fair coin's count never reaches 20 by itself.
    e = log_sign_evalue(np.arange(0, 101, dtype=float), np.full(101, 100.0))
    assert (np.diff(e) > 0).all()
    assert e[50] < math.log(20)


def test_critical_count_is_the_least_count_that_rejects() -> None:
    n = np.array([1.0, 5.0, 10.0, 40.0, 100.0, 1000.0])
    k = critical_count(n, 0.05)
    target = math.log(20)
    for ki, ni in zip(k, n, strict=True):
        if ki <= ni:
            assert log_sign_evalue(np.array([ki]), np.array([ni]))[0] >= target
            assert log_sign_evalue(np.array([ki - 1]), np.array([ni]))[0] < target
        else:  # too few pairs for any count to reject
            assert log_sign_evalue(np.array([ni]), np.array([ni]))[0] < target
    assert k[0] == 2 and k[-1] < 560  # 1 pair can never reject; 1000 pairs need a clear majority


def test_pairs_are_counted_dropped_and_binned() -> None:
    data = Paired.of([1.0, 1.0, 2.0, 1.0, 0.0, 1.0, math.nan], [1.2, 0.8, 2.0, -1.0, 1.0, math.inf, 1.0],
                     dropped=2, errored=1)
    assert data.n == 3 and data.dropped == 2 + 4 and data.errored == 1
    assert data.above(0.0) == 1  # only 1.2/1.0; 2.0/2.0 is a tie, not slower
    assert data.below(0.0) == 1
    assert data.below(math.log(1.25)) == 3 and data.above(math.log(0.75)) == 3
    assert data.sum == pytest.approx(math.log(1.2) + math.log(0.8))
    # One pair at a time gives the same summary as a batch, and summaries add up.
    sketch = PairedSketch()
    for p, c in ((1.0, 1.2), (1.0, 0.8), (2.0, 2.0), (0.0, 1.0), (1.0, None)):
        sketch.add(p, c)
    one = sketch.snapshot()
    assert one.n == 3 and one.dropped == 2
    np.testing.assert_array_equal(one.counts, Paired.of([1.0, 1.0, 2.0], [1.2, 0.8, 2.0]).counts)
    both = one + Paired.of([1.0], [3.0])
    assert both.n == 4 and both.above(0.0) == 2 and both.dropped == 2
    assert LOG_RATIO_LE[800] == 0.0  # the fail threshold is a bound: its count is exact
    with pytest.raises(JudgeInputError, match="pair up one to one"):
        Paired.of([1.0, 2.0], [1.0])


@pytest.mark.parametrize("stat", STATS)
def test_aa_passes_and_a_30_percent_shift_fails(stat: str) -> None:
    aa = judge([MetricInput.of_pairs(_spec(stat), Paired.of(PRIMARY, _candidate(1.0)))])
    assert aa.outcome is Outcome.passed, aa.reason
    worse = judge([MetricInput.of_pairs(_spec(stat), Paired.of(PRIMARY, _candidate(1.3)))])
    assert worse.outcome is Outcome.failed, worse.reason
    r = worse.results[0]
    assert r.effect == pytest.approx(1.3, rel=0.03)
    assert r.interval[0] is not None and r.interval[0] > 1.0 and r.threshold == 1.0
    assert r.n_primary == r.n_candidate == 200
    # Few pairs of the same data: not enough to decide either way.
    few = judge([MetricInput.of_pairs(_spec(stat), Paired.of(PRIMARY[:8], _candidate(1.0)[:8]))])
    assert few.outcome in (Outcome.cont, Outcome.nodata)


@pytest.mark.parametrize("stat", STATS)
def test_an_effect_inside_the_margin_is_not_a_fail_and_the_request_variance_cancels(stat: str) -> None:
    """+5% with a 10% margin: pass or continue. The requests span 50x, which two independent arms
    of 200 could not tell from +5%; the pairs can."""
    v = judge([MetricInput.of_pairs(_spec(stat), Paired.of(PRIMARY, _candidate(1.05)))])
    assert v.outcome is Outcome.passed
    v15 = judge([MetricInput.of_pairs(_spec(stat), Paired.of(PRIMARY, _candidate(1.15)))])
    assert v15.outcome is Outcome.failed


def test_no_pairs_is_nodata_and_says_what_was_left_out() -> None:
    for pairs in (Paired.of([], [], dropped=4, errored=2), Paired.of([1.0, 2.0], [math.nan, 0.0], errored=2)):
        v = judge([MetricInput.of_pairs(_spec("paired-median"), pairs)])
        r = v.results[0]
        assert v.outcome is Outcome.nodata and r.outcome is Outcome.nodata
        assert "no pairs yet" in r.sentence and "with a failed side" in r.sentence
        assert r.extra["pairs"] == 0 and r.extra["pairsErrored"] == 2
    v = judge([MetricInput.of_pairs(_spec("paired-mean"), Paired.of(PRIMARY[:20], _candidate(2.0)[:20]))])
    assert v.outcome is Outcome.nodata and "20 pairs, 50 needed" in v.results[0].sentence
    for missing in (NoData("the output source is not connected"), None):
        v = judge([MetricInput.of_pairs(_spec("paired-mean"), missing)])
        assert v.outcome is Outcome.nodata


def test_dropped_pairs_are_counted_in_the_evidence() -> None:
    v = judge([MetricInput.of_pairs(_spec("paired-median"),
                                    Paired.of([*PRIMARY, 1.0, 1.0], [*_candidate(1.3), math.nan, 0.0], errored=5))])
    rec = v.results[0].to_record()
    assert rec.outcome == "fail"
    assert rec.extra == {"pairs": 200, "pairsDropped": 2, "pairsErrored": 5, "candidateSlower": 200,
                         "logEValueFail": pytest.approx(rec.extra["logEValueFail"]),  # type: ignore[index]
                         "logEValuePass": pytest.approx(rec.extra["logEValuePass"])}  # type: ignore[index]
    assert "2 without the quantity on a side, 5 with a failed side" in rec.sentence
    assert rec.samples.primary == rec.samples.candidate == 200


def test_directions_and_levels() -> None:
    faster = Paired.of(PRIMARY, _candidate(0.7))
    assert judge([MetricInput.of_pairs(_spec("paired-median", direction=Direction.decrease), faster)]).outcome \
        is Outcome.failed
    assert judge([MetricInput.of_pairs(_spec("paired-median"), faster)]).outcome is Outcome.passed
    for stat in STATS:
        either = _spec(stat, direction=Direction.either)
        assert judge([MetricInput.of_pairs(either, faster)]).outcome is Outcome.failed
        assert judge([MetricInput.of_pairs(either, Paired.of(PRIMARY, _candidate(1.0)))]).outcome is Outcome.passed
    # Bonferroni over the look's metrics: two metrics, each judged at alpha/2.
    v = judge([MetricInput.of_pairs(_spec("paired-median"), Paired.of(PRIMARY, _candidate(1.0))),
               MetricInput(MetricSpec("errors", "rate", margin=Margin.parse("1pp")), Counts(1, 500), Counts(2, 500))])
    assert v.results[0].alpha == pytest.approx(0.025)


def test_wrong_kinds_of_data_are_refused() -> None:
    with pytest.raises(JudgeInputError, match="relative"):
        judge([MetricInput.of_pairs(_spec("paired-mean", margin="0.1"), Paired.of(PRIMARY, PRIMARY))])
    arms = MetricInput(_spec("paired-mean"), Counts(1, 10), Counts(1, 10))
    with pytest.raises(JudgeInputError, match="takes pairs"):
        judge([arms])
    [err] = judge_many([LookInput([MetricInput(MetricSpec("p", "p50"), None, None, Paired.of([1.0], [1.0]))])])
    assert isinstance(err, JudgeInputError) and "takes two arms" in str(err)


@pytest.mark.parametrize("stat", STATS)
def test_repeated_looks_at_aa_pairs_rarely_fail(stat: str) -> None:
    """200 A/A streams (request lognormal sigma 1, server noise 0.2), 60 looks of 20 pairs: the share
    that ever fails stays near alpha (the median's test is exact; the bench measures both)."""
    rng = np.random.default_rng(11)
    streams, looks, per = 200, 60, 20
    sketches = [PairedSketch() for _ in range(streams)]
    ever = np.zeros(streams, dtype=bool)
    spec = _spec(stat)
    for _ in range(looks):
        for s in sketches:
            req = rng.lognormal(0.0, 1.0, per)
            s.add_many(req * rng.lognormal(0.0, 0.2, per), req * rng.lognormal(0.0, 0.2, per))
        batch = batch_paired(spec, [s.snapshot() for s in sketches], alpha=0.05, beta=0.05)
        ever |= batch.code == FAIL
    assert ever.mean() <= 0.08


# --------------------------------------------------------------------------- restored from .status


def _look(spec: MetricSpec, data: Paired) -> MetricResult:
    [verdict] = judge_many([LookInput([MetricInput.of_pairs(spec, data)], alpha=0.05, beta=0.1, final=False)])
    assert not isinstance(verdict, Exception)
    return verdict.results[0]


def _through_json(record: PairedCounts) -> PairedCounts:
    """What the API server keeps and a restarted controller reads back."""
    return PairedCounts.model_validate(json.loads(json.dumps(record.to_json(), allow_nan=False)))


@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("factor", [1.0, 1.06, 1.3])
def test_pairs_restored_from_the_status_record_decide_as_if_never_restarted(stat: str, direction: Direction,
                                                                            factor: float) -> None:
    """Judging 150 pairs counted before a restart (kept in `.status` as n, sums and counts at some
    bounds) plus 100 counted after gives the verdict, e-values, counts and mean's interval of judging
    all 250 at once; the median's interval may only widen."""
    rng = np.random.default_rng(int(factor * 100) + len(direction.value))
    req = rng.lognormal(0, 1, 250)
    primary, candidate = req * rng.lognormal(0, 0.15, 250), req * factor * rng.lognormal(0, 0.15, 250)
    spec = _spec(stat, direction=direction, min_samples=20)
    whole = Paired.of(primary, candidate, dropped=3, errored=2)
    before = Paired.of(primary[:150], candidate[:150], dropped=3, errored=2)
    after = Paired.of(primary[150:], candidate[150:])
    record = before.to_record(decision_bounds(spec))
    back = Paired.from_record(_through_json(record))
    assert back is not None and back.restored == 150 and back.n == 150 and back.counts_max is not None
    assert (back.sum, back.sum_sq, back.dropped, back.errored) == (before.sum, before.sum_sq, 3, 2)
    for x in decision_bounds(spec):  # exact where the decision reads
        j = int(np.searchsorted(LOG_RATIO_LE, x))
        assert back.counts[j] == back.upper_counts[j] == before.counts[j]
    assert np.all(back.counts <= before.counts) and np.all(before.counts <= back.upper_counts)  # brackets

    want, got = _look(spec, whole), _look(spec, back + after)
    assert got.outcome is want.outcome
    assert got.n_candidate == want.n_candidate == 250
    assert got.extra["pairsRestored"] == 150 and "pairsRestored" not in want.extra
    assert got.extra["candidateSlower"] == want.extra["candidateSlower"]
    assert (got.extra["pairsDropped"], got.extra["pairsErrored"]) == (3, 2)
    if stat == "paired-median":
        assert got.extra["logEValueFail"] == want.extra["logEValueFail"]
        assert got.extra["logEValuePass"] == want.extra["logEValuePass"]
        lo, hi = got.interval
        assert lo is not None and hi is not None and want.interval[0] is not None and want.interval[1] is not None
        assert lo <= want.interval[0] and hi >= want.interval[1]
        assert got.effect is not None and want.effect is not None and abs(math.log(got.effect / want.effect)) < 0.05
    else:
        assert got.effect == pytest.approx(want.effect, rel=1e-12)
        assert got.interval == pytest.approx(want.interval, rel=1e-9)
    # A second restart: the restored pairs are written again only where their counts are known.
    again = (back + after).to_record(decision_bounds(spec))
    assert again.pairs == 250 and set(again.le) <= set(record.le)
    twice = Paired.from_record(_through_json(again))
    assert twice is not None and _look(spec, twice).outcome is want.outcome


def test_the_status_record_is_bounded_and_refuses_bounds_off_the_layout() -> None:
    rng = np.random.default_rng(5)
    many = Paired.of(rng.lognormal(0, 1, 100_000), rng.lognormal(0, 1, 100_000))
    spec = _spec("paired-median")
    record = many.to_record(decision_bounds(spec))
    assert record.pairs == 100_000 and len(record.le) == len(record.counts) <= 64
    assert len(json.dumps(record.to_json())) < 1200  # bytes, however many pairs
    assert {0.0, -0.005}.issubset(record.le)
    assert record.counts == sorted(record.counts)
    # Many margins on one quantity: the decision's bounds stay, the grid gives way.
    needed = {round(x, 6) for m in range(1, 25) for x in decision_bounds(_spec("paired-median", f"{m}%"))}
    crowded = many.to_record(sorted(needed))
    assert len(needed) > 64 - len(record.le) and len(crowded.le) == 64 and needed <= set(crowded.le)
    assert Paired.from_record(record.model_copy(update={"le": [*record.le[:-1], 0.0123]})) is None
    assert Paired.from_record(PairedCounts()) is not None
    assert Paired.of([], []).to_record().le == []
