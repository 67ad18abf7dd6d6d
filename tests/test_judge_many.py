"""judge_many: many rollouts' looks in one call give each look the verdict it gets alone."""

from __future__ import annotations

import math
import random

import numpy as np

from shadowctl.judge import (
    Counts,
    Histogram,
    JudgeInputError,
    LookInput,
    Margin,
    MetricInput,
    MetricSpec,
    NoData,
    Samples,
    combine,
    judge_many,
    judge_metric,
)

LE = (0.1, 0.25, 0.5, 1.0, 2.5, math.inf)
OTHER_LE = (0.1, 0.5, 1.0, 5.0, math.inf)


def _histogram(rng: random.Random, n: int, median: float, le: tuple[float, ...]) -> Histogram:
    values = [median * math.exp(rng.gauss(0, 0.6)) for _ in range(n)]
    counts = [sum(v <= b for v in values) for b in le]
    return Histogram(list(le), counts, sum=sum(values) if rng.random() < 0.5 else None)


def _look(rng: random.Random) -> LookInput:
    n = rng.choice([20, 300, 2000])
    inputs = [
        MetricInput(MetricSpec("ttft", "p50", margin=Margin.parse("15%")),
                    _histogram(rng, n, 0.4, LE), _histogram(rng, n, rng.choice([0.4, 0.6]), rng.choice([LE, OTHER_LE]))),
        MetricInput(MetricSpec("ttft99", "p99", margin=Margin.parse("30%"), critical=True),
                    _histogram(rng, n, 0.4, LE), _histogram(rng, n, 0.4, LE)),
        MetricInput(MetricSpec("mean", "mean", margin=Margin.parse("10%")),
                    _histogram(rng, n, 0.4, LE), _histogram(rng, n, 0.45, LE)),
        MetricInput(MetricSpec("errors", "rate", margin=Margin(0.01, relative=False)),
                    Counts(rng.randint(0, n // 50), n), Counts(rng.randint(0, n // 10), n)),
        MetricInput(MetricSpec("raw", "p95", margin=Margin.parse("20%")),
                    Samples(np.asarray([rng.lognormvariate(0, 0.5) for _ in range(n)])),
                    Samples(np.asarray([rng.lognormvariate(0.1, 0.5) for _ in range(n)]))),
    ]
    if rng.random() < 0.3:
        inputs.append(MetricInput(MetricSpec("gone", "p50"), NoData("the query returned no series"), None))
    rng.shuffle(inputs)
    return LookInput(inputs[: rng.randint(1, len(inputs))], alpha=rng.choice([0.05, 0.01]), beta=0.05,
                     final=rng.random() < 0.2)


def _alone(look: LookInput) -> object:
    """The verdict of one look judged metric by metric (judge_metric, one kernel call per metric)."""
    k = len(look.inputs)
    results = [judge_metric(mi.spec, mi.primary, mi.candidate, alpha=look.alpha / k, beta=look.beta, final=look.final)
               for mi in look.inputs]
    return combine(results, final=look.final)


def test_a_look_judged_with_many_gets_the_verdict_it_gets_alone() -> None:
    rng = random.Random(7)
    looks = [_look(rng) for _ in range(120)]
    verdicts = judge_many(looks)
    assert len(verdicts) == len(looks)
    assert verdicts == [_alone(look) for look in looks]
    outcomes = {v.outcome for v in verdicts if not isinstance(v, JudgeInputError)}
    assert len(outcomes) >= 3  # the looks are varied enough to mean something


def test_a_bad_look_gets_its_error_and_the_others_their_verdicts() -> None:
    rng = random.Random(3)
    good = _look(rng)
    wrong_kind = LookInput([MetricInput(MetricSpec("e", "rate"), Histogram(list(LE), [1, 2, 3, 4, 5, 6]),
                                        Histogram(list(LE), [1, 2, 3, 4, 5, 6]))])
    bad_level = LookInput(good.inputs, alpha=1.5)
    out = judge_many([good, wrong_kind, bad_level])
    assert out[0] == _alone(good)
    assert isinstance(out[1], JudgeInputError) and "needs Counts" in str(out[1])
    assert isinstance(out[2], JudgeInputError) and "alpha and beta" in str(out[2])
    assert judge_many([]) == []
