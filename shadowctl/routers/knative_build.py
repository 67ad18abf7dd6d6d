"""Pure builders for a Knative ``serving.knative.dev/v1`` Service's ``spec.traffic``.

shadowctl manages two traffic targets and nothing else:

* the **primary** target, pinned by ``revisionName`` (a ``latestRevision: true``
  target that carries the primary's traffic is pinned on first touch, because
  the candidate *is* the latest revision: left floating, it would hand the
  candidate all the traffic);
* the **candidate** target: the one tagged with the policy's ``candidateTag``,
  pinned to the candidate revision. It is added even at 0%, because the tag
  gives the candidate its own URL, which the shadow phase mirrors to.

Other targets (a 0% ``latest`` tag someone keeps, a ``previous`` tag holding
10%, other tags) keep their percent, as Istio's third destinations do: the
candidate gets the step's percent and the primary gives up the difference
(promotion hands the primary's percent to the candidate). A step the others
leave no room for is refused, and so is another target that sends traffic to
the candidate revision (e.g. a ``latestRevision: true`` target with a share,
which follows the latest ready revision): the candidate would get more than
its step. The primary and candidate revisions are resolved once, on first
touch, and kept in the ownership record, so that later steps and a rollback
after a restart use the same revisions even after ``latestReadyRevisionName``
has moved on.

Knative's controller writes ``status`` a moment after each spec write, so on
first touch the revisions are resolved only from a status that is current
(``observedGeneration`` is the Service's generation and the latest created
revision is ready); otherwise the builder refuses, and the caller retries.

Before anything is written the traffic block is checked the way Knative's
webhook checks it: percents sum to 100, ``revisionName`` XOR
``latestRevision: true``, unique tags, revisions that exist (when known).
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from shadowctl.policy.model import KnativeTarget
from shadowctl.routers import shape
from shadowctl.routers.base import (
    DestinationNotFound,
    RouteNotFound,
    RouteState,
    UnmanagedTraffic,
    Unsupported,
    WouldBeRejected,
)
from shadowctl.routers.record import JSON, Build, load_record, object_name, store_record


@dataclass(frozen=True)
class Resolved:
    """The revisions and tag a rollout manages, as resolved on first touch."""

    primary: str
    candidate: str
    tag: str


# --------------------------------------------------------------------------- the shape the builders read


class _TrafficTarget(shape.Shape):
    revisionName: str | None = None
    configurationName: str | None = None
    latestRevision: bool | None = None
    percent: int | None = Field(default=None, ge=0, le=100)
    tag: str | None = None


class _Template(shape.Shape):
    metadata: shape.Metadata | None = None


class _Spec(shape.Shape):
    traffic: list[_TrafficTarget] | None = None
    template: _Template | None = None


class _Status(shape.Shape):
    traffic: list[_TrafficTarget] | None = None
    latestReadyRevisionName: str | None = None
    latestCreatedRevisionName: str | None = None
    observedGeneration: int | None = None


class _KnativeService(shape.Shape):
    metadata: shape.Metadata = Field(default_factory=shape.Metadata)
    spec: _Spec = Field(default_factory=_Spec)
    status: _Status | None = None


def check_shape(obj: Any) -> None:
    """Raise WouldBeRejected naming the first field whose type is not Knative's (see :mod:`.shape`)."""
    shape.check_shape(_KnativeService, obj, "Service")


# --------------------------------------------------------------------------- public builders


