"""Inputs and outputs of the judge: metric specs, per-arm data, results and verdicts.

Everything here is frozen and plain. Results convert to the status model's evidence records
(``to_record()``) because they are written into the policy's Kubernetes ``.status``.
Data classes validate their numbers on construction and raise :class:`JudgeInputError`
with a message that says which field is wrong, so bad input never reaches the
statistics as a traceback from numpy.
"""

from __future__ import annotations

import enum
import math
import re
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from shadowctl.errors import ShadowctlError
from shadowctl.policy.status import PAIRED_BOUNDS_MAX, Evidence, MetricEvidence, PairedCounts, SampleCounts

FloatArray = npt.NDArray[np.float64]


class JudgeError(ShadowctlError):
    """Base class of the judge's errors."""


class JudgeInputError(JudgeError, ValueError):
    """A spec or a data object is malformed (the message says which field and why)."""


class Outcome(str, enum.Enum):
    """What the judge concluded for one metric, or for the whole verdict."""

    passed = "pass"
    failed = "fail"
    cont = "continue"
    inconclusive = "inconclusive"
    nodata = "nodata"


class Direction(str, enum.Enum):
    """Which change of the statistic is a regression."""

    increase = "increase"  # bigger is worse (latency, error rate, cost)
    decrease = "decrease"  # smaller is worse (throughput, agreement)
    either = "either"  # any change beyond the margin is worse


_STAT_ALIASES = {"error_rate": "rate", "agreement_rate": "agreement"}
PAIRED_STATISTICS = ("paired-mean", "paired-median")
"""Statistics of per-pair log ratios log(candidate/primary): their mean, or their median."""
_QUANTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")
_MARGIN = re.compile(r"^\s*\+?\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|pp)?\s*$")


def quantile_of(statistic: str) -> float | None:
    """The quantile level of a ``pNN`` statistic (``p99`` -> 0.99), or None for other statistics."""
    m = _QUANTILE.match(statistic)
    return float(m.group(1)) / 100.0 if m else None


def normalize_statistic(statistic: str) -> str:
    """Canonical statistic name; raises :class:`JudgeInputError` for unknown ones."""
    s = _STAT_ALIASES.get(statistic.strip().lower(), statistic.strip().lower())
    q = quantile_of(s)
    if s in ("mean", "rate", "agreement", *PAIRED_STATISTICS):
        return s
    if q is not None and 0.0 < q < 1.0:
        return s
    raise JudgeInputError(
        f"unknown statistic {statistic!r}: use p50, p90, p95, p99 (any pNN), mean, rate (error rate), "
        "agreement, or paired-mean / paired-median (per-pair log ratios)"
    )


@dataclass(frozen=True)
class Margin:
    """How much worse the candidate may be: relative (0.10 = 10%) or absolute (0.005 = +0.5 points)."""

    value: float
    relative: bool

    def __post_init__(self) -> None:
        if not math.isfinite(self.value) or self.value <= 0:
            raise JudgeInputError(f"margin must be a positive number, got {self.value!r}")
        if self.relative and self.value >= 1.0:
            # For a 'decrease' direction a relative margin m means "candidate >= (1-m) x primary".
            raise JudgeInputError(f"a relative margin must be below 100%, got {self.value * 100:g}%")

    @classmethod
    def parse(cls, text: str | float) -> Margin:
        """Parse ``"10%"`` (relative), ``"0.5pp"``, ``"+0.005"`` or ``0.005`` (absolute)."""
        if isinstance(text, bool):
            raise JudgeInputError("a margin is a number or a string such as '10%' or '+0.005'")
        if isinstance(text, int | float):
            return cls(float(text), relative=False)
        m = _MARGIN.match(text)
        if not m:
            raise JudgeInputError(f"{text!r} is not a margin; write '10%' (relative), '0.5pp' or '+0.005' (absolute)")
        number = float(m.group(1))
        if m.group(2) == "%":
            return cls(number / 100.0, relative=True)
        if m.group(2) == "pp":
            return cls(number / 100.0, relative=False)
        return cls(number, relative=False)

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


