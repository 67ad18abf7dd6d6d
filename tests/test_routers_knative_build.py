"""The pure Knative Service traffic builders, on realistic fixtures and generated traffic blocks."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routers_util import assert_valid, load

from shadowctl.policy.model import KnativeTarget
from shadowctl.routers import knative_build
from shadowctl.routers.base import (
    MANAGED_ANNOTATION,
    DestinationNotFound,
    RouteState,
    UnmanagedTraffic,
    Unsupported,
    WouldBeRejected,
)

TARGET = KnativeTarget(service="llm")
KNOWN = {"llm-00001", "llm-00002"}


def _record(obj: dict[str, Any]) -> dict[str, Any]:
    return json.loads(obj["metadata"]["annotations"][MANAGED_ANNOTATION])


@pytest.mark.usefixtures("local_cluster")  # assert_valid asks the real API server
def test_defaults_pin_primary_and_tag_candidate_keeping_others_tags() -> None:
    svc = load("ksvc-llm.yaml")
    pristine = copy.deepcopy(svc)
    new, modified = knative_build.build(svc, TARGET, RouteState(90, 10), KNOWN)
    assert modified and svc == pristine
    assert new["spec"]["traffic"] == [
        {"revisionName": "llm-00001", "percent": 90},
        {"tag": "latest", "latestRevision": True, "percent": 0},
        {"tag": "stable", "revisionName": "llm-00001", "percent": 0},
        {"tag": "candidate", "revisionName": "llm-00002", "percent": 10},
    ]
    assert new["spec"]["template"] == pristine["spec"]["template"]
    assert _record(new) == {"version": 1, "traffic": {
        "primaryRevision": "llm-00001", "candidateRevision": "llm-00002", "candidateTag": "candidate"}}
    assert knative_build.read_state(new, TARGET, KNOWN) == RouteState(90, 10)
    assert not knative_build.build(new, TARGET, RouteState(90, 10), KNOWN).modified
    assert_valid(new)


def test_shadow_step_adds_the_tag_at_zero() -> None:
    new, modified = knative_build.build(load("ksvc-llm.yaml"), TARGET, RouteState(100, 0), KNOWN)
    assert modified
    assert new["spec"]["traffic"][-1] == {"tag": "candidate", "revisionName": "llm-00002", "percent": 0}


def test_revisions_stay_fixed_after_latest_ready_moves_on() -> None:
    obj, _ = knative_build.build(load("ksvc-llm.yaml"), TARGET, RouteState(50, 50), KNOWN)
    obj["status"]["latestReadyRevisionName"] = "llm-00003"  # someone deployed again mid-rollout
    new, _ = knative_build.build(obj, TARGET, RouteState(20, 80), KNOWN | {"llm-00003"})
    assert [t.get("revisionName") for t in new["spec"]["traffic"]] == ["llm-00001", None, "llm-00001", "llm-00002"]


def test_rollback_and_keep_candidate_tag() -> None:
    svc = load("ksvc-llm.yaml")
    obj, _ = knative_build.build(svc, TARGET, RouteState(60, 40), KNOWN)
    restored, _ = knative_build.finalize(obj, TARGET, known_revisions=KNOWN)
    assert restored == svc
    kept, _ = knative_build.finalize(obj, TARGET, keep_candidate=True, known_revisions=KNOWN)
    assert kept["spec"]["traffic"][-1] == {"tag": "candidate", "revisionName": "llm-00002", "percent": 0}
    assert MANAGED_ANNOTATION not in kept["metadata"]["annotations"]
    assert not knative_build.finalize(restored, TARGET).modified


@pytest.mark.usefixtures("local_cluster")  # assert_valid asks the real API server
def test_promote_pins_the_candidate() -> None:
    obj, _ = knative_build.build(load("ksvc-llm.yaml"), TARGET, RouteState(10, 90), KNOWN)
    promoted, _ = knative_build.promote(obj, TARGET, KNOWN)
    assert promoted["spec"]["traffic"] == [
        {"revisionName": "llm-00002", "percent": 100},
        {"tag": "latest", "latestRevision": True, "percent": 0},
        {"tag": "stable", "revisionName": "llm-00001", "percent": 0},
    ]
    assert knative_build.promoted_revision(promoted) == "llm-00002"
    assert not knative_build.promote(promoted, TARGET, KNOWN).modified
    assert_valid(promoted)


def test_floating_primary_is_pinned_before_anything_moves() -> None:
    svc = load("ksvc-floating.yaml")
    target = KnativeTarget(service="llm", candidate_revision="llm-00002")
    new, _ = knative_build.build(svc, target, RouteState(100, 0), KNOWN)
    assert new["spec"]["traffic"] == [
        {"percent": 100, "revisionName": "llm-00001"},
        {"tag": "candidate", "revisionName": "llm-00002", "percent": 0},
    ]
    assert _record(new)["traffic"]["pinnedLatest"] == {"latestRevision": True, "percent": 100}


def test_candidate_already_serving_everything_is_an_error() -> None:
    with pytest.raises(DestinationNotFound, match="llm-00001 already receives 100%"):
        knative_build.build(load("ksvc-floating.yaml"), KnativeTarget(service="llm"), RouteState(90, 10))


def test_first_touch_waits_for_a_current_status() -> None:
    """Knative writes status after the spec: a stale latestReadyRevisionName must not become the candidate."""
    svc = load("ksvc-llm.yaml")
    svc["metadata"]["generation"] = 3  # someone deployed llm-00003; the controller has not reported it yet
    svc["status"]["observedGeneration"] = 2
    for attempt in (lambda s: knative_build.build(s, TARGET, RouteState(90, 10), KNOWN),
                    lambda s: knative_build.promote(s, TARGET, KNOWN)):
        with pytest.raises(DestinationNotFound, match="has not reconciled generation 3 yet"):
            attempt(svc)
    named = KnativeTarget(service="llm", primary_revision="llm-00001", candidate_revision="llm-00002")
    assert knative_build.build(svc, named, RouteState(90, 10), KNOWN).modified  # nothing taken from status
    svc["status"]["observedGeneration"] = 3
    svc["status"]["latestCreatedRevisionName"] = "llm-00003"  # created, not ready yet
    with pytest.raises(DestinationNotFound, match="latest created revision llm-00003 is not ready yet"):
        knative_build.build(svc, TARGET, RouteState(90, 10), KNOWN | {"llm-00003"})
    svc["status"]["latestReadyRevisionName"] = "llm-00003"
    new, modified = knative_build.build(svc, TARGET, RouteState(90, 10), KNOWN | {"llm-00003"})
    assert modified and _record(new)["traffic"]["candidateRevision"] == "llm-00003"
    # Once resolved, later steps use the record: a status that lags the router's own write is fine.
    new["metadata"]["generation"] = 4
    later, _ = knative_build.build(new, TARGET, RouteState(50, 50), KNOWN | {"llm-00003"})
    assert later["spec"]["traffic"][-1] == {"tag": "candidate", "revisionName": "llm-00003", "percent": 50}
    assert knative_build.read_state(later, TARGET) == RouteState(50, 50)


def test_missing_revision_is_named() -> None:
    target = KnativeTarget(service="llm", candidate_revision="llm-00009")
    with pytest.raises(DestinationNotFound, match=r"'llm-00009' does not exist; known revisions: llm-00001, llm-00002"):
        knative_build.build(load("ksvc-llm.yaml"), target, RouteState(90, 10), KNOWN)


def test_mirroring_is_unsupported() -> None:
    with pytest.raises(Unsupported, match=r"shadow\.virtualService"):
        knative_build.build(load("ksvc-llm.yaml"), TARGET, RouteState(100, 0, 5.0))


def _with_previous(percent: int = 10) -> dict[str, Any]:
    """The fixture with a `previous` tag pinned to llm-00000 holding ``percent`` (the primary the rest)."""
    svc = load("ksvc-llm.yaml")
    svc["spec"]["traffic"][0]["percent"] = 100 - percent
    svc["spec"]["traffic"].append({"tag": "previous", "revisionName": "llm-00000", "percent": percent})
    return svc


@pytest.mark.usefixtures("local_cluster")  # assert_valid asks the real API server
def test_a_third_target_keeps_its_share_through_a_whole_rollout() -> None:
    """A `previous` tag holding 10%: each step's percent comes from the primary, rollback gives it back."""
    svc = _with_previous()
    known = KNOWN | {"llm-00000"}
    assert knative_build.read_state(svc, TARGET, known) == RouteState(100, 0)
    obj = svc
    for step in (0, 10, 50, 90):
        obj, _ = knative_build.build(obj, TARGET, RouteState(100 - step, step), known)
        percents = {(t.get("tag"), t.get("revisionName")): t["percent"] for t in obj["spec"]["traffic"]}
        assert percents == {(None, "llm-00001"): 90 - step, ("latest", None): 0, ("stable", "llm-00001"): 0,
                            ("previous", "llm-00000"): 10, ("candidate", "llm-00002"): step}
        assert knative_build.read_state(obj, TARGET, known) == RouteState(100 - step, step)
        assert_valid(obj)
    with pytest.raises(UnmanagedTraffic, match="hold 10% of the traffic, so the candidate cannot get 95%"):
        knative_build.build(obj, TARGET, RouteState(5, 95), known)
    assert knative_build.finalize(obj, TARGET, known_revisions=known).obj == svc
    promoted, _ = knative_build.promote(obj, TARGET, known)
    assert promoted["spec"]["traffic"] == [
        {"revisionName": "llm-00002", "percent": 90},
        {"tag": "latest", "latestRevision": True, "percent": 0},
        {"tag": "stable", "revisionName": "llm-00001", "percent": 0},
        {"tag": "previous", "revisionName": "llm-00000", "percent": 10},
    ]
    assert knative_build.promoted_revision(promoted, "candidate") == "llm-00002"
    assert not knative_build.promote(promoted, TARGET, known).modified
    assert_valid(promoted)


