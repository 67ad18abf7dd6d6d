"""One look: gather what primary and candidate did since the phase started, and judge it.

Why "since the phase started" and not "since the last look": the sequential
judge is a function of cumulative data (see :mod:`shadowctl.judge`), so the
controller keeps no per-look memory of metrics; after a restart it re-queries
``increase(...[now - phaseStartedAt])`` and reaches the same decision. Output
agreement counts cannot be re-queried (MQTT is a stream), so the tally is
written to ``.status`` at every tick and read back from there.

The Prometheus source answers all policies of a look together: the
:class:`BatchingSource` coalesces the requests that workers send within a few
milliseconds of each other (workers tick on interval boundaries), so the query
rate grows with the number of metric templates, not with the number of rollouts.

The judge, too, runs once per look for all rollouts: the first tick of a look
asks the manager which rollouts' looks end at the same boundary
(:attr:`Analyzer.peers`), fetches them together and judges every metric of every
rollout in one vectorized call per metric kind (:func:`~shadowctl.judge.core.batch_binned`,
:func:`~shadowctl.judge.core.batch_counts`); each tick then reads its rows. A row
is used only if the tick's own data, spec and error budget are exactly the ones
that were judged; anything else is judged on its own, as before, so the verdict
never depends on whether it came from the batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import structlog

from shadowctl.compare.comparators import AgreementInput, AgreementTally, judge_inputs
from shadowctl.judge import (
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
    Verdict,
    combine,
    judge_fixed,
    judge_metric,
)
from shadowctl.judge.core import Batch, batch_binned, batch_counts, result_of
from shadowctl.judge.fixed import FixedConfig
from shadowctl.machine import Phase, RolloutState
from shadowctl.policy.model import Method, Metric, ShadowPolicy
from shadowctl.sources import base
from shadowctl.sources.base import (
    CounterWindow,
    CountWindow,
    GaugeWindow,
    HistogramWindow,
    MetricKey,
    MetricSource,
    Planned,
    SourceConfigError,
    SourceUnavailable,
    VariantPair,
    Window,
    WindowRequest,
    WindowResult,
)

log = structlog.get_logger(__name__)

FIXED_BASELINE_PSEUDO_COUNT = 1_000_000
"""A fixed baseline agreement (measured beforehand) enters the judge as an arm this large, so that its
uncertainty is negligible and the comparison is effectively against a known constant."""


class OutputTallies(Protocol):
    """Agreement counts of paired outputs per policy, since a given time (see controller.outputs.OutputHub)."""

    def ensure(self, policy: ShadowPolicy, since: float) -> None:
        """Have a source running for `policy`, counting from the phase that started at `since`."""
        ...

    def tally(self, policy_key: str, since: float) -> AgreementTally | None:
        """Counts for pairs completed after `since` (None: no output source for this policy)."""
        ...

    async def stop(self, policy_key: str) -> None:
        """No phase of `policy_key` compares outputs now: release its source."""
        ...


@dataclass(frozen=True)
class Look:
    """The result of one look: the judge's verdict (what the machine steps on) and its evidence for `.status`."""

    verdict: Verdict
    evidence: dict[str, Any]
    source_errors: tuple[str, ...] = ()
    tally: AgreementTally | None = None


def _arm(window: Window) -> ArmData:
    if isinstance(window, HistogramWindow):
        return Histogram(le=list(window.le), counts=list(window.counts))
    if isinstance(window, CountWindow):
        return Counts(failures=window.failures, total=window.total)
    if isinstance(window, GaugeWindow):
        return Aggregates(np.asarray(window.samples, dtype=np.float64))
    if isinstance(window, CounterWindow):
        return Aggregates(np.asarray([window.rate], dtype=np.float64))
    raise TypeError(f"unknown window {window!r}")  # pragma: no cover - the Window union is closed


