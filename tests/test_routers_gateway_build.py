"""The pure HTTPRoute builders, on a realistic fixture and on generated objects (hypothesis).

The fixture's results are also sent to the real API server (a server-side dry run against Gateway
API v1.6.1's CRD, with its CEL rules), so what the builder writes is what the server accepts.
"""

from __future__ import annotations

import copy
import json
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from routers_util import assert_valid, load

from shadowctl.policy.model import BackendRef, GatewayAPITarget
from shadowctl.routers import gateway_build
from shadowctl.routers.base import (
    MANAGED_ANNOTATION,
    DestinationNotFound,
    RouteNotFound,
    RouteState,
    UnmanagedTraffic,
    WouldBeRejected,
)

TARGET = GatewayAPITarget(http_route="llm", rule="chat", primary=BackendRef(name="llm-v1"),
                          candidate=BackendRef(name="llm-v2"))


def _rule(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in obj["spec"]["rules"] if r.get("name") == name)


def _record(obj: dict[str, Any]) -> dict[str, Any]:
    return json.loads(obj["metadata"]["annotations"][MANAGED_ANNOTATION])


def _shares(rule: dict[str, Any]) -> dict[str, Fraction]:
    weights = {r["name"]: r.get("weight", 1) for r in rule["backendRefs"]}
    total = sum(weights.values())
    return {name: Fraction(w, total) for name, w in weights.items()}


# --------------------------------------------------------------------------- the fixture


@pytest.mark.usefixtures("local_cluster")
def test_canary_step_changes_only_the_managed_rule() -> None:
    route = load("httproute-llm.yaml")
    pristine = copy.deepcopy(route)
    new, modified = gateway_build.build(route, TARGET, RouteState(90, 10))
    assert modified
    assert route == pristine, "the input was mutated"
    chat = _rule(new, "chat")
    assert chat["backendRefs"] == [
        {**_rule(pristine, "chat")["backendRefs"][0], "weight": 9},
        {"name": "llm-v2", "port": 8000, "weight": 1},  # the primary's port: a Service backendRef needs one
    ]
    for key in ("matches", "filters", "timeouts"):
        assert chat[key] == _rule(pristine, "chat")[key]
    for key in ("parentRefs", "hostnames"):
        assert new["spec"][key] == pristine["spec"][key]
    assert [r for r in new["spec"]["rules"] if r["name"] != "chat"] == [
        r for r in pristine["spec"]["rules"] if r["name"] != "chat"]
    assert new["metadata"]["annotations"]["team"] == "inference"
    assert _record(new) == {"version": 1, "rules": {"chat": {"addedCandidate": True, "candidate": {"name": "llm-v2"},
                                                             "weights": [["llm-v1:8000", None]]}}}
    assert gateway_build.read_state(new, TARGET) == RouteState(90, 10)
    assert_valid(new)


@pytest.mark.usefixtures("local_cluster")
@pytest.mark.parametrize(("percent", "written"), [
    (5.0, {"percent": 5}),
    (2.5, {"fraction": {"numerator": 25, "denominator": 1000}}),
    (0.0001, {"fraction": {"numerator": 1, "denominator": 1000000}}),
    (100.0, {"percent": 100}),
])
def test_shadow_adds_a_mirror_beside_the_others(percent: float, written: dict[str, Any]) -> None:
    route = load("httproute-llm.yaml")
    new, _ = gateway_build.build(route, TARGET, RouteState(100, 0, percent))
    chat = _rule(new, "chat")
    before = _rule(route, "chat")["filters"]
    assert chat["filters"][:2] == before, "others' filters (their mirror included) stay, in order"
    assert chat["filters"][2] == {"type": "RequestMirror",
                                  "requestMirror": {"backendRef": {"name": "llm-v2", "port": 8000}, **written}}
    assert chat["backendRefs"] == _rule(route, "chat")["backendRefs"], "no backendRef while it is only mirrored to"
    assert gateway_build.read_state(new, TARGET) == RouteState(100, 0, percent)
    assert gateway_build.finalize(new, TARGET).obj == route
    assert_valid(new)


