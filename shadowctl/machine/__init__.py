"""The rollout state machine: a pure ``step()`` over frozen state.

``step(state, verdict, command, now, policy, observed) -> StepResult(state, actions)``
does no I/O and reads no clock. ``verdict`` is the judge's own :class:`~shadowctl.judge.Verdict`
(its :class:`~shadowctl.judge.Outcome` and the sentence that explains it): the machine speaks the
judge's vocabulary, not a copy of it that would be mapped by hand.

The reconciler carries out the returned actions (routes first), and only then writes the new
state to ``.status``; if an action fails, the status is not written and the next tick recomputes
from the old state. That order, plus idempotent actions (a router that is asked
for the routes it already has writes nothing), is what makes a crash at any
point safe: the same state and the same cluster give the same actions.

Phases keep Flagger's names where they exist::

    Pending ─▶ Shadowing ─▶ Progressing(step 0..n-1) ─▶ WaitingPromotion ─▶ Promoting ─▶ Succeeded
        │           │               │                          │
        └───────────┴───────────────┴──────────────────────────┴─▶ RollingBack ─▶ RolledBack
    any non-terminal ─pause─▶ Paused ─resume─▶ (the phase it left, analysis restarted)
    Failed: the target could not be found or routed; routes were restored where possible.

Which commands a phase accepts is stated once, by :func:`refusal`: ``step`` treats a refused
command as no command at all, and the CLI asks the same function before it writes one, so a
person is told up front instead of seeing a command "carried out" with no effect.

Safety rules encoded here (and tested transition by transition):
- inconclusive never promotes: it rolls back, or holds (Paused) when the policy says ``hold``;
- no data is never a pass: it is "continue" until the phase's maximum duration, then inconclusive;
- a new candidate (or a changed spec) mid-rollout restarts the analysis from the first phase,
  pulling live traffic back to the first phase's routes; this comes before every command but rollback,
  Paused included (a new candidate restarts a paused rollout at once; a spec edit that keeps the candidate
  restarts it when a command would move it on), so that no resume, promotion or step is ever carried out
  for a candidate with the recorded rollout's step (bench/faults r-00201);
- the progress deadline ends every non-terminal phase in RollingBack, also after the spec was edited into
  one the model refuses: :func:`step_refused` holds, then rolls back at the deadline recorded from the
  last accepted spec (:func:`deadline_at`), so a refused spec never leaves traffic half-moved for good;
- live traffic to the candidate only ever equals the step the policy has reached, and is 0
  before the shadow phase passed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from shadowctl.judge import Outcome, Verdict
from shadowctl.policy.model import OnDrift, OnInconclusive, Promotion, ShadowPolicy, Trigger, WebhookType
from shadowctl.policy.status import Command, HistoryEntry, Phase, RolloutRecord

HISTORY_LIMIT = 50


ANALYSED = (Phase.shadowing, Phase.progressing, Phase.waiting_promotion)


def _names(phases: tuple[Phase, ...]) -> str:
    return ", ".join(p.value for p in phases)


class Refusal(enum.StrEnum):
    """Why a phase does not accept a command (see :func:`refusal`), worded for the person who sent it."""

    nothing_to_approve = "nothing waits for approval, so promote would do nothing"
    nothing_started = "no rollout has started (no candidate yet), there is nothing to promote"
    already_promoted = "the candidate already serves all traffic"
    promotion_under_way = "the promotion is already under way"
    rollback_finishing = f"a rollback is finishing; promote --full once it is {Phase.rolled_back.value}"
    nothing_to_roll_back = "the primary already serves all traffic, there is nothing to roll back"
    rollback_under_way = "the rollback is already under way"
    promotion_finishing = f"the promotion is finishing; roll back once it is {Phase.succeeded.value}"
    already_paused = "pause would do nothing"
    not_in_analysis = f"only a rollout in analysis ({_names(ANALYSED)}) can be paused"
    not_paused = f"not {Phase.paused.value}, so there is nothing to resume"
    still_running = (f"retry starts a finished rollout again ({_names(tuple(p for p in Phase if p.terminal))} or "
                     f"{Phase.paused.value}); this one is still running")


_REFUSED: dict[Command, dict[Phase, Refusal]] = {
    # Paused accepts promote when it was paused waiting for approval: refusal() reads paused_from.
    Command.promote: {p: Refusal.nothing_to_approve for p in Phase if p is not Phase.waiting_promotion},
    Command.promote_full: {
        Phase.pending: Refusal.nothing_started,
        Phase.promoting: Refusal.promotion_under_way,
        Phase.succeeded: Refusal.already_promoted,
        Phase.rolling_back: Refusal.rollback_finishing,
    },
    Command.rollback: {
        Phase.promoting: Refusal.promotion_finishing,
        Phase.rolling_back: Refusal.rollback_under_way,
        Phase.rolled_back: Refusal.nothing_to_roll_back,
        Phase.failed: Refusal.nothing_to_roll_back,
    },
    Command.pause: {
        p: Refusal.already_paused if p is Phase.paused else Refusal.not_in_analysis for p in Phase if p not in ANALYSED
    },
    Command.resume: {p: Refusal.not_paused for p in Phase if p is not Phase.paused},
    Command.retry: {p: Refusal.still_running for p in Phase if not p.terminal and p is not Phase.paused},
}
"""Which commands each phase refuses (a phase not listed under a command accepts it)."""


@dataclass(frozen=True)
class Observed:
    """Facts the reconciler read from the cluster this tick."""

    candidate: str | None = None  # identity of the candidate (revision, subset+generation); None: none to roll out
    generation: int = 1  # the policy's metadata.generation
    gate: bool | None = None  # confirm-promotion webhooks: True open, False closed, None not asked/none configured
    drift: bool = False  # someone else changed the routes we manage
    leftover: bool = False  # Pending, but the routes carry shadowctl's changes (a start whose status never landed)


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class SetRoutes:
    """Route `weight`% of live traffic to the candidate and mirror `mirror_percent`% (None: no mirror)."""

    weight: int
    mirror_percent: float | None


@dataclass(frozen=True)
class Promote:
    """Send 100% of live traffic to the candidate, no mirror (Knative: pin the candidate revision)."""


@dataclass(frozen=True)
class Finalize:
    """Restore what shadowctl changed: 100% primary, our mirror removed."""

    keep_candidate: bool = False


@dataclass(frozen=True)
class Notify:
    """Tell people: a Kubernetes Event, the MQTT events topic, webhooks."""

    reason: str
    message: str
    warning: bool = False


Action = SetRoutes | Promote | Finalize | Notify


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class RolloutState:
    """Everything the controller must remember between ticks; stored in `.status` and read back."""

    phase: Phase = Phase.pending
    step: int | None = None  # canary step index while Progressing / WaitingPromotion
    weight: int = 0  # live traffic share the candidate should have now
    mirror_percent: float | None = None  # mirror the candidate should have now
    candidate: str | None = None  # the candidate this rollout is about
    generation: int = 0  # the policy generation this rollout follows
    rollout_started_at: float | None = None
    phase_started_at: float | None = None
    paused_from: Phase | None = None
    paused_step: int | None = None
    message: str = ""
    history: tuple[HistoryEntry, ...] = field(default_factory=tuple)

    # -- (de)serialisation for .status

    def to_record(self) -> RolloutRecord:
        return RolloutRecord(
            phase=self.phase, step=self.step, canary_weight=self.weight, mirror_percent=self.mirror_percent,
            candidate=self.candidate, rollout_generation=self.generation,
            rollout_started_at=self.rollout_started_at, phase_started_at=self.phase_started_at,
            paused_from=self.paused_from, paused_step=self.paused_step, message=self.message,
            history=list(self.history),
        )

    @classmethod
    def from_record(cls, record: RolloutRecord | None) -> RolloutState:
        """The state `.status` holds; None (nothing written, or unreadable) is a fresh Pending state."""
        if record is None:
            return cls()
        return cls(
            phase=record.phase, step=record.step, weight=record.canary_weight,
            mirror_percent=record.mirror_percent, candidate=record.candidate,
            generation=record.rollout_generation, rollout_started_at=record.rollout_started_at,
            phase_started_at=record.phase_started_at, paused_from=record.paused_from,
            paused_step=record.paused_step, message=record.message, history=tuple(record.history),
        )


@dataclass(frozen=True)
class StepResult:
    """The result of one step: the next state and the actions that get there."""

    state: RolloutState
    actions: tuple[Action, ...] = ()


def refusal(command: Command, state: RolloutState) -> Refusal | None:
    """Why ``step`` will not act on `command` in `state`, or None when it will.

    ``step`` does with a refused command exactly what it does with none, so a person's command never
    does something the phase was not meant to allow. An accepted command can still find nothing to
    act on in what the reconciler observed (``promote --full`` or ``retry`` with no candidate).
    """
    if command is Command.promote and state.phase is Phase.paused and state.paused_from is Phase.waiting_promotion:
        return None  # paused while it waited for approval: the approval still ends the wait
    return _REFUSED[command].get(state.phase)


# --------------------------------------------------------------------------- helpers


def _move(
    state: RolloutState,
    phase: Phase,
    now: float,
    reason: str,
    *,
    warning: bool = False,
    **changes: Any,
) -> tuple[RolloutState, Notify]:
    transition = HistoryEntry(at=now, from_=state.phase.value, to=phase.value, reason=reason)
    history = (*state.history, transition)[-HISTORY_LIMIT:]
    new = replace(state, phase=phase, phase_started_at=now, message=reason, history=history, **changes)
    label = phase.value if phase is not Phase.progressing else f"Progressing step {(new.step or 0) + 1}"
    return new, Notify(reason=phase.value, message=f"{label}: {reason}", warning=warning)


def first_phase(policy: ShadowPolicy) -> tuple[Phase, int | None, int, float | None]:
    """(phase, step, weight, mirror) of a rollout's first analysed phase."""
    spec = policy.spec
    if spec.shadow is not None:
        return Phase.shadowing, None, 0, spec.shadow.mirror_percent
    assert spec.canary is not None  # the model requires shadow or canary
    return Phase.progressing, 0, spec.canary.steps[0], None


