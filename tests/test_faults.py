"""The fault campaign (bench/faults) stays runnable, finds no violation in a tiny run, and its checker can fail.

A tiny campaign: 5 rollouts drawing from two fault kinds (API 500s through the fault proxy, GitOps drift by
a concurrent writer), on its own audited control plane, two controller processes (`shadowctl run`'s wiring,
Lease election; the metric source is a stub at the port, as the campaign's docstring says). Then writes
that break each rule are planted, by hand, among the real audit events: a checker that cannot fail is
worthless. The big runs are by hand (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import copy
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "faults"))

import audit
import run

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[run.Outcome], list[JSON]]:
    workdir = tmp_path_factory.mktemp("faults")
    args = run.parser().parse_args(["--rollouts", "5", "--seed", "7", "--concurrency", "5",
                                    "--faults", "api-500,gitops-drift", "--rollout-timeout", "120"])
    result, outcomes = asyncio.run(run.campaign(args, workdir))
    return result, outcomes, audit.read_log(workdir / "audit.log")


def _check(events: list[JSON], outcomes: list[run.Outcome], finals: dict[str, Any] | None = None) -> audit.Report:
    return audit.check(events, namespace=run.NS, writers=run.WRITERS,
                       outcomes={o.name: o.outcome for o in outcomes},
                       finals=finals if finals is not None else {o.name: o.final_vs for o in outcomes})


def _controller_route_writes(events: list[JSON]) -> list[int]:
    return [i for i, e in enumerate(events)
            if (e.get("objectRef") or {}).get("resource") == "virtualservices" and e.get("verb") == "update"
            and (e.get("user") or {}).get("username") in run.WRITERS
            and int((e.get("responseStatus") or {}).get("code") or 0) < 300]


def _route(event: JSON) -> JSON:
    route = audit.route_of(event["responseObject"])
    assert route is not None
    return route


def _plant(events: list[JSON], index: int, change: Any) -> list[JSON]:
    """The events with a changed copy of events[index] right after it (as if the controller had written it)."""
    forged = copy.deepcopy(events[index])
    forged["auditID"] = "planted"
    change(forged)
    return [*events[: index + 1], forged, *events[index + 1:]]


def test_tiny_campaign_finishes_every_rollout_without_a_violation(tiny: Any) -> None:
    result, outcomes, _ = tiny
    assert result["violations"] == 0, result["violation_list"]
    assert {o.outcome for o in outcomes} <= {"Succeeded", "RolledBack"}, [(o.name, o.outcome) for o in outcomes]
    applied = {k for o in outcomes for k in o.applied}
    assert applied == {"api-500", "gitops-drift"}
    checked = result["checked"]
    assert checked["controller route writes"] >= 5 and checked["controller status writes"] >= 5, checked
    assert checked["final objects checked"] == 5


def test_the_audit_log_records_who_wrote_a_route_and_from_which_version(tiny: Any) -> None:
    _, _, events = tiny
    writes = _controller_route_writes(events)
    assert writes
    event = events[writes[0]]
    assert event["level"] == "RequestResponse" and event["stage"] == "ResponseComplete"
    assert event["requestObject"]["metadata"]["resourceVersion"]  # the version it was computed from
    assert int(event["responseObject"]["metadata"]["resourceVersion"]) > int(
        event["requestObject"]["metadata"]["resourceVersion"])
    assert _route(event)  # the route as stored


def test_the_checker_catches_planted_violations(tiny: Any) -> None:
    _, outcomes, events = tiny
    assert _check(events, outcomes).violations == []
    first = _controller_route_writes(events)[0]  # the shadow phase's mirror write: status says Shadowing

    def sum_90(e: JSON) -> None:
        for r in e["responseObject"]["spec"]["http"]:
            if r.get("name") == audit.ROUTE:
                r["route"] = [{**r["route"][0], "weight": 90}]

    def early_canary(e: JSON) -> None:
        for r in e["responseObject"]["spec"]["http"]:
            if r.get("name") == audit.ROUTE:
                primary = r["route"][0]
                candidate = copy.deepcopy(primary)
                candidate["destination"]["subset"] = "v2"
                r["route"] = [{**primary, "weight": 90}, {**candidate, "weight": 10}]

    def other_route(e: JSON) -> None:
        other = next(r for r in e["responseObject"]["spec"]["http"] if r.get("name") != audit.ROUTE)
        other["timeout"] = "1s"

    def unconditional(e: JSON) -> None:
        del e["requestObject"]["metadata"]["resourceVersion"]

    for change, rule in ((sum_90, "weights-sum"), (early_canary, "step-bound"), (other_route, "other-routes"),
                         (unconditional, "unconditional-write")):
        report = _check(_plant(events, first, change), outcomes)
        assert [v["rule"] for v in report.violations] == [rule], (rule, report.violations)
        assert report.violations[0]["auditID"] == "planted"

    # Invariant 3: a rollout recorded as rolled back (or deleted) whose final route still mirrors.
    name = outcomes[0].name
    final = copy.deepcopy(outcomes[0].final_vs)
    for r in final["spec"]["http"]:
        if r.get("name") == audit.ROUTE:
            r["mirror"] = {"host": "chat.llm.svc.cluster.local", "subset": "v2"}
    report = audit.check(events, namespace=run.NS, writers=run.WRITERS, outcomes={name: "RolledBack"},
                         finals={name: final})
    assert [v["rule"] for v in report.violations] == ["final-restored"], report.violations


def _raising_route_writes(events: list[JSON]) -> list[tuple[int, int]]:
    """(index of a controller route write giving the candidate live traffic, index of the status write
    that recorded its intent just before it, for the same rollout)."""
    out = []
    for i in _controller_route_writes(events):
        if not audit.candidate_weight(_route(events[i])):
            continue
        name = events[i]["objectRef"]["name"]
        for j in range(i - 1, -1, -1):
            e = events[j]
            if (e.get("objectRef") or {}).get("resource") == "shadowpolicies" and e["objectRef"].get("name") == name \
                    and int((e.get("responseStatus") or {}).get("code") or 0) < 300 \
                    and isinstance(e.get("responseObject"), dict):
                if (e["responseObject"].get("status") or {}).get("pendingRoute"):
                    out.append((i, j))
                break
    return out


def test_a_raise_is_allowed_by_the_intent_recorded_before_it_and_only_then(tiny: Any) -> None:
    """Every raise of the candidate's share in the real log was recorded as an intent right before it; a
    raise whose intent is taken out (routes first, the status after: what a kill between the two writes
    left) is a step-bound violation, although the status written after it allows the weight."""
    _, outcomes, events = tiny
    raises = _raising_route_writes(events)
    assert raises, "no raise of the candidate's share recorded as an intent in the tiny campaign"
    route_write, intent_write = raises[0]
    forged = copy.deepcopy(events)
    del forged[intent_write]["responseObject"]["status"]["pendingRoute"]
    report = _check(forged, outcomes)
    assert [v["rule"] for v in report.violations] == ["step-bound"], report.violations
    assert report.violations[0]["auditID"] == events[route_write]["auditID"]
    assert report.violations[0]["write"]["resource"] == "virtualservices"
    assert report.violations[0]["invariant"].startswith("the candidate's live share never exceeds")


def test_the_checker_catches_a_promotion_without_a_passing_verdict(tiny: Any) -> None:
    _, outcomes, events = tiny
    promotions = [(i, j) for i, j in _raising_route_writes(events) if audit.candidate_weight(_route(events[i])) == 100]
    if not promotions:
        pytest.skip("no rollout of the tiny campaign was promoted")  # pragma: no cover - seed 7 promotes
    route_write, intent_write = promotions[0]
    assert events[intent_write]["responseObject"]["status"]["lastVerdict"]["outcome"] == "pass"
    forged = copy.deepcopy(events)
    forged[intent_write]["responseObject"]["status"]["lastVerdict"]["outcome"] = "continue"
    report = _check(forged, outcomes)
    assert [v["rule"] for v in report.violations] == ["promotion-verdict"], report.violations
    assert report.violations[0]["auditID"] == events[route_write]["auditID"]


def test_the_checker_catches_a_shadow_pass_without_enough_output_pairs(tiny: Any) -> None:
    """The tiny campaign's policies compare outputs over a real Mosquitto: each shadow pass rests on a persisted
    verdict whose agreement metric passed on at least minPairs pairs. One that rests on fewer pairs, or on a
    verdict without the output comparison (a broker that was down read as a pass), is a violation."""
    _, outcomes, events = tiny
    assert all(o.outputs for o in outcomes)
    from_shadow = [(i, j) for i, j in _raising_route_writes(events)
                   if events[j]["responseObject"]["status"].get("phase") == "Shadowing"]
    assert from_shadow, "no rollout of the tiny campaign passed its shadow phase"
    route_write, intent_write = from_shadow[0]
    status = events[intent_write]["responseObject"]["status"]
    [agreement] = [m for m in status["lastVerdict"]["metrics"] if m["name"] == "agreement/token-f1"]
    assert agreement["outcome"] == "pass" and agreement["samples"]["candidate"] >= run.OUTPUTS["minPairs"]

    def few_pairs(s: JSON) -> None:
        next(m for m in s["lastVerdict"]["metrics"] if m["name"] == "agreement/token-f1")["samples"]["candidate"] = 5

    def no_outputs(s: JSON) -> None:
        s["lastVerdict"]["metrics"] = [m for m in s["lastVerdict"]["metrics"] if m["name"] != "agreement/token-f1"]

    for change in (few_pairs, no_outputs):
        forged = copy.deepcopy(events)
        change(forged[intent_write]["responseObject"]["status"])
        report = _check(forged, outcomes)
        assert [v["rule"] for v in report.violations] == ["shadow-pass-data"], report.violations
        assert report.violations[0]["auditID"] == events[route_write]["auditID"]


def test_the_checker_catches_a_rollout_that_never_ended(tiny: Any) -> None:
    """A rollout left in Shadowing is a deadline violation, also when its spec was refused mid-rollout (the
    controller rolls it back at the recorded deadline); one whose spec was refused before it started (Pending,
    nothing routed) or that is Paused is a documented hold."""
    _, outcomes, events = tiny
    name = outcomes[0].name
    finals = {name: outcomes[0].final_vs}
    shadowing = {"status": {"phase": "Shadowing", "conditions": [{"type": "Ready", "status": "True"}]}}
    refused = {"status": {"phase": "Pending", "conditions": [
        {"type": "Ready", "status": "False", "message": "invalid spec: spec: progressDeadline too short"}]}}
    refused_mid = {"status": {**refused["status"], "phase": "Shadowing"}}
    for final, rules in ((shadowing, ["deadline"]), (refused, []), (refused_mid, ["deadline"]),
                         ({"status": {"phase": "Paused"}}, [])):
        report = audit.check(events, namespace=run.NS, writers=run.WRITERS, outcomes={name: "Stuck:Shadowing"},
                             finals=finals, final_policies={name: final})
        assert [v["rule"] for v in report.violations] == rules, (final, report.violations)


def _event(resource: str, name: str, rv: int, obj: JSON, *, user: str = run.WRITERS[0],
           subresource: str | None = None) -> JSON:
    ref = {"resource": resource, "name": name, "namespace": run.NS}
    if subresource:
        ref["subresource"] = subresource
    stored = {**obj, "metadata": {**obj.get("metadata", {}), "name": name, "resourceVersion": str(rv)}}
    return {"stage": "ResponseComplete", "verb": "update", "objectRef": ref, "user": {"username": user},
            "responseStatus": {"code": 200}, "auditID": f"a{rv}",
            "requestObject": {"metadata": {"resourceVersion": str(rv - 1)}}, "responseObject": stored}


def test_the_checker_reads_httproute_weights_as_proportions() -> None:
    """A Gateway API rule's weights are proportions of the rule's total: 9:1 is 10% to the candidate, 1:1 is
    50%, whatever the sum; a RequestMirror filter is a mirror. Synthetic events (the tiny campaign above runs
    Istio targets only), judged by the same rules."""
    created = run.original_route("r-1", "gateway")

    def route(primary: int, candidate: int, mirror: bool = False) -> JSON:
        obj = copy.deepcopy(created)
        rule = next(r for r in obj["spec"]["rules"] if r["name"] == audit.ROUTE)
        rule["backendRefs"] = [{"name": "chat-v1", "port": 8000, "weight": primary},
                               {"name": "chat-v2", "port": 8000, "weight": candidate}]
        if mirror:
            rule["filters"] = [{"type": "RequestMirror", "requestMirror": {
                "backendRef": {"name": "chat-v2", "port": 8000}, "percent": 20}}]
        return obj

    def status(phase: str, weight: int) -> JSON:
        return {"status": {"phase": phase, "rollout": {"phase": phase, "canaryWeight": weight}}}

    def replay(*writes: JSON, outcome: str = "Succeeded", final: JSON | None = None) -> list[str]:
        events = [_event("httproutes", "r-1", 1, created, user="admin"),
                  *(_event(w["at"][0], w["at"][1], w["at"][2], w["obj"], subresource=w.get("sub")) for w in writes)]
        report = audit.check(events, namespace=run.NS, writers=run.WRITERS, outcomes={"r-1": outcome},
                             finals={"r-1": final if final is not None else events[-1]["responseObject"]})
        return [v["rule"] for v in report.violations]

    def vs(rv: int, obj: JSON) -> JSON:
        return {"at": ("httproutes", "r-1", rv), "obj": obj}

    def st(rv: int, obj: JSON) -> JSON:
        return {"at": ("shadowpolicies", "r-1", rv), "obj": obj, "sub": "status"}

    shadow = route(1, 0, mirror=True)
    assert audit.candidate_share(audit.route_of(route(9, 1)) or {}) == 10.0
    assert audit.candidate_share(audit.route_of(route(3, 3)) or {}) == 50.0
    assert audit.mirrored(audit.route_of(shadow) or {})
    assert replay(st(2, status("Shadowing", 0)), vs(3, shadow), st(4, status("Progressing", 10)),
                  vs(5, route(18, 2)), final=created) == []
    assert replay(st(2, status("Progressing", 10)), vs(3, route(1, 1))) == ["step-bound"]  # 50% at step 10
    assert replay(st(2, status("Shadowing", 0)), vs(3, route(9, 1))) == ["step-bound"]  # live before passing
    assert replay(st(2, status("Progressing", 10)), vs(3, route(0, 0)), final=created) == ["weights-sum"]  # none
    assert replay(st(2, status("RolledBack", 0)), vs(3, shadow), outcome="RolledBack") == ["final-restored"]
