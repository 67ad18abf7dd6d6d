"""Per-policy Prometheus: requests routed by server; the token comes from the policy's Secret.

The metric sources behind the router are test doubles at the port (FakeMetricSource); the
Secret is read from the real local API server (created there through KubeClient, read by
``secret_connect``), and the token is checked on the wire by a small HTTP server standing in
for Prometheus.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest_kube import KubeEnv
from controller_helpers import FakeMetricSource
from http_stub import PROMETHEUS_VECTOR_1, serving

from shadowctl.kube import SECRET, KubeClient
from shadowctl.policy.model import ShadowPolicy
from shadowctl.sources.base import MetricSource, ServerRef, SourceError, SourceUnavailable, VariantPair
from shadowctl.sources.prometheus.promql import build_request
from shadowctl.sources.routing import RoutingSource, secret_connect


def _policy(name: str, prometheus: dict[str, str] | None) -> ShadowPolicy:
    analysis: dict[str, Any] = {
        "variants": {"primary": {"workload": "chat-v1"}, "candidate": {"workload": "chat-v2"}},
        "metrics": [{"name": "ttft", "preset": "vllm-ttft"}],
    }
    if prometheus is not None:
        analysis["prometheus"] = prometheus
    return ShadowPolicy.model_validate({
        "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy",
        "metadata": {"name": name, "namespace": "llm"},
        "spec": {"target": {"istio": {"virtualService": "chat", "primary": {"host": "h", "subset": "a"},
                                      "candidate": {"host": "h", "subset": "b"}}},
                 "canary": {"steps": [10]}, "analysis": analysis},
    })


def _request(name: str, prometheus: dict[str, str] | None = None) -> Any:
    pol = _policy(name, prometheus)
    return build_request(pol, pol.spec.analysis.metrics[0], start=datetime.fromtimestamp(1_700_000_000, UTC),
                         end=datetime.fromtimestamp(1_700_000_300, UTC))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Tracked(FakeMetricSource):
    closed: bool = False

    async def aclose(self) -> None:
        self.closed = True


async def test_requests_go_to_the_server_their_policy_names() -> None:
    default = Tracked()
    made: dict[ServerRef, Tracked] = {}

    async def connect(ref: ServerRef) -> MetricSource:
        made[ref] = Tracked()
        return made[ref]

    router = RoutingSource(default, connect, clock=Clock())
    plain, own = _request("a"), _request("b", {"url": "http://thanos.tenant:9090", "bearerTokenSecret": "prom"})
    assert own.server == ServerRef("http://thanos.tenant:9090", ("llm", "prom"), namespace="llm")
    results = await router.fetch_many([plain, own])
    assert all(isinstance(r, VariantPair) for r in results.values())
    assert [r.key for r in default.requests] == [plain.key]
    assert [r.key for r in made[own.server].requests] == [own.key]
    await router.aclose()
    assert default.closed and made[own.server].closed


async def test_a_server_that_cannot_be_connected_to_is_unavailable_never_a_number() -> None:
    async def connect(ref: ServerRef) -> MetricSource:
        raise SourceError("Secret llm/prom (spec.analysis.prometheus.bearerTokenSecret) not found")

    router = RoutingSource(None, connect, clock=Clock())
    own = _request("b", {"url": "http://thanos.tenant:9090", "bearerTokenSecret": "prom"})
    results = await router.fetch_many([_request("a"), own])
    for key, result in results.items():
        assert isinstance(result, SourceUnavailable), key
    assert "no Prometheus" in results[_request("a").key].reason  # type: ignore[union-attr]
    assert "Secret llm/prom" in results[own.key].reason  # type: ignore[union-attr]


async def test_sources_are_made_again_after_refresh_so_rotated_tokens_apply() -> None:
    clock = Clock()
    made: list[Tracked] = []

    async def connect(ref: ServerRef) -> MetricSource:
        made.append(Tracked())
        return made[-1]

    router = RoutingSource(None, connect, clock=clock, refresh=300)
    own = _request("b", {"url": "http://thanos.tenant:9090"})
    await router.fetch(own)
    clock.t = 299
    await router.fetch(own)
    assert len(made) == 1
    clock.t = 301
    await router.fetch(own)
    assert len(made) == 2 and made[0].closed and not made[1].closed


@pytest.fixture
def recorder() -> Iterator[dict[str, Any]]:
    """A stand-in Prometheus that records the headers of each query."""
    with serving(PROMETHEUS_VECTOR_1) as stub:
        yield stub


async def test_secret_connect_sends_the_token_from_the_policys_secret(
    kube_env: KubeEnv, tmp_path: Path, recorder: dict[str, Any]
) -> None:
    kube = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "k"))
    try:
        await kube.create(SECRET, {"apiVersion": "v1", "kind": "Secret",
                                   "metadata": {"name": "prom", "namespace": "llm"},
                                   "data": {"token": base64.b64encode(b"t3nant-token\n").decode()}})
        await kube.create(SECRET, {"apiVersion": "v1", "kind": "Secret",
                                   "metadata": {"name": "wrong", "namespace": "llm"}, "data": {"password": "eA=="}})
        connect = secret_connect(kube, {"timeout": 5.0, "bearer_token": "controller-token"})
        source = await connect(ServerRef(recorder["url"], ("llm", "prom")))
        assert await source.check() is None
        await source.aclose()
        assert [h.get("authorization") for h in recorder["headers"]] == ["Bearer t3nant-token"]  # the policy's token, not the controller's
        with pytest.raises(SourceError, match=r"Secret llm/nope .* not found"):
            await connect(ServerRef(recorder["url"], ("llm", "nope")))
        with pytest.raises(SourceError, match="has no key 'token'"):
            await connect(ServerRef(recorder["url"], ("llm", "wrong")))
    finally:
        await kube.close()