def test_rendering_a_service_with_a_third_target_is_no_longer_refused() -> None:
    """Before: "shadowctl will not guess how to rebalance them"; now the candidate's share comes from the
    primary, as for Istio's third destinations."""
    new, _ = knative_build.build(_with_previous(), TARGET, RouteState(80, 20))
    assert [t["percent"] for t in new["spec"]["traffic"]] == [70, 0, 0, 10, 20]


def test_a_latest_revision_target_that_follows_the_candidate_is_refused() -> None:
    """A floating target with a share follows the latest ready revision, the candidate: it would get more
    than its step (before the shadow phase passed, too)."""
    svc = load("ksvc-llm.yaml")
    svc["spec"]["traffic"][0]["percent"] = 80
    svc["spec"]["traffic"][1]["percent"] = 20
    with pytest.raises(UnmanagedTraffic, match=r"sends latestRevision \(tag latest\) 20% to the candidate revision"):
        knative_build.build(svc, KnativeTarget(service="llm", primary_revision="llm-00001"), RouteState(90, 10))
    assert knative_build.read_state(svc, KnativeTarget(service="llm", primary_revision="llm-00001")) == RouteState(
        80, 20), "what reaches the candidate counts as the candidate's"


def test_a_latest_revision_target_on_another_revision_keeps_its_share() -> None:
    """Rolling out llm-00002 while llm-00003 is the latest ready: a floating `latest` tag with 10% follows
    llm-00003, a third revision, so it keeps its 10%."""
    svc = load("ksvc-llm.yaml")
    svc["spec"]["traffic"][0]["percent"] = 90
    svc["spec"]["traffic"][1]["percent"] = 10
    svc["status"]["latestReadyRevisionName"] = svc["status"]["latestCreatedRevisionName"] = "llm-00003"
    svc["status"]["traffic"][1]["revisionName"] = "llm-00003"
    target = KnativeTarget(service="llm", candidate_revision="llm-00002")
    new, _ = knative_build.build(svc, target, RouteState(70, 30))
    assert [t["percent"] for t in new["spec"]["traffic"]] == [60, 10, 0, 30]
    assert knative_build.finalize(new, target).obj == svc


