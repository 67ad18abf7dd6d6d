"""The pure VirtualService builders, on realistic fixtures and on generated objects (hypothesis)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routers_util import assert_valid, load

from shadowctl.policy.model import Destination, IstioTarget, MirrorVirtualService
from shadowctl.routers import istio_build
from shadowctl.routers.base import (
    MANAGED_ANNOTATION,
    DestinationNotFound,
    RouteNotFound,
    RouteState,
    UnmanagedTraffic,
    WouldBeRejected,
)

HOST = "llm.models.svc.cluster.local"
TARGET = IstioTarget(
    virtual_service="llm",
    route="chat",
    primary=Destination(host=HOST, subset="v1", port=8000),
    candidate=Destination(host=HOST, subset="v2", port=8000),
)


def _route(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in obj["spec"]["http"] if r.get("name") == name)


def _record(obj: dict[str, Any]) -> dict[str, Any]:
    return json.loads(obj["metadata"]["annotations"][MANAGED_ANNOTATION])


# --------------------------------------------------------------------------- fixtures


@pytest.mark.usefixtures("local_cluster")  # assert_valid asks the real API server
def test_canary_step_changes_only_the_managed_route() -> None:
    vs = load("vs-llm.yaml")
    pristine = copy.deepcopy(vs)
    new, modified = istio_build.build(vs, TARGET, RouteState(90, 10, None))
    assert modified
    assert vs == pristine, "the input was mutated"
    chat = _route(new, "chat")
    assert chat["route"] == [
        {"destination": {"host": HOST, "subset": "v1", "port": {"number": 8000}}, "weight": 90,
         "headers": {"response": {"add": {"x-variant": "primary"}}}},
        {"destination": {"host": HOST, "subset": "v2", "port": {"number": 8000}}, "weight": 10},
    ]
    for key in ("match", "retries", "timeout", "headers", "corsPolicy"):
        assert chat[key] == _route(pristine, "chat")[key]
    assert new["spec"]["tcp"] == pristine["spec"]["tcp"]
    assert [r for r in new["spec"]["http"] if r.get("name") != "chat"] == [
        r for r in pristine["spec"]["http"] if r.get("name") != "chat"
    ]
    assert new["metadata"]["annotations"]["team"] == "inference"
    assert _record(new) == {"version": 1, "routes": {"chat": {
        "weights": True, "addedCandidate": True, "replacedMirror": None, "primaryWeight": None}}}
    assert istio_build.read_state(new, TARGET) == RouteState(90, 10, None)
    assert_valid(new)


@pytest.mark.usefixtures("local_cluster")  # assert_valid asks the real API server
def test_shadow_writes_mirror_percentage_never_the_deprecated_field() -> None:
    vs = load("vs-llm.yaml")
    new, modified = istio_build.build(vs, TARGET, RouteState(100, 0, 2.5))
    assert modified
    chat = _route(new, "chat")
    assert chat["mirror"] == {"host": HOST, "subset": "v2", "port": {"number": 8000}}
    assert chat["mirrorPercentage"] == {"value": 2.5}
    assert "\"mirrorPercent\"" not in json.dumps(new["spec"])
    assert len(chat["route"]) == 1, "the candidate gets no destination while it only receives mirrored traffic"
    assert "weight" not in chat["route"][0], "a lone primary keeps its weight as written"
    assert istio_build.read_state(new, TARGET) == RouteState(100, 0, 2.5)
    assert_valid(new)


@pytest.mark.usefixtures("local_cluster")  # assert_valid asks the real API server
def test_a_candidate_named_without_a_port_takes_the_primary_routes_port() -> None:
    """The README's render example names both without a port; the route's primary says :8000, so the
    candidate's share and the mirror go to :8000 too (the same host is the same Service). A candidate on
    another host keeps what it was given."""
    vs = load("vs-llm.yaml")
    portless = IstioTarget(virtual_service="llm", route="chat", primary=Destination(host=HOST, subset="v1"),
                           candidate=Destination(host=HOST, subset="v2"))
    v2 = {"host": HOST, "subset": "v2", "port": {"number": 8000}}
    shadow, _ = istio_build.build(vs, portless, RouteState(100, 0, 5.0))
    assert _route(shadow, "chat")["mirror"] == v2
    canary, _ = istio_build.build(shadow, portless, RouteState(90, 10, None))
    assert [e["destination"] for e in _route(canary, "chat")["route"]][1] == v2
    assert istio_build.read_state(canary, portless) == RouteState(90, 10, None)
    assert istio_build.read_state(canary, TARGET) == RouteState(90, 10, None)  # the same destination as :8000
    assert istio_build.finalize(canary, portless).obj == vs
    assert_valid(canary)
    listed, _ = istio_build.build(load("vs-mirrors.yaml"), IstioTarget(
        virtual_service="llm", primary=Destination(host=HOST, subset="v1"), candidate=Destination(host=HOST, subset="v2")),
        RouteState(100, 0, 20.0))
    assert listed["spec"]["http"][0]["mirrors"][-1]["destination"] == {"host": HOST, "subset": "v2"}  # no port to take
    other = portless.model_copy(update={"candidate": Destination(host="llm-v2.models.svc.cluster.local")})
    elsewhere, _ = istio_build.build(vs, other, RouteState(90, 10, 5.0))
    assert _route(elsewhere, "chat")["route"][1]["destination"] == {"host": "llm-v2.models.svc.cluster.local"}
    assert _route(elsewhere, "chat")["mirror"] == {"host": "llm-v2.models.svc.cluster.local"}


def test_unchanged_state_is_not_modified() -> None:
    vs = load("vs-llm.yaml")
    same, modified = istio_build.build(vs, TARGET, RouteState(100, 0, None))
    assert not modified
    assert same == vs
    assert MANAGED_ANNOTATION not in same["metadata"]["annotations"]


def test_finalize_after_a_whole_rollout_restores_the_original() -> None:
    vs = load("vs-llm.yaml")
    obj = vs
    for state in (RouteState(100, 0, 5.0), RouteState(100, 0, 50.0), RouteState(95, 5), RouteState(50, 50)):
        obj, _ = istio_build.build(obj, TARGET, state)
    restored, modified = istio_build.finalize(obj, TARGET)
    assert modified
    assert restored == vs


def test_finalize_keep_candidate_leaves_it_at_zero() -> None:
    obj, _ = istio_build.build(load("vs-llm.yaml"), TARGET, RouteState(70, 30))
    kept, _ = istio_build.finalize(obj, TARGET, keep_candidate=True)
    assert [e["weight"] for e in _route(kept, "chat")["route"]] == [100, 0]
    assert MANAGED_ANNOTATION not in kept["metadata"]["annotations"]


def test_promote_gives_the_candidate_everything_and_drops_the_record() -> None:
    obj, _ = istio_build.build(load("vs-llm.yaml"), TARGET, RouteState(100, 0, 10.0))
    promoted, _ = istio_build.promote(obj, TARGET)
    chat = _route(promoted, "chat")
    assert [e["weight"] for e in chat["route"]] == [0, 100]
    assert "mirror" not in chat and "mirrorPercentage" not in chat
    assert MANAGED_ANNOTATION not in promoted["metadata"]["annotations"]
    # promote is idempotent, and a later finalize has nothing of ours to undo but still means 100% primary
    assert not istio_build.promote(promoted, TARGET).modified


@pytest.mark.usefixtures("local_cluster")  # assert_valid asks the real API server
def test_mirrors_list_keeps_other_entries() -> None:
    vs = load("vs-mirrors.yaml")
    target = IstioTarget(virtual_service="llm", primary=Destination(host=HOST, subset="v1"),
                         candidate=Destination(host=HOST, subset="v2"))
    new, _ = istio_build.build(vs, target, RouteState(100, 0, 20.0))
    route = new["spec"]["http"][0]
    assert "mirror" not in route
    assert route["mirrors"] == [
        vs["spec"]["http"][0]["mirrors"][0],
        {"destination": {"host": HOST, "subset": "v2"}, "percentage": {"value": 20.0}},
    ]
    assert istio_build.read_state(new, target).mirror_percent == 20.0
    off, _ = istio_build.build(new, target, RouteState(100, 0, None))
    assert off["spec"]["http"][0]["mirrors"] == vs["spec"]["http"][0]["mirrors"]
    assert istio_build.finalize(new, target).obj == vs
    assert_valid(new)


def test_foreign_mirror_is_replaced_then_put_back() -> None:
    vs = load("vs-foreign-mirror.yaml")
    target = IstioTarget(virtual_service="llm", primary=Destination(host="llm", subset="v1"),
                         candidate=Destination(host="llm", subset="v2"))
    assert istio_build.read_state(vs, target) == RouteState(100, 0, None), "someone else's mirror is not ours"
    new, _ = istio_build.build(vs, target, RouteState(100, 0, 1.0))
    route = new["spec"]["http"][0]
    assert route["mirror"] == {"host": "llm", "subset": "v2"}
    assert route["mirrorPercentage"] == {"value": 1.0}
    assert "mirrorPercent" not in route
    assert _record(new)["routes"]["#0"]["replacedMirror"] == {
        "mirror": {"host": "analytics.data.svc.cluster.local"}, "mirrorPercent": 10}
    canary, _ = istio_build.build(new, target, RouteState(80, 20, None))
    assert canary["spec"]["http"][0]["mirror"] == {"host": "analytics.data.svc.cluster.local"}
    assert istio_build.finalize(canary, target).obj == vs
    assert istio_build.finalize(new, target).obj == vs


def test_mirror_only_spec_never_touches_weights() -> None:
    vs = load("vs-llm.yaml")
    mirror = MirrorVirtualService(name="llm", route="chat", candidate=Destination(host="candidate-llm.models"))
    new, _ = istio_build.build(vs, mirror, RouteState(0, 100, 3.0))
    chat = _route(new, "chat")
    assert chat["route"] == _route(vs, "chat")["route"]
    assert chat["mirror"] == {"host": "candidate-llm.models"}
    assert istio_build.read_mirror(chat, mirror) == 3.0
    assert istio_build.finalize(new, mirror).obj == vs


@pytest.mark.parametrize(
    ("target", "error", "words"),
    [
        (TARGET.model_copy(update={"route": "nope"}), RouteNotFound, ["no http route named 'nope'", "debug, chat"]),
        (TARGET.model_copy(update={"route": None}), RouteNotFound, ["3 http routes", "debug, chat, default"]),
        (TARGET.model_copy(update={"primary": Destination(host=HOST, subset="v9")}), DestinationNotFound,
         ["no primary destination", "v9", f"{HOST}/v1:8000"]),
        (TARGET.model_copy(update={"route": "default"}), DestinationNotFound, ["llm-fallback"]),
    ],
)
def test_clear_errors(target: IstioTarget, error: type[Exception], words: list[str]) -> None:
    with pytest.raises(error) as info:
        istio_build.build(load("vs-llm.yaml"), target, RouteState(90, 10))
    for w in words:
        assert w in str(info.value)


def test_third_destination_with_weight_is_refused() -> None:
    vs = load("vs-mirrors.yaml")
    vs["spec"]["http"][0]["route"][0]["weight"] = 60
    vs["spec"]["http"][0]["route"].append({"destination": {"host": "other"}, "weight": 40})
    target = IstioTarget(virtual_service="llm", primary=Destination(host=HOST, subset="v1"),
                         candidate=Destination(host=HOST, subset="v2"))
    with pytest.raises(UnmanagedTraffic, match="other \\(weight 40\\)"):
        istio_build.build(vs, target, RouteState(90, 10))
    with pytest.raises(UnmanagedTraffic):
        istio_build.read_state(vs, target)


def test_both_mirror_and_mirrors_is_refused() -> None:
    vs = load("vs-mirrors.yaml")
    vs["spec"]["http"][0]["mirror"] = {"host": "x"}
    target = IstioTarget(virtual_service="llm", primary=Destination(host=HOST, subset="v1"),
                         candidate=Destination(host=HOST, subset="v2"))
    with pytest.raises(WouldBeRejected, match="both mirror and mirrors"):
        istio_build.build(vs, target, RouteState(100, 0, 5.0))


# --------------------------------------------------------------------------- properties

PRIMARY = Destination(host="llm", subset="v1")
CANDIDATE = Destination(host="llm", subset="v2")
PROP_TARGET = IstioTarget(virtual_service="vs", route="managed", primary=PRIMARY, candidate=CANDIDATE)

_scalars = st.one_of(st.integers(-5, 5), st.text(max_size=5), st.booleans(), st.none())
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=3)), max_leaves=8)
_extras = st.dictionaries(st.sampled_from(["match", "retries", "timeout", "headers", "fault", "x-unknown"]),
                          _json, max_size=3)


@st.composite
def _foreign_mirror(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {"mirror": {"host": draw(st.sampled_from(["sink", "analytics.data"]))}}
    pct = draw(st.sampled_from(["none", "percentage", "deprecated"]))
    if pct == "percentage":
        out["mirrorPercentage"] = {"value": draw(st.floats(0, 100))}
    elif pct == "deprecated":
        out["mirrorPercent"] = draw(st.integers(0, 100))
    return out


@st.composite
def virtual_services(draw: st.DrawFn) -> dict[str, Any]:
    """A VirtualService at 100% primary, with random neighbours, extras and foreign mirrors."""
    primary: dict[str, Any] = {"destination": {"host": "llm", "subset": "v1"}}
    entries = [primary]
    with_candidate = draw(st.booleans())
    if with_candidate:
        primary["weight"] = 100
        entries.append({"destination": {"host": "llm", "subset": "v2"}, "weight": 0})
    elif draw(st.booleans()):
        primary["weight"] = 100
    if draw(st.booleans()):
        entries.insert(draw(st.integers(0, len(entries))), {"destination": {"host": "spare"}, "weight": 0})
        primary["weight"] = 100
    managed: dict[str, Any] = {"name": "managed", **draw(_extras), "route": entries}
    mirror_kind = draw(st.sampled_from(["none", "single", "list"]))
    if mirror_kind == "single":
        managed.update(draw(_foreign_mirror()))
    elif mirror_kind == "list":
        managed["mirrors"] = [{"destination": {"host": f"sink{i}"}, "percentage": {"value": float(i)}}
                              for i in range(draw(st.integers(0, 2)))]
    others = [{"name": f"r{i}", **draw(_extras), "route": [{"destination": {"host": f"h{i}"}}]}
              for i in range(draw(st.integers(0, 3)))]
    http = [*others]
    http.insert(draw(st.integers(0, len(others))), managed)
    spec: dict[str, Any] = {"hosts": ["llm"], "http": http}
    if draw(st.booleans()):
        spec["tcp"] = [{"route": [{"destination": {"host": "llm", "port": {"number": 9000}}}]}]
    meta: dict[str, Any] = {"name": "vs", "namespace": "ns", "resourceVersion": "7"}
    if draw(st.booleans()):
        meta["annotations"] = {"other": draw(st.text(max_size=5))}
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": meta, "spec": spec,
            **({"x-top": draw(_json)} if draw(st.booleans()) else {})}


@st.composite
def route_states(draw: st.DrawFn) -> RouteState:
    cw = draw(st.integers(0, 100))
    mirror = draw(st.one_of(st.none(), st.floats(min_value=0.0001, max_value=100, allow_nan=False)))
    return RouteState(100 - cw, cw, mirror)


def _outside(obj: dict[str, Any]) -> str:
    """Everything except the managed route and the ownership annotation, as JSON."""
    rest = copy.deepcopy(obj)
    rest["spec"]["http"] = [r for r in rest["spec"]["http"] if r.get("name") != "managed"]
    rest["metadata"].get("annotations", {}).pop(MANAGED_ANNOTATION, None)
    if rest["metadata"].get("annotations") == {}:
        del rest["metadata"]["annotations"]
    return json.dumps(rest, sort_keys=True)


_MANAGED_KEYS = {"route", "mirror", "mirrorPercentage", "mirrorPercent", "mirrors"}
_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(virtual_services(), st.lists(route_states(), min_size=1, max_size=4))
def test_builds_keep_invariants(vs: dict[str, Any], states: list[RouteState]) -> None:
    pristine = copy.deepcopy(vs)
    obj = vs
    for state in states:
        new, _ = istio_build.build(obj, PROP_TARGET, state)
        managed = _route(new, "managed")
        weights = [e.get("weight", 100 if len(managed["route"]) == 1 else 0) for e in managed["route"]]
        assert sum(weights) == 100
        assert istio_build.read_state(new, PROP_TARGET) == state
        assert _outside(new) == _outside(pristine)
        before = _route(pristine, "managed")
        assert {k: v for k, v in managed.items() if k not in _MANAGED_KEYS} == {
            k: v for k, v in before.items() if k not in _MANAGED_KEYS}
        if state.mirror_percent is not None:
            assert "mirrorPercent" not in managed
        again = istio_build.build(new, PROP_TARGET, state)
        assert not again.modified and again.obj == new
        obj = new
    assert vs == pristine
    restored, _ = istio_build.finalize(obj, PROP_TARGET)
    assert restored == pristine
    assert not istio_build.finalize(restored, PROP_TARGET).modified
