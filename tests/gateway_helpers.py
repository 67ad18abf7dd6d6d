"""Whole rollouts on a Gateway API HTTPRoute: the controller harness with the route of gateway-api/chat.yaml.

The HTTPRoute is stored by the real API server (Gateway API v1.6.1's CRD, with its CEL rules); every
write the controller makes to it is captured as the server stored it, and the DESIGN.md invariants
are checked on each one, not only on what a tick's end shows.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import yaml
from conftest_kube import KubeEnv
from controller_helpers import REPO, FakeMetricSource, Harness, policy_doc

from shadowctl.kube import HTTP_ROUTE, SHADOW_POLICY, KubeClient, ResourceRef
from shadowctl.kube.refs import GVR
from shadowctl.routers import gateway_build

ROUTE_REF = ResourceRef(HTTP_ROUTE, "chat", "llm")
RULE = "chat-default"
TARGET = {"httpRoute": "chat", "rule": RULE, "primary": {"name": "chat-v1", "port": 8000},
          "candidate": {"name": "chat-v2", "port": 8000}}
OTHERS_MIRROR = {"type": "RequestMirror",
                 "requestMirror": {"backendRef": {"name": "analytics", "namespace": "data", "port": 9000},
                                   "percent": 5}}


def load_route(*, third: int = 0) -> dict[str, Any]:
    """gateway-api/chat.yaml's HTTPRoute with someone else's mirror in the managed rule; ``third``: a
    ``chat-previous`` backend holding that many percent (weights 100 - third and third)."""
    docs = list(yaml.safe_load_all((REPO / "gateway-api" / "chat.yaml").read_text()))
    route = copy.deepcopy(next(d for d in docs if d["kind"] == "HTTPRoute"))
    rule = next(r for r in route["spec"]["rules"] if r["name"] == RULE)
    rule["filters"] = [copy.deepcopy(OTHERS_MIRROR)]
    if third:
        rule["backendRefs"][0]["weight"] = 100 - third
        rule["backendRefs"].append({"name": "chat-previous", "port": 8000, "weight": third})
    return route


def rule_of(route: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in route["spec"]["rules"] if r.get("name") == RULE)


def shares(route: dict[str, Any]) -> dict[str, Fraction]:
    """Each backend's share of the managed rule, in percent (exact)."""
    refs = rule_of(route)["backendRefs"]
    total = sum(r.get("weight", 1) for r in refs)
    out: dict[str, Fraction] = {}
    for r in refs:
        out[r["name"]] = out.get(r["name"], Fraction(0)) + Fraction(100 * r.get("weight", 1), total)
    return out


def our_mirror(route: dict[str, Any]) -> float | None:
    for f in rule_of(route).get("filters") or []:
        if f["type"] == "RequestMirror" and f["requestMirror"]["backendRef"]["name"] == "chat-v2":
            return gateway_build.mirror_percent_of(f["requestMirror"])
    return None


class GatewayHarness(Harness):
    """The controller harness on the HTTPRoute; ``writes`` holds every HTTPRoute the controller wrote."""

    def __init__(self, env: KubeEnv, kube: KubeClient, source: FakeMetricSource | None = None, *,
                 third: int = 0) -> None:
        super().__init__(env, kube, source)
        self.third = third
        self.original: dict[str, Any] = {}
        self.writes: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        original_replace = kube.replace

        async def replace(gvr: GVR, obj: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
            stored = await original_replace(gvr, obj, *args, **kwargs)
            if gvr == HTTP_ROUTE:
                self._pending.append(stored)
            return stored

        kube.replace = replace  # type: ignore[method-assign]

    async def setup(self, **spec: Any) -> None:
        await self.kube.create(HTTP_ROUTE, load_route(third=self.third))
        self.original = await self.kube.get(ROUTE_REF)
        doc = policy_doc(**spec)
        doc["spec"]["target"] = {"gatewayAPI": copy.deepcopy(TARGET)}
        doc["spec"]["analysis"]["variants"] = {"primary": {"workload": "chat-v1"},
                                               "candidate": {"workload": "chat-v2"}}
        await self.kube.create(SHADOW_POLICY, doc)

    async def route(self) -> dict[str, Any]:
        return await self.kube.get(ROUTE_REF)

    async def weights(self) -> tuple[int, int, float | None]:
        """(primary, candidate) shares in whole percents of the managed rule, and our mirror."""
        route = await self.route()
        s = shares(route)
        assert all(v.denominator == 1 for v in s.values()), s
        return int(s.get("chat-v1", 0)), int(s.get("chat-v2", 0)), our_mirror(route)

    async def tick(self, advance: float = 10.0) -> Any:
        self._pending = []
        result = await super().tick(advance)
        row = self.history[-1]
        for stored in self._pending:
            s = shares(stored)
            self.writes.append({"phase": row["phase"], "decided": row["decided"], "shares": s,
                                "mirror": our_mirror(stored), "route": stored})
        return result

    def check_invariants(self, steps: Sequence[int]) -> None:
        """DESIGN.md invariants 1-3 at every HTTPRoute write and every tick's end, others' backends and
        everything outside the managed rule included."""
        third = Fraction(self.third)
        passed_shadow = False
        promoted = False
        rows = [{"phase": w["phase"], "decided": w["decided"], "shares": w["shares"], "mirror": w["mirror"]}
                for w in self.writes]
        assert rows, "the controller wrote the HTTPRoute"
        for w in self.writes:
            assert w["route"]["spec"]["parentRefs"] == self.original["spec"]["parentRefs"]
            assert w["route"]["spec"]["hostnames"] == self.original["spec"]["hostnames"]
            assert [r for r in w["route"]["spec"]["rules"] if r.get("name") != RULE] == [
                r for r in self.original["spec"]["rules"] if r.get("name") != RULE]
            rule, before = rule_of(w["route"]), rule_of(self.original)
            assert {k: v for k, v in rule.items() if k not in ("backendRefs", "filters")} == {
                k: v for k, v in before.items() if k not in ("backendRefs", "filters")}
            assert before["filters"][0] in rule["filters"], "someone else's mirror is kept"
        for row in rows:
            s = row["shares"]
            assert sum(s.values()) == 100, row
            assert s.get("chat-previous", Fraction(0)) == third, row  # others keep their share
            candidate = s.get("chat-v2", Fraction(0))
            assert candidate.denominator == 1, row
            if "Progressing" in (row["phase"], row["decided"]):
                passed_shadow = True
            if "Promoting" in (row["phase"], row["decided"]) or row["phase"] == "Succeeded":
                promoted = True
            if candidate not in (0, 100 - third):
                assert passed_shadow, row
                assert candidate in steps, row
            elif candidate == 100 - third and candidate not in steps:
                assert promoted, row
            if row["phase"] == "RolledBack":
                assert candidate == 0 and row["mirror"] is None, row