@pytest.mark.parametrize(
    ("traffic", "words"),
    [
        ([{"revisionName": "a", "percent": 60}], "sum to 60"),
        ([{"revisionName": "a", "latestRevision": True, "percent": 100}], "both revisionName and latestRevision"),
        ([{"percent": 100}], "needs revisionName or latestRevision"),
        ([{"revisionName": "a", "percent": 100, "tag": "x"}, {"latestRevision": True, "tag": "x"}], "used twice"),
        ([{"revisionName": "zz", "percent": 100}], "'zz' does not exist"),
    ],
)
def test_check_traffic_refuses_what_knative_would(traffic: list[dict[str, Any]], words: str) -> None:
    with pytest.raises(WouldBeRejected, match=words):
        knative_build.check_traffic({"kind": "Service"}, traffic, {"a"})


# --------------------------------------------------------------------------- properties


@st.composite
def services(draw: st.DrawFn) -> dict[str, Any]:
    """A Service whose primary holds what other targets leave, with other targets (tags pinned to the
    primary or an old revision with a share; tags on the candidate and latest at 0%) in any order."""
    primary: dict[str, Any] = {"revisionName": "p", "percent": 100}
    traffic: list[dict[str, Any]] = [primary]
    for i in range(draw(st.integers(0, 3))):
        entry: dict[str, Any] = {"tag": f"t{i}"}
        if draw(st.booleans()):
            entry["latestRevision"] = True
        else:
            entry["revisionName"] = draw(st.sampled_from(["p", "c", "old"]))
        share = draw(st.sampled_from([0, 5, 10, 30])) if entry.get("revisionName") in ("p", "old") else 0
        if share or draw(st.booleans()):
            entry["percent"] = share
            primary["percent"] -= share
        traffic.insert(draw(st.integers(0, len(traffic))), entry)
    return {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
            "metadata": {"name": "s", "namespace": "ns", "resourceVersion": "3"},
            "spec": {"template": {"spec": {"containers": [{"image": "x"}]}}, "traffic": traffic},
            "status": {"latestReadyRevisionName": "c"}}


