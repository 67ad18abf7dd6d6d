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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from shadowctl.compare.comparators import AgreementInput, AgreementTally, judge_inputs
from shadowctl.judge import (
    Aggregates,
    ArmData,
    Counts,
    Histogram,
    JudgeError,
    Margin,
    MetricInput,
    MetricSpec,
    NoData,
    Outcome,
    Verdict,
    judge,
    judge_fixed,
)
from shadowctl.judge import Direction as JudgeDirection
from shadowctl.judge.fixed import FixedConfig
from shadowctl.machine import Decision, Phase, RolloutState
from shadowctl.machine import Verdict as MachineVerdict
from shadowctl.policy.model import Method, Metric, ShadowPolicy
from shadowctl.sources.base import (
    CounterWindow,
    CountWindow,
    GaugeWindow,
    HistogramWindow,
    MetricKey,
    MetricSource,
    SourceConfigError,
    SourceUnavailable,
    VariantPair,
    Window,
    WindowRequest,
    WindowResult,
)
from shadowctl.sources.base import NoData as SourceNoData
from shadowctl.sources.promql import build_requests

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
    """The result of one look: the machine's verdict and the judge's evidence for `.status`."""

    verdict: MachineVerdict
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


def plan_requests(policy: ShadowPolicy, since: float, end: float) -> list[tuple[Metric, WindowRequest | SourceConfigError]]:
    """The metric requests of one look: every metric over (phase start, end]."""
    return build_requests(policy, start=datetime.fromtimestamp(since, UTC), end=datetime.fromtimestamp(end, UTC))


