"""The fault campaign's checker: DESIGN.md's routing invariants, replayed from kube-apiserver's audit log.

The audit policy (``shadowctl.sim.cluster.AUDIT_POLICY``) records every write to a VirtualService or a
ShadowPolicy (and its status) with the object sent and the object stored, who sent it and whether it
landed. Landed writes are put in the order etcd gave them (the stored object's resourceVersion is
etcd's revision, one counter for the whole store), and replayed per rollout. Rules, each a violation
when broken:

* ``weights-sum`` (invariant 1): in every route of every VirtualService a controller wrote, the
  destination weights sum to 100 (a lone destination without weight counts as 100);
* ``other-routes`` (invariant 1): the routes shadowctl does not manage (all but ``chat-default``) are
  exactly as created;
* ``step-bound`` (invariant 2): a controller's route write gives the candidate (every destination that is
  not the primary subset) no more than the status before it allows. A write that raises the candidate's
  share is recorded first as an intent (``status.pendingRoute``, docs/controller.md), so the status before
  it allows it, and only that status: a write allowed only by a status recorded after it (routes first,
  then a crash) is a violation. The weight a status allows: 0 in Pending and Shadowing (the shadow phase
  has not passed), 100 in Promoting and Succeeded, else ``rollout.canaryWeight``; or more, up to
  ``pendingRoute.candidateWeight``, while an intent is outstanding;
* ``promotion-verdict`` (no promotion without a persisted passing verdict): a controller's route write
  that gives the candidate 100% comes after a status whose ``lastVerdict`` passed (or with a person's
  promote command on the policy);
* ``shadow-pass-data`` (invariant 4, a decision needs data: no missing output metric is a pass): a controller's
  route write that first gives the candidate live traffic while the status before it still records Shadowing
  (the write its recorded intent allows) rests on a persisted ``lastVerdict`` that passed, and, for a policy
  that compares outputs (``spec.analysis.outputs``), in which every comparator's ``agreement/<name>`` metric
  passed on at least ``minPairs`` candidate pairs (a broker that was down or restarted must leave the
  shadow phase waiting, never passing);
* ``deadline`` (every rollout ends in a terminal phase or a documented safe hold before its deadline): the
  first status that records a terminal phase is no later than ``rolloutStartedAt + progressDeadline`` +
  :data:`DEADLINE_GRACE`; a rollout that never ended (``Stuck:<phase>``) is a violation unless it is in a
  documented hold: Paused (a person's or ``onInconclusive: hold``), or its spec refused (Ready=False,
  ``invalid spec``) before anything started (Pending: nothing is routed). A spec refused mid-rollout is no
  hold past the deadline: the controller rolls back at the deadline the last accepted spec recorded
  (``status.deadlineAt``, docs/controller.md), so such a rollout must end in time like any other;
Order: by the stored resourceVersion; a landed write that made no new revision (a no-op update, or the
patch that releases a deleted object's last finalizer, which answers with the object as last stored) is
placed after every write the log holds before it (the log backend writes events as requests complete).

* ``rollback-restored`` (invariant 3): when a status first records RolledBack, and when a controller
  lets a deleted policy's finalizer go (unless it had Succeeded: the promoted candidate is the new primary),
  the route object as it stands then gives the candidate 0 and
  has no mirror;
* ``unconditional-write``: every controller update or patch of a route, a policy or its status names
  the resourceVersion it was computed from (so a stale leader's write fails 409 and never lands);
* ``final-*``: the final VirtualService of each rollout: weights sum to 100, unmanaged routes as created,
  and after RolledBack, Failed or a deletion: candidate 0, no mirror.

Route objects are Istio VirtualServices (weights are percents) or Gateway API HTTPRoutes (``--gateway-share``:
a rule's weights are proportions of its total, so the candidate's share is its weight over the total, and a
RequestMirror filter is a mirror); the rules read both the same way.

The checker must be able to fail: tests/test_faults.py plants writes that break each rule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from shadowctl.policy.duration import parse_duration

JSON = dict[str, Any]
ROUTE = "chat-default"
PRIMARY_SUBSET = "v1"
PRIMARY_BACKEND = "chat-v1"
ROUTE_RESOURCES = ("virtualservices", "httproutes")
ROUTE_KINDS = ("VirtualService", "HTTPRoute")
FINALIZER_PREFIX = "shadowctl.dev/"
DEADLINE_GRACE = 15.0
"""Seconds past the progress deadline a rollout may take to record its end: the deadline is checked once a
tick (interval 1 s), and a rollback takes two ticks (RollingBack, then RolledBack), each of which may meet
an API fault, a 409 or a lease handover first."""
PROMOTE_COMMANDS = ("promote", "promote-full")


INVARIANTS = {
    "weights-sum": "weights and percents sum to 100",
    "other-routes": "routes shadowctl does not manage are left as they are",
    "step-bound": "the candidate's live share never exceeds the step reached, and is 0 before the shadow phase passed",
    "promotion-verdict": "no promotion without a persisted passing verdict",
    "shadow-pass-data": "a decision needs data: the shadow phase passes only on a persisted verdict in which every "
                        "output comparison passed on at least minPairs pairs",
    "rollback-restored": "after rollback (or deletion): 100% primary and no mirror of ours",
    "restored": "after rollback (or deletion): 100% primary and no mirror of ours",
    "unconditional-write": "every write names the resourceVersion it was computed from (a stale writer's write fails)",
    "deadline": "every rollout ends in a terminal phase or a documented safe hold before its deadline",
    "missing": "the route object survives the rollout",
}
"""Each rule's invariant, in DESIGN.md's and issue #16's words (``final-<rule>``: the same, on the final object)."""