def routes_of(state: RolloutState) -> SetRoutes:
    return SetRoutes(state.weight, state.mirror_percent)


def _start(state: RolloutState, now: float, policy: ShadowPolicy, observed: Observed, reason: str) -> StepResult:
    """Start (or restart) from the first phase; a rollout in flight is first undone (its candidate may differ)."""
    phase, step, weight, mirror = first_phase(policy)
    undo: tuple[Action, ...] = ()
    if (state.phase is not Phase.pending and not state.phase.terminal) or (state.phase is Phase.pending
                                                                           and observed.leftover):
        # Never after Succeeded: that would take traffic from the promoted version. From Pending only when
        # an earlier start's routes are there (its status never landed; its candidate may differ since).
        undo = (Finalize(False),)
    new, note = _move(
        state,
        phase,
        now,
        reason,
        step=step,
        weight=weight,
        mirror_percent=mirror,
        candidate=observed.candidate,
        generation=observed.generation,
        rollout_started_at=now,
        paused_from=None,
        paused_step=None,
    )
    return StepResult(new, (*undo, SetRoutes(weight, mirror), note))


def _rollback(state: RolloutState, now: float, policy: ShadowPolicy, reason: str) -> StepResult:
    return _roll_back(state, now, policy.spec.rollback.keep_candidate_tag, reason)


