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
  not the primary subset) no more than the step the policy has reached. Routes are written before the
  status that records the step (a crash between the two is allowed, DESIGN.md), so a write is judged
  against the status before it and the first status a controller records after it: the weight is
  allowed by either. The weight a status allows: 0 in Pending and Shadowing (the shadow phase has not
  passed), 100 in Promoting and Succeeded, else ``rollout.canaryWeight``;
Order: by the stored resourceVersion; a landed write that made no new revision (a no-op update, or the
patch that releases a deleted object's last finalizer, which answers with the object as last stored) is
placed after every write the log holds before it (the log backend writes events as requests complete).

* ``rollback-restored`` (invariant 3): when a status first records RolledBack, and when a controller
  lets a deleted policy's finalizer go, the VirtualService as it stands then gives the candidate 0 and
  has no mirror;
* ``unconditional-write``: every controller update or patch of a route, a policy or its status names
  the resourceVersion it was computed from (so a stale leader's write fails 409 and never lands);
* ``final-*``: the final VirtualService of each rollout: weights sum to 100, unmanaged routes as created,
  and after RolledBack, Failed or a deletion: candidate 0, no mirror.

The checker must be able to fail: tests/test_faults.py plants writes that break each rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
ROUTE = "chat-default"
PRIMARY_SUBSET = "v1"
FINALIZER_PREFIX = "shadowctl.dev/"


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
        row: JSON = {"rule": rule, "rollout": rollout, "detail": detail}
        if event is not None:
            row["rv"] = _rv(event.get("responseObject"))
            row["user"] = (event.get("user") or {}).get("username")
            row["auditID"] = event.get("auditID")
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


def route_of(vs: JSON, name: str = ROUTE) -> JSON | None:
    for route in (vs.get("spec") or {}).get("http") or []:
        if route.get("name") == name:
            return dict(route)
    return None


def candidate_weight(route: JSON) -> int:
    dests = route.get("route") or []
    return sum(_weight(d, len(dests) == 1) for d in dests
               if (d.get("destination") or {}).get("subset") != PRIMARY_SUBSET)


def sums(vs: JSON) -> list[tuple[str, int]]:
    """(route name, weight sum) of every route whose weights do not sum to 100."""
    bad = []
    for route in (vs.get("spec") or {}).get("http") or []:
        dests = route.get("route") or []
        total = sum(_weight(d, len(dests) == 1) for d in dests)
        if dests and total != 100:
            bad.append((str(route.get("name")), total))
    return bad


def unmanaged(vs: JSON) -> list[JSON]:
    return [r for r in (vs.get("spec") or {}).get("http") or [] if r.get("name") != ROUTE]


def allowed(status: JSON | None) -> int:
    """The most candidate weight a recorded status allows (see the module docstring)."""
    if not status:
        return 0
    rollout = status.get("rollout") or {}
    phase = rollout.get("phase") or status.get("phase") or "Pending"
    if phase in ("Pending", "Shadowing"):
        return 0
    if phase in ("Promoting", "Succeeded"):
        return 100
    return int(rollout.get("canaryWeight") or 0)


def _phase(status: JSON | None) -> str:
    return str((status or {}).get("phase") or "Pending")


@dataclass
class _Rollout:
    created: JSON | None = None
    vs: JSON | None = None
    status: JSON | None = None
    waiting: list[tuple[JSON, int, int]] = field(default_factory=list)
    """Controller route writes waiting for the next status: (event, candidate weight, allowed before)."""


def check(events: Iterable[JSON], *, namespace: str, writers: Sequence[str],
          outcomes: Mapping[str, str] | None = None, finals: Mapping[str, JSON | None] | None = None) -> Report:
    """Replay the audit log's writes in ``namespace``; ``writers``: the controllers' user names."""
    report = Report()
    writes: list[tuple[int, int, JSON]] = []
    newest = 0  # the highest revision a landed write has got so far, in the log's order
    for order, event in enumerate(events):
        ref = event.get("objectRef") or {}
        if event.get("stage") != "ResponseComplete" or ref.get("namespace") != namespace:
            continue
        if ref.get("resource") not in ("virtualservices", "shadowpolicies"):
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
        if ref["resource"] == "virtualservices":
            if r.created is None:
                r.created = obj
            r.vs = obj
            if not mine:
                continue
            report.count("controller route writes")
            for route_name, total in sums(obj):
                report.add("weights-sum", name, f"route {route_name} weights sum to {total}", event)
            if r.created is not None and unmanaged(obj) != unmanaged(r.created):
                report.add("other-routes", name, "a route shadowctl does not manage was changed", event)
            route = route_of(obj)
            weight = candidate_weight(route) if route else 0
            if weight > 0:
                r.waiting.append((event, weight, allowed(r.status)))
            continue
        # a ShadowPolicy write (the object or its status): it carries the status as stored
        status = obj.get("status") or {}
        before = r.status
        r.status = status
        if mine and ref.get("subresource") == "status":
            report.count("controller status writes")
            for waiting, weight, prior in r.waiting:
                if weight > max(prior, allowed(status)):
                    report.add("step-bound", name, f"candidate weight {weight} with status allowing {prior} "
                               f"before and {allowed(status)} after ({_phase(status)})", waiting)
            r.waiting.clear()
        if _phase(status) == "RolledBack" and _phase(before) != "RolledBack":
            report.count("rollbacks checked")
            _restored(report, name, r.vs, event, "RolledBack recorded")
        meta = obj.get("metadata") or {}
        if mine and meta.get("deletionTimestamp") and not any(
                str(f).startswith(FINALIZER_PREFIX) for f in meta.get("finalizers") or []):
            report.count("deletions checked")
            _restored(report, name, r.vs, event, "finalizer released")
    for name, r in rollouts.items():  # route writes no status followed: judged by the status before them
        for waiting, weight, prior in r.waiting:
            if weight > prior:
                report.add("step-bound", name, f"candidate weight {weight}, status before allowed {prior}, "
                           "and no status after", waiting)

    for name, vs in (finals or {}).items():
        report.count("final objects checked")
        if vs is None or vs.get("kind") != "VirtualService":
            report.add("final-missing", name, "no final VirtualService")
            continue
        for route_name, total in sums(vs):
            report.add("final-weights-sum", name, f"route {route_name} weights sum to {total}")
        created = rollouts.get(name, _Rollout()).created
        if created is not None and unmanaged(vs) != unmanaged(created):
            report.add("final-other-routes", name, "a route shadowctl does not manage differs from the created one")
        outcome = (outcomes or {}).get(name, "?")
        if outcome in ("RolledBack", "Failed", "Deleted"):
            route = route_of(vs) or {}
            if candidate_weight(route) or "mirror" in route:
                report.add("final-restored", name, f"after {outcome}: candidate {candidate_weight(route)}%, "
                           f"mirror {'mirror' in route}")
    return report


def _restored(report: Report, name: str, vs: JSON | None, event: JSON, when: str) -> None:
    route = route_of(vs or {}) or {}
    weight = candidate_weight(route)
    if weight or "mirror" in route:
        report.add("rollback-restored", name, f"{when} while the route gives the candidate {weight}% "
                   f"and {'has' if 'mirror' in route else 'has no'} mirror", event)
