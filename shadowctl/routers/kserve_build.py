"""Pure builders for a KServe ``serving.kserve.io/v1beta1`` InferenceService's predictor canary.

KServe (serverless mode) splits a component's traffic between two Knative
revisions it tracks in ``status.components.predictor``: the **latest ready**
revision gets ``spec.predictor.canaryTrafficPercent`` percent, the **latest
rolled-out** revision (the last one that served 100%) the rest. So shadowctl
owns exactly one field, ``canaryTrafficPercent``:

* a step of N% writes ``canaryTrafficPercent: N``; the candidate is the
  latest ready revision and the primary the latest rolled-out one, both
  resolved on first touch and kept in the ownership record;
* **rollback** (finalize) writes ``canaryTrafficPercent: 0``: KServe then sends
  everything to the rolled-out revision. It never restores a value it replaced:
  an absent field means "the latest revision gets 100%", the very thing a
  rollback must not do;
* **promote** removes ``canaryTrafficPercent``, as KServe documents it: the
  latest ready revision gets 100% and KServe records it as rolled out (the
  previous one becomes ``previousRolledoutRevision``).

KServe routes the canary share to whatever revision is the latest ready one
(its Knative traffic target is ``latestRevision: true``, not pinned), so a
revision that becomes ready mid-rollout takes the candidate's share at once.
The builders notice it (the latest ready revision is not the candidate
recorded at first touch) and refuse to give it live traffic
(:class:`RevisionsChanged`); the controller sees the new candidate and
restarts the analysis, which first sets the share back to 0.

KServe has no mirroring (kserve#2978): the shadow phase goes through the tap.

Before anything is written the value is checked as KServe's webhook would: an
integer from 0 to 100 (the CRD itself only says ``int64``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from shadowctl.policy.model import KServeTarget
from shadowctl.routers import shape
from shadowctl.routers.base import (
    DestinationNotFound,
    RevisionsChanged,
    RouteNotFound,
    RouteState,
    Unsupported,
    WouldBeRejected,
)
from shadowctl.routers.record import JSON, Build, load_record, object_name, store_record

FIELD = "canaryTrafficPercent"
RECORD_KEY = "canary"


@dataclass(frozen=True)
class Resolved:
    """The revisions a rollout manages: the rolled-out primary and the latest ready candidate."""

    primary: str
    candidate: str


# --------------------------------------------------------------------------- the shape the builders read


class _TrafficTarget(shape.Shape):
    revisionName: str | None = None
    latestRevision: bool | None = None
    percent: int | None = None
    tag: str | None = None


class _ComponentStatus(shape.Shape):
    latestReadyRevision: str | None = None
    latestCreatedRevision: str | None = None
    latestRolledoutRevision: str | None = None
    previousRolledoutRevision: str | None = None
    traffic: list[_TrafficTarget] | None = None


class _Components(shape.Shape):
    predictor: _ComponentStatus | None = None


class _Status(shape.Shape):
    components: _Components | None = None
    observedGeneration: int | None = None


class _Predictor(shape.Shape):
    canaryTrafficPercent: int | None = None


class _Spec(shape.Shape):
    predictor: _Predictor | None = None


class _InferenceService(shape.Shape):
    metadata: shape.Metadata = Field(default_factory=shape.Metadata)
    spec: _Spec = Field(default_factory=_Spec)
    status: _Status | None = None


def check_shape(obj: Any) -> None:
    """Raise WouldBeRejected naming the first field whose type is not KServe's (see :mod:`.shape`)."""
    shape.check_shape(_InferenceService, obj, "InferenceService")


# --------------------------------------------------------------------------- public builders


def build(current: JSON, target: KServeTarget, state: RouteState) -> Build:
    """The InferenceService with ``canaryTrafficPercent`` at ``state.candidate_weight`` (which must not mirror)."""
    check_shape(current)
    if state.mirror_percent is not None:
        raise Unsupported(
            f"{object_name(current)}: KServe cannot mirror requests (kserve#2978); set shadow.mode: tap"
        )
    obj = copy.deepcopy(current)
    _check_kind(obj)
    record = load_record(obj)
    rec = record.get(RECORD_KEY)
    if rec:
        res = Resolved(str(rec.get("primaryRevision")), str(rec.get("candidateRevision")))
        if state.candidate_weight > 0:
            check_candidate(obj, res)
    else:
        res = resolve(obj, target)
        rec = {"component": target.component.value, "primaryRevision": res.primary,
               "candidateRevision": res.candidate}
    predictor = _predictor(obj)
    predictor[FIELD] = state.candidate_weight
    check_percent(obj, predictor.get(FIELD))
    record[RECORD_KEY] = rec
    store_record(obj, record)
    return Build(obj, obj != current)