@pytest.mark.usefixtures("local_cluster")
def test_a_previous_candidate_of_ours_is_taken_out_when_the_candidate_changes() -> None:
    """bench/faults r-00201: mid-canary (llm-v2 at 50%, a backendRef shadowctl added) the policy names llm-v3.
    Before, a write for llm-v3 counted llm-v2 as someone else's backend and kept its 50% for good; now every
    builder first undoes what the record says was written for llm-v2 (its weight back to the primary, its
    backendRef removed, its mirror gone), as finalize for llm-v2 would."""
    route = load("httproute-llm.yaml")
    pristine = copy.deepcopy(route)
    v3 = TARGET.model_copy(update={"candidate": BackendRef(name="llm-v3")})
    mid, _ = gateway_build.build(route, TARGET, RouteState(50, 50))
    mid, _ = gateway_build.build(mid, TARGET, RouteState(50, 50, 5.0))  # and a mirror of ours, to be sure
    assert _shares(_rule(mid, "chat")) == {"llm-v1": Fraction(1, 2), "llm-v2": Fraction(1, 2)}
    for state in (RouteState(100, 0, 20.0), RouteState(50, 50), RouteState(100, 0)):
        new, _ = gateway_build.build(mid, v3, state)
        chat = _rule(new, "chat")
        assert "llm-v2" not in [r["name"] for r in chat["backendRefs"]], state
        assert [f for f in chat.get("filters", []) if f["type"] == "RequestMirror"
                and f["requestMirror"]["backendRef"]["name"] == "llm-v2"] == [], state
        assert _shares(chat).get("llm-v3", 0) == Fraction(state.candidate_weight, 100), state
        assert gateway_build.read_state(new, v3) == state
        if state == RouteState(100, 0):  # nothing of ours left: no record either
            assert MANAGED_ANNOTATION not in new["metadata"]["annotations"]
        else:
            assert _record(new)["rules"]["chat"]["candidate"] == {"name": "llm-v3"}
        assert_valid(new)
    restored, _ = gateway_build.finalize(mid, v3)  # a restart's finalize, built for the candidate named now
    assert restored == pristine
    promoted, _ = gateway_build.promote(mid, v3)
    assert _shares(_rule(promoted, "chat")) == {"llm-v1": 0, "llm-v3": 1}
    # A record's candidate that the policy now names as its primary is no longer ours to take out.
    swapped = GatewayAPITarget(http_route="llm", rule="chat", primary=BackendRef(name="llm-v2"),
                               candidate=BackendRef(name="llm-v3"))
    kept, _ = gateway_build.build(mid, swapped, RouteState(100, 0))
    assert "llm-v2" in [r["name"] for r in _rule(kept, "chat")["backendRefs"]]


def test_unchanged_state_is_not_modified() -> None:
    route = load("httproute-llm.yaml")
    same, modified = gateway_build.build(route, TARGET, RouteState(100, 0))
    assert not modified and same == route
    assert MANAGED_ANNOTATION not in same["metadata"]["annotations"]


def test_finalize_after_a_whole_rollout_restores_the_original() -> None:
    route = load("httproute-llm.yaml")
    obj = route
    for state in (RouteState(100, 0, 5.0), RouteState(100, 0, 12.5), RouteState(95, 5), RouteState(40, 60)):
        obj, _ = gateway_build.build(obj, TARGET, state)
    assert [r.get("weight") for r in _rule(obj, "chat")["backendRefs"]] == [8, 12]  # 1 -> 20 -> 20
    restored, modified = gateway_build.finalize(obj, TARGET)
    assert modified and restored == route
    assert not gateway_build.finalize(restored, TARGET).modified


@pytest.mark.usefixtures("local_cluster")
def test_finalize_keep_candidate_leaves_it_at_zero() -> None:
    obj, _ = gateway_build.build(load("httproute-llm.yaml"), TARGET, RouteState(70, 30, None))
    kept, _ = gateway_build.finalize(obj, TARGET, keep_candidate=True)
    refs = _rule(kept, "chat")["backendRefs"]
    assert [(r["name"], r.get("weight")) for r in refs] == [("llm-v1", None), ("llm-v2", 0)]
    assert MANAGED_ANNOTATION not in kept["metadata"]["annotations"]
    assert gateway_build.read_state(kept, TARGET) == RouteState(100, 0)
    assert_valid(kept)