def build(
    current: JSON, target: KnativeTarget, state: RouteState, known_revisions: Collection[str] | None = None
) -> Build:
    """The Service with primary/candidate percents as ``state`` (which must not mirror)."""
    check_shape(current)
    if state.mirror_percent is not None:
        raise Unsupported(
            f"{object_name(current)}: Knative cannot mirror requests; set shadow.virtualService "
            "(an Istio VirtualService in front of the service) or shadow.mode: tap"
        )
    obj = copy.deepcopy(current)
    record = load_record(obj)
    if not record.get("traffic"):
        check_status_current(obj, target)
    res = resolve(obj, target, known_revisions)
    traffic = _traffic(obj)
    p = _primary_index(obj, traffic, res, record)
    c = _candidate_index(traffic, res)
    assert c is not None
    others = _others(obj, traffic, {p, c}, res, refuse_candidate=True)
    if others + state.candidate_weight > 100:
        raise UnmanagedTraffic(
            f"{object_name(obj)}: targets that are neither the primary {res.primary} nor the candidate "
            f"{res.candidate} hold {others}% of the traffic, so the candidate cannot get {state.candidate_weight}%; "
            "shadowctl will not take traffic from them"
        )
    traffic[p]["percent"] = 100 - others - state.candidate_weight
    traffic[c]["percent"] = state.candidate_weight
    check_traffic(obj, traffic, known_revisions)
    obj.setdefault("spec", {})["traffic"] = traffic
    record["traffic"] = {**(record.get("traffic") or {}), "primaryRevision": res.primary,
                         "candidateRevision": res.candidate, "candidateTag": res.tag}
    store_record(obj, record)
    return Build(obj, obj != current)


def finalize(
    current: JSON, target: KnativeTarget, keep_candidate: bool = False, known_revisions: Collection[str] | None = None
) -> Build:
    """Rollback: the candidate's percent back to the primary (pinned), other targets keep theirs; the candidate
    tag removed unless ``keep_candidate`` (then 0%).

    Without an ownership record shadowctl changed nothing (the record is written
    with every change), so there is nothing to undo and the Service is returned as is.
    """
    check_shape(current)
    obj = copy.deepcopy(current)
    record = load_record(obj)
    if not record.get("traffic"):
        return Build(obj, False)
    res = resolve(obj, target, known_revisions)
    traffic = _traffic(obj)
    p = _primary_index(obj, traffic, res, record)
    c = _candidate_index(traffic, res, add=False)
    traffic[p]["percent"] = 100 - _others(obj, traffic, {p, c}, res)
    if c is not None:
        if keep_candidate:
            traffic[c]["percent"] = 0
        else:
            del traffic[c]
    check_traffic(obj, traffic, known_revisions)
    obj.setdefault("spec", {})["traffic"] = traffic
    record.pop("traffic", None)
    store_record(obj, record)
    return Build(obj, obj != current)


def promote(current: JSON, target: KnativeTarget, known_revisions: Collection[str] | None = None) -> Build:
    """Promotion: the primary target re-pinned to the candidate revision with the primary's and the candidate's
    percent (other targets keep theirs), the candidate tag removed.

    Idempotent: without an ownership record, a Service whose main target (see
    :func:`promoted_revision`) already pins the candidate revision is returned as is.
    """
    check_shape(current)
    obj = copy.deepcopy(current)
    record = load_record(obj)
    if not record.get("traffic"):
        done = promoted_revision(obj, target.candidate_tag)
        wanted = target.candidate_revision or (obj.get("status") or {}).get("latestReadyRevisionName")
        if done is not None and done == wanted:
            return Build(obj, False)
        check_status_current(obj, target)
    res = resolve(obj, target, known_revisions)
    traffic = _traffic(obj)
    p = _primary_index(obj, traffic, res, record)
    c = _candidate_index(traffic, res, add=False)
    traffic[p]["revisionName"] = res.candidate
    traffic[p]["percent"] = 100 - _others(obj, traffic, {p, c}, res)
    if c is not None:
        del traffic[c]
    check_traffic(obj, traffic, known_revisions)
    obj.setdefault("spec", {})["traffic"] = traffic
    record.pop("traffic", None)
    store_record(obj, record)
    return Build(obj, obj != current)