def read_log(path: Path) -> list[JSON]:
    """The audit log's events (one JSON object a line); a torn last line is left out."""
    events = []
    with path.open() as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


@dataclass
class Report:
    violations: list[JSON] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, rule: str, rollout: str, detail: str, event: JSON | None = None) -> None:
        row: JSON = {"rule": rule, "invariant": INVARIANTS.get(rule.removeprefix("final-"), rule),
                     "rollout": rollout, "detail": detail}
        if event is not None:
            ref = event.get("objectRef") or {}
            row["rv"] = _rv(event.get("responseObject"))
            row["user"] = (event.get("user") or {}).get("username")
            row["auditID"] = event.get("auditID")
            row["write"] = {"verb": event.get("verb"), "resource": ref.get("resource"),
                            "subresource": ref.get("subresource"), "name": ref.get("name"),
                            "user": row["user"], "auditID": row["auditID"], "resourceVersion": row["rv"],
                            "stageTimestamp": event.get("stageTimestamp")}
        self.violations.append(row)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


def _rv(obj: Any) -> int | None:
    if not isinstance(obj, dict):
        return None
    value = (obj.get("metadata") or {}).get("resourceVersion")
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _weight(dest: JSON, alone: bool) -> int:
    if "weight" in dest:
        return int(dest.get("weight") or 0)
    return 100 if alone else 0


def _routes(obj: JSON) -> list[JSON]:
    """The routes of a VirtualService (``spec.http``) or the rules of an HTTPRoute (``spec.rules``)."""
    spec = obj.get("spec") or {}
    routes = spec.get("rules") if obj.get("kind") == "HTTPRoute" else spec.get("http")
    return [r for r in routes if isinstance(r, dict)] if isinstance(routes, list) else []


def route_of(obj: JSON, name: str = ROUTE) -> JSON | None:
    for route in _routes(obj):
        if route.get("name") == name:
            return dict(route)
    return None


def _backend_weight(ref: JSON) -> int:
    return int(ref.get("weight", 1) or 0)  # Gateway API: a backendRef without weight weighs 1


def candidate_share(route: JSON) -> float:
    """The candidate's share of live traffic in percent: an Istio route's weights are percents, an HTTPRoute
    rule's are proportions of the rule's total (every backend that is not the primary is the candidate)."""
    if "backendRefs" in route:
        refs = route.get("backendRefs") or []
        total = sum(_backend_weight(r) for r in refs)
        cand = sum(_backend_weight(r) for r in refs if r.get("name") != PRIMARY_BACKEND)
        return 100.0 * cand / total if total else 0.0
    dests = route.get("route") or []
    return float(sum(_weight(d, len(dests) == 1) for d in dests
                     if (d.get("destination") or {}).get("subset") != PRIMARY_SUBSET))