def _roll_back(state: RolloutState, now: float, keep_candidate: bool, reason: str) -> StepResult:
    new, note = _move(
        state, Phase.rolling_back, now, reason, warning=True, weight=0, mirror_percent=None, step=None,
        paused_from=None, paused_step=None,
    )
    return StepResult(new, (Finalize(keep_candidate), note))


def _promote(state: RolloutState, now: float, reason: str) -> StepResult:
    new, note = _move(state, Phase.promoting, now, reason, weight=100, mirror_percent=None, paused_from=None)
    return StepResult(new, (Promote(), note))


def _inconclusive(state: RolloutState, now: float, policy: ShadowPolicy, reason: str) -> StepResult:
    if policy.spec.on_inconclusive is OnInconclusive.hold:
        new, note = _move(
            state, Phase.paused, now, f"inconclusive, holding for a person to decide: {reason}", warning=True,
            paused_from=state.phase, paused_step=state.step,
        )
        return StepResult(new, (note,))
    return _rollback(state, now, policy, f"inconclusive: {reason}")


def _elapsed(state: RolloutState, now: float) -> float:
    return now - (state.phase_started_at if state.phase_started_at is not None else now)


def _after_last_step(state: RolloutState, now: float, policy: ShadowPolicy, observed: Observed, why: str) -> StepResult:
    needs_gate = policy.spec.promotion is Promotion.manual or any(
        w.type is WebhookType.confirm_promotion for w in policy.spec.notifications.webhooks
    )
    if needs_gate:
        gate = "shadowctl promote" if policy.spec.promotion is Promotion.manual else "the confirm-promotion webhook"
        new, note = _move(state, Phase.waiting_promotion, now, f"{why}; waiting for {gate}")
        return StepResult(new, (note,))
    return _promote(state, now, why)


