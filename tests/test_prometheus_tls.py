"""A policy's Prometheus over TLS with a bearer token, both from Secrets in the policy's namespace.

The real Prometheus sits behind shadowctl.sim.authproxy.BearerProxy (TLS with a certificate from a
throw-away CA, 401 without the token), as it would behind kube-rbac-proxy; the Secrets live in the
real local API server and are read by the controller's SecretConnect. Nothing is mocked. Every test
runs a second time with the session's VictoriaMetrics behind the same proxy (id ``victoria-metrics``):
the store does not see the credentials, so what it answers must be the same.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest_kube import KubeEnv
from conftest_prometheus import STORES, MetricStore, PrometheusFactory

from shadowctl.cli.prom_opts import connection_options
from shadowctl.kube import SECRET, KubeClient, ResourceRef
from shadowctl.policy.model import ShadowPolicy
from shadowctl.sim.authproxy import BearerProxy
from shadowctl.sim.pki import LocalCA
from shadowctl.sources.base import SourceUnavailable, Unavailability
from shadowctl.sources.prometheus import PrometheusMetricSource
from shadowctl.sources.prometheus.promql import build_request
from shadowctl.sources.routing import RoutingSource, SecretConnect, secret_connect

OLD, NEW = "token-before-rotation-5c1f", "token-after-rotation-9a7e"


@pytest.fixture(scope="module", params=STORES)
def prometheus(request: pytest.FixtureRequest, prometheus_factory: PrometheusFactory) -> MetricStore:
    """The store behind the proxy: a Prometheus, or the session's VictoriaMetrics."""
    if request.param == "prometheus":
        return prometheus_factory()
    store: MetricStore = request.getfixturevalue("victoria_metrics")
    return store


@pytest.fixture
async def proxy(prometheus: MetricStore, tmp_path: Path) -> AsyncIterator[tuple[BearerProxy, LocalCA]]:
    ca = LocalCA(tmp_path / "pki")
    server = BearerProxy(prometheus.url, ca.issue("proxy", "127.0.0.1", hosts=("127.0.0.1",)), {OLD})
    await server.start()
    yield server, ca
    await server.stop()


def _secret(name: str, data: dict[str, bytes]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "llm"},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def _request(url: str, prometheus: dict[str, Any]) -> Any:
    pol = ShadowPolicy.model_validate({
        "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy", "metadata": {"name": "p", "namespace": "llm"},
        "spec": {"target": {"istio": {"virtualService": "chat", "primary": {"host": "h", "subset": "a"},
                                      "candidate": {"host": "h", "subset": "b"}}},
                 "canary": {"steps": [10]},
                 "analysis": {"variants": {"primary": {"workload": "chat-v1"}, "candidate": {"workload": "chat-v2"}},
                              "metrics": [{"name": "ttft", "preset": "vllm-ttft"}],
                              "prometheus": {"url": url, **prometheus}}},
    })
    return build_request(pol, pol.spec.analysis.metrics[0], start=datetime.fromtimestamp(1_700_000_000, UTC),
                         end=datetime.fromtimestamp(1_700_000_300, UTC))