@pytest.mark.usefixtures("local_cluster")
def test_promote_gives_the_candidate_the_primary_share() -> None:
    route = load("httproute-llm.yaml")
    _rule(route, "chat")["backendRefs"].append({"name": "llm-previous", "port": 8000, "weight": 1})
    obj, _ = gateway_build.build(route, TARGET, RouteState(100, 0, 10.0))
    obj, _ = gateway_build.build(obj, TARGET, RouteState(80, 20))
    promoted, _ = gateway_build.promote(obj, TARGET)
    chat = _rule(promoted, "chat")
    assert _shares(chat) == {"llm-v1": 0, "llm-previous": Fraction(1, 2), "llm-v2": Fraction(1, 2)}
    assert all(f["requestMirror"]["backendRef"]["name"] != "llm-v2" for f in chat["filters"]
               if f["type"] == "RequestMirror")
    assert MANAGED_ANNOTATION not in promoted["metadata"]["annotations"]
    assert not gateway_build.promote(promoted, TARGET).modified
    assert_valid(promoted)


@pytest.mark.usefixtures("local_cluster")
def test_a_third_backend_keeps_its_share() -> None:
    """weights 3 (primary) and 1 (a previous version): the previous version keeps 25% at every step."""
    route = load("httproute-llm.yaml")
    chat = _rule(route, "chat")
    chat["backendRefs"][0]["weight"] = 3
    chat["backendRefs"].append({"name": "llm-previous", "port": 8000, "weight": 1})
    obj = route
    for step in (10, 33, 50, 75):
        obj, _ = gateway_build.build(obj, TARGET, RouteState(100 - step, step))
        shares = _shares(_rule(obj, "chat"))
        assert shares["llm-v2"] == Fraction(step, 100)
        assert shares["llm-previous"] == Fraction(1, 4)
        assert shares["llm-v1"] == 1 - Fraction(1, 4) - Fraction(step, 100)
        assert gateway_build.read_state(obj, TARGET) == RouteState(100 - step, step)
        assert_valid(obj)
    with pytest.raises(UnmanagedTraffic, match="hold 25% of the rule's weight, so the candidate cannot get 80%"):
        gateway_build.build(obj, TARGET, RouteState(20, 80))
    assert gateway_build.finalize(obj, TARGET).obj == route


def test_a_mirror_to_the_candidate_already_there_counts_as_ours() -> None:
    route = load("httproute-llm.yaml")
    _rule(route, "chat")["filters"].append({"type": "RequestMirror", "requestMirror": {
        "backendRef": {"group": "", "kind": "Service", "name": "llm-v2", "port": 8000},
        "fraction": {"numerator": 1, "denominator": 100}}})
    assert gateway_build.read_state(route, TARGET).mirror_percent == 1.0
    new, _ = gateway_build.build(route, TARGET, RouteState(100, 0, 20.0))
    mirrors = [f for f in _rule(new, "chat")["filters"] if f["type"] == "RequestMirror"]
    assert len(mirrors) == 2 and mirrors[1]["requestMirror"] == {
        "backendRef": {"group": "", "kind": "Service", "name": "llm-v2", "port": 8000}, "percent": 20}
    again, _ = gateway_build.build(new, TARGET, RouteState(100, 0, None))
    assert [f["type"] for f in _rule(again, "chat")["filters"]] == ["RequestHeaderModifier", "RequestMirror"]