# --------------------------------------------------------------------------- step


def step(
    state: RolloutState,
    verdict: Verdict | None,
    command: Command | None,
    now: float,
    policy: ShadowPolicy,
    observed: Observed | None = None,
) -> StepResult:
    """Compute the next state and the actions to reach it. Pure: no I/O, time is `now` (seconds)."""
    obs = observed or Observed()
    spec = policy.spec
    phase = state.phase
    # A command the phase refuses is no command (the CLI refuses it up front with the same reason);
    # from here on every command is one the phase accepts.
    refused = refusal(command, state) if command is not None else None
    if refused is not None:
        command = None

    # 1. Starting and restarting.
    if command is Command.retry:
        if obs.candidate is None:
            return StepResult(replace(state, message="retry: there is no candidate to roll out"))
        return _start(state, now, policy, obs, "retry requested by a person")
    if phase is Phase.pending:
        if command is Command.rollback:
            new, note = _move(state, Phase.rolled_back, now, "rolled back by a person before it started",
                              warning=True)
            return StepResult(new, (Finalize(spec.rollback.keep_candidate_tag), note))
        if obs.candidate is None:
            msg = "waiting for a candidate revision that differs from the primary"
            return StepResult(state if state.message == msg else replace(state, message=msg))
        return _start(state, now, policy, obs, f"rollout of {obs.candidate} started")
    if phase.terminal:
        # auto: every new candidate starts a rollout; manual: only a policy edit that names a new one.
        new_candidate = obs.candidate is not None and obs.candidate != state.candidate
        if new_candidate and (spec.trigger is Trigger.auto or obs.generation != state.generation):
            return _start(state, now, policy, obs, f"new candidate {obs.candidate}: rollout started")
        if command is Command.promote_full and obs.candidate is not None:  # the candidate named now is promoted
            return _promote(replace(state, candidate=obs.candidate, generation=obs.generation), now,
                            "promoted by a person (--full), analysis skipped")
        if command is Command.rollback:
            return _rollback(state, now, policy, "rolled back by a person after promotion")
        return StepResult(state)

    # 2. Finishing what was started: routes are written before the status, so these are idempotent.
    if phase is Phase.promoting:
        new, note = _move(state, Phase.succeeded, now, "candidate serves 100% of traffic")
        if obs.candidate is not None and obs.candidate != state.candidate:
            # The promotion of the recorded candidate is written (routes first); a Promote now would be built
            # for the one named since. Succeeded as it stands; the new candidate then starts its own rollout.
            return StepResult(new, (note,))
        return StepResult(new, (Promote(), note))
    if phase is Phase.rolling_back:
        new, note = _move(state, Phase.rolled_back, now, f"routes restored to the primary ({state.message})",
                          warning=True)
        return StepResult(new, (Finalize(spec.rollback.keep_candidate_tag), note))

    # 3. A person's rollback wins over everything (it restores the routes the rollout was started on).
    if command is Command.rollback:
        return _rollback(state, now, policy, "rolled back by a person")

    # 4. A changed candidate (or spec) is handled before any other command, Paused included: the routes hold
    #    the rollout of the recorded candidate, and a step, a resume or a promotion computed for another one
    #    would move live traffic to a candidate nothing analysed (and leave the old one's share behind).
    changed = _changed(state, command, now, policy, obs)
    if changed is not None:
        if command is Command.pause and changed.state.phase in ANALYSED:  # restarted, then paused as asked
            new, note = _move(changed.state, Phase.paused, now, "paused by a person",
                              paused_from=changed.state.phase, paused_step=changed.state.step)
            return StepResult(new, (*changed.actions, note))
        return changed

    # 5. A person's other commands win over analysis.
    if command is Command.promote_full:
        return _promote(state, now, "promoted by a person (--full), remaining analysis skipped")
    if command is Command.pause:
        new, note = _move(state, Phase.paused, now, "paused by a person", paused_from=phase, paused_step=state.step)
        return StepResult(new, (note,))
    if phase is Phase.paused:
        if command is Command.resume and state.paused_from is not None:
            back, step_index = state.paused_from, state.paused_step
            new, note = _move(state, back, now, "resumed by a person; analysis of this phase restarts",
                              step=step_index, paused_from=None, paused_step=None)
            return StepResult(new, (routes_of(new), note))
        if command is Command.promote:
            return _promote(state, now, "promotion approved by a person")
        if now - (state.rollout_started_at or now) >= spec.progress_deadline.total_seconds():
            return _rollback(state, now, policy, "progress deadline exceeded while paused")
        return StepResult(state)

    # 6. Safety nets: deadline, drift.
    if now - (state.rollout_started_at or now) >= spec.progress_deadline.total_seconds():
        return _rollback(state, now, policy, f"progress deadline ({spec.progress_deadline}) exceeded")
    extra: tuple[Action, ...] = ()
    if refused is Refusal.nothing_to_approve:  # the one refusal worth an event: approval may come later
        extra = (Notify("PromoteIgnored", "nothing waits for approval; "
                        "use `shadowctl promote --full` to skip the analysis"),)
    if obs.drift:
        if spec.on_drift is OnDrift.pause:
            new, note = _move(state, Phase.paused, now, "someone else changed the managed routes; paused",
                              warning=True, paused_from=phase, paused_step=state.step)
            return StepResult(new, (note,))
        reasserted = Notify("DriftReasserted", "someone else changed the managed routes; re-asserted them",
                            warning=True)
        out = _analyse(state, verdict, command, now, policy, obs, (reasserted, *extra))
        if not any(isinstance(a, SetRoutes | Promote | Finalize) for a in out.actions):
            out = StepResult(out.state, (routes_of(out.state), *out.actions))
        return out
    return _analyse(state, verdict, command, now, policy, obs, extra)