def look_end(now: float, since: float, interval: float) -> float:
    """The end of a look's window: `now` rounded down to the interval boundary (whole seconds).

    Ticks of all policies with the same interval run at the same boundary, a few milliseconds apart;
    rounding their windows' end to the boundary lets the batching source answer all of them with one
    query per metric template. A window must not end before it starts, so early in a phase `now` is used.
    """
    boundary = float(int(now // interval) * interval)
    return boundary if boundary > since else now


_PLANNED: dict[tuple[int, int, float, float], tuple[ShadowPolicy, Planned]] = {}
_PLANNED_LIMIT = 20_000


def plan_requests(source: MetricSource, policy: ShadowPolicy, since: float, end: float) -> Planned:
    """The metric requests of one look: every metric over (phase start, end]. Do not modify the list.

    Remembered per (source, policy object, since, end): the first tick of a look plans every rollout's
    requests (:meth:`Manager.looks`), and each tick of the look then needs its own again. Policy objects
    are frozen and cached by generation (:func:`~shadowctl.controller.status.parse_policy`), so an edited
    spec is a new object and is planned anew.
    """
    key = (id(source), id(policy), since, end)
    hit = _PLANNED.get(key)
    if hit is not None and hit[0] is policy:
        return hit[1]
    built = source.plan(policy, start=datetime.fromtimestamp(since, UTC), end=datetime.fromtimestamp(end, UTC))
    if len(_PLANNED) >= _PLANNED_LIMIT:
        _PLANNED.clear()
    _PLANNED[key] = (policy, built)
    return built


def metric_spec(metric: Metric) -> MetricSpec:
    return MetricSpec(
        name=metric.name,
        statistic=metric.statistic.value,
        direction=Direction(metric.direction.value),
        margin=Margin(metric.margin.value, relative=metric.margin.relative),
        critical=metric.critical,
        min_samples=metric.min_samples,
    )


def metric_input(metric: Metric, result: WindowResult | SourceConfigError) -> MetricInput:
    spec = metric_spec(metric)
    if isinstance(result, VariantPair):
        return MetricInput(spec, _arm(result.primary), _arm(result.candidate))
    reason = str(result)
    return MetricInput(spec, NoData(reason), NoData(reason))


def agreement_input(item: AgreementInput, min_pairs: int) -> MetricInput:
    """Candidate agreement against the primary's own agreement (the noise floor), as disagreement counts."""
    spec = MetricSpec(
        name=f"agreement/{item.comparator}",
        statistic="agreement",
        direction=Direction.decrease,
        margin=Margin(round(1.0 - item.min_relative_agreement, 6), relative=True),
        critical=item.critical,
        min_samples=min_pairs,
    )
    candidate: ArmData = (
        Counts(item.candidate_pairs - item.candidate_agree, item.candidate_pairs)
        if item.candidate_pairs
        else NoData("no paired candidate answers yet")
    )
    if item.fixed_baseline is not None:
        n = FIXED_BASELINE_PSEUDO_COUNT
        primary: ArmData = Counts(round((1.0 - item.fixed_baseline) * n), n)
    elif item.baseline_pairs:
        primary = Counts(item.baseline_pairs - item.baseline_agree, item.baseline_pairs)
    else:
        primary = NoData("no baseline pairs (primary vs a second primary replica) yet")
    return MetricInput(spec, primary, candidate)


def phase_limit(policy: ShadowPolicy, state: RolloutState) -> float | None:
    """Seconds after which the current phase's analysis is final (None: no limit)."""
    spec = policy.spec
    if state.phase is Phase.shadowing and spec.shadow is not None:
        return spec.shadow.max_duration.total_seconds()
    if state.phase is Phase.progressing and spec.canary is not None:
        return spec.canary.step_limit.total_seconds()
    return None


LookPeers = Callable[[float], Sequence[tuple[ShadowPolicy, Sequence[tuple[Metric, WindowRequest]]]]]
"""For a look's end (epoch seconds): every rollout whose look ends there, with its metric requests."""


@dataclass(frozen=True)
class _Row:
    """One metric of one rollout, judged together with the rest of its look: row `index` of `batch`."""

    spec: MetricSpec
    alpha: float
    beta: float
    data: WindowResult
    batch: Batch
    index: int

    def matches(self, spec: MetricSpec, alpha: float, beta: float, data: WindowResult | SourceConfigError) -> bool:
        """The tick judges exactly what was judged here (else it judges on its own)."""
        return (self.alpha == alpha and self.beta == beta and self.spec == spec
                and (self.data is data or self.data == data))


class Analyzer:
    """Runs one look for one policy: metric source + output tallies -> judge -> verdict."""

    def __init__(self, source: MetricSource | None, outputs: OutputTallies | None = None, keep_looks: int = 3) -> None:
        self.source = source
        self.outputs = outputs
        self.peers: LookPeers | None = None
        """Set by the manager: then the first tick of a look judges the look of every rollout at once."""
        self.keep_looks = keep_looks
        self._looks: dict[float, asyncio.Future[dict[MetricKey, _Row]]] = {}
        self.looks_judged = 0
        """Looks judged in one vectorized pass (for tests and the benchmark)."""
        self.rows_used = 0
        """Metric results a tick took from such a pass instead of judging alone."""

    async def look(self, policy: ShadowPolicy, state: RolloutState, now: float,
                   stored_tally: AgreementTally | None = None) -> Look:
        since = state.phase_started_at if state.phase_started_at is not None else now
        limit = phase_limit(policy, state)
        final = limit is not None and now - since >= limit
        errors: list[str] = []
        metrics = policy.spec.analysis.metrics
        analysis = policy.spec.analysis
        results: dict[str, WindowResult | SourceConfigError] = {}
        rows: dict[MetricKey, _Row] = {}
        if metrics:
            if now - since < 1.0:
                results = {m.name: base.NoData(m.name, None, "", "the phase has just started") for m in metrics}
            else:
                if analysis.method is Method.sequential:
                    rows = await self._look_rows(policy, since, now)
                results = await self._fetch(policy, since, now)
            for metric in metrics:
                result = results[metric.name]
                if isinstance(result, SourceUnavailable | SourceConfigError):
                    errors.append(str(result))
        tally: AgreementTally | None = None
        extra: list[MetricInput] = []
        outputs = analysis.outputs
        if outputs is not None and state.phase is Phase.shadowing:
            fresh = None
            if self.outputs is not None:
                self.outputs.ensure(policy, since)
                fresh = self.outputs.tally(policy.key, since)
            tally = _merge(stored_tally, fresh)
            for item in judge_inputs(tally or AgreementTally(), outputs):
                extra.append(agreement_input(item, outputs.min_pairs))
        if not metrics and not extra:
            verdict = Verdict(Outcome.nodata, (), "nothing to judge in this phase")
            return Look(verdict, {"outcome": "nodata", "reason": verdict.reason, "metrics": []}, tuple(errors), tally)
        try:
            if analysis.method is Method.fixed:
                inputs = [metric_input(m, results[m.name]) for m in metrics] + extra
                judged = judge_fixed(inputs, FixedConfig(pass_score=analysis.pass_score,
                                                         marginal_score=analysis.marginal_score))
            else:
                judged = self._judge(policy, results, extra, rows, final)
        except JudgeError as exc:
            verdict = Verdict(Outcome.nodata, (), f"the judge could not use the data: {exc}")
            return Look(verdict, {"outcome": "nodata", "reason": verdict.reason, "metrics": []}, tuple(errors), tally)
        verdict = judged
        if verdict.outcome is Outcome.passed and state.phase is Phase.shadowing:
            verdict = _check_min_pairs(policy, verdict, tally)
        return Look(verdict, judged.to_dict(), tuple(errors), tally)

    def _judge(self, policy: ShadowPolicy, results: dict[str, WindowResult | SourceConfigError],
               extra: list[MetricInput], rows: dict[MetricKey, _Row], final: bool) -> Verdict:
        """What ``judge(inputs, alpha, beta, final)`` returns, taking each metric's row from the look's
        vectorized pass where it judged exactly this metric's data (row-wise the same computation)."""
        analysis = policy.spec.analysis
        alpha, beta = analysis.alpha, analysis.beta
        if not (0 < alpha < 1 and 0 < beta < 1):
            raise JudgeInputError(f"alpha and beta must be in (0, 1), got alpha={alpha}, beta={beta}")
        metrics = analysis.metrics
        alpha_k = alpha / max(len(metrics) + len(extra), 1)  # Bonferroni over all inputs, as judge() does
        out: list[MetricResult] = []
        for metric in metrics:
            data = results[metric.name]
            spec = metric_spec(metric)
            row = rows.get(MetricKey(policy.key, metric.name))
            if row is not None and row.matches(spec, alpha_k, beta, data):
                out.append(result_of(spec, row.batch, row.index, alpha=alpha_k, beta=beta, final=final))
                self.rows_used += 1
                continue
            mi = metric_input(metric, data)
            out.append(judge_metric(mi.spec, mi.primary, mi.candidate, alpha=alpha_k, beta=beta, final=final))
        for mi in extra:
            out.append(judge_metric(mi.spec, mi.primary, mi.candidate, alpha=alpha_k, beta=beta, final=final))
        return combine(out, final=final)

    async def _look_rows(self, policy: ShadowPolicy, since: float, now: float) -> dict[MetricKey, _Row]:
        """The vectorized pass of the look this tick belongs to (run by its first tick, shared by the rest)."""
        if self.peers is None or self.source is None:
            return {}
        interval = policy.spec.analysis.interval.total_seconds()
        end = look_end(now, since, interval)
        if end != float(int(now // interval) * interval):
            return {}  # early in a phase the window ends now: a look of its own
        return await self.prepare(end)

    async def prepare(self, end: float) -> dict[MetricKey, _Row]:
        """Fetch and judge, in one pass, the look ending at `end` of every rollout due then (see `peers`).

        The manager calls it at each interval boundary, before the first tick of the look; otherwise the
        first tick of the look runs it and the other ticks wait for it. Runs at most once per look.
        """
        if self.peers is None or self.source is None:
            return {}
        pending = self._looks.get(end)
        if pending is not None:
            return await asyncio.shield(pending)
        mine: asyncio.Future[dict[MetricKey, _Row]] = asyncio.get_running_loop().create_future()
        self._looks[end] = mine
        for old in sorted(self._looks)[:-self.keep_looks]:
            del self._looks[old]
        rows: dict[MetricKey, _Row] = {}
        try:
            rows = await self._judge_look(end)
            self.looks_judged += 1
        except asyncio.CancelledError:
            if self._looks.get(end) is mine:
                del self._looks[end]  # the next tick of this look tries again
            raise
        except Exception:  # the shortcut must never cost a verdict: every tick then judges on its own
            log.exception("analysis.look_batch_failed", end=end)
        finally:
            if not mine.done():
                mine.set_result(rows)
        return rows

    async def _judge_look(self, end: float) -> dict[MetricKey, _Row]:
        assert self.peers is not None and self.source is not None
        todo: list[tuple[ShadowPolicy, Metric, WindowRequest]] = []
        for policy, requests in self.peers(end):
            if policy.spec.analysis.method is Method.sequential:
                todo.extend((policy, metric, req) for metric, req in requests)
        if not todo:
            return {}
        answers = await self.source.fetch_many([req for _, _, req in todo])
        binned: dict[
            tuple[MetricSpec, float, float, tuple[float, ...]],
            list[tuple[MetricKey, VariantPair, HistogramWindow, HistogramWindow]],
        ] = {}
        counts: dict[tuple[MetricSpec, float, float], list[tuple[MetricKey, VariantPair, Counts, Counts]]] = {}
        for policy, metric, req in todo:
            data = answers.get(req.key)
            if not isinstance(data, VariantPair):
                continue  # no data or an outage: the tick reports it on its own
            analysis = policy.spec.analysis
            alpha_k = analysis.alpha / max(len(analysis.metrics), 1)  # with output agreement a tick's k differs
            p, c = data.primary, data.candidate
            if isinstance(p, HistogramWindow) and isinstance(c, HistogramWindow):
                if (p.le is c.le or p.le == c.le) and len(p.counts) == len(p.le) == len(c.counts):
                    group = (metric_spec(metric), alpha_k, analysis.beta, p.le)
                    binned.setdefault(group, []).append((req.key, data, p, c))
            elif isinstance(p, CountWindow) and isinstance(c, CountWindow):
                try:
                    mi = metric_input(metric, data)
                except JudgeError:
                    continue
                if isinstance(mi.primary, Counts) and isinstance(mi.candidate, Counts) and not (
                    mi.primary.has_nan or mi.candidate.has_nan
                ):
                    counts.setdefault((mi.spec, alpha_k, analysis.beta), []).append(
                        (req.key, data, mi.primary, mi.candidate))
            # raw samples and gauges: judged per tick
        rows: dict[MetricKey, _Row] = {}
        for (spec, alpha_k, beta, le_values), members in binned.items():
            le = np.asarray(le_values, dtype=np.float64)
            if le.size == 0 or not np.isposinf(le[-1]) or np.isnan(le).any() or (np.diff(le) <= 0).any():
                continue  # not a histogram the judge takes: each tick reports why
            cp = np.asarray([m[2].counts for m in members], dtype=np.float64)
            cc = np.asarray([m[3].counts for m in members], dtype=np.float64)
            # The rows a Histogram takes as they are (finite, >= 0, cumulative); others are judged per tick.
            ok = np.ones(len(members), dtype=bool)
            for cum in (cp, cc):
                tolerance = -1e-9 * np.maximum(1.0, cum[:, -1])
                ok &= np.isfinite(cum).all(axis=1) & (cum >= 0).all(axis=1)
                ok &= (np.diff(cum, axis=1) >= tolerance[:, None]).all(axis=1)
            keep = np.flatnonzero(ok)
            if keep.size == 0:
                continue
            try:
                batch = batch_binned(spec, cp[keep], cc[keep], le, alpha=alpha_k, beta=beta)
            except JudgeError:
                continue  # e.g. a statistic buckets cannot give: each tick reports it
            for i, m in enumerate(keep):
                key, data, _, _ = members[int(m)]
                rows[key] = _Row(spec, alpha_k, beta, data, batch, i)
        for (spec, alpha_k, beta), found in counts.items():
            try:
                batch = batch_counts(
                    spec,
                    np.array([f[2].failures for f in found]),
                    np.array([f[2].total for f in found]),
                    np.array([f[3].failures for f in found]),
                    np.array([f[3].total for f in found]),
                    alpha=alpha_k,
                    beta=beta,
                )
            except JudgeError:
                continue
            for i, (key, data, _, _) in enumerate(found):
                rows[key] = _Row(spec, alpha_k, beta, data, batch, i)
        return rows

    async def idle(self, policy_key: str) -> None:
        """The policy is not in a phase that compares outputs."""
        if self.outputs is not None:
            await self.outputs.stop(policy_key)

    async def _fetch(self, policy: ShadowPolicy, since: float, now: float) -> dict[str, WindowResult | SourceConfigError]:
        if self.source is None:
            return {m.name: base.NoData(m.name, None, "", "no metric source configured")
                    for m in policy.spec.analysis.metrics}
        end = look_end(now, since, policy.spec.analysis.interval.total_seconds())
        out: dict[str, WindowResult | SourceConfigError] = {}
        requests: list[tuple[Metric, WindowRequest]] = []
        for metric, req in plan_requests(self.source, policy, since, end):
            if isinstance(req, SourceConfigError):
                out[metric.name] = req
            else:
                requests.append((metric, req))
        if requests:
            answers = await self.source.fetch_many([r for _, r in requests])
            for metric, req in requests:
                out[metric.name] = answers[req.key]
        return out


def _merge(stored: AgreementTally | None, fresh: AgreementTally | None) -> AgreementTally | None:
    """The larger of the stored and the fresh tally per comparator (a restarted source starts from zero)."""
    if fresh is None:
        return stored
    if stored is None:
        return fresh
    stored_n = sum(t.candidate_pairs + t.baseline_pairs for t in stored.counts.values())
    fresh_n = sum(t.candidate_pairs + t.baseline_pairs for t in fresh.counts.values())
    return fresh if fresh_n >= stored_n else stored


def _check_min_pairs(policy: ShadowPolicy, verdict: Verdict, tally: AgreementTally | None) -> Verdict:
    shadow = policy.spec.shadow
    if shadow is None or shadow.min_pairs == 0 or policy.spec.analysis.outputs is None:
        return verdict
    pairs = max((t.candidate_pairs for t in (tally.counts.values() if tally else ())), default=0)
    if pairs < shadow.min_pairs:
        return dataclasses.replace(verdict, outcome=Outcome.cont,
                                   reason=f"{verdict.reason}; waiting for {shadow.min_pairs} paired answers (have {pairs})")
    return verdict


# --------------------------------------------------------------------------- batching across policies


_Window = tuple[MetricKey, datetime, datetime]


def _window(r: WindowRequest) -> _Window:
    return (r.key, r.start, r.end)


@dataclass
class _Batch:
    requests: list[WindowRequest] = field(default_factory=list)
    done: asyncio.Future[dict[_Window, WindowResult]] | None = None
    first: float = 0.0
    last: float = 0.0
    task: asyncio.Task[None] | None = None
    planned: bool = False
    """The planner gave the whole look: send it at once instead of waiting for more requests."""
    asked: set[_Window] = field(default_factory=set)
    """Once sent: what it asks for (a tick that needs no more waits for it instead of asking again)."""


class BatchingSource:
    """A MetricSource that coalesces concurrent `fetch_many` calls for the same look into one.

    Workers of all policies tick at the same interval boundaries, so their requests carry the same
    window end. Requests with the same end meet here and go to the real source as one batch, which
    answers each metric template with one query for all rollouts. A batch is sent once no request
    joined it for `idle` seconds, or `max_wait` seconds after it opened, whichever comes first; a
    batch the planner filled with the whole look is sent at once. A request that a batch in flight
    already asks for waits for that batch.
    """

    def __init__(self, inner: MetricSource, idle: float = 0.05, max_wait: float = 1.0, keep_looks: int = 3) -> None:
        self.inner = inner
        self.idle = idle
        self.max_wait = max_wait
        self.keep_looks = keep_looks
        self.planner: Callable[[datetime], Sequence[WindowRequest]] | None = None
        """Every request due for the look ending at a given time (set by the manager): the first request
        of a look then fetches all of them, and the later (staggered) ticks read the answers."""
        self._batches: dict[float, _Batch] = {}
        self._in_flight: dict[float, list[_Batch]] = {}
        self._answers: dict[_Window, WindowResult] = {}
        self._planned: list[datetime] = []
        self.batches = 0

    def plan(
        self, policy: ShadowPolicy, *, start: datetime, end: datetime, metrics: Sequence[str] | None = None
    ) -> Planned:
        return self.inner.plan(policy, start=start, end=end, metrics=metrics)

    async def fetch(self, request: WindowRequest) -> WindowResult:
        return (await self.fetch_many([request]))[request.key]

    async def fetch_many(self, requests: Sequence[WindowRequest]) -> dict[MetricKey, WindowResult]:
        if not requests:
            return {}
        found = {r.key: self._answers[_window(r)] for r in requests if _window(r) in self._answers}
        missing = [r for r in requests if _window(r) not in self._answers]
        if not missing:
            return found
        end = max(r.end for r in missing)
        key = end.timestamp()
        for flying in self._in_flight.get(key, ()):
            if all(_window(r) in flying.asked for r in missing):
                assert flying.done is not None
                answers = await asyncio.shield(flying.done)
                return {**found, **{r.key: answers[_window(r)] for r in missing}}
        extra: Sequence[WindowRequest] = ()
        if self.planner is not None and end not in self._planned:
            self._planned = [*self._planned, end][-self.keep_looks:]
            extra = self.planner(end)
        loop = asyncio.get_running_loop()
        batch = self._batches.get(key)
        if batch is None:
            batch = _Batch(done=loop.create_future(), first=loop.time())
            self._batches[key] = batch
            batch.task = loop.create_task(self._flush_when_quiet(key, batch))
        batch.planned = batch.planned or bool(extra)
        batch.requests.extend(extra)
        batch.requests.extend(missing)
        batch.last = loop.time()
        assert batch.done is not None
        answers = await asyncio.shield(batch.done)
        return {**found, **{r.key: answers[_window(r)] for r in missing}}

    async def _flush_when_quiet(self, key: float, batch: _Batch) -> None:
        loop = asyncio.get_running_loop()
        while not batch.planned:
            now = loop.time()
            wait = min(batch.last + self.idle, batch.first + self.max_wait) - now
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        if self._batches.get(key) is batch:
            del self._batches[key]
        assert batch.done is not None
        self.batches += 1
        unique: dict[_Window, WindowRequest] = {_window(r): r for r in batch.requests}
        batch.asked = set(unique)
        self._in_flight.setdefault(key, []).append(batch)
        try:
            result = await self._ask(list(unique.values()))
        except Exception as exc:  # pragma: no cover - the port returns failures as results
            batch.done.set_exception(exc)
            return
        finally:
            flying = self._in_flight.get(key, [])
            if batch in flying:
                flying.remove(batch)
            if not flying:
                self._in_flight.pop(key, None)
        keep = set(self._planned) | {r.end for r in unique.values()}
        cutoff = sorted(keep)[-self.keep_looks:][0]
        self._answers = {k: v for k, v in self._answers.items() if k[2] >= cutoff}
        for window, answer in result.items():
            if not isinstance(answer, SourceUnavailable):  # an outage is asked again, not remembered
                self._answers[window] = answer
        batch.done.set_result(result)

    async def _ask(self, requests: list[WindowRequest]) -> dict[_Window, WindowResult]:
        """The inner source answers by MetricKey: a key asked for two windows (a phase restarted while its
        previous window was planned) goes in a second call rather than getting the other window's answer."""
        out: dict[_Window, WindowResult] = {}
        while requests:
            now: dict[MetricKey, WindowRequest] = {}
            later: list[WindowRequest] = []
            for r in requests:
                if r.key in now:
                    later.append(r)
                else:
                    now[r.key] = r
            answers = await self.inner.fetch_many(list(now.values()))
            out.update({_window(r): answers[r.key] for r in now.values()})
            requests = later
        return out

    async def check(self) -> SourceUnavailable | None:
        return await self.inner.check()

    async def aclose(self) -> None:
        await self.inner.aclose()
