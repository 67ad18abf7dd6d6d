"""Every pure builder against objects with fields of the wrong type or missing: refused in words, never a crash.

The objects are the example Istio VirtualService, Knative Service and Gateway API HTTPRoute with up to
three values replaced by values of other types or deleted, drawn by bench/fuzz's own strategy
(``targets.mutated``). Before routers/shape.py, these raised AttributeError and TypeError from inside
the builders: 9 kinds over 300 mutations of the VirtualService, 8 of the Service, 1 of the HTTPRoute.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from routers_util import load

from shadowctl.policy.model import BackendRef, Destination, GatewayAPITarget, IstioTarget, KnativeTarget, KServeTarget
from shadowctl.routers import gateway_build, istio_build, knative_build, kserve_build
from shadowctl.routers.base import RouterError, RouteState, WouldBeRejected

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench" / "fuzz"))

import targets  # noqa: E402

CHAT_VS = next(d for d in yaml.safe_load_all((REPO / "istio" / "chat.yaml").read_text()) if d["kind"] == "VirtualService")
ISTIO = IstioTarget(virtual_service="chat", route="chat-default",
                    primary=Destination(host="chat.llm.svc.cluster.local", subset="v1", port=8000),
                    candidate=Destination(host="chat.llm.svc.cluster.local", subset="v2", port=8000))
KNATIVE = KnativeTarget(service="llm")
KNOWN = {"llm-00001", "llm-00002"}
GATEWAY = GatewayAPITarget(http_route="llm", rule="chat", primary=BackendRef(name="llm-v1"),
                           candidate=BackendRef(name="llm-v2"))

KSERVE = KServeTarget(inference_service="llm")

Call = Callable[[dict[str, Any]], object]
CASES: dict[str, tuple[dict[str, Any], list[Call]]] = {
    "istio": (CHAT_VS, [
        lambda o: istio_build.build(o, ISTIO, RouteState(90, 10, 5.0)),
        lambda o: istio_build.read_state(o, ISTIO),
        lambda o: istio_build.finalize(o, ISTIO),
        lambda o: istio_build.promote(o, ISTIO),
        istio_build.route_names,
    ]),
    "knative": (load("ksvc-llm.yaml"), [
        lambda o: knative_build.build(o, KNATIVE, RouteState(80, 20, None), KNOWN),
        lambda o: knative_build.read_state(o, KNATIVE, KNOWN),
        lambda o: knative_build.finalize(o, KNATIVE, known_revisions=KNOWN),
        lambda o: knative_build.promote(o, KNATIVE, KNOWN),
        knative_build.promoted_revision,
    ]),
    "gateway": (load("httproute-llm.yaml"), [
        lambda o: gateway_build.build(o, GATEWAY, RouteState(90, 10, 2.5)),
        lambda o: gateway_build.read_state(o, GATEWAY),
        lambda o: gateway_build.finalize(o, GATEWAY),
        lambda o: gateway_build.promote(o, GATEWAY),
        gateway_build.rule_names,
    ]),
    "kserve": (load("isvc-llm.yaml"), [
        lambda o: kserve_build.build(o, KSERVE, RouteState(90, 10, None)),
        lambda o: kserve_build.read_state(o, KSERVE),
        lambda o: kserve_build.finalize(o, KSERVE),
        lambda o: kserve_build.promote(o, KSERVE),
        lambda o: kserve_build.candidate_of(o, settled=True),
    ]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_any_field_of_the_wrong_type_is_a_router_error_never_a_crash(name: str) -> None:
    base, calls = CASES[name]

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(targets.mutated(base))
    def one(obj: dict[str, Any]) -> None:
        for call in calls:
            with contextlib.suppress(RouterError):
                call(obj)

    one()


def _set(obj: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return obj


@pytest.mark.parametrize(
    ("name", "path", "value", "message"),
    [
        ("istio", ("spec", "http", 1, "route", 0, "weight"), "ten",
         "VirtualService llm/chat: spec.http[1].route[0].weight: expected an integer, got 'ten'"),
        ("istio", ("spec", "http", 0, "route", 0, "destination"), 7,
         "VirtualService llm/chat: spec.http[0].route[0].destination: expected a mapping, got 7"),
        ("istio", ("metadata",), None, "VirtualService: metadata: expected a mapping, got None"),
        ("knative", ("status", "traffic"), 7, "Service models/llm: status.traffic: expected a list, got 7"),
        ("knative", ("spec",), None, "Service models/llm: spec: expected a mapping, got None"),
        ("kserve", ("status", "components", "predictor", "latestReadyRevision"), 7,
         "InferenceService models/llm: status.components.predictor.latestReadyRevision: expected a string, got 7"),
        ("gateway", ("spec", "rules", 0, "backendRefs", 0, "weight"), "ten",
         "spec.rules[0].backendRefs[0].weight: expected an integer, got 'ten'"),
    ],
)
def test_the_first_bad_field_is_named_with_its_path(name: str, path: tuple[Any, ...], value: Any,
                                                    message: str) -> None:
    base, calls = CASES[name]
    obj = _set(yaml.safe_load(yaml.safe_dump(base)), path, value)
    with pytest.raises(WouldBeRejected) as info:
        calls[0](obj)
    assert message in info.value.args[0]