def _changed(state: RolloutState, command: Command | None, now: float, policy: ShadowPolicy,
             obs: Observed) -> StepResult | None:
    """A rollout in flight (analysed or Paused) whose candidate or spec is no longer the recorded one: restart
    from the first phase (the old candidate's routes undone first), or Failed when the candidate is gone;
    None when nothing changed. Paused holds through a spec edit that keeps the candidate (a person may be
    fixing something before resuming) and restarts when a command would move it on."""
    if obs.candidate is not None and obs.candidate != state.candidate:
        where = "while paused" if state.phase is Phase.paused else "mid-rollout"
        return _start(state, now, policy, obs, f"new candidate {obs.candidate} {where}: analysis restarts")
    if obs.candidate is None and state.candidate is not None:
        new, note = _move(state, Phase.failed, now, "the candidate disappeared", warning=True, weight=0,
                          mirror_percent=None, step=None, paused_from=None, paused_step=None)
        return StepResult(new, (Finalize(policy.spec.rollback.keep_candidate_tag), note))
    if obs.generation != state.generation and (state.phase is not Phase.paused or command is not None):
        where = "while paused" if state.phase is Phase.paused else "mid-rollout"
        return _start(state, now, policy, obs, f"the policy changed {where}: analysis restarts")
    return None