def promoted_revision(obj: JSON, candidate_tag: str | None = None) -> str | None:
    """The revision a finished promotion left serving: the one pinned by ``revisionName`` in the main target
    (the first untagged target with traffic, else the first target with traffic), when no target carries
    ``candidate_tag`` any more. None when the main target floats or the candidate tag is still there."""
    check_shape(obj)
    traffic = _traffic(obj)
    if candidate_tag and any(t.get("tag") == candidate_tag for t in traffic):
        return None
    carrying = [t for t in traffic if _percent(t) > 0]
    if not carrying:
        return None
    main = next((t for t in carrying if not t.get("tag")), carrying[0])
    rev = main.get("revisionName")
    return str(rev) if rev and not main.get("latestRevision") else None


def read_state(obj: JSON, target: KnativeTarget, known_revisions: Collection[str] | None = None) -> RouteState:
    """The candidate revision's percent, and everything else as the primary's (Knative never mirrors).

    Other targets keep their percent through a rollout, so they are not part of the state:
    ``primary_weight`` is 100 minus the candidate's percent. Traffic that reaches the candidate
    revision by another target (a floating ``latestRevision`` one) counts as the candidate's.
    """
    check_shape(obj)
    res = resolve(obj, target, known_revisions)
    traffic = _traffic(obj)
    record = load_record(obj)
    resolved = _resolved_latest(obj)
    total = candidate = 0
    for entry in traffic:
        pct = _percent(entry)
        total += pct
        rev = entry.get("revisionName") if not entry.get("latestRevision") else resolved.get(entry.get("tag"))
        if entry.get("tag") == res.tag or rev == res.candidate:
            candidate += pct
    if total != 100:
        raise WouldBeRejected(f"{object_name(obj)}: spec.traffic percents sum to {total}, not 100")
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return RouteState(100 - candidate, candidate, None, resource_version=rv, owned=record.get("traffic"))


def resolve(obj: JSON, target: KnativeTarget, known_revisions: Collection[str] | None = None) -> Resolved:
    """The primary and candidate revisions: the ownership record, else the policy, else the defaults.

    Defaults: the candidate is ``status.latestReadyRevisionName``; the primary is
    the revision the untagged traffic goes to now.
    """
    check_shape(obj)
    name = object_name(obj)
    if obj.get("kind") not in (None, "Service") or not str(obj.get("apiVersion", "serving.knative.dev/")).startswith(
        "serving.knative.dev/"
    ):
        raise RouteNotFound(f"{name} is not a Knative Service (serving.knative.dev/v1)")
    rec = load_record(obj).get("traffic") or {}
    status = obj.get("status") or {}
    candidate = rec.get("candidateRevision") or target.candidate_revision or status.get("latestReadyRevisionName")
    if not candidate:
        raise DestinationNotFound(
            f"{name}: no candidate revision: the policy names none (candidateRevision) and the service "
            "has no status.latestReadyRevisionName yet"
        )
    primary = rec.get("primaryRevision") or target.primary_revision or _serving_revision(obj)
    if primary == candidate:
        raise DestinationNotFound(
            f"{name}: the candidate revision {candidate} already receives 100% of the traffic; "
            "name the revision serving today with primaryRevision"
        )
    known = _known(obj, known_revisions)
    if known is not None:
        for role, rev in (("primary", primary), ("candidate", candidate)):
            if rev not in known:
                raise DestinationNotFound(
                    f"{name}: the {role} revision {rev!r} does not exist; known revisions: "
                    f"{', '.join(sorted(known)) or '(none)'}"
                )
    return Resolved(str(primary), str(candidate), str(rec.get("candidateTag") or target.candidate_tag))