def test_server_defaults_on_read_back_change_nothing() -> None:
    """The API server fills in weight 1, group "" and kind Service; computing again must not write."""
    new, _ = gateway_build.build(load("httproute-llm.yaml"), TARGET, RouteState(90, 10, 2.5))
    stored = copy.deepcopy(new)
    for rule in stored["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            ref.setdefault("weight", 1)
            ref.setdefault("group", "")
            ref.setdefault("kind", "Service")
        for f in rule.get("filters", []):
            if f["type"] == "RequestMirror":
                f["requestMirror"]["backendRef"].setdefault("group", "")
                f["requestMirror"]["backendRef"].setdefault("kind", "Service")
    assert not gateway_build.build(stored, TARGET, RouteState(90, 10, 2.5)).modified
    assert gateway_build.read_state(stored, TARGET) == RouteState(90, 10, 2.5)
    restored = gateway_build.finalize(stored, TARGET).obj
    assert "weight" not in _rule(restored, "chat")["backendRefs"][0]  # as it was before the first change


def test_ports_and_namespaces_tell_backends_apart() -> None:
    route = load("httproute-llm.yaml")
    chat = _rule(route, "chat")
    chat["backendRefs"][0]["weight"] = 1
    chat["backendRefs"].append({"name": "llm-v1", "port": 9000, "weight": 0})
    with pytest.raises(DestinationNotFound, match=r"matches 2 backendRefs .* give its port"):
        gateway_build.build(route, TARGET, RouteState(90, 10))
    target = TARGET.model_copy(update={"primary": BackendRef(name="llm-v1", port=8000),
                                       "candidate": BackendRef(name="llm-v2", namespace="canary", port=8001)})
    new, _ = gateway_build.build(route, target, RouteState(90, 10))
    assert _rule(new, "chat")["backendRefs"][-1] == {"name": "llm-v2", "namespace": "canary", "port": 8001,
                                                     "weight": 1}
    assert gateway_build.read_state(new, target) == RouteState(90, 10)
    other_ns = target.model_copy(update={"candidate": BackendRef(name="llm-v2", namespace="models", port=8001)})
    assert gateway_build.read_state(new, other_ns).candidate_weight == 0  # llm-v2 in "canary" is not this one


def test_a_candidate_without_a_port_anywhere_is_refused() -> None:
    route = load("httproute-llm.yaml")
    del _rule(route, "chat")["backendRefs"][0]["port"]
    with pytest.raises(WouldBeRejected, match="needs a port"):
        gateway_build.build(route, TARGET, RouteState(90, 10))
    with pytest.raises(WouldBeRejected, match="needs a port"):
        gateway_build.build(route, TARGET, RouteState(100, 0, 5.0))


@pytest.mark.parametrize(
    ("target", "error", "words"),
    [
        (TARGET.model_copy(update={"rule": "nope"}), RouteNotFound, ["no rule named 'nope'", "debug, chat, default"]),
        (TARGET.model_copy(update={"rule": None}), RouteNotFound, ["3 rules", "debug, chat, default"]),
        (TARGET.model_copy(update={"primary": BackendRef(name="llm-v9")}), DestinationNotFound,
         ["no primary backendRef llm-v9", "it has: llm-v1:8000"]),
        (TARGET.model_copy(update={"rule": "default"}), DestinationNotFound, ["llm-fallback:8000"]),
    ],
)
def test_clear_errors(target: GatewayAPITarget, error: type[Exception], words: list[str]) -> None:
    with pytest.raises(error) as info:
        gateway_build.build(load("httproute-llm.yaml"), target, RouteState(90, 10))
    for w in words:
        assert w in str(info.value)


def test_a_redirect_rule_cannot_carry_a_canary() -> None:
    route = load("httproute-llm.yaml")
    route["spec"]["rules"].append({"name": "old", "filters": [
        {"type": "RequestRedirect", "requestRedirect": {"hostname": "new.example.com"}}]})
    with pytest.raises(DestinationNotFound, match="it redirects"):
        gateway_build.build(route, TARGET.model_copy(update={"rule": "old"}), RouteState(90, 10))


def test_mirror_share_is_exact_or_refused() -> None:
    for text in ("0.5", "33.3333333", "99.9999999", "0.0000001", "12.25"):
        share = gateway_build.mirror_share(float(text))
        assert gateway_build.mirror_percent_of(share) == float(text)
        assert share["fraction"]["denominator"] <= 2**31 - 1
    with pytest.raises(WouldBeRejected, match="at most 7 decimals"):
        gateway_build.mirror_share(1e-9)
    assert gateway_build.mirror_percent_of({}) == 100.0  # neither percent nor fraction: everything
    assert gateway_build.mirror_percent_of({"fraction": {"numerator": 1}}) == 1.0  # denominator defaults to 100


# --------------------------------------------------------------------------- properties

PROP_TARGET = GatewayAPITarget(http_route="r", rule="managed", primary=BackendRef(name="v1"),
                               candidate=BackendRef(name="v2"))

_scalars = st.one_of(st.integers(-5, 5), st.text(max_size=5), st.booleans(), st.none())
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=3)), max_leaves=8)
_extras = st.dictionaries(st.sampled_from(["matches", "timeouts", "sessionPersistence", "retry", "x-unknown"]),
                          _json, max_size=3)


