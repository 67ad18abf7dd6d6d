"""What the controller writes to a ShadowPolicy's `.status`, and reads back from it.

`.status` is the controller's memory: the rollout state (phase, step, weights,
mirror, when the phase started, the transition history), the evidence behind
the last verdict, the output agreement tally, the last command carried out,
and Kubernetes-style conditions. Everything here is plain JSON, so `kubectl
get -o yaml` and `shadowctl describe` show the same numbers the controller used.
"""

from __future__ import annotations

from typing import Any

from shadowctl.compare.comparators import AgreementTally
from shadowctl.controller.clock import iso
from shadowctl.machine import Phase, RolloutState
from shadowctl.policy.model import ShadowPolicy

_PARSED: dict[tuple[str, str, str, int], ShadowPolicy] = {}
_PARSED_LIMIT = 10_000


def parse_policy(obj: dict[str, Any]) -> ShadowPolicy:
    """The policy model of a ShadowPolicy object from the API (raises pydantic's ValidationError).

    Cached by (namespace, name, uid, generation): the API server bumps the generation on every spec
    change, and the model is frozen, so a tick does not validate an unchanged spec again.
    """
    meta = obj.get("metadata") or {}
    generation = meta.get("generation")
    key = (str(meta.get("namespace")), str(meta.get("name")), str(meta.get("uid")), int(generation or 0))
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


def read_state(obj: dict[str, Any]) -> RolloutState:
    return RolloutState.from_dict((obj.get("status") or {}).get("rollout"))


def read_tally(obj: dict[str, Any], state: RolloutState) -> AgreementTally | None:
    """The stored output tally, if it belongs to the current phase."""
    data = (obj.get("status") or {}).get("outputs")
    if not data or data.get("phaseStartedAt") != state.phase_started_at:
        return None
    try:
        return AgreementTally.from_dict(data)
    except (KeyError, TypeError, ValueError):
        return None


def _condition(kind: str, ok: bool, reason: str, message: str, now: float, old: list[dict[str, Any]]) -> dict[str, Any]:
    status = "True" if ok else "False"
    previous = next((c for c in old if c.get("type") == kind), None)
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == status else iso(now)
    return {"type": kind, "status": status, "reason": reason, "message": message[:1000],
            "lastTransitionTime": since}


def conditions(state: RolloutState, old: list[dict[str, Any]], now: float, error: str | None) -> list[dict[str, Any]]:
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
    obj: dict[str, Any],
    state: RolloutState,
    *,
    now: float,
    generation: int,
    evidence: dict[str, Any] | None,
    routes: dict[str, Any] | None,
    tally: AgreementTally | None,
    command: dict[str, Any] | None,
    error: str | None,
    source_errors: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The whole new `.status` (written as a merge patch; lists and the rollout block are replaced whole)."""
    old = obj.get("status") or {}
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": state.phase.value,
        "canaryWeight": state.weight,
        "mirrorPercent": state.mirror_percent,
        "step": None if state.step is None else state.step + 1,
        "message": state.message,
        "rollout": state.to_dict(),
        "lastTick": iso(now),
        "conditions": conditions(state, old.get("conditions") or [], now, error),
        "sourceErrors": list(source_errors) or None,
    }
    if evidence is not None:
        status["lastVerdict"] = {**evidence, "at": iso(now)}
    if routes is not None:
        status["routes"] = routes
    if tally is not None:
        status["outputs"] = {**tally.to_dict(), "phaseStartedAt": state.phase_started_at}
    if command is not None:
        status["lastCommand"] = command
    return status


def _pruned(value: Any) -> Any:
    """Drop None values (a merge patch deletes those keys, so the stored object has none)."""
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def comparable(status: dict[str, Any]) -> dict[str, Any]:
    """The status without the fields that change every tick, to skip writes that change nothing."""
    out: dict[str, Any] = _pruned({k: v for k, v in status.items() if k not in ("lastTick", "lastVerdict")})
    out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                         for c in out.get("conditions") or []]
    verdict = status.get("lastVerdict")
    if isinstance(verdict, dict):
        out["lastVerdict"] = _pruned({k: v for k, v in verdict.items() if k != "at"})
    return out