def check_status_current(obj: JSON, target: KnativeTarget) -> None:
    """Raise DestinationNotFound when revisions would be resolved from a status Knative has not caught up on.

    Knative's controller writes ``status`` some time after a spec write. Until
    ``status.observedGeneration`` reaches ``metadata.generation``, and while the
    latest created revision is not yet the latest ready one,
    ``latestReadyRevisionName`` (and what a floating ``latestRevision`` target
    points at) names an older revision; resolved on first touch it would be
    recorded as the candidate (or promoted) for the whole rollout. Called before
    the first touch only, and not when the policy names both revisions. A status
    without ``observedGeneration`` (a file, a status written by hand) is taken as is.
    """
    check_shape(obj)
    if target.candidate_revision and target.primary_revision:
        return
    name = object_name(obj)
    generation = (obj.get("metadata") or {}).get("generation")
    status = obj.get("status") or {}
    observed = status.get("observedGeneration")
    if isinstance(generation, int) and isinstance(observed, int) and observed < generation:
        raise DestinationNotFound(
            f"{name}: Knative has not reconciled generation {generation} yet (status.observedGeneration is "
            f"{observed}), so its status may name an older revision; try again once the status is current, "
            "or name candidateRevision and primaryRevision"
        )
    created, ready = status.get("latestCreatedRevisionName"), status.get("latestReadyRevisionName")
    if not target.candidate_revision and created and ready and created != ready:
        raise DestinationNotFound(
            f"{name}: the latest created revision {created} is not ready yet (the latest ready is {ready}); "
            f"try again once it is ready, or name candidateRevision (e.g. {ready}) to roll out another"
        )


def check_traffic(obj: JSON, traffic: list[JSON], known_revisions: Collection[str] | None = None) -> None:
    """Raise WouldBeRejected for what Knative's webhook refuses in ``spec.traffic``."""
    name = object_name(obj)
    total = 0
    tags: set[str] = set()
    known = _known(obj, known_revisions)
    for i, entry in enumerate(traffic):
        where = f"{name} spec.traffic[{i}]"
        latest = entry.get("latestRevision")
        rev = entry.get("revisionName")
        if latest is True and rev:
            raise WouldBeRejected(f"{where}: sets both revisionName and latestRevision: true")
        if latest is not True and not rev:
            raise WouldBeRejected(f"{where}: needs revisionName or latestRevision: true")
        pct = entry.get("percent", 0)
        if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            raise WouldBeRejected(f"{where}: percent must be an integer from 0 to 100, got {pct!r}")
        total += pct
        tag = entry.get("tag")
        if tag:
            if tag in tags:
                raise WouldBeRejected(f"{where}: tag {tag!r} is used twice")
            tags.add(tag)
        if rev and known is not None and rev not in known:
            raise WouldBeRejected(f"{where}: revision {rev!r} does not exist")
    if total != 100:
        raise WouldBeRejected(f"{name}: spec.traffic percents would sum to {total}, not 100")


# --------------------------------------------------------------------------- helpers


def _traffic(obj: JSON) -> list[JSON]:
    spec = obj.get("spec")
    traffic = spec.get("traffic") if isinstance(spec, dict) else None
    if traffic is None:  # Knative's default: everything to the latest ready revision
        return [{"latestRevision": True, "percent": 100}]
    if not isinstance(traffic, list) or not all(isinstance(t, dict) for t in traffic):
        raise WouldBeRejected(f"{object_name(obj)}: spec.traffic is not a list of traffic targets")
    return traffic


def _percent(entry: JSON) -> int:
    pct = entry.get("percent")
    return pct if isinstance(pct, int) and not isinstance(pct, bool) else 0


def _resolved_latest(obj: JSON) -> dict[Any, str]:
    """What each ``latestRevision: true`` target points at now, by tag (None: untagged)."""
    status = obj.get("status") or {}
    out: dict[Any, str] = {}
    for entry in status.get("traffic") or []:
        if isinstance(entry, dict) and entry.get("latestRevision") and entry.get("revisionName"):
            out.setdefault(entry.get("tag"), entry["revisionName"])
    latest = status.get("latestReadyRevisionName")
    if latest:
        for entry in (obj.get("spec") or {}).get("traffic") or [{"latestRevision": True}]:
            if isinstance(entry, dict) and entry.get("latestRevision"):
                out.setdefault(entry.get("tag"), latest)
    return out