async def test_the_token_and_ca_come_from_secrets_and_a_rotated_token_applies_at_the_next_query(
    kube_env: KubeEnv, tmp_path: Path, proxy: tuple[BearerProxy, LocalCA]
) -> None:
    server, ca = proxy
    kube = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "k"))
    other_ca = LocalCA(tmp_path / "other")
    with structlog.testing.capture_logs() as logs:
        try:
            await kube.create(SECRET, _secret("prom-token", {"token": OLD.encode() + b"\n"}))
            await kube.create(SECRET, _secret("prom-ca", {"ca.crt": ca.pem}))
            await kube.create(SECRET, _secret("other-ca", {"ca.crt": other_ca.pem}))
            connect: SecretConnect = secret_connect(kube, {"timeout": 5.0})
            router = RoutingSource(None, connect, clock=lambda: 0.0, on_refused=connect.invalidate)
            good = _request(server.url, {"bearerTokenSecret": "prom-token", "tls": {"caSecret": "prom-ca"}})

            answer = (await router.fetch_many([good]))[good.key]
            assert not isinstance(answer, SourceUnavailable), answer  # the store answered (no such series here)
            assert (server.forwarded, server.refused) == (1, 0)

            # Rotation: the server now takes only the new token, and the Secret holds it.
            server.tokens = {NEW}
            secret = await kube.get(ResourceRef(SECRET, "prom-token", "llm"))
            secret["data"]["token"] = base64.b64encode(NEW.encode()).decode()
            await kube.replace(SECRET, secret)
            reads = connect.secrets.reads
            answer = (await router.fetch_many([good]))[good.key]
            assert not isinstance(answer, SourceUnavailable), answer
            # The old token was sent once and refused by the server; the Secret was read again; the new one passed.
            assert (server.forwarded, server.refused) == (2, 1)
            assert connect.secrets.reads > reads

            # No token: the server refuses, and the answer says so (never a number).
            bare = _request(server.url, {"tls": {"caSecret": "prom-ca"}})
            answer = (await router.fetch_many([bare]))[bare.key]
            assert isinstance(answer, SourceUnavailable) and answer.cause is Unavailability.unauthorized
            assert "refused the credentials" in answer.reason

            # A CA that did not sign the server's certificate: TLS fails, said in one line.
            wrong = _request(server.url, {"bearerTokenSecret": "prom-token", "tls": {"caSecret": "other-ca"}})
            answer = (await router.fetch_many([wrong]))[wrong.key]
            assert isinstance(answer, SourceUnavailable) and answer.cause is Unavailability.unreachable
            assert "TLS: the server's certificate is not trusted" in answer.reason
            assert server.forwarded == 2

            # A CA Secret that holds no PEM: unavailable, naming the Secret and the field.
            await kube.create(SECRET, _secret("junk-ca", {"ca.crt": b"not a certificate"}))
            junk = _request(server.url, {"bearerTokenSecret": "prom-token", "tls": {"caSecret": "junk-ca"}})
            answer = (await router.fetch_many([junk]))[junk.key]
            assert isinstance(answer, SourceUnavailable) and "the CA is not a PEM certificate" in answer.reason
            await router.aclose()
        finally:
            await kube.close()
    text = repr(logs)
    assert OLD not in text and NEW not in text


async def test_the_controllers_token_file_is_read_again_when_the_server_refuses_it(
    tmp_path: Path, proxy: tuple[BearerProxy, LocalCA]
) -> None:
    """`shadowctl run --prometheus-token-file F --prometheus-ca-file CA`, as the command builds its source: the
    kubelet rotates the projected token in F; the server refuses the old one once, F is read again and the same
    query passes. A refusal while F still holds the refused token is answered as such, with no second try."""
    server, ca = proxy
    token_file = tmp_path / "token"
    token_file.write_text(OLD + "\n")
    options = connection_options(token_file, None, ca.cert_file, False, 5.0)
    with structlog.testing.capture_logs() as logs:
        source = PrometheusMetricSource(server.url, **options)
        try:
            assert await source.check() is None
            assert (server.forwarded, server.refused, source.token_rereads) == (1, 0, 0)

            server.tokens = {NEW}  # the server takes only the new token ...
            token_file.write_text(NEW + "\n")  # ... and the kubelet wrote it (after the source was made)
            assert await source.check() is None
            assert (server.forwarded, server.refused, source.token_rereads) == (2, 1, 1)
            assert await source.check() is None  # the new token is kept: no refusal, no read
            assert (server.forwarded, server.refused, source.token_rereads) == (3, 1, 1)

            server.tokens = {"a-token-nobody-has"}  # the file is not rotated: refused, said so, sent once only
            refused = await source.check()
            assert refused is not None and refused.cause is Unavailability.unauthorized, refused
            assert "refused the credentials" in refused.reason
            assert (server.forwarded, server.refused, source.token_rereads) == (3, 2, 2)
        finally:
            await source.aclose()
    assert any(e["event"] == "prometheus.token_reread" and e["file"] == str(token_file) for e in logs)
    text = repr(logs)
    assert OLD not in text and NEW not in text
