"""Shared pieces of the controller tests: a policy, a deterministic metric source double, a harness,
and a second writer that provokes real 409 Conflicts on the real API server.

The metric source double stands in for Prometheus at the port boundary (the real
adapter is tested against a real Prometheus in tests/test_prometheus_*.py): it
returns the cumulative windows a Prometheus would, computed from known
lognormal latency distributions and error rates, so whole rollouts run in
milliseconds of fake time.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from conftest_kube import KubeEnv
from fake_clock import FakeClock

from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.reconciler import Reconciler, TickResult
from shadowctl.kube import SHADOW_POLICY, VIRTUAL_SERVICE, KubeClient, ResourceRef
from shadowctl.kube.refs import GVR
from shadowctl.policy.status import PolicyStatus
from shadowctl.routers.factory import router_for
from shadowctl.sources.base import (
    CountWindow,
    HistogramWindow,
    MetricKey,
    SourceUnavailable,
    Unavailability,
    VariantPair,
    WindowRequest,
    WindowResult,
)
from shadowctl.sources.prometheus import build_requests

REPO = Path(__file__).resolve().parent.parent

POLICY = """
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {name: chat, namespace: llm}
spec:
  target:
    istio:
      virtualService: chat
      route: chat-default
      primary: {host: chat.llm.svc.cluster.local, subset: v1, port: 8000}
      candidate: {host: chat.llm.svc.cluster.local, subset: v2, port: 8000}
  shadow: {mirrorPercent: 20, minDuration: 20s, maxDuration: 300s, minPairs: 0}
  canary: {steps: [10, 50], stepDuration: 20s, maxStepDuration: 300s}
  analysis:
    interval: 10s
    variants:
      primary: {workload: chat-v1, subset: v1}
      candidate: {workload: chat-v2, subset: v2}
    metrics:
      - {name: ttft-p95, preset: vllm-ttft, statistic: p95, margin: 10%, critical: true, minSamples: 50}
      - {name: errors, preset: vllm-errors, kind: ratio, statistic: rate, margin: 1pp, minSamples: 50}
  progressDeadline: 1h