def candidate_weight(route: JSON) -> int:
    """:func:`candidate_share`, rounded up (a share above a step by any fraction is above it)."""
    return math.ceil(candidate_share(route) - 1e-9)


def mirrored(route: JSON) -> bool:
    """Whether the route mirrors: Istio's ``mirror``, or a RequestMirror filter in an HTTPRoute rule."""
    if "backendRefs" in route:
        return any(f.get("type") == "RequestMirror" for f in route.get("filters") or [])
    return "mirror" in route


def sums(obj: JSON) -> list[tuple[str, int]]:
    """(route name, weight sum) of every route whose weights do not sum to 100 (an HTTPRoute rule's weights
    are proportions: only a rule whose backends all weigh 0, so that no request has a backend, is listed)."""
    bad = []
    for route in _routes(obj):
        if "backendRefs" in route:
            refs = route.get("backendRefs") or []
            if refs and not sum(_backend_weight(r) for r in refs):
                bad.append((str(route.get("name")), 0))
            continue
        dests = route.get("route") or []
        total = sum(_weight(d, len(dests) == 1) for d in dests)
        if dests and total != 100:
            bad.append((str(route.get("name")), total))
    return bad


def unmanaged(obj: JSON) -> list[JSON]:
    return [r for r in _routes(obj) if r.get("name") != ROUTE]


def allowed(status: JSON | None) -> int:
    """The most candidate weight a recorded status allows (see the module docstring)."""
    if not status:
        return 0
    intent = status.get("pendingRoute") or {}
    raised = int(intent.get("candidateWeight") or 0)
    rollout = status.get("rollout") or {}
    phase = rollout.get("phase") or status.get("phase") or "Pending"
    if phase in ("Pending", "Shadowing"):
        return raised
    if phase in ("Promoting", "Succeeded"):
        return 100
    return max(raised, int(rollout.get("canaryWeight") or 0))


def _seconds(value: Any) -> float | None:
    """A Go-style duration (``10s``, ``5m``, ``1h30m``) in seconds; None when it is not one."""
    try:
        return parse_duration(value).total_seconds()
    except ValueError:
        return None