@st.composite
def _foreign_filter(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["header", "mirror-percent", "mirror-fraction", "mirror-all"]))
    if kind == "header":
        return {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x", "value": "1"}]}}
    mirror: dict[str, Any] = {"backendRef": {"name": draw(st.sampled_from(["sink", "analytics"])), "port": 80}}
    if kind == "mirror-percent":
        mirror["percent"] = draw(st.integers(0, 100))
    elif kind == "mirror-fraction":
        den = draw(st.integers(1, 1000))
        mirror["fraction"] = {"numerator": draw(st.integers(0, den)), "denominator": den}
    return {"type": "RequestMirror", "requestMirror": mirror}


@st.composite
def http_routes(draw: st.DrawFn) -> dict[str, Any]:
    """An HTTPRoute whose managed rule gives the candidate nothing, with random neighbours, extras and filters."""
    primary: dict[str, Any] = {"name": "v1", "port": 8000, **draw(st.dictionaries(
        st.just("filters"), st.just([{"type": "RequestHeaderModifier"}]), max_size=1))}
    if draw(st.booleans()):
        primary["weight"] = draw(st.integers(1, 7))
    entries = [primary]
    if draw(st.booleans()):
        entries.append({"name": "v2", "port": 8000, "weight": 0})
    for i in range(draw(st.integers(0, 2))):
        other: dict[str, Any] = {"name": f"spare{i}", "port": 8000}
        if draw(st.booleans()):
            other["weight"] = draw(st.integers(0, 3))
        entries.insert(draw(st.integers(0, len(entries))), other)
    managed: dict[str, Any] = {"name": "managed", **draw(_extras), "backendRefs": entries}
    filters = draw(st.lists(_foreign_filter(), max_size=3))
    if filters:
        managed["filters"] = filters
    others = [{"name": f"r{i}", **draw(_extras), "backendRefs": [{"name": f"h{i}", "port": 80}]}
              for i in range(draw(st.integers(0, 3)))]
    rules = [*others]
    rules.insert(draw(st.integers(0, len(others))), managed)
    spec: dict[str, Any] = {"parentRefs": [{"name": "gw"}], "rules": rules}
    if draw(st.booleans()):
        spec["hostnames"] = ["llm.example.com"]
    meta: dict[str, Any] = {"name": "r", "namespace": "ns", "resourceVersion": "7"}
    if draw(st.booleans()):
        meta["annotations"] = {"other": draw(st.text(max_size=5))}
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta, "spec": spec,
            **({"x-top": draw(_json)} if draw(st.booleans()) else {})}


@st.composite
def route_states(draw: st.DrawFn) -> RouteState:
    cw = draw(st.integers(0, 100))
    mirror = draw(st.one_of(st.none(), st.integers(1, 10**9).map(lambda n: n / 10**7)))
    return RouteState(100 - cw, cw, mirror)


def _outside(obj: dict[str, Any]) -> str:
    """Everything except the managed rule and the ownership annotation, as JSON."""
    rest = copy.deepcopy(obj)
    rest["spec"]["rules"] = [r for r in rest["spec"]["rules"] if r.get("name") != "managed"]
    rest["metadata"].get("annotations", {}).pop(MANAGED_ANNOTATION, None)
    if rest["metadata"].get("annotations") == {}:
        del rest["metadata"]["annotations"]
    return json.dumps(rest, sort_keys=True)


def _others(rule: dict[str, Any]) -> dict[str, Fraction]:
    return {k: v for k, v in _shares(rule).items() if k not in ("v1", "v2")}


def _not_ours(rule: dict[str, Any]) -> list[Any]:
    return [f for f in rule.get("filters", [])
            if not (f["type"] == "RequestMirror" and f["requestMirror"]["backendRef"]["name"] == "v2")]