def _analyse(
    state: RolloutState,
    verdict: Verdict | None,
    command: Command | None,
    now: float,
    policy: ShadowPolicy,
    obs: Observed,
    extra: tuple[Action, ...],
) -> StepResult:
    """5. Analysis: the judge's outcome moves an analysed phase on; `extra` actions go first."""
    spec = policy.spec
    phase = state.phase
    outcome = verdict.outcome if verdict else Outcome.cont
    reason = verdict.reason if verdict else ""
    if outcome is Outcome.failed:
        return _rollback(state, now, policy, reason or "the candidate is worse")
    elapsed = _elapsed(state, now)

    if phase is Phase.shadowing:
        assert spec.shadow is not None
        if outcome is Outcome.passed and elapsed >= spec.shadow.min_duration.total_seconds():
            why = f"shadow analysis passed: {reason}" if reason else "shadow analysis passed"
            if spec.canary is None:
                new, note = _move(state, Phase.succeeded, now, f"{why} (shadow-only evaluation)",
                                  mirror_percent=None, weight=0)
                return StepResult(new, (*extra, Finalize(False), note))
            new, note = _move(state, Phase.progressing, now, why, step=0, weight=spec.canary.steps[0],
                              mirror_percent=None)
            return StepResult(new, (*extra, routes_of(new), note))
        if outcome is Outcome.inconclusive or elapsed >= spec.shadow.max_duration.total_seconds():
            return _inconclusive(state, now, policy, reason or "no decision within the shadow phase's maxDuration")
        return StepResult(state, extra)

    if phase is Phase.progressing:
        assert spec.canary is not None
        k = state.step or 0
        if outcome is Outcome.passed and elapsed >= spec.canary.step_duration.total_seconds():
            why = f"step {k + 1} ({state.weight}%) passed" + (f": {reason}" if reason else "")
            if k + 1 < len(spec.canary.steps):
                new, note = _move(state, Phase.progressing, now, why, step=k + 1, weight=spec.canary.steps[k + 1])
                return StepResult(new, (*extra, routes_of(new), note))
            last = _after_last_step(state, now, policy, obs, why)
            return StepResult(last.state, (*extra, *last.actions))
        if outcome is Outcome.inconclusive or elapsed >= spec.canary.step_limit.total_seconds():
            return _inconclusive(state, now, policy, reason or f"no decision within step {k + 1}'s maximum duration")
        return StepResult(state, extra)

    if phase is Phase.waiting_promotion:
        if command is Command.promote:
            return _promote(state, now, "promotion approved by a person")
        if spec.promotion is Promotion.auto and obs.gate is True:
            return _promote(state, now, "the confirm-promotion webhook approved")
        return StepResult(state, extra)

    return StepResult(state, extra)  # pragma: no cover - every non-terminal phase is handled above


# --------------------------------------------------------------------------- a refused spec


def deadline_at(state: RolloutState, policy: ShadowPolicy) -> float | None:
    """When the progress deadline ends the rollout in flight (None: none in flight): ``rolloutStartedAt``
    plus the policy's ``progressDeadline``, the instant ``step`` rolls back at. The controller records it
    from every accepted spec, so that a later spec the model refuses cannot hide it (:func:`step_refused`)."""
    if state.phase is Phase.pending or state.phase.terminal or state.rollout_started_at is None:
        return None
    return state.rollout_started_at + policy.spec.progress_deadline.total_seconds()