def _epoch(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def promote_commanded(obj: JSON) -> bool:
    """Whether the policy object carries a person's promote command (the annotation, as data)."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get("shadowctl.dev/command")
    try:
        return isinstance(raw, str) and json.loads(raw).get("command") in PROMOTE_COMMANDS
    except (ValueError, AttributeError):
        return False


def documented_hold(obj: JSON | None) -> str | None:
    """Why a rollout that never ended is in a documented safe hold (None: it is not)."""
    status = (obj or {}).get("status") or {}
    if _phase(status) == "Paused":
        return "Paused"
    if _phase(status) != "Pending":  # a spec refused mid-rollout is rolled back at the recorded deadline
        return None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") == "False" \
                and str(cond.get("message") or "").startswith("invalid spec"):
            return "spec refused"
    return None


def _phase(status: JSON | None) -> str:
    return str((status or {}).get("phase") or "Pending")


@dataclass
class _Rollout:
    created: JSON | None = None
    vs: JSON | None = None
    status: JSON | None = None
    policy: JSON | None = None
    ended: bool = False


def check(events: Iterable[JSON], *, namespace: str, writers: Sequence[str],
          outcomes: Mapping[str, str] | None = None, finals: Mapping[str, JSON | None] | None = None,
          final_policies: Mapping[str, JSON | None] | None = None) -> Report:
    """Replay the audit log's writes in ``namespace``; ``writers``: the controllers' user names;
    ``final_policies``: each rollout's policy object at the end (None: deleted), for the deadline rule."""
    report = Report()
    writes: list[tuple[int, int, JSON]] = []
    newest = 0  # the highest revision a landed write has got so far, in the log's order
    for order, event in enumerate(events):
        ref = event.get("objectRef") or {}
        if event.get("stage") != "ResponseComplete" or ref.get("namespace") != namespace:
            continue
        if ref.get("resource") not in (*ROUTE_RESOURCES, "shadowpolicies"):
            continue
        if event.get("verb") not in ("create", "update", "patch", "delete"):
            continue
        report.count("writes")
        user = (event.get("user") or {}).get("username")
        code = int((event.get("responseStatus") or {}).get("code") or 0)
        mine = user in writers
        if mine:
            report.count("controller writes")
            if code == 409:
                report.count("controller writes refused 409")
        if mine and event["verb"] in ("update", "patch") and code < 300:
            request = event.get("requestObject")
            if not isinstance(request, dict) or not (request.get("metadata") or {}).get("resourceVersion"):
                report.add("unconditional-write", str(ref.get("name")),
                           f"{event['verb']} {ref.get('resource')}{'/' + ref['subresource'] if ref.get('subresource') else ''}"
                           " without a resourceVersion", event)
        rv = _rv(event.get("responseObject"))
        if code < 300 and rv is not None and event["verb"] != "delete":
            # A write that made no new revision (a no-op, or the patch that lets the last finalizer go, whose
            # answer is the object as last stored) happened after everything the log holds before it.
            request_rv = _rv(event.get("requestObject"))
            made = rv if request_rv is None or rv > request_rv else max(rv, newest)
            newest = max(newest, rv)
            writes.append((made, order, event))
    writes.sort(key=lambda w: (w[0], w[1]))

    rollouts: dict[str, _Rollout] = {}
    for _made, _order, event in writes:
        ref = event["objectRef"]
        name = str(ref["name"])
        r = rollouts.setdefault(name, _Rollout())
        obj = event["responseObject"]
        mine = (event.get("user") or {}).get("username") in writers
        if ref["resource"] in ROUTE_RESOURCES:
            if r.created is None:
                r.created = obj
            earlier = route_of(r.vs or {})
            r.vs = obj
            if not mine:
                continue
            report.count("controller route writes")
            route = route_of(obj)
            # (a raise its status does not allow is step-bound's; this rule reads the verdict behind one it does)
            if route and 0 < candidate_weight(route) <= allowed(r.status) and _phase(r.status) == "Shadowing" \
                    and not (earlier and candidate_weight(earlier) > 0) and not promote_commanded(r.policy or {}):
                report.count("shadow passes checked")
                for problem in shadow_pass_problems(r.policy or {}, r.status or {}):
                    report.add("shadow-pass-data", name, problem, event)
            for route_name, total in sums(obj):
                report.add("weights-sum", name, f"route {route_name} weights sum to {total}", event)
            if r.created is not None and unmanaged(obj) != unmanaged(r.created):
                report.add("other-routes", name, "a route shadowctl does not manage was changed", event)
            route = route_of(obj)
            weight = candidate_weight(route) if route else 0
            if weight > allowed(r.status):
                intent = (r.status or {}).get("pendingRoute")
                report.add("step-bound", name, f"candidate weight {weight} with the status before allowing "
                           f"{allowed(r.status)} ({_phase(r.status)}, "
                           f"{'intent ' + str(intent.get('candidateWeight')) if intent else 'no intent'})", event)
            if weight == 100:
                report.count("promotions checked")
                verdict = ((r.status or {}).get("lastVerdict") or {}).get("outcome")
                if verdict != "pass" and not promote_commanded(r.policy or {}):
                    report.add("promotion-verdict", name, f"candidate 100% with the persisted verdict {verdict!r} "
                               "and no promote command", event)
            continue
        # a ShadowPolicy write (the object or its status): it carries the status as stored
        status = obj.get("status") or {}
        before = r.status
        r.status = status
        r.policy = obj
        if status.get("pendingRoute"):
            report.count("intents recorded" if not (before or {}).get("pendingRoute") else "intent status writes")
        if mine and ref.get("subresource") == "status":
            report.count("controller status writes")
        if not r.ended and _phase(status) in TERMINAL:
            r.ended = True
            _deadline(report, name, obj, event)
        if _phase(status) == "RolledBack" and _phase(before) != "RolledBack":
            report.count("rollbacks checked")
            _restored(report, name, r.vs, event, "RolledBack recorded")
        meta = obj.get("metadata") or {}
        if mine and meta.get("deletionTimestamp") and _phase(status) != "Succeeded" and not any(
                str(f).startswith(FINALIZER_PREFIX) for f in meta.get("finalizers") or []):
            # (a promoted rollout's candidate is the new primary: deleting its policy leaves it serving)
            report.count("deletions checked")
            _restored(report, name, r.vs, event, "finalizer released")
    for name, outcome in (outcomes or {}).items():
        if outcome.startswith("Stuck"):
            hold = documented_hold((final_policies or {}).get(name))
            report.count("unfinished rollouts")
            if hold is None:
                report.add("deadline", name, f"never ended ({outcome}) and not in a documented hold")
            else:
                report.count(f"documented holds: {hold}")

    for name, vs in (finals or {}).items():
        report.count("final objects checked")
        if vs is None or vs.get("kind") not in ROUTE_KINDS:
            report.add("final-missing", name, "no final route object")
            continue
        for route_name, total in sums(vs):
            report.add("final-weights-sum", name, f"route {route_name} weights sum to {total}")
        created = rollouts.get(name, _Rollout()).created
        if created is not None and unmanaged(vs) != unmanaged(created):
            report.add("final-other-routes", name, "a route shadowctl does not manage differs from the created one")
        outcome = (outcomes or {}).get(name, "?")
        if outcome in ("RolledBack", "Failed", "Deleted"):
            route = route_of(vs) or {}
            if candidate_weight(route) or mirrored(route):
                report.add("final-restored", name, f"after {outcome}: candidate {candidate_share(route):g}%, "
                           f"mirror {mirrored(route)}")
    return report


TERMINAL = ("Succeeded", "RolledBack", "Failed")


def shadow_pass_problems(policy: JSON, status: JSON) -> list[str]:
    """Why the persisted verdict a shadow pass rests on does not carry the data it needs (empty: it does)."""
    verdict = status.get("lastVerdict") or {}
    if verdict.get("outcome") != "pass":
        return [f"candidate traffic after the shadow phase with the persisted verdict {verdict.get('outcome')!r}"]
    outputs = ((policy.get("spec") or {}).get("analysis") or {}).get("outputs")
    if not isinstance(outputs, dict):
        return []
    min_pairs = int(outputs.get("minPairs", 100))
    metrics = {str(m.get("name")): m for m in verdict.get("metrics") or [] if isinstance(m, dict)}
    problems = []
    for comparator in outputs.get("comparators") or []:
        name = f"agreement/{comparator.get('name')}"
        metric = metrics.get(name)
        if metric is None:
            problems.append(f"the shadow phase passed without {name} in its persisted verdict")
            continue
        pairs = (metric.get("samples") or {}).get("candidate")
        if metric.get("outcome") != "pass" or not isinstance(pairs, int | float) or pairs < min_pairs:
            problems.append(f"the shadow phase passed with {name} {metric.get('outcome')!r} on {pairs} candidate "
                            f"pairs (minPairs {min_pairs})")
    return problems


def _deadline(report: Report, name: str, obj: JSON, event: JSON) -> None:
    """The first status that records a terminal phase: no later than the progress deadline + grace."""
    status = obj.get("status") or {}
    started = (status.get("rollout") or {}).get("rolloutStartedAt")
    deadline = _seconds((obj.get("spec") or {}).get("progressDeadline", "2h"))
    ended = _epoch(status.get("lastTick"))
    report.count("ends checked")
    if not isinstance(started, int | float) or deadline is None or ended is None:
        return
    if ended - started > deadline + DEADLINE_GRACE:
        report.add("deadline", name, f"{_phase(status)} recorded {ended - started:.1f} s after the rollout started, "
                   f"past its progress deadline ({deadline:g} s) + {DEADLINE_GRACE:g} s", event)


def _restored(report: Report, name: str, vs: JSON | None, event: JSON, when: str) -> None:
    route = route_of(vs or {}) or {}
    weight = candidate_weight(route)
    if weight or mirrored(route):
        report.add("rollback-restored", name, f"{when} while the route gives the candidate {weight}% "
                   f"and {'has' if mirrored(route) else 'has no'} mirror", event)