def metric_spec(metric: Metric) -> MetricSpec:
    return MetricSpec(
        name=metric.name,
        statistic=metric.statistic.value,
        direction=JudgeDirection(metric.direction.value),
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
        direction=JudgeDirection.decrease,
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


def _to_machine(verdict: Verdict) -> MachineVerdict:
    mapping = {
        Outcome.passed: Decision.passed,
        Outcome.failed: Decision.failed,
        Outcome.cont: Decision.cont,
        Outcome.inconclusive: Decision.inconclusive,
        Outcome.nodata: Decision.nodata,
    }
    return MachineVerdict(mapping[verdict.outcome], verdict.reason)


def phase_limit(policy: ShadowPolicy, state: RolloutState) -> float | None:
    """Seconds after which the current phase's analysis is final (None: no limit)."""
    spec = policy.spec
    if state.phase is Phase.shadowing and spec.shadow is not None:
        return spec.shadow.max_duration.total_seconds()
    if state.phase is Phase.progressing and spec.canary is not None:
        return spec.canary.step_limit.total_seconds()
    return None


class Analyzer:
    """Runs one look for one policy: metric source + output tallies -> judge -> verdict."""

    def __init__(self, source: MetricSource | None, outputs: OutputTallies | None = None) -> None:
        self.source = source
        self.outputs = outputs

    async def look(self, policy: ShadowPolicy, state: RolloutState, now: float,
                   stored_tally: AgreementTally | None = None) -> Look:
        since = state.phase_started_at if state.phase_started_at is not None else now
        limit = phase_limit(policy, state)
        final = limit is not None and now - since >= limit
        inputs: list[MetricInput] = []
        errors: list[str] = []
        metrics = policy.spec.analysis.metrics
        if metrics:
            if now - since < 1.0:
                results: dict[str, WindowResult | SourceConfigError] = {
                    m.name: SourceNoData(m.name, None, "", "the phase has just started") for m in metrics
                }
            else:
                results = await self._fetch(policy, since, now)
            for metric in metrics:
                result = results[metric.name]
                if isinstance(result, SourceUnavailable | SourceConfigError):
                    errors.append(str(result))
                inputs.append(metric_input(metric, result))
        tally: AgreementTally | None = None
        outputs = policy.spec.analysis.outputs
        if outputs is not None and state.phase is Phase.shadowing:
            fresh = None
            if self.outputs is not None:
                self.outputs.ensure(policy, since)
                fresh = self.outputs.tally(policy.key, since)
            tally = _merge(stored_tally, fresh)
            for item in judge_inputs(tally or AgreementTally(), outputs):
                inputs.append(agreement_input(item, outputs.min_pairs))
        if not inputs:
            verdict = MachineVerdict(Decision.nodata, "nothing to judge in this phase")
            return Look(verdict, {"outcome": "nodata", "reason": verdict.reason, "metrics": []}, tuple(errors), tally)
        analysis = policy.spec.analysis
        try:
            if analysis.method is Method.fixed:
                judged = judge_fixed(inputs, FixedConfig(pass_score=analysis.pass_score,
                                                         marginal_score=analysis.marginal_score))
            else:
                judged = judge(inputs, alpha=analysis.alpha, beta=analysis.beta, final=final)
        except JudgeError as exc:
            verdict = MachineVerdict(Decision.nodata, f"the judge could not use the data: {exc}")
            return Look(verdict, {"outcome": "nodata", "reason": verdict.reason, "metrics": []}, tuple(errors), tally)
        verdict = _to_machine(judged)
        if verdict.decision is Decision.passed and state.phase is Phase.shadowing:
            verdict = _check_min_pairs(policy, verdict, tally)
        return Look(verdict, judged.to_dict(), tuple(errors), tally)

    async def idle(self, policy_key: str) -> None:
        """The policy is not in a phase that compares outputs."""
        if self.outputs is not None:
            await self.outputs.stop(policy_key)

    async def _fetch(self, policy: ShadowPolicy, since: float, now: float) -> dict[str, WindowResult | SourceConfigError]:
        built = plan_requests(policy, since, look_end(now, since, policy.spec.analysis.interval.total_seconds()))
        out: dict[str, WindowResult | SourceConfigError] = {}
        requests: list[tuple[Metric, WindowRequest]] = []
        for metric, req in built:
            if isinstance(req, SourceConfigError):
                out[metric.name] = req
            else:
                requests.append((metric, req))
        if requests:
            if self.source is None:
                for metric, req in requests:
                    out[metric.name] = SourceNoData(metric.name, None, req.primary.expr, "no metric source configured")
            else:
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


def _check_min_pairs(policy: ShadowPolicy, verdict: MachineVerdict, tally: AgreementTally | None) -> MachineVerdict:
    shadow = policy.spec.shadow
    if shadow is None or shadow.min_pairs == 0 or policy.spec.analysis.outputs is None:
        return verdict
    pairs = max((t.candidate_pairs for t in (tally.counts.values() if tally else ())), default=0)
    if pairs < shadow.min_pairs:
        return MachineVerdict(Decision.cont, f"{verdict.reason}; waiting for {shadow.min_pairs} paired answers "
                                             f"(have {pairs})")
    return verdict


# --------------------------------------------------------------------------- batching across policies


@dataclass
class _Batch:
    requests: list[WindowRequest] = field(default_factory=list)
    done: asyncio.Future[dict[MetricKey, WindowResult]] | None = None
    first: float = 0.0
    last: float = 0.0
    task: asyncio.Task[None] | None = None


class BatchingSource:
    """A MetricSource that coalesces concurrent `fetch_many` calls for the same look into one.

    Workers of all policies tick at the same interval boundaries, so their requests carry the same
    window end. Requests with the same end meet here and go to the real source as one batch, which
    answers each metric template with one query for all rollouts. A batch is sent once no request
    joined it for `idle` seconds, or `max_wait` seconds after it opened, whichever comes first.
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
        self._answers: dict[tuple[MetricKey, datetime, datetime], WindowResult] = {}
        self._planned: list[datetime] = []
        self.batches = 0

    async def fetch(self, request: WindowRequest) -> WindowResult:
        return (await self.fetch_many([request]))[request.key]

    async def fetch_many(self, requests: Sequence[WindowRequest]) -> dict[MetricKey, WindowResult]:
        if not requests:
            return {}
        found = {r.key: self._answers[(r.key, r.start, r.end)] for r in requests
                 if (r.key, r.start, r.end) in self._answers}
        missing = [r for r in requests if r.key not in found]
        if not missing:
            return found
        end = max(r.end for r in missing)
        extra: Sequence[WindowRequest] = ()
        if self.planner is not None and end not in self._planned:
            self._planned = [*self._planned, end][-self.keep_looks:]
            extra = self.planner(end)
        loop = asyncio.get_running_loop()
        key = end.timestamp()
        batch = self._batches.get(key)
        if batch is None:
            batch = _Batch(done=loop.create_future(), first=loop.time())
            self._batches[key] = batch
            batch.task = loop.create_task(self._flush_when_quiet(key, batch))
        batch.requests.extend(extra)
        batch.requests.extend(missing)
        batch.last = loop.time()
        assert batch.done is not None
        answers = await asyncio.shield(batch.done)
        return {**found, **{r.key: answers[r.key] for r in missing}}

    async def _flush_when_quiet(self, key: float, batch: _Batch) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            wait = min(batch.last + self.idle, batch.first + self.max_wait) - now
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        if self._batches.get(key) is batch:
            del self._batches[key]
        assert batch.done is not None
        self.batches += 1
        try:
            unique: dict[MetricKey, WindowRequest] = {r.key: r for r in batch.requests}
            result = await self.inner.fetch_many(list(unique.values()))
        except Exception as exc:  # pragma: no cover - the port returns failures as results
            batch.done.set_exception(exc)
            return
        keep = set(self._planned) | {r.end for r in unique.values()}
        cutoff = sorted(keep)[-self.keep_looks:][0]
        self._answers = {k: v for k, v in self._answers.items() if k[2] >= cutoff}
        for r in unique.values():
            answer = result[r.key]
            if not isinstance(answer, SourceUnavailable):  # an outage is asked again, not remembered
                self._answers[(r.key, r.start, r.end)] = answer
        batch.done.set_result(result)

    async def check(self) -> SourceUnavailable | None:
        return await self.inner.check()

    async def aclose(self) -> None:
        await self.inner.aclose()