def finalize(current: JSON, target: KServeTarget, keep_candidate: bool = False) -> Build:
    """Rollback: ``canaryTrafficPercent: 0`` (everything to the rolled-out revision) and the record removed.

    KServe has no tag of shadowctl's to keep or remove, so ``keep_candidate`` changes nothing: the candidate
    revision stays, at 0%. Without an ownership record shadowctl changed nothing (the record is written with
    every change), so the object is returned as is.
    """
    check_shape(current)
    obj = copy.deepcopy(current)
    record = load_record(obj)
    if not record.get(RECORD_KEY):
        return Build(obj, False)
    _check_kind(obj)
    _predictor(obj)[FIELD] = 0
    record.pop(RECORD_KEY, None)
    store_record(obj, record)
    return Build(obj, obj != current)


def promote(current: JSON, target: KServeTarget) -> Build:
    """Promotion as KServe documents it: ``canaryTrafficPercent`` removed, so the latest ready revision (the
    candidate) gets 100% and becomes the rolled-out one; the record removed.

    Refused (RevisionsChanged) when the latest ready revision is not the recorded candidate: removing the field
    would roll out a revision that was never analysed. Idempotent: without a record and without the field
    there is nothing to do.
    """
    check_shape(current)
    obj = copy.deepcopy(current)
    _check_kind(obj)
    record = load_record(obj)
    rec = record.get(RECORD_KEY)
    predictor = _predictor(obj)
    if rec:
        check_candidate(obj, Resolved(str(rec.get("primaryRevision")), str(rec.get("candidateRevision"))))
    elif FIELD not in predictor:
        return Build(obj, False)
    else:
        check_status_current(obj)
    predictor.pop(FIELD, None)
    record.pop(RECORD_KEY, None)
    store_record(obj, record)
    return Build(obj, obj != current)


def read_state(obj: JSON, target: KServeTarget) -> RouteState:
    """The share KServe sends to the candidate, from ``canaryTrafficPercent`` (absent: 100, all to the latest).

    Once the latest ready revision is also the rolled-out one there is no split: all traffic goes to it, which
    is the candidate's (0/100) when it is the recorded candidate, else the primary's. Raises
    DestinationNotFound when KServe has rolled nothing out yet (the first revision takes everything).
    """
    check_shape(obj)
    _check_kind(obj)
    record = load_record(obj)
    rec = record.get(RECORD_KEY) or {}
    status = component_status(obj)
    ready, rolled = status.get("latestReadyRevision"), status.get("latestRolledoutRevision")
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    if not rolled:
        raise DestinationNotFound(
            f"{object_name(obj)}: KServe has rolled out no revision yet (status.components.predictor."
            "latestRolledoutRevision is empty): the first revision takes all traffic, there is nothing to split"
        )
    if ready == rolled:
        mine = rec.get("candidateRevision")
        weight = 100 if mine is not None and mine == ready else 0
    else:
        value = _predictor_of(obj).get(FIELD)
        weight = 100 if value is None else int(value)
        if not 0 <= weight <= 100:
            raise WouldBeRejected(f"{object_name(obj)}: spec.predictor.{FIELD} is {weight}, not 0..100")
    return RouteState(100 - weight, weight, None, resource_version=rv, owned=rec or None)


