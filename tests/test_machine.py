"""The pure rollout state machine, transition by transition, plus invariants over random runs."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowctl.judge import Outcome, Verdict
from shadowctl.machine import (
    ANALYSED,
    Finalize,
    Notify,
    Observed,
    Promote,
    Refusal,
    Refused,
    RolloutState,
    SetRoutes,
    deadline_at,
    refusal,
    step,
    step_refused,
)
from shadowctl.policy import ShadowPolicy, parse_policies
from shadowctl.policy.status import Command, Phase, PolicyStatus, RolloutRecord

BASE = """
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {name: chat, namespace: llm}
spec:
  target:
    istio:
      virtualService: chat
      primary: {host: chat, subset: v1}
      candidate: {host: chat, subset: v2}
  shadow: {mirrorPercent: 20, minDuration: 60s, maxDuration: 300s, minPairs: 10}
  canary: {steps: [10, 50], stepDuration: 60s, maxStepDuration: 200s}
  analysis:
    interval: 10s
    metrics:
      - {name: ttft, preset: vllm-ttft, statistic: p95, margin: 10%}
  progressDeadline: 1h
"""

CAND = Observed(candidate="v2", generation=1)
PASS = Verdict(Outcome.passed, (), "ttft p95 within 10%")
FAIL = Verdict(Outcome.failed, (), "ttft p95 +31%")
CONT = Verdict(Outcome.cont, (), "")
NODATA = Verdict(Outcome.nodata, (), "no samples")
INCONCLUSIVE = Verdict(Outcome.inconclusive, (), "too few samples at the deadline")


def policy(**spec_changes: Any) -> ShadowPolicy:
    doc = yaml.safe_load(BASE)
    for key, value in spec_changes.items():
        if value is None:
            doc["spec"].pop(key, None)
        elif isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key] = {**doc["spec"][key], **value}
        else:
            doc["spec"][key] = value
    return parse_policies(yaml.safe_dump(doc))[0]


P = policy()


def at(phase: Phase, *, t0: float = 1000.0, **kw: Any) -> RolloutState:
    defaults: dict[str, Any] = {"candidate": "v2", "generation": 1, "rollout_started_at": t0, "phase_started_at": t0}
    if phase is Phase.shadowing:
        defaults.update(weight=0, mirror_percent=20.0)
    if phase in (Phase.progressing, Phase.waiting_promotion):
        defaults.update(step=0, weight=10)
    defaults.update(kw)
    return RolloutState(phase=phase, **defaults)


def routes(actions: tuple[Any, ...]) -> list[Any]:
    return [a for a in actions if not isinstance(a, Notify)]


# (name, state, verdict, command, now, policy, observed, expected phase, expected route actions, expected weight)
CASES: list[tuple[str, RolloutState, Verdict | None, Command | None, float, ShadowPolicy, Observed, Phase, list[Any], int]] = [
    ("pending starts shadow", RolloutState(), None, None, 0, P, CAND, Phase.shadowing, [SetRoutes(0, 20.0)], 0),
    ("pending without candidate waits", RolloutState(), None, None, 0, P, Observed(None), Phase.pending, [], 0),
    ("pending without shadow starts canary", RolloutState(), None, None, 0, policy(shadow=None), CAND,
     Phase.progressing, [SetRoutes(10, None)], 10),
    ("pending rollback", RolloutState(), None, Command.rollback, 0, P, CAND, Phase.rolled_back, [Finalize()], 0),
    ("shadow pass too early holds", at(Phase.shadowing), PASS, None, 1030, P, CAND, Phase.shadowing, [], 0),
    ("shadow pass after min -> step 1", at(Phase.shadowing), PASS, None, 1060, P, CAND, Phase.progressing,
     [SetRoutes(10, None)], 10),
    ("shadow fail -> rollback", at(Phase.shadowing), FAIL, None, 1010, P, CAND, Phase.rolling_back, [Finalize()], 0),
    ("shadow continue holds", at(Phase.shadowing), CONT, None, 1200, P, CAND, Phase.shadowing, [], 0),
    ("shadow nodata holds", at(Phase.shadowing), NODATA, None, 1200, P, CAND, Phase.shadowing, [], 0),
    ("shadow nodata at max -> rollback", at(Phase.shadowing), NODATA, None, 1300, P, CAND, Phase.rolling_back,
     [Finalize()], 0),
    ("shadow inconclusive -> rollback", at(Phase.shadowing), INCONCLUSIVE, None, 1300, P, CAND, Phase.rolling_back,
     [Finalize()], 0),
    ("shadow inconclusive hold -> paused", at(Phase.shadowing), INCONCLUSIVE, None, 1300,
     policy(onInconclusive="hold"), CAND, Phase.paused, [], 0),
    ("shadow-only pass -> succeeded, mirror removed", at(Phase.shadowing), PASS, None, 1060, policy(canary=None), CAND,
     Phase.succeeded, [Finalize()], 0),
    ("step pass too early holds", at(Phase.progressing), PASS, None, 1059, P, CAND, Phase.progressing, [], 10),
    ("step 1 pass -> step 2", at(Phase.progressing), PASS, None, 1060, P, CAND, Phase.progressing,
     [SetRoutes(50, None)], 50),
    ("last step pass -> promoting", at(Phase.progressing, step=1, weight=50), PASS, None, 1060, P, CAND,
     Phase.promoting, [Promote()], 100),
    ("last step pass, manual -> waiting", at(Phase.progressing, step=1, weight=50), PASS, None, 1060,
     policy(promotion="manual"), CAND, Phase.waiting_promotion, [], 50),
    ("step fail -> rollback", at(Phase.progressing, step=1, weight=50), FAIL, None, 1001, P, CAND,
     Phase.rolling_back, [Finalize()], 0),
    ("step nodata past limit -> rollback", at(Phase.progressing), NODATA, None, 1200, P, CAND, Phase.rolling_back,
     [Finalize()], 0),
    ("waiting + promote -> promoting", at(Phase.waiting_promotion, step=1, weight=50), CONT, Command.promote, 2000,
     policy(promotion="manual"), CAND, Phase.promoting, [Promote()], 100),
    ("waiting without promote holds", at(Phase.waiting_promotion, step=1, weight=50), PASS, None, 2000,
     policy(promotion="manual"), CAND, Phase.waiting_promotion, [], 50),
    ("waiting fails on analysis", at(Phase.waiting_promotion, step=1, weight=50), FAIL, None, 2000,
     policy(promotion="manual"), CAND, Phase.rolling_back, [Finalize()], 0),
    ("promoting -> succeeded", at(Phase.promoting, weight=100), None, None, 2000, P, CAND, Phase.succeeded,
     [Promote()], 100),
    ("rolling back -> rolled back", at(Phase.rolling_back), None, None, 2000, P, CAND, Phase.rolled_back,
     [Finalize()], 0),
    ("rollback keeps tag when asked", at(Phase.shadowing), FAIL, None, 1010, policy(rollback={"keepCandidateTag": True}),
     CAND, Phase.rolling_back, [Finalize(keep_candidate=True)], 0),
    ("promote --full from shadow", at(Phase.shadowing), CONT, Command.promote_full, 1010, P, CAND, Phase.promoting,
     [Promote()], 100),
    ("promote (no --full) in shadow is ignored", at(Phase.shadowing), CONT, Command.promote, 1010, P, CAND,
     Phase.shadowing, [], 0),
    ("pause in canary", at(Phase.progressing), PASS, Command.pause, 1100, P, CAND, Phase.paused, [], 10),
    ("paused ignores analysis", at(Phase.paused, paused_from=Phase.progressing, paused_step=0, weight=10), FAIL, None,
     1100, P, CAND, Phase.paused, [], 10),
    ("resume restores phase and routes", at(Phase.paused, paused_from=Phase.progressing, paused_step=0, weight=10),
     None, Command.resume, 1100, P, CAND, Phase.progressing, [SetRoutes(10, None)], 10),
    ("paused past deadline -> rollback", at(Phase.paused, paused_from=Phase.shadowing), None, None, 1000 + 3600, P,
     CAND, Phase.rolling_back, [Finalize()], 0),
    ("deadline -> rollback", at(Phase.progressing, phase_started_at=4000), CONT, None, 1000 + 3600, P, CAND,
     Phase.rolling_back, [Finalize()], 0),
    ("new candidate mid-canary restarts", at(Phase.progressing, step=1, weight=50), PASS, None, 1100, P,
     Observed("v3", 1), Phase.shadowing, [Finalize(), SetRoutes(0, 20.0)], 0),
    ("policy edit mid-canary restarts", at(Phase.progressing, step=1, weight=50), PASS, None, 1100, P,
     Observed("v2", 2), Phase.shadowing, [Finalize(), SetRoutes(0, 20.0)], 0),
    ("candidate gone -> failed, routes restored", at(Phase.progressing), PASS, None, 1100, P, Observed(None),
     Phase.failed, [Finalize()], 0),
    # A changed candidate comes before every command but rollback, Paused included (bench/faults r-00201: a
    # resume wrote the paused step for the new candidate).
    ("paused, new candidate: restarts at once", at(Phase.paused, paused_from=Phase.progressing, paused_step=1,
     step=1, weight=50), None, None, 1100, P, Observed("v3", 2), Phase.shadowing, [Finalize(), SetRoutes(0, 20.0)], 0),
    ("paused + resume, new candidate: restarts", at(Phase.paused, paused_from=Phase.progressing, paused_step=1,
     step=1, weight=50), None, Command.resume, 1100, P, Observed("v3", 2), Phase.shadowing,
     [Finalize(), SetRoutes(0, 20.0)], 0),
    ("paused + resume, spec edited: restarts", at(Phase.paused, paused_from=Phase.progressing, paused_step=1,
     step=1, weight=50), None, Command.resume, 1100, P, Observed("v2", 2), Phase.shadowing,
     [Finalize(), SetRoutes(0, 20.0)], 0),
    ("paused, spec edited, no command: holds", at(Phase.paused, paused_from=Phase.progressing, paused_step=1,
     step=1, weight=50), None, None, 1100, P, Observed("v2", 2), Phase.paused, [], 50),
    ("paused waiting + promote, new candidate: restarts", at(Phase.paused, paused_from=Phase.waiting_promotion,
     paused_step=1, step=1, weight=50), None, Command.promote, 1100, P, Observed("v3", 2), Phase.shadowing,
     [Finalize(), SetRoutes(0, 20.0)], 0),
    ("paused, candidate gone -> failed", at(Phase.paused, paused_from=Phase.progressing, paused_step=0, step=0,
     weight=10), None, None, 1100, P, Observed(None), Phase.failed, [Finalize()], 0),
    ("pause + new candidate: restarted, then paused", at(Phase.progressing, step=1, weight=50), PASS, Command.pause,
     1100, P, Observed("v3", 2), Phase.paused, [Finalize(), SetRoutes(0, 20.0)], 0),
    ("promote --full + new candidate: restarts", at(Phase.progressing, step=1, weight=50), PASS,
     Command.promote_full, 1100, P, Observed("v3", 2), Phase.shadowing, [Finalize(), SetRoutes(0, 20.0)], 0),
    ("promoting, new candidate: finished without a Promote for it", at(Phase.promoting, weight=100), None, None,
     1100, P, Observed("v3", 2), Phase.succeeded, [], 100),
    ("new candidate past the deadline restarts", at(Phase.progressing, step=1, weight=50), CONT, None, 1000 + 3600,
     P, Observed("v3", 2), Phase.shadowing, [Finalize(), SetRoutes(0, 20.0)], 0),
    ("drift reasserted", at(Phase.progressing), CONT, None, 1010, P, Observed("v2", 1, drift=True),
     Phase.progressing, [SetRoutes(10, None)], 10),
    ("drift pauses when asked", at(Phase.progressing), CONT, None, 1010, policy(onDrift="pause"),
     Observed("v2", 1, drift=True), Phase.paused, [], 10),
    ("rolled back + retry restarts", at(Phase.rolled_back), None, Command.retry, 5000, P, CAND, Phase.shadowing,
     [SetRoutes(0, 20.0)], 0),
    ("rolled back stays", at(Phase.rolled_back), PASS, None, 5000, P, CAND, Phase.rolled_back, [], 0),
    ("succeeded, manual, same candidate: no restart", at(Phase.succeeded, weight=100), None, None, 5000, P,
     Observed("v2", 2), Phase.succeeded, [], 100),
    ("succeeded, auto, new candidate starts", at(Phase.succeeded, weight=100), None, None, 5000,
     policy(trigger="auto"), Observed("v3", 1), Phase.shadowing, [SetRoutes(0, 20.0)], 0),
    ("succeeded, manual, edit names new candidate", at(Phase.succeeded, weight=100), None, None, 5000, P,
     Observed("v3", 2), Phase.shadowing, [SetRoutes(0, 20.0)], 0),
    ("succeeded + rollback", at(Phase.succeeded, weight=100), None, Command.rollback, 5000, P, CAND,
     Phase.rolling_back, [Finalize()], 0),
]


@pytest.mark.parametrize(
    ("name", "state", "verdict", "command", "now", "pol", "observed", "phase", "actions", "weight"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_transition(
    name: str, state: RolloutState, verdict: Verdict | None, command: Command | None, now: float, pol: ShadowPolicy,
    observed: Observed, phase: Phase, actions: list[Any], weight: int,
) -> None:
    out = step(state, verdict, command, now, pol, observed)
    assert out.state.phase is phase
    assert routes(out.actions) == actions
    assert out.state.weight == weight
    if out.state.phase is not state.phase:
        assert out.state.history[-1].to == phase.value
        assert out.state.phase_started_at == now
        assert any(isinstance(a, Notify) for a in out.actions)


def test_waiting_for_gate_webhook() -> None:
    pol = policy(notifications={"webhooks": [{"name": "qa", "url": "http://gate/ok", "type": "confirm-promotion"}]})
    out = step(at(Phase.progressing, step=1, weight=50), PASS, None, 1060, pol, CAND)
    assert out.state.phase is Phase.waiting_promotion
    closed = step(out.state, PASS, None, 1100, pol, replace(CAND, gate=False))
    assert closed.state.phase is Phase.waiting_promotion
    unknown = step(out.state, PASS, None, 1100, pol, CAND)
    assert unknown.state.phase is Phase.waiting_promotion
    opened = step(out.state, PASS, None, 1100, pol, replace(CAND, gate=True))
    assert opened.state.phase is Phase.promoting


def test_inconclusive_never_promotes_from_any_phase() -> None:
    for state in (at(Phase.shadowing), at(Phase.progressing, step=1, weight=50)):
        for pol in (P, policy(onInconclusive="hold")):
            out = step(state, INCONCLUSIVE, None, 5000 - 3000, pol, CAND)
            assert out.state.phase in (Phase.rolling_back, Phase.paused)
            assert not any(isinstance(a, Promote) for a in out.actions)


def test_status_round_trip() -> None:
    out = step(at(Phase.shadowing), PASS, None, 1060, P, CAND)
    stored = PolicyStatus.read(json.loads(json.dumps({"rollout": out.state.to_record().to_json()})))
    assert RolloutState.from_record(stored.rollout) == out.state
    assert RolloutState.from_record(None) == RolloutState()
    assert PolicyStatus.read({"rollout": {"phase": "Bogus"}}).rollout is None  # unreadable: a fresh rollout
    assert PolicyStatus.read({"rollout": {"canaryWeight": 5}}).rollout is None


STATES = [at(p) for p in Phase if p is not Phase.paused] + [
    at(Phase.paused, paused_from=p, paused_step=None if p is Phase.shadowing else 0,
       step=None if p is Phase.shadowing else 0, weight=0 if p is Phase.shadowing else 10)
    for p in ANALYSED
]


@pytest.mark.parametrize("command", list(Command))
@pytest.mark.parametrize("state", STATES, ids=[f"{s.phase.value}{s.paused_from or ''}" for s in STATES])
def test_refusal_is_exactly_what_step_ignores(state: RolloutState, command: Command) -> None:
    """`refusal()` is the one statement of which commands a phase accepts: step does with a refused
    command what it does with none (a refused promote only adds its PromoteIgnored event), and an
    accepted one changes what step does."""
    why = refusal(command, state)
    for verdict in (PASS, CONT, FAIL, None):
        with_command = step(state, verdict, command, 1100, P, CAND)
        without = step(state, verdict, None, 1100, P, CAND)
        if why is None:
            if verdict is CONT:
                assert with_command != without
            continue
        assert with_command.state == without.state
        told = [a for a in with_command.actions if isinstance(a, Notify) and a.reason == "PromoteIgnored"]
        assert [a for a in with_command.actions if a not in told] == list(without.actions)
        assert not told or (why is Refusal.nothing_to_approve and state.phase in ANALYSED)


def test_refusals_a_person_is_told() -> None:
    assert refusal(Command.promote, at(Phase.progressing)) is Refusal.nothing_to_approve
    assert refusal(Command.promote, at(Phase.waiting_promotion)) is None
    assert refusal(Command.promote, at(Phase.paused, paused_from=Phase.waiting_promotion)) is None
    assert refusal(Command.promote, at(Phase.paused, paused_from=Phase.progressing)) is Refusal.nothing_to_approve
    assert refusal(Command.promote_full, at(Phase.succeeded)) is Refusal.already_promoted
    assert refusal(Command.promote_full, at(Phase.rolled_back)) is None
    assert refusal(Command.rollback, at(Phase.failed)) is Refusal.nothing_to_roll_back
    assert refusal(Command.rollback, at(Phase.succeeded)) is None
    assert refusal(Command.pause, at(Phase.paused)) is Refusal.already_paused
    assert refusal(Command.pause, at(Phase.succeeded)) is Refusal.not_in_analysis
    assert refusal(Command.resume, at(Phase.progressing)) is Refusal.not_paused
    assert refusal(Command.retry, at(Phase.shadowing)) is Refusal.still_running
    assert refusal(Command.retry, at(Phase.paused)) is None
    assert str(Refusal.not_in_analysis) == (
        "only a rollout in analysis (Shadowing, Progressing, WaitingPromotion) can be paused")
    assert "(Succeeded, RolledBack, Failed or Paused)" in str(Refusal.still_running)


_events = st.tuples(
    st.sampled_from([PASS, FAIL, CONT, NODATA, INCONCLUSIVE, None]),
    st.sampled_from([None, None, None, None, *Command]),
    st.floats(min_value=0, max_value=400),
    st.sampled_from([CAND, CAND, CAND, Observed("v3", 1), Observed("v2", 1, drift=True), Observed("v3", 2)]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_events, min_size=1, max_size=40), st.sampled_from([P, policy(onInconclusive="hold"),
                                                                     policy(promotion="manual")]))
def test_invariants_over_random_runs(events: list[Any], pol: ShadowPolicy) -> None:
    """Invariant 2: live traffic never exceeds the step reached, and is 0 before the shadow phase passed."""
    assert pol.spec.canary is not None
    state = RolloutState()
    now = 0.0
    shadow_passed_for: str | None = None
    for verdict, command, dt, observed in events:
        now += dt
        before = state
        out = step(state, verdict, command, now, pol, observed)
        state = out.state
        assert RolloutState.from_record(RolloutRecord.model_validate(state.to_record().to_json())) == state
        if before.phase is Phase.shadowing and state.phase is Phase.progressing:
            shadow_passed_for = state.candidate
        for action in out.actions:
            if isinstance(action, SetRoutes):
                assert 0 <= action.weight <= 100
                if action.weight > 0:
                    # Live traffic only at a step the policy reached, and only after the shadow phase passed.
                    assert state.phase in (Phase.progressing, Phase.paused, Phase.waiting_promotion)
                    assert action.weight == pol.spec.canary.steps[state.step or 0]
                    assert shadow_passed_for == state.candidate
                    # ... for the candidate the routes are written for (the router is built from what is observed
                    # now): never a step reached by another one (bench/faults r-00201).
                    assert observed.candidate == state.candidate
                if state.phase is Phase.shadowing:
                    assert action.weight == 0
            if isinstance(action, Promote):
                assert state.phase in (Phase.promoting, Phase.succeeded)
                assert command is Command.promote_full or before.phase in (
                    Phase.progressing, Phase.waiting_promotion, Phase.promoting, Phase.paused)
                assert observed.candidate == state.candidate
        if state.phase is Phase.shadowing:
            assert state.weight == 0
        if state.phase is Phase.rolled_back:
            assert state.weight == 0
            assert state.mirror_percent is None


# --------------------------------------------------------------------------- a refused spec

DEADLINE = 1000.0 + 3600.0  # at(...)'s rolloutStartedAt + P's progressDeadline
WHY = "invalid spec: spec: progressDeadline (0:00:30) is shorter than the phases need at least (0:03:00)"
KEPT = Refused(WHY, recorded=True, deadline_at=DEADLINE)

# (name, state, command, now, refused, expected phase, expected route actions)
REFUSED_ROWS: list[tuple[str, RolloutState, Command | None, float, Refused, Phase, list[Any]]] = [
    ("shadowing holds with the mirror", at(Phase.shadowing), None, DEADLINE - 1, KEPT, Phase.shadowing, []),
    ("shadowing rolled back at the deadline", at(Phase.shadowing), None, DEADLINE, KEPT, Phase.rolling_back,
     [Finalize()]),
    ("canary at 50% holds: no step up", at(Phase.progressing, step=1, weight=50), None, DEADLINE - 1, KEPT,
     Phase.progressing, []),
    ("canary at 50% rolled back at the deadline", at(Phase.progressing, step=1, weight=50), None, DEADLINE, KEPT,
     Phase.rolling_back, [Finalize()]),
    ("waiting promotion: promote waits for a valid spec", at(Phase.waiting_promotion, step=1, weight=50),
     Command.promote, DEADLINE - 1, KEPT, Phase.waiting_promotion, []),
    ("paused rolled back at the deadline", at(Phase.paused, paused_from=Phase.shadowing), None, DEADLINE, KEPT,
     Phase.rolling_back, [Finalize()]),
    ("resume waits for a valid spec", at(Phase.paused, paused_from=Phase.shadowing), Command.resume, DEADLINE - 1,
     KEPT, Phase.paused, []),
    ("rollback by a person", at(Phase.shadowing), Command.rollback, DEADLINE - 1, KEPT, Phase.rolling_back,
     [Finalize()]),
    ("keeps the candidate's tag as the accepted spec said", at(Phase.shadowing), None, DEADLINE,
     replace(KEPT, keep_candidate=True), Phase.rolling_back, [Finalize(keep_candidate=True)]),
    ("rolling back finishes", at(Phase.rolling_back), None, DEADLINE - 1, KEPT, Phase.rolled_back, [Finalize()]),
    ("promoting finishes: the routes already hold it", at(Phase.promoting, weight=100), None, DEADLINE - 1, KEPT,
     Phase.succeeded, [Promote()]),
    ("succeeded holds", at(Phase.succeeded, weight=100), None, DEADLINE + 1, KEPT, Phase.succeeded, []),
    ("succeeded: rollback by a person", at(Phase.succeeded, weight=100), Command.rollback, DEADLINE + 1, KEPT,
     Phase.rolling_back, [Finalize()]),
    ("rolled back: a rollback is refused", at(Phase.rolled_back), Command.rollback, DEADLINE + 1, KEPT,
     Phase.rolled_back, []),
    ("pending holds", RolloutState(), None, DEADLINE + 1, KEPT, Phase.pending, []),
    ("pending: rollback by a person", RolloutState(), Command.rollback, 0, KEPT, Phase.rolled_back, [Finalize()]),
    ("no deadline recorded: holds", at(Phase.shadowing), None, DEADLINE + 1, replace(KEPT, deadline_at=None),
     Phase.shadowing, []),
    ("nothing accepted recorded: holds, even a rollback", at(Phase.shadowing), Command.rollback, DEADLINE + 1,
     Refused(WHY, recorded=False), Phase.shadowing, []),
]


@pytest.mark.parametrize(("name", "state", "command", "now", "refused", "phase", "actions"), REFUSED_ROWS,
                         ids=[row[0] for row in REFUSED_ROWS])
def test_step_refused_rows(name: str, state: RolloutState, command: Command | None, now: float, refused: Refused,
                           phase: Phase, actions: list[Any]) -> None:
    out = step_refused(state, command, now, refused)
    assert out.state.phase is phase
    assert routes(out.actions) == actions
    if phase is state.phase:
        assert out.state == state and not out.actions  # a hold writes nothing new
    if phase is Phase.rolling_back and command is None:
        assert "spec was refused" in out.state.message and WHY in out.state.message
    assert not any(isinstance(a, SetRoutes) for a in out.actions)  # never a step up


def test_deadline_at_is_step_s_deadline() -> None:
    """The recorded deadline is the instant ``step`` itself rolls back at, under the accepted spec."""
    state = at(Phase.paused, paused_from=Phase.shadowing)  # paused: only the deadline moves it
    deadline = deadline_at(state, P)
    assert deadline == DEADLINE
    assert step(state, CONT, None, deadline - 0.001, P, CAND).state.phase is Phase.paused
    assert step(state, CONT, None, deadline, P, CAND).state.phase is Phase.rolling_back
    assert deadline_at(RolloutState(), P) is None and deadline_at(at(Phase.rolled_back), P) is None