def _unmanaged(traffic: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Targets that are neither the candidate's tag nor the untagged primary: shadowctl must not touch them."""
    return [t for t in traffic if t.get("tag") != "candidate" and (t.get("tag") or t.get("revisionName") != "p")]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(services(), st.lists(st.integers(0, 100), min_size=1, max_size=4))
def test_knative_builds_keep_invariants(svc: dict[str, Any], steps: list[int]) -> None:
    pristine = copy.deepcopy(svc)
    target = KnativeTarget(service="s")
    obj = svc
    others = 100 - svc["spec"]["traffic"][[t.get("tag") for t in svc["spec"]["traffic"]].index(None)]["percent"]
    for cw in steps:
        state = RouteState(100 - cw, cw)
        if others + cw > 100:
            with pytest.raises(UnmanagedTraffic, match="cannot get"):
                knative_build.build(obj, target, state, {"p", "c", "old"})
            continue
        new, _ = knative_build.build(obj, target, state, {"p", "c", "old"})
        traffic = new["spec"]["traffic"]
        assert sum(t.get("percent", 0) for t in traffic) == 100
        assert sum(t.get("percent", 0) for t in traffic if t.get("tag") == "candidate") == cw
        assert knative_build.read_state(new, target) == state
        assert _unmanaged(traffic) == _unmanaged(pristine["spec"]["traffic"])
        assert not knative_build.build(new, target, state, {"p", "c", "old"}).modified
        obj = new
    assert knative_build.finalize(obj, target).obj == pristine