@dataclass(frozen=True)
class MetricSpec:
    """One metric to judge. ``statistic``: pNN, mean, rate or agreement."""

    name: str
    statistic: str
    direction: Direction = Direction.increase
    margin: Margin = field(default_factory=lambda: Margin(0.10, relative=True))
    critical: bool = False
    min_samples: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "statistic", normalize_statistic(self.statistic))
        object.__setattr__(self, "direction", Direction(self.direction))
        if self.min_samples < 1:
            raise JudgeInputError(f"metric {self.name!r}: min_samples must be at least 1, got {self.min_samples}")

    @property
    def quantile(self) -> float | None:
        return quantile_of(self.statistic)

    @property
    def paired(self) -> bool:
        """Judged on per-pair log ratios (:class:`Paired` data), not on two independent arms."""
        return self.statistic in PAIRED_STATISTICS


# --------------------------------------------------------------------------- data per arm


MAX_MAGNITUDE = 1e150
"""The largest |value| the judge takes as an observation: the squares of such values still sum to a finite
number (a latency of 1e150 s is a broken exporter, not a slow candidate). Beyond it an arm is no data."""


def _finite_array(values: Iterable[float], what: str) -> FloatArray:
    try:
        arr = np.asarray(list(values), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise JudgeInputError(f"{what}: expected a list of numbers") from exc
    if arr.ndim != 1:
        raise JudgeInputError(f"{what}: expected a flat list of numbers")
    return arr


@dataclass(frozen=True, eq=False)
class Samples:
    """Raw observations of one arm (cumulative since the phase started). NaN marks a missing value."""

    values: FloatArray

    def __init__(self, values: Iterable[float]) -> None:
        object.__setattr__(self, "values", _finite_array(values, "samples"))

    @property
    def has_nan(self) -> bool:
        return bool(np.isnan(self.values).any())

    @property
    def out_of_range(self) -> bool:
        """Some value is infinite or beyond :data:`MAX_MAGNITUDE` (NaN, a missing value, is not)."""
        return bool((np.abs(self.values) > MAX_MAGNITUDE).any())


@dataclass(frozen=True, eq=False)
class Aggregates(Samples):
    """Per-interval aggregates of one arm (e.g. mean GPU utilisation of each scrape); each is one sample."""


@dataclass(frozen=True, eq=False)
class Histogram:
    """Prometheus-style histogram of one arm: cumulative counts per upper bound ``le``, ending in ``+Inf``.

    ``sum`` (the ``_sum`` series) and ``sum_sq`` are optional; with them the mean and its variance are
    exact instead of estimated from the buckets.
    """

    le: FloatArray
    counts: FloatArray
    sum: float | None = None
    sum_sq: float | None = None

    def __init__(
        self, le: Iterable[float], counts: Iterable[float], sum: float | None = None, sum_sq: float | None = None
    ) -> None:
        le_arr = _finite_array(le, "histogram le")
        cnt = _finite_array(counts, "histogram counts")
        if le_arr.size == 0 or le_arr.size != cnt.size:
            raise JudgeInputError(
                f"histogram: 'le' has {le_arr.size} bounds and 'counts' {cnt.size}; they must match and be non-empty"
            )
        if not np.isposinf(le_arr[-1]):
            raise JudgeInputError("histogram: the last 'le' bound must be +Inf")
        if np.isnan(le_arr).any() or (np.diff(le_arr) <= 0).any():
            raise JudgeInputError("histogram: 'le' bounds must be strictly increasing numbers")
        if not np.isnan(cnt).any() and ((cnt < 0).any() or (np.diff(cnt) < -1e-9 * max(1.0, cnt[-1])).any()):
            raise JudgeInputError("histogram: counts must be cumulative (non-decreasing along 'le') and >= 0")
        object.__setattr__(self, "le", le_arr)
        object.__setattr__(self, "counts", cnt)
        object.__setattr__(self, "sum", None if sum is None else float(sum))
        object.__setattr__(self, "sum_sq", None if sum_sq is None else float(sum_sq))

    @property
    def total(self) -> float:
        return float(self.counts[-1])

    @property
    def has_nan(self) -> bool:
        return bool(np.isnan(self.counts).any()) or (self.sum is not None and math.isnan(self.sum))

    def __add__(self, other: Histogram) -> Histogram:
        """Accumulate two histograms with the same layout (increments of later looks)."""
        if self.le.shape != other.le.shape or not np.array_equal(self.le, other.le):
            raise JudgeInputError("histogram: cannot add histograms with different 'le' layouts")

        def _add(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else a + b

        return Histogram(self.le, self.counts + other.counts, _add(self.sum, other.sum), _add(self.sum_sq, other.sum_sq))


@dataclass(frozen=True)
class Counts:
    """Failures out of a total for one arm (errors of requests; disagreements of compared outputs)."""

    failures: float
    total: float
    exact: bool = False
    """The proportion failures/total is a known constant, not a sample (a fixed agreement baseline measured
    beforehand): the agreement test then compares the candidate with it, with no uncertainty on this arm."""

    def __post_init__(self) -> None:
        for name in ("failures", "total"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise JudgeInputError(f"counts: {name} must be a number, got {v!r}")
        if not isinstance(self.exact, bool):
            raise JudgeInputError(f"counts: exact must be true or false, got {self.exact!r}")
        if not (math.isnan(self.failures) or math.isnan(self.total)) and (
            self.total < 0 or self.failures < 0 or self.failures > self.total
        ):
            raise JudgeInputError(f"counts: need 0 <= failures <= total, got {self.failures} of {self.total}")

    @property
    def has_nan(self) -> bool:
        return math.isnan(self.failures) or math.isnan(self.total)

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.failures + other.failures, self.total + other.total, self.exact and other.exact)


@dataclass(frozen=True)
class NoData:
    """The source could not deliver this arm's data (unreachable, empty query); ``reason`` says why."""

    reason: str


ArmData = Samples | Histogram | Counts | NoData | None


# --------------------------------------------------------------------------- paired data

LOG_RATIO_STEP = 0.005
LOG_RATIO_LE: FloatArray = np.append(np.arange(-800, 801) * LOG_RATIO_STEP, np.inf)
"""Upper bounds of the fixed layout per-pair log ratios are counted in: 0.5% wide from -4 to 4
(ratios 0.018 to 55), 0 exactly a bound, then +Inf; a ratio beyond either end counts in the end bucket."""

_LOG_RATIO_BOUNDS = tuple(float(x) for x in LOG_RATIO_LE)

_ZERO = 800
"""The index of the bound 0 in :data:`LOG_RATIO_LE`."""

_GRID_STEPS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0)
KEPT_GRID: tuple[float, ...] = (0.0, *(sign * x for x in _GRID_STEPS for sign in (-1.0, 1.0)))
"""Log-ratio bounds whose counts `.status` keeps beside the decision bounds (:meth:`Paired.to_record`): 1%
apart near a ratio of 1, wider further out. They give a restored median its estimate and interval;
the decision itself needs only the counts at 0 and at the margins."""


def _bound_index(x: float) -> int | None:
    """The index of the bound ``x`` in :data:`LOG_RATIO_LE` (None: not one of its finite bounds)."""
    if not math.isfinite(x):
        return None
    k = round(x / LOG_RATIO_STEP)
    if abs(k * LOG_RATIO_STEP - x) > 1e-9 or not -_ZERO <= k <= _ZERO:
        return None
    return k + _ZERO


class PairedSketch:
    """Accumulates pairs (primary, candidate) of one quantity into a :class:`Paired` summary.

    Memory is bounded (one count per bucket of :data:`LOG_RATIO_LE` and five sums) however many pairs
    arrive. A pair whose sides are not both finite and positive is counted in ``dropped``, not used.
    """

    __slots__ = ("_buckets", "_dropped", "_errored", "_frozen", "_sums")

    def __init__(self) -> None:
        self._buckets = np.zeros(LOG_RATIO_LE.size, dtype=np.float64)
        self._sums = [0.0, 0.0, 0.0, 0.0]  # d, d^2, log primary, log candidate
        self._dropped = 0
        self._errored = 0
        self._frozen: Paired | None = None

    def add(self, primary: float | None, candidate: float | None) -> bool:
        """Count one pair; False (and counted as dropped) when a side is missing, not finite or not positive."""
        self._frozen = None
        if primary is None or candidate is None or not (0 < primary < math.inf and 0 < candidate < math.inf):
            self._dropped += 1
            return False
        lp, lc = math.log(primary), math.log(candidate)
        d = lc - lp
        self._buckets[bisect_left(_LOG_RATIO_BOUNDS, d)] += 1
        s = self._sums
        s[0] += d
        s[1] += d * d
        s[2] += lp
        s[3] += lc
        return True

    def add_many(self, primary: Iterable[float], candidate: Iterable[float]) -> None:
        """Count many pairs at once (arrays of equal length, element i of each is one pair)."""
        p = _finite_array(primary, "paired primary")
        c = _finite_array(candidate, "paired candidate")
        if p.shape != c.shape:
            raise JudgeInputError(f"paired data: {p.size} primary and {c.size} candidate values; they pair up one to one")
        self._frozen = None
        with np.errstate(invalid="ignore", divide="ignore"):
            ok = (p > 0) & (c > 0) & np.isfinite(p) & np.isfinite(c)
            lp, lc = np.log(p[ok]), np.log(c[ok])
        d = lc - lp
        self._dropped += int(p.size - ok.sum())
        self._buckets += np.bincount(np.searchsorted(LOG_RATIO_LE, d, side="left"), minlength=LOG_RATIO_LE.size)
        s = self._sums
        s[0] += float(d.sum())
        s[1] += float((d * d).sum())
        s[2] += float(lp.sum())
        s[3] += float(lc.sum())

    def drop(self, n: int = 1) -> None:
        """Count pairs where a side lacks the quantity (not counted as pairs)."""
        self._frozen = None
        self._dropped += n

    def errored(self, n: int = 1) -> None:
        """Count pairs where a side failed (an error is not a latency; not counted as pairs)."""
        self._frozen = None
        self._errored += n

    def snapshot(self) -> Paired:
        """The summary so far (frozen; cached until the next change)."""
        if self._frozen is None:
            s = self._sums
            self._frozen = Paired(np.cumsum(self._buckets), s[0], s[1], s[2], s[3], self._dropped, self._errored)
        return self._frozen


@dataclass(frozen=True, eq=False)
class Paired:
    """Per-pair log ratios ``d = log(candidate/primary)`` of one metric, cumulative since the phase started.

    The judge of a paired metric (statistic ``paired-mean`` or ``paired-median``) takes this instead of
    two arms: both sides answered the same request, so the request's own share of the latency (prompt
    and output length) cancels in ``d``. Held in bounded memory: ``counts`` are cumulative counts of
    ``d`` per upper bound of :data:`LOG_RATIO_LE`, ``sum``/``sum_sq`` exact sums of ``d`` and ``d^2``,
    ``sum_log_primary``/``sum_log_candidate`` the sums of each side's log (their geometric means, for
    the evidence). ``dropped``: pairs where a side lacked the quantity (or it was not positive);
    ``errored``: pairs with a failed side. Neither is in ``n``. Build with :meth:`of` or a
    :class:`PairedSketch`.

    Pairs restored from `.status` (:meth:`from_record`, after a controller restart) are known only at a
    few bounds: between two of them a pair may lie anywhere. Then ``counts`` counts each such pair at
    the upper end of its range and ``counts_max`` at the lower end, so the true cumulative counts lie
    between the two (``counts_max`` None: exact). The judge takes the count that says less at every
    step (see :mod:`shadowctl.judge.paired`); at the bounds the decision reads, both are exact.
    ``restored``: how many of the ``n`` pairs came from `.status`.
    """

    counts: FloatArray
    sum: float
    sum_sq: float
    sum_log_primary: float
    sum_log_candidate: float
    dropped: int = 0
    errored: int = 0
    counts_max: FloatArray | None = None
    restored: int = 0

    def __post_init__(self) -> None:
        for name in ("counts", "counts_max"):
            value = getattr(self, name)
            if value is None:
                continue
            cnt = np.asarray(value, dtype=np.float64)
            if cnt.shape != LOG_RATIO_LE.shape:
                raise JudgeInputError(f"paired data: expected {LOG_RATIO_LE.size} cumulative counts, got {cnt.size}")
            object.__setattr__(self, name, cnt)

    @property
    def upper_counts(self) -> FloatArray:
        """The cumulative counts with every pair placed as low as it may lie (``counts`` where exact)."""
        return self.counts if self.counts_max is None else self.counts_max

    def to_record(self, keep: Iterable[float] = ()) -> PairedCounts:
        """What `.status` keeps of these pairs: n, the sums, the left-out counts, and the cumulative
        counts at the bounds ``keep`` (those the decision reads, :func:`shadowctl.judge.paired.decision_bounds`)
        and at :data:`KEPT_GRID`, bounded in size. A bound where the count is not known exactly (pairs
        restored at other bounds) is left out rather than guessed."""
        wanted: list[int] = []
        for x in (*keep, *KEPT_GRID):  # the decision's bounds first: they stay if the limit bites
            j = _bound_index(float(x))
            if j is not None and j not in wanted:
                wanted.append(j)
        upper = self.upper_counts
        exact = [j for j in wanted if self.counts[j] == upper[j]][:PAIRED_BOUNDS_MAX] if self.n > 0 else []
        exact.sort()
        return PairedCounts(
            pairs=int(self.n), sum=float(self.sum), sum_sq=max(float(self.sum_sq), 0.0),
            sum_log_primary=float(self.sum_log_primary), sum_log_candidate=float(self.sum_log_candidate),
            dropped=int(self.dropped), errored=int(self.errored),
            le=[round(float(LOG_RATIO_LE[j]), 6) for j in exact], counts=[int(self.counts[j]) for j in exact],
        )

    @classmethod
    def from_record(cls, record: PairedCounts) -> Paired | None:
        """Inverse of :meth:`to_record`, as far as it kept: exact n, sums and counts at the kept bounds;
        between them each pair is only known to lie in its range (``counts``/``counts_max``). None for a
        record whose bounds are not on :data:`LOG_RATIO_LE` (the caller then starts afresh)."""
        n = float(record.pairs)
        known = np.full(LOG_RATIO_LE.size, np.nan)
        for x, c in zip(record.le, record.counts, strict=True):
            j = _bound_index(x)
            if j is None:
                return None
            known[j] = c
        known[-1] = n
        low = np.maximum.accumulate(np.where(np.isnan(known), 0.0, known))
        high = np.minimum.accumulate(np.where(np.isnan(known), n, known)[::-1])[::-1]
        return cls(low, record.sum, record.sum_sq, record.sum_log_primary, record.sum_log_candidate,
                   record.dropped, record.errored, counts_max=None if np.array_equal(low, high) else high,
                   restored=record.pairs)

    @classmethod
    def of(cls, primary: Iterable[float], candidate: Iterable[float], *, dropped: int = 0, errored: int = 0) -> Paired:
        """From pairs given as two aligned sequences (element i of each is pair i); bad pairs are dropped."""
        sketch = PairedSketch()
        sketch.add_many(primary, candidate)
        sketch.drop(dropped)
        sketch.errored(errored)
        return sketch.snapshot()

    @property
    def n(self) -> float:
        """Pairs counted."""
        return float(self.counts[-1])

    @property
    def has_nan(self) -> bool:
        return (bool(np.isnan(self.counts).any()) or bool(np.isnan(self.upper_counts).any())
                or math.isnan(self.sum) or math.isnan(self.sum_sq))

    def above(self, x: float) -> float:
        """How many ``d`` are above ``x``, counted at the nearest bound at or above ``x`` (never more)."""
        j = int(np.searchsorted(LOG_RATIO_LE, x, side="left"))
        return self.n - float(self.upper_counts[min(j, LOG_RATIO_LE.size - 1)])

    def below(self, x: float) -> float:
        """How many ``d`` are below ``x``, counted at the nearest bound below ``x`` (never more)."""
        j = int(np.searchsorted(LOG_RATIO_LE, x, side="left")) - 1
        return float(self.counts[j]) if j >= 0 else 0.0

    def __add__(self, other: Paired) -> Paired:
        exact = self.counts_max is None and other.counts_max is None
        return Paired(self.counts + other.counts, self.sum + other.sum, self.sum_sq + other.sum_sq,
                      self.sum_log_primary + other.sum_log_primary,
                      self.sum_log_candidate + other.sum_log_candidate,
                      self.dropped + other.dropped, self.errored + other.errored,
                      counts_max=None if exact else self.upper_counts + other.upper_counts,
                      restored=self.restored + other.restored)


@dataclass(frozen=True)
class MetricInput:
    """A metric spec with the cumulative data of both arms since the phase started.

    A paired metric (``spec.paired``) takes its data in ``pairs`` instead (:meth:`of_pairs`); its
    ``primary``/``candidate`` are None.
    """

    spec: MetricSpec
    primary: ArmData
    candidate: ArmData
    pairs: Paired | NoData | None = None

    @classmethod
    def of_pairs(cls, spec: MetricSpec, pairs: Paired | NoData | None) -> MetricInput:
        """A paired metric's input: the per-pair log ratios (or why there are none)."""
        return cls(spec, None, None, pairs)


# --------------------------------------------------------------------------- results


def _num(x: float | None) -> float | None:
    """A JSON-safe number: None for NaN, strings are avoided; +-inf become None too."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def _json_safe(v: Any) -> Any:
    return _num(v) if isinstance(v, float) else v


@dataclass(frozen=True)
class MetricResult:
    """The judge's conclusion for one metric, with the numbers behind it.

    ``effect`` and ``interval`` are on the user's scale: for a relative margin the ratio
    candidate/primary (1.12 = 12% higher), for an absolute margin the difference candidate - primary.
    ``threshold`` is what the crossing statistic was compared with (the margin bound or 0).
    """

    name: str
    outcome: Outcome
    statistic: str
    direction: Direction
    margin: Margin
    critical: bool
    n_primary: float
    n_candidate: float
    primary_value: float | None
    candidate_value: float | None
    effect: float | None
    interval: tuple[float | None, float | None]
    alpha: float
    beta: float
    crossed: str | None
    threshold: float | None
    sentence: str
    method: str = "sequential"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> MetricEvidence:
        """The evidence as `.status` stores it (numbers JSON cannot hold are None)."""
        return MetricEvidence(
            name=self.name, outcome=self.outcome.value, statistic=self.statistic,
            direction=self.direction.value, margin=str(self.margin), critical=self.critical,
            method=self.method, samples=SampleCounts(primary=_num(self.n_primary), candidate=_num(self.n_candidate)),
            primary=_num(self.primary_value), candidate=_num(self.candidate_value), effect=_num(self.effect),
            effect_scale="ratio" if self.margin.relative else "difference",
            interval=[_num(self.interval[0]), _num(self.interval[1])], alpha=self.alpha, beta=self.beta,
            crossed=self.crossed, threshold=_num(self.threshold), sentence=self.sentence,
            extra={k: _json_safe(v) for k, v in self.extra.items()} if self.extra else None,
        )


@dataclass(frozen=True)
class Verdict:
    """The overall outcome of one look over all metrics."""

    outcome: Outcome
    results: tuple[MetricResult, ...]
    reason: str
    method: str = "sequential"
    score: float | None = None

    def to_record(self) -> Evidence:
        """The verdict as `.status.lastVerdict` stores it (the controller adds the time)."""
        return Evidence(outcome=self.outcome.value, method=self.method, reason=self.reason,
                        metrics=[r.to_record() for r in self.results], score=self.score)