def _serving_revision(obj: JSON) -> str:
    """The revision serving today: the one every untagged target with traffic points at (pinned, or
    floating and resolved), which holds the main route; tagged targets beside it (a `previous` tag with
    a share) keep theirs. DestinationNotFound when untagged targets split between revisions."""
    name = object_name(obj)
    resolved = _resolved_latest(obj)
    revisions: set[str | None] = set()
    for entry in _traffic(obj):
        if _percent(entry) > 0 and not entry.get("tag"):
            rev = resolved.get(None) if entry.get("latestRevision") else entry.get("revisionName")
            revisions.add(str(rev) if rev else None)
    if len(revisions) == 1 and None not in revisions:
        return str(next(iter(revisions)))
    raise DestinationNotFound(
        f"{name}: no single revision holds the untagged traffic, so the primary is ambiguous; "
        "name it with primaryRevision"
    )


def _known(obj: JSON, known_revisions: Collection[str] | None) -> set[str] | None:
    if known_revisions is None:
        return None
    known = set(known_revisions)
    status = obj.get("status") or {}
    for key in ("latestReadyRevisionName", "latestCreatedRevisionName"):
        if status.get(key):
            known.add(status[key])
    return known


def _primary_index(obj: JSON, traffic: list[JSON], res: Resolved, record: JSON) -> int:
    untagged = [i for i, t in enumerate(traffic) if t.get("revisionName") == res.primary and not t.get("tag")]
    if untagged:
        return untagged[0]
    tagged = [i for i, t in enumerate(traffic) if t.get("revisionName") == res.primary and t.get("tag") != res.tag
              and _percent(t) > 0]
    if tagged:
        return tagged[0]
    resolved = _resolved_latest(obj)
    for i, t in enumerate(traffic):
        if t.get("latestRevision") and _percent(t) > 0 and resolved.get(t.get("tag")) == res.primary:
            rec = record.setdefault("traffic", {})
            rec["pinnedLatest"] = copy.deepcopy(t)
            t.pop("latestRevision")
            t["revisionName"] = res.primary
            return i
    traffic.append({"revisionName": res.primary, "percent": 0})
    return len(traffic) - 1


def _candidate_index(traffic: list[JSON], res: Resolved, add: bool = True) -> int | None:
    """The target tagged with the candidate tag, re-pinned to the candidate revision (appended when ``add``)."""
    for i, t in enumerate(traffic):
        if t.get("tag") == res.tag:
            if t.get("latestRevision"):
                del t["latestRevision"]
            if t.get("revisionName") != res.candidate:
                t["revisionName"] = res.candidate
            return i
    if not add:
        return None
    traffic.append({"tag": res.tag, "revisionName": res.candidate, "percent": 0})
    return len(traffic) - 1


def _others(obj: JSON, traffic: list[JSON], mine: set[int | None], res: Resolved, *,
            refuse_candidate: bool = False) -> int:
    """The percent held by targets that are neither the primary's nor the candidate's (they keep it).

    With ``refuse_candidate``, one of them that sends traffic to the candidate revision (pinned to it
    under another tag, or a ``latestRevision`` target that follows it) is refused: the candidate would
    get more than the step.
    """
    resolved = _resolved_latest(obj)
    held = 0
    reaching = []
    for i, t in enumerate(traffic):
        if i in mine:
            continue
        pct = _percent(t)
        held += pct
        rev = resolved.get(t.get("tag")) if t.get("latestRevision") else t.get("revisionName")
        if refuse_candidate and pct > 0 and rev == res.candidate:
            what = "latestRevision" if t.get("latestRevision") else str(t.get("revisionName"))
            reaching.append(f"{what}{' (tag ' + t['tag'] + ')' if t.get('tag') else ''} {pct}%")
    if reaching:
        raise UnmanagedTraffic(
            f"{object_name(obj)}: spec.traffic also sends {', '.join(reaching)} to the candidate revision "
            f"{res.candidate} outside shadowctl's steps (a latestRevision target follows the latest ready "
            "revision); pin that target to a revision (revisionName) or move its traffic first"
        )
    return held
