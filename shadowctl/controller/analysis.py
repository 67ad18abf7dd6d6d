"""One look: gather what primary and candidate did since the phase started, and judge it.

Why "since the phase started" and not "since the last look": the sequential
judge is a function of cumulative data (see :mod:`shadowctl.judge`), so the
controller keeps no per-look memory of metrics; after a restart it re-queries
``increase(...[now - phaseStartedAt])`` and reaches the same decision. Output
agreement counts and paired latencies cannot be re-queried (MQTT is a stream), so
they are written to ``.status`` at every tick and read back from there: the
agreement tally whole, the paired latencies as what their tests need (n, the sums,
the counts at 0, at the margins and at a coarse grid; :meth:`Paired.to_record`).

How one look runs, for all rollouts at once: at each interval boundary the manager hands the
rollouts whose look ends there to :class:`LookScheduler`, which plans their requests, fetches them
with one ``fetch_many`` (the source answers each metric template with one query for every rollout),
judges their sequential looks with one :func:`~shadowctl.judge.judge_many` call and posts each
rollout's :class:`SharedLook` on the :class:`LookBoard`. Each policy's tick comes later in the
interval (its fixed offset, see the manager) and takes its results, and its verdict where it judges
exactly what was judged, from the board; a tick whose phase started anew, whose spec changed, or
whose look also judges output agreement (whose counts move between the boundary and the tick)
judges alone, on the same data. Bonferroni, the level check and the data checks are the judge's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
import structlog

from shadowctl.compare.comparators import AgreementInput, AgreementTally, judge_inputs
from shadowctl.compare.routing import CopyOutcomes, TapCopies
from shadowctl.controller.sampling import Represented, SamplingTuner
from shadowctl.controller.tracing import LOOK_SPAN, NO_TRACER, Tracer, look_attributes, policy_attributes
from shadowctl.judge import (
    Aggregates,
    ArmData,
    Counts,
    Direction,
    Histogram,
    JudgeError,
    LookInput,
    Margin,
    MetricInput,
    MetricResult,
    MetricSpec,
    NoData,
    Outcome,
    Paired,
    Verdict,
    judge_fixed,
    judge_many,
)
from shadowctl.judge.fixed import config_from_policy
from shadowctl.judge.paired import decision_bounds
from shadowctl.machine import RolloutState
from shadowctl.policy.model import BaselineMode, Method, Metric, MetricKind, ShadowPolicy
from shadowctl.policy.status import Evidence, PairedLatencyRecord, Phase
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
"""A fixed baseline agreement (measured beforehand) enters the judge as counts of this many pairs, marked
exact (`Counts.exact`): the judge compares the candidate with that constant, to 1e-6, with no uncertainty
on the baseline's side (docs/judge.md, agreement)."""


class OutputTallies(Protocol):
    """Agreement counts of paired outputs per policy, since a given time (see controller.outputs.OutputHub)."""

    def ensure(self, policy: ShadowPolicy, since: float, carried: Mapping[str, Paired] | None = None) -> None:
        """Have a source running for `policy`, counting from the phase that started at `since`; a source it
        starts counts its paired latencies on top of `carried` (that phase's, restored from `.status`)."""
        ...

    def tally(self, policy_key: str, since: float) -> AgreementTally | None:
        """Counts for pairs completed after `since` (None: no output source for this policy)."""
        ...

    def latency(self, policy_key: str, since: float) -> Mapping[str, Paired] | None:
        """The candidate's paired latencies per quantity (ttft, tpot, e2e) since `since`, the carried ones
        included (None: no source)."""
        ...

    def error(self, policy_key: str) -> str | None:
        """Why `policy_key` has no output source, where it could not be built."""
        ...

    def judge_problem(self, policy_key: str) -> str | None:
        """Why the policy's llm-judge comparator has no data when its judge model failed every pair it was
        asked about (None: it gave verdicts, or there is no judge)."""
        ...

    async def stop(self, policy_key: str) -> None:
        """No phase of `policy_key` compares outputs now: release its source."""
        ...


