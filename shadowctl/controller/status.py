"""What the controller writes to a ShadowPolicy's `.status`, and reads back from it.

`.status` is the controller's memory: the rollout state (phase, step, weights,
mirror, when the phase started, the transition history), the evidence behind
the last verdict, the output agreement tally and the paired latencies of the
shadow phase (what an MQTT stream cannot give again), the last command carried out,
and Kubernetes-style conditions: one :class:`~shadowctl.policy.status.PolicyStatus`, the model
every reader uses too, so `kubectl get -o yaml` and `shadowctl describe` show the same numbers
the controller used.

What a refused spec leaves to act on (``deadlineAt``, ``acceptedGeneration``, ``acceptedSpec``). A spec
edited mid-rollout into one the model refuses cannot say when the rollout must end nor how to undo it,
so every status written from an accepted spec records both: the absolute progress deadline
(``rolloutStartedAt`` + that spec's ``progressDeadline``, :func:`shadowctl.machine.deadline_at`) and the
spec itself, as written. Why the whole spec and not only ``spec.target`` (the routes' target is already
``rolloutTarget``): the router is built from more than the target. ``shadow.mode: tap`` composes the
target's router with the tap router, whose route channel is ``analysis.outputs.mqtt`` (broker and
credentials) and whose settings carry the shadow budget and the sampling fraction; a Knative target mirrors
through ``shadow.virtualService``; the rollback keeps the candidate's tag by ``rollback.keepCandidateTag``.
A record of only those fields would be a second, partial policy model to keep in step with the real one;
the spec as written is read back with the same model (:func:`accepted_policy`), so whatever the router
needs is there. Its cost: the spec is stored twice (a few KiB per policy), and written to `.status` only
when a new generation is accepted (the merge patch leaves an unchanged ``acceptedSpec`` out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from shadowctl.compare.comparators import AgreementTally
from shadowctl.controller.clock import iso
from shadowctl.judge.model import Paired
from shadowctl.machine import RolloutState, deadline_at
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.status import (
    CommandRecord,
    Condition,
    Evidence,
    PairedLatencyRecord,
    PendingRoute,
    Phase,
    PolicyStatus,
    RouteRecord,
    merge_patch,
)
from shadowctl.routers.base import RouteState

_PARSED: dict[tuple[str, str, str, int], ShadowPolicy] = {}
_PARSED_LIMIT = 10_000


def parse_policy(obj: dict[str, Any]) -> ShadowPolicy:
    """The policy model of a ShadowPolicy object from the API (raises pydantic's ValidationError).

    Cached by (namespace, name, uid, generation): the API server bumps the generation on every spec
    change, and the model is frozen, so a tick does not validate an unchanged spec again.
    """
    found = obj.get("metadata")
    meta: dict[str, Any] = found if isinstance(found, dict) else {}  # another shape: the model says what is missing
    raw = meta.get("generation")
    generation = raw if isinstance(raw, int) and not isinstance(raw, bool) else 0
    key = (str(meta.get("namespace")), str(meta.get("name")), str(meta.get("uid")), generation)
    if generation and meta.get("uid") and key in _PARSED:
        return _PARSED[key]
    policy = ShadowPolicy.model_validate(
        {k: obj.get(k) for k in ("apiVersion", "kind", "spec")}
        | {"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace", "default")}}
    )
    if generation and meta.get("uid"):
        if len(_PARSED) >= _PARSED_LIMIT:
            _PARSED.clear()
        _PARSED[key] = policy
    return policy


@dataclass(frozen=True)
class Accepted:
    """A spec the model accepted: its generation, the spec as written, and the policy it reads as."""

    generation: int
    spec: dict[str, Any]
    policy: ShadowPolicy


def accepted_of(obj: dict[str, Any]) -> Accepted | None:
    """The object's spec when the model accepts it (None: refused, or no generation to name it by)."""
    meta = obj.get("metadata")
    generation = meta.get("generation") if isinstance(meta, dict) else None
    spec = obj.get("spec")
    if not isinstance(generation, int) or isinstance(generation, bool) or not isinstance(spec, dict):
        return None
    try:
        policy = parse_policy(obj)
    except ValidationError:
        return None
    return Accepted(generation, spec, policy)


def accepted_policy(obj: dict[str, Any], status: PolicyStatus) -> ShadowPolicy | None:
    """The policy the last accepted spec (``status.acceptedSpec``) reads as, under the object's name; None
    when none is recorded or it no longer reads (a controller whose model refuses what an older one took)."""
    if status.accepted_spec is None:
        return None
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    namespace = meta.get("namespace", "default") if isinstance(meta, dict) else "default"
    try:
        return ShadowPolicy.model_validate({"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                                           "metadata": {"name": name, "namespace": namespace},
                                           "spec": status.accepted_spec})
    except ValidationError:
        return None


def deadline_text(at: float) -> str:
    """``deadlineAt`` as written: RFC 3339, rounded up to the second (never before the deadline itself)."""
    return iso(math.ceil(at))


def recorded_deadline(status: PolicyStatus) -> float | None:
    """``status.deadlineAt`` in epoch seconds (None: none recorded, or unreadable)."""
    if status.deadline_at is None:
        return None
    try:
        return datetime.fromisoformat(status.deadline_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def refused_error(error: str, state: RolloutState, status: PolicyStatus) -> str:
    """The Ready condition's message for a refused spec: the model's where-and-what first (``invalid spec:
    ...``), then what the controller does meanwhile with the rollout in flight."""
    if state.phase is Phase.pending or state.phase.terminal:
        return error
    if state.phase is Phase.rolling_back:
        return f"{error}; the rollout is being rolled back with the last accepted spec"
    if status.accepted_spec is None:
        return (f"{error}; no accepted spec is recorded to undo the rollout with, so it holds as it is until "
                "the spec is fixed")
    if status.deadline_at is None:
        return f"{error}; the rollout holds until the spec is fixed (no deadline recorded)"
    return (f"{error}; the rollout holds and is rolled back at {status.deadline_at} (the progress deadline of "
            f"generation {status.accepted_generation}, the last accepted spec) unless the spec is fixed first; "
            "only `shadowctl rollback` is carried out meanwhile")


def intended_routes(intent: PendingRoute) -> RouteState:
    """The routes a recorded intent is to set."""
    return RouteState(intent.primary_weight, intent.candidate_weight, intent.mirror_percent)


def read_state(obj: dict[str, Any]) -> RolloutState:
    return RolloutState.from_record(PolicyStatus.of(obj).rollout)


def read_tally(status: PolicyStatus, state: RolloutState) -> AgreementTally | None:
    """The stored output tally, if it belongs to the current phase."""
    outputs = status.outputs
    if outputs is None or outputs.phase_started_at != state.phase_started_at:
        return None
    return AgreementTally.from_record(outputs)


def read_latency(status: PolicyStatus, state: RolloutState) -> dict[str, Paired] | None:
    """The stored paired latencies per quantity, if they belong to the current phase (a quantity whose
    record cannot be used is left out: its test starts afresh, which is valid on its own)."""
    record = status.paired_latency
    if record is None or record.phase_started_at != state.phase_started_at or state.phase_started_at is None:
        return None
    out = {q: p for q, counts in record.quantities().items() if (p := Paired.from_record(counts)) is not None}
    return out or None


def _condition(kind: str, ok: bool, reason: str, message: str, now: float, old: PolicyStatus) -> Condition:
    status: Literal["True", "False"] = "True" if ok else "False"
    previous = old.condition(kind)
    since = previous.last_transition_time if previous and previous.status == status else iso(now)
    return Condition(type=kind, status=status, reason=reason, message=message[:1000], last_transition_time=since)


def conditions(state: RolloutState, old: PolicyStatus, now: float, error: str | None) -> list[Condition]:
    phase = state.phase
    reason = phase.value
    ready = error is None
    return [
        _condition("Ready", ready, "Reconciled" if ready else "ReconcileError", error or "the controller can act",
                   now, old),
        _condition("Progressing", not phase.terminal and phase is not Phase.paused, reason, state.message, now, old),
        _condition("Promoted", phase is Phase.succeeded and state.weight == 100, reason, state.message, now, old),
    ]


def build_status(
    old: PolicyStatus,
    state: RolloutState,
    *,
    now: float,
    generation: int,
    evidence: Evidence | None,
    routes: RouteState | None,
    tally: AgreementTally | None,
    command: CommandRecord | None,
    error: str | None,
    source_errors: tuple[str, ...] = (),
    target: dict[str, Any] | None = None,
    paired: PairedLatencyRecord | None = None,
    since: float | None = None,
    intent: PendingRoute | None = None,
    settled: bool = False,
    accepted: Accepted | None = None,
) -> PolicyStatus:
    """The whole new `.status`. What this tick did not observe (no look, routes unread, no command,
    no target) keeps its old value: the last verdict, the routes, the tally, the paired latencies
    and the last command stay readable until a later tick has new ones. ``since``: when the phase
    the look judged started, the tally's tag (default the state's: a tick that moves to a new phase
    must not hand the old phase's counts to the new one). ``intent``: a raise of the candidate's share, or a
    policy's first start, about to be written (``pendingRoute``); ``settled``: the outstanding one is done with (applied and
    recorded, adopted, or dropped); neither: it stays as it was. ``accepted``: the spec this tick read, when the model accepted
    it: recorded with the deadline it sets (None: refused; the last accepted one and its deadline stay,
    the deadline only while a rollout is in flight)."""
    tag = since if since is not None else state.phase_started_at
    in_flight = state.phase is not Phase.pending and not state.phase.terminal
    if accepted is not None:
        # With an intent, the rollout it leads to may be in flight before the next write records it (a start):
        # the earlier of the two deadlines, so that a later refused spec never finds none, nor a late one.
        ats = [a for a in (deadline_at(state, accepted.policy), deadline_at(
            RolloutState.from_record(intent.rollout), accepted.policy) if intent is not None else None)
            if a is not None]
        deadline = deadline_text(min(ats)) if ats else None
    else:
        deadline = old.deadline_at if in_flight else None
    return PolicyStatus(
        observed_generation=generation,
        phase=state.phase,
        canary_weight=state.weight,
        mirror_percent=state.mirror_percent,
        step=None if state.step is None else state.step + 1,
        message=state.message,
        rollout=state.to_record(),
        last_tick=iso(now),
        conditions=conditions(state, old, now, error),
        source_errors=list(source_errors) or None,
        last_verdict=evidence.model_copy(update={"at": iso(now)}) if evidence is not None else old.last_verdict,
        routes=(RouteRecord(primary_weight=routes.primary_weight, candidate_weight=routes.candidate_weight,
                            mirror_percent=routes.mirror_percent) if routes is not None else old.routes),
        outputs=tally.to_record(tag) if tally is not None else old.outputs,
        paired_latency=paired if paired is not None else old.paired_latency,
        last_command=command if command is not None else old.last_command,
        rollout_target=target if target is not None else old.rollout_target,
        pending_route=intent if intent is not None else None if settled else old.pending_route,
        deadline_at=deadline,
        accepted_generation=accepted.generation if accepted is not None else old.accepted_generation,
        accepted_spec=accepted.spec if accepted is not None else old.accepted_spec,
    )


def status_patch(stored: Any, new: PolicyStatus) -> dict[str, Any]:
    """The merge patch from the stored `.status` (as the API returned it) to ``new``: the keys
    ``new`` leaves out are deleted, so nothing another version wrote lingers beside it."""
    patch: dict[str, Any] = merge_patch(stored if isinstance(stored, dict) else {}, new.to_json())
    return patch