"""

# Fine log-spaced buckets (5% apart): coarse buckets cannot resolve a 10% margin (see docs/judge.md).
LE = (*(round(0.05 * 1.05**i, 6) for i in range(100)), math.inf)


def _lognorm_cdf(x: float, median: float, sigma: float) -> float:
    if math.isinf(x):
        return 1.0
    return 0.5 * (1 + math.erf(math.log(x / median) / (sigma * math.sqrt(2))))


@dataclass
class Arm:
    median: float = 0.4
    sigma: float = 0.5
    error_rate: float = 0.01


@dataclass
class FakeMetricSource:
    """Cumulative windows of known distributions; `rate` requests per second per arm."""

    primary: Arm = field(default_factory=Arm)
    candidate: Arm = field(default_factory=Arm)
    rate: float = 200.0
    down: bool = False
    calls: int = 0
    requests: list[WindowRequest] = field(default_factory=list)
    plan = staticmethod(build_requests)  # requests as the Prometheus source makes them

    async def fetch(self, request: WindowRequest) -> WindowResult:
        return (await self.fetch_many([request]))[request.key]

    async def fetch_many(self, requests: Sequence[WindowRequest]) -> dict[MetricKey, WindowResult]:
        self.calls += 1
        self.requests.extend(requests)
        out: dict[MetricKey, WindowResult] = {}
        for req in requests:
            if self.down:
                out[req.key] = SourceUnavailable(req.key.metric, req.primary.expr, Unavailability.unreachable,
                                                 "connection refused")
                continue
            n = self.rate * (req.end - req.start).total_seconds()
            if req.key.metric == "errors":
                out[req.key] = VariantPair(CountWindow(self.primary.error_rate * n, n),
                                           CountWindow(self.candidate.error_rate * n, n))
            else:
                out[req.key] = VariantPair(self._hist(self.primary, n), self._hist(self.candidate, n))
        return out

    @staticmethod
    def _hist(arm: Arm, n: float) -> HistogramWindow:
        return HistogramWindow(LE, tuple(round(n * _lognorm_cdf(b, arm.median, arm.sigma)) for b in LE))

    async def check(self) -> SourceUnavailable | None:
        return None

    async def aclose(self) -> None:
        return None


def load_vs() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((REPO / "istio" / "chat.yaml").read_text()))
    return copy.deepcopy(next(d for d in docs if d["kind"] == "VirtualService"))


def policy_doc(**spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(POLICY)
    for key, value in spec.items():
        if value is None:
            doc["spec"].pop(key, None)
        elif isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key] = {**doc["spec"][key], **value}
        else:
            doc["spec"][key] = value
    return doc


REF = ResourceRef(SHADOW_POLICY, "chat", "llm")
VS_REF = ResourceRef(VIRTUAL_SERVICE, "chat", "llm")


class Harness:
    """The real local API server with the chat VirtualService, a policy, a fake clock and a reconciler.

    ``kube`` is the client under test (normally through the fault proxy); ``env`` the test's
    :class:`~conftest_kube.KubeEnv` (admin access, faults).
    """

    def __init__(self, env: KubeEnv, kube: KubeClient, source: FakeMetricSource | None = None) -> None:
        self.env = env
        self.kube = kube
        self.clock = FakeClock()
        self.source = source or FakeMetricSource()
        self.reconciler = Reconciler(kube, router_for, Analyzer(self.source), self.clock)
        self.history: list[dict[str, Any]] = []

    async def setup(self, **spec: Any) -> None:
        await self.kube.create(VIRTUAL_SERVICE, load_vs())
        await self.kube.create(SHADOW_POLICY, policy_doc(**spec))

    async def vs_route(self) -> dict[str, Any]:
        vs = await self.kube.get(VS_REF)
        return next(r for r in vs["spec"]["http"] if r.get("name") == "chat-default")

    async def weights(self) -> tuple[int, int, float | None]:
        route = await self.vs_route()
        w = {d["destination"].get("subset"): int(d.get("weight", 100 if len(route["route"]) == 1 else 0))
             for d in route["route"]}
        mirror = route.get("mirrorPercentage", {}).get("value") if "mirror" in route else None
        return w.get("v1", 0), w.get("v2", 0), mirror

    async def status(self) -> PolicyStatus:
        return PolicyStatus.of(await self.kube.get(REF))

    async def tick(self, advance: float = 10.0) -> TickResult:
        self.clock.advance(advance)
        result = await self.reconciler.tick(REF)
        primary, candidate, mirror = await self.weights()
        status = await self.status()
        self.history.append({"phase": status.phase.value, "primary": primary, "candidate": candidate,
                             "mirror": mirror, "step": status.step,
                             "decided": result.phase.value if result.phase else None})
        return result

    async def run_until(self, phases: set[str], max_ticks: int = 80, advance: float = 10.0) -> str:
        for _ in range(max_ticks):
            await self.tick(advance)
            phase = (await self.status()).phase.value
            if phase in phases:
                return phase
        raise AssertionError(f"no phase in {phases} after {max_ticks} ticks: {self.history[-5:]}")

    def check_invariants(self, steps: Sequence[int]) -> None:
        """DESIGN.md invariants 1-3 over every sampled tick."""
        passed_shadow = False
        for row in self.history:
            assert row["primary"] + row["candidate"] == 100, row
            # The shadow phase passed when a tick decided so (its status write may have failed since).
            if "Progressing" in (row["phase"], row.get("decided")):
                passed_shadow = True
            if row["candidate"] not in (0, 100):
                assert passed_shadow, row
                assert row["candidate"] in steps, row
            if row["phase"] in ("RolledBack",):
                assert row["candidate"] == 0, row
                assert row["mirror"] is None, row


_edits = itertools.count(1)


def touch(env: KubeEnv, gvr: GVR, namespace: str, name: str) -> None:
    """A person edits the object (a new annotation value, straight to the API server as the admin).

    The edit changes nothing shadowctl reads, but gives the object a new resourceVersion, so a
    conditional write computed from an earlier read gets a real 409 Conflict.
    """
    env.patch(gvr, namespace, name, {"metadata": {"annotations": {"example.com/edited-by-a-person": str(next(_edits))}}})


@contextlib.contextmanager
def second_writer(
    kube: KubeClient, method: str, when: Callable[..., bool], edit: Callable[[], None], *, times: int | None = None
) -> Iterator[list[int]]:
    """Run ``edit`` (another writer's change) right after each call of ``kube.<method>(...)`` for which
    ``when(*args)`` holds, at most ``times`` times. Yields a one-item list: how often it edited.

    This places a real concurrent write at an exact point of a tick (between the controller's read and
    its write, or between its route write and its status write), where a racing thread would hit it
    only sometimes.
    """
    original = getattr(kube, method)
    edits = [0]

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        if (times is None or edits[0] < times) and when(*args):
            edits[0] += 1
            edit()
        return result

    setattr(kube, method, wrapped)
    try:
        yield edits
    finally:
        delattr(kube, method)