@dataclass(frozen=True)
class Look:
    """The result of one look: the judge's verdict (what the machine steps on) and its evidence for `.status`."""

    verdict: Verdict
    evidence: Evidence
    source_errors: tuple[str, ...] = ()
    tally: AgreementTally | None = None
    since: float | None = None
    """When the phase this look judged started (what `.status` tags the tally and the pairs with)."""
    paired: PairedLatencyRecord | None = None
    """The paired latencies this look judged, as `.status` keeps them (None: the look had none)."""


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


def metric_spec(metric: Metric) -> MetricSpec:
    paired = metric.kind is MetricKind.paired_latency
    return MetricSpec(
        name=metric.name,
        statistic=f"paired-{metric.statistic.value}" if paired else metric.statistic.value,
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


def paired_input(metric: Metric, latency: Mapping[str, Paired] | None, why_none: str) -> MetricInput:
    """A paired-latency metric's input: the candidate's pairs of its quantity since the phase started."""
    spec = metric_spec(metric)
    quantity = metric.quantity.value if metric.quantity is not None else "?"
    data = latency.get(quantity) if latency is not None else None
    if data is None:
        return MetricInput.of_pairs(spec, NoData(why_none if latency is None else f"no {quantity} pairs collected"))
    return MetricInput.of_pairs(spec, data)


NO_BASELINE_REPLICA = "no baseline pairs yet (primary vs a second primary replica's tap, variant baseline)"
NO_BASELINE_RESEND = ("no baseline pairs yet (baseline.mode resend: the primary's taps resend a share of requests "
                      "as variant baseline; taps that no route setting drives do so only with --baseline-resend)")


def agreement_input(item: AgreementInput, min_pairs: int, judge_problem: str | None = None, *,
                    resend: bool = False) -> MetricInput:
    """Candidate agreement against the primary's own agreement (the noise floor), as disagreement counts.

    A model judge's verdicts (``min_win_or_tie`` set) are the same proportion test on other numbers: the
    candidate's win-or-tie share (losses are its "disagreements") against an even match, a fixed 0.5, with
    the absolute margin 0.5 - min_win_or_tie (pass above min_win_or_tie, fail below 0.5). `judge_problem`: why
    such a judge has no verdicts (it failed every pair), said instead of "no paired candidate answers yet"."""
    margin = (Margin(round(item.fixed_baseline - item.min_win_or_tie, 6), relative=False)
              if item.min_win_or_tie is not None and item.fixed_baseline is not None
              else Margin(round(1.0 - item.min_relative_agreement, 6), relative=True))
    spec = MetricSpec(
        name=f"agreement/{item.comparator}",
        statistic="agreement",
        direction=Direction.decrease,
        margin=margin,
        critical=item.critical,
        min_samples=min_pairs,
    )
    redacted = item.no_data_reason()
    candidate: ArmData = (
        NoData(redacted) if redacted is not None
        else Counts(item.candidate_pairs - item.candidate_agree, item.candidate_pairs) if item.candidate_pairs
        else NoData(judge_problem if judge_problem is not None and item.min_win_or_tie is not None
                    else "no paired candidate answers yet")
    )
    if redacted is not None:  # the baseline's pairs are redacted alike: say why on both arms
        primary: ArmData = NoData(redacted)
    elif item.fixed_baseline is not None:
        n = FIXED_BASELINE_PSEUDO_COUNT
        primary = Counts(round((1.0 - item.fixed_baseline) * n), n, exact=True)
    elif item.baseline_pairs:
        primary = Counts(item.baseline_pairs - item.baseline_agree, item.baseline_pairs)
    else:
        primary = NoData(NO_BASELINE_RESEND if resend else NO_BASELINE_REPLICA)
    return MetricInput(spec, primary, candidate)


def phase_limit(policy: ShadowPolicy, state: RolloutState) -> float | None:
    """Seconds after which the current phase's analysis is final (None: no limit)."""
    spec = policy.spec
    if state.phase is Phase.shadowing and spec.shadow is not None:
        return spec.shadow.max_duration.total_seconds()
    if state.phase is Phase.progressing and spec.canary is not None:
        return spec.canary.step_limit.total_seconds()
    return None


def _final(policy: ShadowPolicy, state: RolloutState, since: float, now: float) -> bool:
    """Whether a look at `now` is the phase's last (an undecided metric is then inconclusive)."""
    limit = phase_limit(policy, state)
    return limit is not None and now - since >= limit


@dataclass(frozen=True)
class SharedLook:
    """One rollout's look as the scheduler fetched it at a boundary, and judged it where it could."""

    policy: ShadowPolicy
    since: float
    end: float
    results: Mapping[str, WindowResult | SourceConfigError]
    """Per metric: what the source answered (or why the metric could not be asked)."""
    final: bool
    verdict: Verdict | None
    """The sequential verdict of the metrics; None where the tick must judge (fixed method, output
    agreement in the look, data the judge refused)."""


class LookBoard:
    """The looks of the last few boundaries, per policy key: what each tick reads instead of fetching.

    A boundary's entry is opened (a future) before its look runs, so a tick that comes while it runs
    waits for it instead of asking the source again.
    """

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self._looks: dict[float, asyncio.Future[dict[str, SharedLook]]] = {}

    def open(self, end: float) -> tuple[asyncio.Future[dict[str, SharedLook]], bool]:
        """The entry for `end`, and whether it is new (then the caller must fill it)."""
        held = self._looks.get(end)
        if held is not None:
            return held, False
        entry: asyncio.Future[dict[str, SharedLook]] = asyncio.get_running_loop().create_future()
        self._looks[end] = entry
        for old in sorted(self._looks)[:-self.keep]:
            del self._looks[old]
        return entry, True

    def drop(self, end: float, entry: asyncio.Future[dict[str, SharedLook]]) -> None:
        if self._looks.get(end) is entry:
            del self._looks[end]

    async def get(self, key: str, end: float) -> SharedLook | None:
        entry = self._looks.get(end)
        if entry is None:
            return None
        return (await asyncio.shield(entry)).get(key)


class Analyzer:
    """Runs one look for one policy: metric source + output tallies -> judge -> verdict.

    A tick whose look the scheduler already ran at the boundary (:class:`LookScheduler`) takes its
    results from the :class:`LookBoard` instead of fetching, and its verdict too when it would judge
    exactly what was judged (the same spec, window, final flag, and no output agreement).
    """

    def __init__(self, source: MetricSource | None, outputs: OutputTallies | None = None,
                 board: LookBoard | None = None, tracer: Tracer = NO_TRACER,
                 sampling: SamplingTuner | None = None) -> None:
        self.source = source
        self.outputs = outputs
        self.board = board or LookBoard()
        self.tracer = tracer
        """Where each look's span goes (controller.tracing; none by default)."""
        self.sampling = sampling or SamplingTuner()
        """The fraction the taps publish, per policy (the adaptive target; controller.sampling). Share it with the
        tap routers (routers.factory's ``sampling``) so that the route settings carry what it chooses."""
        self.looks_judged = 0
        """Boundary looks the scheduler ran (for tests and the benchmark)."""
        self.shared_verdicts = 0
        """Ticks that took the verdict of their boundary's look instead of judging alone."""

    async def look(self, policy: ShadowPolicy, state: RolloutState, now: float,
                   stored_tally: AgreementTally | None = None,
                   stored_latency: Mapping[str, Paired] | None = None, copies: TapCopies | None = None) -> Look:
        """One look at the phase `state` is in. ``stored_tally`` and ``stored_latency``: this phase's
        agreement counts and paired latencies as `.status` holds them (what an earlier process counted).
        ``copies``: what the taps' mirror did under the route setting in force (the router read it this tick;
        :func:`with_copies`). Traced as a ``shadowctl.look`` span with the verdict and its numbers
        (controller.tracing)."""
        attributes = {**policy_attributes(policy.metadata.namespace, policy.metadata.name),
                      "shadowctl.phase": state.phase.value}
        if state.step is not None:
            attributes["shadowctl.step"] = state.step
        with self.tracer.span(LOOK_SPAN, attributes) as span:
            look = await self._look(policy, state, now, stored_tally, stored_latency, copies)
            if span.recording:
                span.set(look_attributes(look))
        return look

    async def _look(self, policy: ShadowPolicy, state: RolloutState, now: float,
                    stored_tally: AgreementTally | None, stored_latency: Mapping[str, Paired] | None,
                    copies: TapCopies | None = None) -> Look:
        since = state.phase_started_at if state.phase_started_at is not None else now
        final = _final(policy, state, since, now)
        errors: list[str] = []
        metrics = source_metrics(policy)
        analysis = policy.spec.analysis
        results: Mapping[str, WindowResult | SourceConfigError] = {}
        shared: SharedLook | None = None
        if metrics:
            if now - since < 1.0:
                results = {m.name: base.NoData(m.name, None, "", "the phase has just started") for m in metrics}
            else:
                end = look_end(now, since, analysis.interval.total_seconds())
                shared = await self.board.get(policy.key, end)
                if shared is not None and (shared.since != since or not _same_spec(shared.policy, policy)):
                    shared = None
                results = shared.results if shared is not None else await self._fetch(policy, since, end)
            for metric in metrics:
                result = results[metric.name]
                if isinstance(result, SourceUnavailable | SourceConfigError):
                    errors.append(str(result))
        tally: AgreementTally | None = None
        paired: PairedLatencyRecord | None = None
        extra: list[MetricInput] = []
        outputs = analysis.outputs
        if outputs is not None and state.phase is Phase.shadowing:
            fresh = None
            latency: Mapping[str, Paired] | None = None
            if self.outputs is not None:
                self.outputs.ensure(policy, since, stored_latency)
                fresh = self.outputs.tally(policy.key, since)
                latency = self.outputs.latency(policy.key, since)
            if latency is None:
                latency = stored_latency  # no source now: what was counted still stands
            paired = paired_record(policy, latency, since)
            tally = _merge(stored_tally, fresh)
            judge_problem = self.outputs.judge_problem(policy.key) if self.outputs is not None else None
            for item in judge_inputs(tally or AgreementTally(), outputs):
                extra.append(agreement_input(item, outputs.min_pairs, judge_problem,
                                             resend=outputs.baseline.mode is BaselineMode.resend))
            # Paired latency: only the shadow phase has pairs (the canary's live requests have no twin).
            why = "the controller has no output hub"
            if self.outputs is not None:
                failed = self.outputs.error(policy.key)
                why = f"the output source could not start: {failed}" if failed else "no output source is running"
            extra.extend(paired_input(m, latency, why) for m in paired_metrics(policy))
        if not metrics and not extra:
            verdict = Verdict(Outcome.nodata, (), "nothing to judge in this phase")
            return Look(verdict, verdict.to_record(), tuple(errors), tally, since, paired)
        try:
            if analysis.method is Method.fixed:
                judged = judge_fixed(look_input(policy, results, final, extra).inputs, config_from_policy(analysis))
            elif shared is not None and shared.verdict is not None and not extra and shared.final == final:
                judged = shared.verdict
                self.shared_verdicts += 1
            else:
                [one] = judge_many([look_input(policy, results, final, extra)])
                if isinstance(one, JudgeError):
                    raise one
                judged = one
        except JudgeError as exc:
            verdict = Verdict(Outcome.nodata, (), f"the judge could not use the data: {exc}")
            return Look(verdict, verdict.to_record(), tuple(errors), tally, since, paired)
        represented = None
        if state.phase is Phase.shadowing and outputs is not None:
            represented = self.sampling.observe(policy, since, _pairs_so_far(tally, paired), now)
        judged = with_sampling(policy, judged, represented)
        if state.phase is Phase.shadowing:
            judged = with_copies(judged, copies)
        verdict = judged
        if verdict.outcome is Outcome.passed and state.phase is Phase.shadowing:
            verdict = _check_min_pairs(policy, verdict, tally)
        return Look(verdict, judged.to_record(), tuple(errors), tally, since, paired)

    async def idle(self, policy_key: str) -> None:
        """The policy is not in a phase that compares outputs."""
        self.sampling.forget(policy_key)
        if self.outputs is not None:
            await self.outputs.stop(policy_key)

    async def _fetch(self, policy: ShadowPolicy, since: float, end: float) -> dict[str, WindowResult | SourceConfigError]:
        if self.source is None:
            return {m.name: base.NoData(m.name, None, "", "no metric source configured")
                    for m in source_metrics(policy)}
        planned = _plan(self.source, policy, since, end)
        requests = _asked(planned)
        return _answered(planned, await self.source.fetch_many(requests) if requests else {})


def _plan(source: MetricSource, policy: ShadowPolicy, since: float, end: float) -> Planned:
    return source.plan(policy, start=datetime.fromtimestamp(since, UTC), end=datetime.fromtimestamp(end, UTC))


def _asked(planned: Planned) -> list[WindowRequest]:
    """The requests of a plan (a metric that cannot become a request is answered by its error)."""
    return [r for _, r in planned if isinstance(r, WindowRequest)]


def _answered(planned: Planned, answers: Mapping[MetricKey, WindowResult]) -> dict[str, WindowResult | SourceConfigError]:
    """Per metric name: the source's answer, or why the metric could not be asked."""
    return {m.name: r if isinstance(r, SourceConfigError) else answers[r.key] for m, r in planned}


def _same_spec(a: ShadowPolicy, b: ShadowPolicy) -> bool:
    return a is b or a == b


def look_input(policy: ShadowPolicy, results: Mapping[str, WindowResult | SourceConfigError], final: bool,
               extra: Sequence[MetricInput] = ()) -> LookInput:
    """What the judge gets for one look: every metric's data, then the output agreement inputs.

    Raises JudgeError for data the judge cannot take (a histogram that is not one)."""
    analysis = policy.spec.analysis
    inputs = [metric_input(m, results[m.name]) for m in source_metrics(policy)] + list(extra)
    return LookInput(inputs, alpha=analysis.alpha, beta=analysis.beta, final=final)


def paired_record(policy: ShadowPolicy, latency: Mapping[str, Paired] | None,
                  since: float) -> PairedLatencyRecord | None:
    """The paired latencies of the phase that started at `since` as `.status` keeps them: per quantity
    a paired metric judges, n, the sums and the counts at the bounds its metrics' decisions read."""
    metrics = paired_metrics(policy)
    if latency is None or not metrics:
        return None
    keep: dict[str, list[float]] = {}
    for m in metrics:
        if m.quantity is not None:
            keep.setdefault(m.quantity.value, []).extend(decision_bounds(metric_spec(m)))
    kept = {q: data.to_record(keep[q]) for q, data in latency.items() if q in keep}
    return PairedLatencyRecord(ttft=kept.get("ttft"), tpot=kept.get("tpot"), e2e=kept.get("e2e"),
                               phase_started_at=since)


def paired_metrics(policy: ShadowPolicy) -> list[Metric]:
    """The paired-latency metrics, judged from the output events in the shadow phase."""
    return [m for m in policy.spec.analysis.metrics if m.kind is MetricKind.paired_latency]


def source_metrics(policy: ShadowPolicy) -> list[Metric]:
    """The metrics the metric source answers (all but the paired-latency ones, which come from the outputs)."""
    return [m for m in policy.spec.analysis.metrics if m.kind is not MetricKind.paired_latency]


class LookScheduler:
    """Runs the look of every rollout due at an interval boundary, once, for all of them.

    The manager calls :meth:`run` at each boundary with the rollouts whose look ends there. It plans
    their requests (:meth:`MetricSource.plan`), fetches them in one ``fetch_many`` (one query per
    metric template), judges every sequential look without output agreement in one
    :func:`~shadowctl.judge.judge_many` call, and posts each rollout's :class:`SharedLook` on the
    analyzer's board for its tick, which runs later in the interval.
    """

    def __init__(self, analyzer: Analyzer) -> None:
        self.analyzer = analyzer

    async def run(self, end: float, due: Sequence[tuple[ShadowPolicy, RolloutState]]) -> None:
        board = self.analyzer.board
        entry, new = board.open(end)
        if not new:
            return
        looks: dict[str, SharedLook] = {}
        try:
            looks = await self._look(end, due)
            self.analyzer.looks_judged += 1
        except asyncio.CancelledError:
            board.drop(end, entry)  # its ticks fetch on their own
            raise
        except Exception:  # the shared look must never cost a verdict: every tick then runs its own
            log.exception("analysis.look_failed", end=end)
        finally:
            if not entry.done():
                entry.set_result(looks)

    async def _look(self, end: float, due: Sequence[tuple[ShadowPolicy, RolloutState]]) -> dict[str, SharedLook]:
        source = self.analyzer.source
        if source is None or not due:
            return {}
        planned: list[tuple[ShadowPolicy, RolloutState, float, Planned]] = []
        for policy, state in due:
            since = state.phase_started_at
            if since is None or end - since < 1.0 or not source_metrics(policy):
                continue
            planned.append((policy, state, since, _plan(source, policy, since, end)))
        requests = [r for _, _, _, plan in planned for r in _asked(plan)]
        answers = await source.fetch_many(requests) if requests else {}
        looks: dict[str, SharedLook] = {}
        judged: list[tuple[str, LookInput]] = []
        for policy, state, since, plan in planned:
            results = _answered(plan, answers)
            final = _final(policy, state, since, end)
            looks[policy.key] = SharedLook(policy, since, end, results, final, None)
            analysis = policy.spec.analysis
            agreement = analysis.outputs is not None and state.phase is Phase.shadowing
            if analysis.method is Method.sequential and not agreement:
                try:
                    judged.append((policy.key, look_input(policy, results, final)))
                except JudgeError:
                    continue  # the tick judges it and says why
        for (key, _), verdict in zip(judged, judge_many([li for _, li in judged]), strict=True):
            if isinstance(verdict, Verdict):
                looks[key] = dataclasses.replace(looks[key], verdict=verdict)
        return looks


def _merge(stored: AgreementTally | None, fresh: AgreementTally | None) -> AgreementTally | None:
    """The larger of the stored and the fresh tally per comparator (a restarted source starts from zero)."""
    if fresh is None:
        return stored
    if stored is None:
        return fresh
    stored_n = sum(t.candidate_pairs + t.baseline_pairs for t in stored.counts.values())
    fresh_n = sum(t.candidate_pairs + t.baseline_pairs for t in fresh.counts.values())
    return fresh if fresh_n >= stored_n else stored


def _pairs_judged(result: MetricResult) -> int | None:
    """How many pairs of output events a metric's result was judged on (None: not a paired metric)."""
    if result.statistic == "agreement":
        return int(result.n_candidate)
    pairs = result.extra.get("pairs")
    return pairs if isinstance(pairs, int) else None


def _pairs_so_far(tally: AgreementTally | None, paired: PairedLatencyRecord | None) -> int:
    """The phase's pairs: the most any comparator or paired-latency quantity counted."""
    counts = [t.candidate_pairs for t in (tally.counts.values() if tally is not None else ())]
    counts += [c.pairs for c in (paired.quantities().values() if paired is not None else ())]
    return max(counts, default=0)


def with_sampling(policy: ShadowPolicy, verdict: Verdict, represented: Represented | None = None) -> Verdict:
    """The verdict saying how many requests its pairs stand for, where the taps publish the events of a
    fraction F of requests (``spec.analysis.outputs.sampling``): each pair-based metric's evidence gets
    ``sampledFraction`` F and ``requestsRepresented`` pairs / F, and the reason says it once. `represented`:
    the phase's effective fraction where F changed during it (the adaptive target, controller.sampling), used
    for F; the reason then also says the fraction in force.

    The pairs are a consistent sample (the same request ids on every tap, chosen by a hash that does not
    look at the answers), so what they show holds for the requests they stand for; the judge's error
    levels are those of the pairs themselves (the judge never sees pairs / F)."""
    outputs = policy.spec.analysis.outputs
    if outputs is None or not outputs.sampling.carried:
        return verdict
    fraction = represented.fraction if represented is not None else outputs.sampling.fraction
    if fraction >= 1.0 and (represented is None or not represented.adaptive):
        return verdict
    results: list[MetricResult] = []
    most = None
    for result in verdict.results:
        pairs = _pairs_judged(result)
        if pairs is not None:
            most = max(most or 0, pairs)
            result = dataclasses.replace(result, extra={
                **result.extra, "sampledFraction": fraction, "requestsRepresented": round(pairs / fraction)})
        results.append(result)
    if most is None:
        return verdict
    said = f"the taps publish {fraction:g} of them"
    if represented is not None and represented.adaptive:
        said = (f"the taps published {fraction:.3g} of them over the phase, {represented.now:g} now, adapted to "
                f"{outputs.sampling.target_pairs_per_second:g} pairs/s")
    return dataclasses.replace(verdict, results=tuple(results), reason=(
        f"{verdict.reason}; {most} pairs stand for about {round(most / fraction)} requests ({said})"))


def with_copies(verdict: Verdict, copies: TapCopies | None) -> Verdict:
    """The verdict saying how many copies the taps' shadow budget let through, where the taps report them (a
    budget or a resent baseline in the route setting): each pair-based metric's evidence gets ``copies``
    (mirror and baseline, by outcome, summed over the taps, since they applied the setting's generation) and
    the reason says it once ("120 pairs; the taps sent 150 copies, the budget skipped 300 (...)").

    The pairs are those the budget let through: a copy it skipped has no answer to pair. The counts come from
    the taps' reports at this tick (each at most a report period old) and start afresh when a tap restarts."""
    if copies is None:
        return verdict
    results: list[MetricResult] = []
    most = None
    record = copies.counts.model_dump(mode="json", by_alias=True)
    for result in verdict.results:
        pairs = _pairs_judged(result)
        if pairs is not None:
            most = max(most or 0, pairs)
            result = dataclasses.replace(result, extra={**result.extra, "copies": record})
        results.append(result)
    if most is None:
        return verdict
    return dataclasses.replace(verdict, results=tuple(results),
                               reason=f"{verdict.reason}; {most} pairs; {copies_sentence(copies)}")


def copies_sentence(copies: TapCopies) -> str:
    """What the taps' copies did, in words: sent, and skipped by the budget (its rate or tokens, the queue
    back-off), for the mirror and, where there is one, the resent baseline."""
    def part(what: str, c: CopyOutcomes) -> str:
        text = f"the taps sent {c.sent} {what}"
        if c.skipped:
            text += (f", the budget skipped {c.skipped} ({c.skipped_budget} over its rate or tokens, "
                     f"{c.skipped_queue} by the queue back-off)")
        else:
            text += ", the budget skipped none"
        others = c.failed + c.dropped_in_flight_cap + c.not_rewritable
        if others:
            text += (f"; {c.failed} failed, {c.dropped_in_flight_cap} over the in-flight cap, "
                     f"{c.not_rewritable} not rewritable")
        return text
    counts = copies.counts
    said = [part("copies", counts.mirror)]
    b = counts.baseline
    if b.sent or b.skipped or b.failed or b.dropped_in_flight_cap:
        said.append(part("baseline resends", b))
    taps = f"{copies.taps} tap{'s' if copies.taps != 1 else ''}"
    return f"{'; '.join(said)} (generation {copies.generation}, {taps})"


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
    asked: set[_Window] = field(default_factory=set)
    """Once sent: what it asks for (a tick that needs no more waits for it instead of asking again)."""


class BatchingSource:
    """A MetricSource that coalesces concurrent `fetch_many` calls for the same look into one.

    Workers of all policies tick at the same interval boundaries, so their requests carry the same
    window end. Requests with the same end meet here and go to the real source as one batch, which
    answers each metric template with one query for all rollouts. A batch is sent once no request
    joined it for `idle` seconds, or `max_wait` seconds after it opened, whichever comes first. A
    request that a batch in flight already asks for waits for that batch. (The boundary's look asks
    for every rollout at once, see :class:`LookScheduler`; this coalesces the ticks that fetch alone.)
    """

    def __init__(self, inner: MetricSource, idle: float = 0.05, max_wait: float = 1.0) -> None:
        self.inner = inner
        self.idle = idle
        self.max_wait = max_wait
        self._batches: dict[float, _Batch] = {}
        self._in_flight: dict[float, list[_Batch]] = {}
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
        missing = list(requests)
        end = max(r.end for r in missing)
        key = end.timestamp()
        for flying in self._in_flight.get(key, ()):
            if all(_window(r) in flying.asked for r in missing):
                assert flying.done is not None
                answers = await asyncio.shield(flying.done)
                return {r.key: answers[_window(r)] for r in missing}
        loop = asyncio.get_running_loop()
        batch = self._batches.get(key)
        if batch is None:
            batch = _Batch(done=loop.create_future(), first=loop.time())
            self._batches[key] = batch
            batch.task = loop.create_task(self._flush_when_quiet(key, batch))
        batch.requests.extend(missing)
        batch.last = loop.time()
        assert batch.done is not None
        answers = await asyncio.shield(batch.done)
        return {r.key: answers[_window(r)] for r in missing}

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
