"""What the controller writes to a ShadowPolicy's `.status`, and reads back from it.

`.status` is the controller's memory: the rollout state (phase, step, weights,
mirror, when the phase started, the transition history), the evidence behind
the last verdict, the output agreement tally and the paired latencies of the
shadow phase (what an MQTT stream cannot give again), the last command carried out,
and Kubernetes-style conditions: one :class:`~shadowctl.policy.status.PolicyStatus`, the model
every reader uses too, so `kubectl get -o yaml` and `shadowctl describe` show the same numbers
the controller used.
"""

from __future__ import annotations

from typing import Any, Literal

from shadowctl.compare.comparators import AgreementTally
from shadowctl.controller.clock import iso
from shadowctl.judge.model import Paired
from shadowctl.machine import RolloutState
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
) -> PolicyStatus:
    """The whole new `.status`. What this tick did not observe (no look, routes unread, no command,
    no target) keeps its old value: the last verdict, the routes, the tally, the paired latencies
    and the last command stay readable until a later tick has new ones. ``since``: when the phase
    the look judged started, the tally's tag (default the state's: a tick that moves to a new phase
    must not hand the old phase's counts to the new one). ``intent``: a raise of the candidate's share
    about to be written (``pendingRoute``); ``settled``: the outstanding one is done with (applied and
    recorded, adopted, or dropped); neither: it stays as it was."""
    tag = since if since is not None else state.phase_started_at
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
    )


def status_patch(stored: Any, new: PolicyStatus) -> dict[str, Any]:
    """The merge patch from the stored `.status` (as the API returned it) to ``new``: the keys
    ``new`` leaves out are deleted, so nothing another version wrote lingers beside it."""
    patch: dict[str, Any] = merge_patch(stored if isinstance(stored, dict) else {}, new.to_json())
    return patch