REFUSED_SPEC_COMMANDS = frozenset({Command.rollback})
"""The commands carried out while the spec is refused; the others wait (unhandled) until it is fixed, since
what they would do (the next step, a promotion, a restart) is read from the spec."""


@dataclass(frozen=True)
class Refused:
    """The policy's spec as it stands now was refused by the model; what the controller recorded from the
    last spec it accepted (``status.acceptedSpec``, ``status.deadlineAt``) stands in for it."""

    why: str  # the model's where-and-what ("invalid spec: ...")
    recorded: bool  # a last accepted spec is recorded: the routes can be restored without the spec
    deadline_at: float | None = None  # the recorded progress deadline (epoch seconds); None: none recorded
    keep_candidate: bool = False  # the last accepted spec's rollback.keepCandidateTag


def step_refused(state: RolloutState, command: Command | None, now: float, refused: Refused) -> StepResult:
    """``step`` for a tick whose spec the model refused: hold, and undo only what must not stay forever.

    A typo must not kill a rollout at once, nor leave traffic half-moved for good. Pure, like ``step``;
    `command` is one of :data:`REFUSED_SPEC_COMMANDS` (the reconciler leaves the others waiting). Rows:

    ======================================  ===============================================================
    nothing accepted recorded               hold (nothing can be undone without a spec)
    Pending                                 hold; rollback: RolledBack (routes restored)
    Shadowing, Progressing,                 rollback: RollingBack; ``now >= deadline_at``: RollingBack,
    WaitingPromotion, Paused                the reason saying the spec was refused; else hold (no step up,
                                            no promotion, no pause or resume)
    RollingBack                             RolledBack (routes restored), as ``step``
    Promoting                               Succeeded: the routes already send the candidate 100% (the
                                            promotion was decided, recorded as an intent and written
                                            before the spec was refused); ``Promote`` is idempotent
    Succeeded                               hold; rollback: RollingBack, as ``step``
    RolledBack, Failed                      hold
    ======================================  ===============================================================

    A spec fixed before the deadline is a new generation: ``step`` then restarts the analysis from the
    first phase, as for any edit mid-rollout. The routes are restored through the target recorded with
    the routes (``status.rolloutTarget``) and the router the last accepted spec builds.
    """
    if not refused.recorded:
        return StepResult(state)
    if command is not None and (command not in REFUSED_SPEC_COMMANDS or refusal(command, state) is not None):
        command = None
    keep = refused.keep_candidate
    phase = state.phase
    if phase is Phase.pending:
        if command is Command.rollback:
            new, note = _move(state, Phase.rolled_back, now, "rolled back by a person before it started "
                              f"(the spec is refused: {refused.why})", warning=True)
            return StepResult(new, (Finalize(keep), note))
        return StepResult(state)
    if phase is Phase.rolling_back:
        new, note = _move(state, Phase.rolled_back, now, f"routes restored to the primary ({state.message})",
                          warning=True)
        return StepResult(new, (Finalize(keep), note))
    if phase is Phase.promoting:
        new, note = _move(state, Phase.succeeded, now, "candidate serves 100% of traffic (the promotion was "
                          f"decided before the spec was refused: {refused.why})")
        return StepResult(new, (Promote(), note))
    if command is Command.rollback:
        after = "after promotion " if phase is Phase.succeeded else ""
        return _roll_back(state, now, keep, f"rolled back by a person {after}while the spec is refused ({refused.why})")
    if phase.terminal:
        return StepResult(state)
    if refused.deadline_at is not None and now >= refused.deadline_at:
        return _roll_back(state, now, keep, f"the spec was refused ({refused.why}) and the progress deadline "
                          "recorded from the last accepted spec passed")
    return StepResult(state)
