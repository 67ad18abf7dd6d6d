"""The statistical judge: numbers of primary and candidate in, a verdict with its reasons out (pure core).

No I/O and no clock: the caller passes the *cumulative* data of each arm since the analysis phase
started and says whether this is the last look. The sequential decision is a pure function of those
cumulative data, so a restarted controller that re-queries Prometheus gets the same answer; there is
no per-look state to keep. See ``docs/judge.md`` for the method and the benchmark numbers.

Public API::

    MetricSpec(name, statistic, direction=Direction.increase, margin=Margin(0.10, relative=True),
               critical=False, min_samples=50)
        statistic: "p50" | "p90" | "p95" | "p99" (any "pNN") | "mean" | "rate" | "agreement"
        Margin.parse("10%") (relative: candidate <= 1.10 x primary; for 'decrease': >= 0.90 x primary),
        Margin.parse("+0.005") / Margin.parse("0.5pp") (absolute difference)

    Per-arm data (cumulative since the phase started):
        Samples(values)                    raw observations
        Aggregates(values)                 per-interval aggregates (gauges), each one observation
        Histogram(le, counts, sum=None)    Prometheus buckets: cumulative counts per `le`, last `+Inf`
        Counts(failures, total)            errors of requests / disagreements of compared outputs
        Counts(failures, total, exact=True) a known proportion (a fixed agreement baseline), not a sample
        NoData(reason) or None             the source had nothing -> outcome `nodata`, never a pass

    Paired metrics (statistic "paired-mean" | "paired-median", relative margin): the candidate and the
    primary on the same requests, as per-pair log ratios, instead of two arms:
        MetricInput.of_pairs(spec, Paired.of(primary_values, candidate_values, dropped=0, errored=0))
        PairedSketch().add(p, c) ... .snapshot() -> Paired     bounded memory for a stream of pairs

    judge(inputs: Sequence[MetricInput], *, alpha=0.05, beta=0.05, method="sequential",
          final=False) -> Verdict
        MetricInput(spec, primary, candidate); alpha is the family-wise false-fail probability
        (Bonferroni over metrics), beta the false-pass probability at a metric's margin.
    judge_many(looks: Sequence[LookInput(inputs, alpha, beta, final)]) -> [Verdict | JudgeInputError]
        the sequential judge of many rollouts' looks at once (vectorized per metric spec and layout)
    judge_metric(spec, primary, candidate, *, alpha, beta, final=False) -> MetricResult
    judge_fixed(inputs, FixedConfig(...)) -> Verdict          NetflixACAJudge-parity fixed-horizon judge
        (FixedConfig: confidence, tolerance, scores, group weights; MetricOptions per metric)

    Verdict.outcome / MetricResult.outcome: Outcome.passed | failed | cont | inconclusive | nodata
        ("pass", "fail", "continue", "inconclusive", "nodata");
    .to_record() -> the status model's Evidence / MetricEvidence; MetricResult.sentence explains the numbers.

Vectorized kernels for many streams at once (used by the replay command and the benchmark) live
in :mod:`shadowctl.judge.estimators` and :func:`shadowctl.judge.sequential.decide`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shadowctl.lazy import lazy_exports

if TYPE_CHECKING:
    from shadowctl.judge.core import LookInput, check_levels, combine, judge, judge_many, judge_metric, nodata_result
    from shadowctl.judge.fixed import Classification, FixedConfig, MetricOptions, classify, judge_fixed, mann_whitney
    from shadowctl.judge.model import (
        Aggregates,
        ArmData,
        Counts,
        Direction,
        Histogram,
        JudgeError,
        JudgeInputError,
        Margin,
        MetricInput,
        MetricResult,
        MetricSpec,
        NoData,
        Outcome,
        Paired,
        PairedSketch,
        Samples,
        Verdict,
    )

_HOME = {
    **dict.fromkeys(("LookInput", "check_levels", "combine", "judge", "judge_many", "judge_metric", "nodata_result"),
                    "core"),
    **dict.fromkeys(("Classification", "FixedConfig", "MetricOptions", "classify", "judge_fixed", "mann_whitney"),
                    "fixed"),
}
"""Where each name lives; the rest are in :mod:`.model`. Loaded on first use: the model needs numpy
only, the kernels scipy (1 s to import), and the machine and the CLI need the model alone."""


__all__ = [
    "Aggregates",
    "ArmData",
    "Classification",
    "Counts",
    "Direction",
    "FixedConfig",
    "Histogram",
    "JudgeError",
    "JudgeInputError",
    "LookInput",
    "Margin",
    "MetricInput",
    "MetricOptions",
    "MetricResult",
    "MetricSpec",
    "NoData",
    "Outcome",
    "Paired",
    "PairedSketch",
    "Samples",
    "Verdict",
    "check_levels",
    "classify",
    "combine",
    "judge",
    "judge_fixed",
    "judge_many",
    "judge_metric",
    "mann_whitney",
    "nodata_result",
]

__getattr__ = lazy_exports(__name__, __all__, _HOME, "model")