def resolve(obj: JSON, target: KServeTarget) -> Resolved:
    """The primary (latest rolled-out) and candidate (latest ready) revisions from a current status.

    Raises DestinationNotFound when there is none to roll out: nothing rolled out yet, no ready revision, the
    latest ready revision is the rolled-out one, or the status is not current (see :func:`check_status_current`).
    """
    check_shape(obj)
    name = object_name(obj)
    check_status_current(obj)
    status = component_status(obj)
    ready, rolled = status.get("latestReadyRevision"), status.get("latestRolledoutRevision")
    if not ready:
        raise DestinationNotFound(f"{name}: the {target.component.value} has no ready revision yet "
                                  "(status.components.predictor.latestReadyRevision)")
    if not rolled:
        raise DestinationNotFound(
            f"{name}: KServe has rolled out no revision yet: the first revision takes all traffic, there is "
            "no primary to split with"
        )
    if ready == rolled:
        raise DestinationNotFound(
            f"{name}: no candidate: the latest ready revision {ready} is already the rolled-out one; apply the "
            f"new model with {FIELD}: 0 so that KServe keeps the current revision serving"
        )
    return Resolved(str(rolled), str(ready))


def candidate_of(obj: JSON, *, settled: bool) -> str | None:
    """The revision a rollout would roll out (the controller's "candidate" identity): the latest ready one,
    when KServe has a rolled-out revision to split with. None when there is none: no ready or rolled-out
    revision yet, or, while no rollout runs (``settled``), the latest ready revision is the rolled-out one.
    A malformed object is WouldBeRejected."""
    check_shape(obj)
    status = component_status(obj)
    ready, rolled = status.get("latestReadyRevision"), status.get("latestRolledoutRevision")
    if not ready or not rolled or (settled and ready == rolled):
        return None
    return str(ready)


def check_status_current(obj: JSON) -> None:
    """Raise DestinationNotFound while KServe is still creating a revision (latest created is not the latest
    ready): the candidate would be resolved to an older revision. Called before the first touch only.

    Why not ``status.observedGeneration``: KServe copies it from its Knative Service, whose generation
    counts differently from the InferenceService's, so it cannot be compared with ``metadata.generation``.
    """
    status = component_status(obj)
    created, ready = status.get("latestCreatedRevision"), status.get("latestReadyRevision")
    if created and ready and created != ready:
        raise DestinationNotFound(
            f"{object_name(obj)}: the latest created revision {created} is not ready yet (the latest ready is "
            f"{ready}); try again once it is ready"
        )


def check_candidate(obj: JSON, res: Resolved) -> None:
    """Raise RevisionsChanged when the latest ready revision (where KServe sends the canary share) is not the
    candidate this rollout analysed."""
    ready = component_status(obj).get("latestReadyRevision")
    if ready and ready != res.candidate:
        raise RevisionsChanged(
            f"{object_name(obj)}: revision {ready} became the latest ready one during the rollout of "
            f"{res.candidate}; KServe would give it the canary share without analysis. The rollout restarts "
            "for the new revision"
        )


def check_percent(obj: JSON, value: Any) -> None:
    """Raise WouldBeRejected unless ``value`` is an integer percent (0..100), as KServe's webhook requires."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise WouldBeRejected(
            f"{object_name(obj)}: spec.predictor.{FIELD} must be an integer from 0 to 100, got {value!r}"
        )


def component_status(obj: JSON) -> JSON:
    """``status.components.predictor`` (``{}`` when absent)."""
    status = obj.get("status") or {}
    components = status.get("components") or {}
    predictor = components.get("predictor") if isinstance(components, dict) else None
    return predictor if isinstance(predictor, dict) else {}


# --------------------------------------------------------------------------- helpers


def _check_kind(obj: JSON) -> None:
    if obj.get("kind") not in (None, "InferenceService") or not str(
        obj.get("apiVersion", "serving.kserve.io/")
    ).startswith("serving.kserve.io/"):
        raise RouteNotFound(f"{object_name(obj)} is not a KServe InferenceService (serving.kserve.io/v1beta1)")


def _predictor_of(obj: JSON) -> JSON:
    spec = obj.get("spec") or {}
    predictor = spec.get("predictor")
    return predictor if isinstance(predictor, dict) else {}


def _predictor(obj: JSON) -> JSON:
    """``spec.predictor`` of ``obj`` for editing in place; WouldBeRejected when it is absent (KServe requires it)."""
    spec = obj.get("spec")
    predictor = spec.get("predictor") if isinstance(spec, dict) else None
    if not isinstance(predictor, dict):
        raise WouldBeRejected(f"{object_name(obj)}: spec.predictor is missing (KServe requires it)")
    return predictor