_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(http_routes(), st.lists(route_states(), min_size=1, max_size=4))
def test_builds_keep_invariants(route: dict[str, Any], states: list[RouteState]) -> None:
    pristine = copy.deepcopy(route)
    before = _rule(pristine, "managed")
    assume(sum(r.get("weight", 1) for r in before["backendRefs"]) > 0)
    others = _others(before)
    obj = route
    for state in states:
        if sum(others.values()) + Fraction(state.candidate_weight, 100) > 1:
            with pytest.raises(UnmanagedTraffic):
                gateway_build.build(obj, PROP_TARGET, state)
            continue
        new, _ = gateway_build.build(obj, PROP_TARGET, state)
        managed = _rule(new, "managed")
        shares = _shares(managed)
        assert shares.get("v2", 0) == Fraction(state.candidate_weight, 100), "the candidate's share is the step's"
        assert _others(managed) == others, "others keep their shares"
        assert sum(shares.values()) == 1
        assert all(0 <= r.get("weight", 1) <= 1_000_000 for r in managed["backendRefs"])
        assert gateway_build.read_state(new, PROP_TARGET) == state
        assert _outside(new) == _outside(pristine)
        assert {k: v for k, v in managed.items() if k not in ("backendRefs", "filters")} == {
            k: v for k, v in before.items() if k not in ("backendRefs", "filters")}
        assert _not_ours(managed) == before.get("filters", []), "others' filters stay, in order"
        for ref in managed["backendRefs"]:
            if ref["name"] != "v2" or any(r["name"] == "v2" for r in before["backendRefs"]):
                original = next(r for r in before["backendRefs"] if r["name"] == ref["name"])
                assert {k: v for k, v in ref.items() if k != "weight"} == {
                    k: v for k, v in original.items() if k != "weight"}
        again = gateway_build.build(new, PROP_TARGET, state)
        assert not again.modified and again.obj == new
        obj = new
    assert route == pristine
    restored, _ = gateway_build.finalize(obj, PROP_TARGET)
    assert restored == pristine
    assert not gateway_build.finalize(restored, PROP_TARGET).modified


PROP_NEXT = GatewayAPITarget(http_route="r", rule="managed", primary=BackendRef(name="v1"),
                             candidate=BackendRef(name="v3", port=8000))


@_settings
@given(http_routes(), st.lists(route_states(), min_size=1, max_size=3), st.lists(route_states(), max_size=3))
def test_a_new_candidate_leaves_nothing_of_the_previous_one(route: dict[str, Any], first: list[RouteState],
                                                             then: list[RouteState]) -> None:
    """Builds for v2, then (the policy names v3) builds for v3: v2 holds exactly what it held before the
    rollout (its backendRef, at its weight, only when it was there), no mirror to it, v3 the step's share, the
    others theirs; finalize for v3 gives back the original route (bench/faults r-00201)."""
    pristine = copy.deepcopy(route)
    before = _rule(pristine, "managed")
    assume(sum(r.get("weight", 1) for r in before["backendRefs"]) > 0)
    others = _others(before)
    assume(sum(others.values()) + Fraction(max(s.candidate_weight for s in [*first, *then]), 100) <= 1)
    obj = route
    for state in first:
        obj, _ = gateway_build.build(obj, PROP_TARGET, state)
    for state in then:
        obj, _ = gateway_build.build(obj, PROP_NEXT, state)
        managed = _rule(obj, "managed")
        shares = _shares(managed)
        assert shares.get("v3", 0) == Fraction(state.candidate_weight, 100)
        assert shares.get("v2", 0) == 0
        assert [r for r in managed["backendRefs"] if r["name"] == "v2"] == [
            r for r in before["backendRefs"] if r["name"] == "v2"]
        assert [f for f in managed.get("filters", []) if f["type"] == "RequestMirror"
                and f["requestMirror"]["backendRef"]["name"] == "v2"] == []
        assert {k: v for k, v in shares.items() if k not in ("v1", "v2", "v3")} == others
        assert gateway_build.read_state(obj, PROP_NEXT) == state
    restored, _ = gateway_build.finalize(obj, PROP_NEXT)
    assert restored == pristine
