"""The Prometheus source against a live scrape, an outage, a server that never answers, and auth headers.

The live test scrapes a prometheus_client exporter started here (scrape every
1s); it and the outage run against Prometheus and VictoriaMetrics alike (ids
``prometheus`` / ``victoria-metrics``, conftest_prometheus). The slow server and the header-recording server are tiny TCP/HTTP servers
in this process: they stand in for failure modes and an auth proxy that a local
Prometheus cannot produce (the boundary mocked is the HTTP connection).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest_prometheus import HAVE_VICTORIA_METRICS, STORES, VM_SKIP_REASON, VictoriaMetricsServer
from http_stub import serving
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from typer.testing import CliRunner

from shadowctl.cli.app import app
from shadowctl.policy.model import ShadowPolicy
from shadowctl.sim.services import ScrapeTarget
from shadowctl.sources.base import HistogramWindow, SourceUnavailable, Unavailability, VariantPair, WindowRequest
from shadowctl.sources.prometheus import PrometheusMetricSource
from shadowctl.sources.prometheus.promql import build_request

if TYPE_CHECKING:
    from conftest_prometheus import PrometheusFactory, PrometheusServer, Scrapers


P_POD, C_POD = "chat-v1-abc12-xyz01", "chat-v2-def34-uvw02"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def policy(metrics: list[dict[str, Any]], url: str | None = None) -> ShadowPolicy:
    analysis: dict[str, Any] = {
        "variants": {"primary": {"workload": "chat-v1"}, "candidate": {"workload": "chat-v2"}},
        "metrics": metrics,
    }
    if url:
        analysis["prometheus"] = {"url": url}
    return ShadowPolicy.model_validate({
        "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy",
        "metadata": {"name": "chat", "namespace": "llm"},
        "spec": {
            "target": {"istio": {
                "virtualService": "chat",
                "primary": {"host": "chat", "subset": "v1"}, "candidate": {"host": "chat", "subset": "v2"},
            }},
            "canary": {"steps": [10]},
            "analysis": analysis,
        },
    })


PRESETS = ["vllm-ttft", "vllm-tpot", "vllm-e2e"]


def requests_for(names: list[str], start: datetime, end: datetime) -> list[WindowRequest]:
    pol = policy([{"name": n, "preset": n} for n in names])
    return [build_request(pol, m, start=start, end=end) for m in pol.spec.analysis.metrics]


def _instant(url: str, expr: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=5) as resp:
        result: list[dict[str, Any]] = json.loads(resp.read())["data"]["result"]
    return result


def _wait_for(url: str, expr: str, expected: float, deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        rows = _instant(url, expr)
        if rows and float(rows[0]["value"][1]) == expected:
            return
        time.sleep(0.2)
    raise AssertionError(f"{expr} did not reach {expected} within {deadline_s}s")


@pytest.fixture
def exporters() -> Iterator[dict[str, tuple[ScrapeTarget, Histogram]]]:
    """Two model-server stand-ins (one per pod) exposing vLLM 0.33's TTFT histogram in the text format.

    As in a cluster, the series carry only vLLM's own labels (model_name, engine); namespace and pod
    are the scrape target's, given as a kube-prometheus PodMonitor gives them (honor_labels false).
    Served by hand rather than with start_http_server: prometheus_client 0.26 answers
    Prometheus's OpenMetrics Accept header with ':' escaped to '_', which vLLM's real
    endpoint does not do. New ones for every test: each store's run starts from counts at 0.
    """
    with contextlib.ExitStack() as stack:
        out = {}
        for pod in (P_POD, C_POD):
            registry = CollectorRegistry()
            hist = Histogram("vllm:time_to_first_token_seconds", "TTFT", ["model_name", "engine"],
                             buckets=(0.1, 0.5, 1.0), registry=registry)
            hist.labels("llama", "0")  # the series exist (at 0) before the first scrape
            stub = stack.enter_context(serving(functools.partial(generate_latest, registry), CONTENT_TYPE_LATEST))
            labels = {"namespace": "llm", "pod": pod, "container": "vllm", "endpoint": "http"}
            out[pod] = (ScrapeTarget("llm/vllm", stub["host"], labels), hist)
        yield out


@pytest.mark.prometheus
@pytest.mark.parametrize("store", STORES)
async def test_live_scrape_exact_increases(
    scrapers: Scrapers, store: str, exporters: dict[str, tuple[ScrapeTarget, Histogram]]
) -> None:
    start = datetime.now(UTC) - timedelta(seconds=5)
    server = scrapers(store, [t for t, _ in exporters.values()])
    bucket = "vllm:time_to_first_token_seconds_bucket"
    pods = f'pod=~"{P_POD}|{C_POD}"'  # the session's VictoriaMetrics may hold other modules' pods
    _wait_for(server.url, f"count({bucket}{{{pods}}})", 8)
    for value in (0.05, 0.05, 0.05, 0.7, 0.7):
        exporters[P_POD][1].labels("llama", "0").observe(value)
    for value in (0.3, 0.3, 0.3, 0.3, 2.0):
        exporters[C_POD][1].labels("llama", "0").observe(value)
    _wait_for(server.url, f"sum(vllm:time_to_first_token_seconds_count{{{pods}}})", 10)
    await asyncio.sleep(1.5)  # one more scrape of each target: each pod's last scrape is after both have their counts
    # Evaluate each variant at its own pod's last scrape (two targets are scraped at different times),
    # so that increase() has nothing to extrapolate.
    results = {}
    src = PrometheusMetricSource(server.url)
    try:
        for pod in (P_POD, C_POD):
            last = float(_instant(server.url, f'max(timestamp({bucket}{{pod="{pod}"}}))')[0]["value"][1])
            results[pod] = await src.fetch(requests_for(["vllm-ttft"], start, datetime.fromtimestamp(last, UTC))[0])
    finally:
        await src.aclose()
    primary, candidate = results[P_POD], results[C_POD]
    assert isinstance(primary, VariantPair) and isinstance(candidate, VariantPair), results
    inf = float("inf")
    assert primary.primary == HistogramWindow((0.1, 0.5, 1.0, inf), (3.0, 3.0, 5.0, 5.0))
    assert candidate.candidate == HistogramWindow((0.1, 0.5, 1.0, inf), (0.0, 4.0, 4.0, 5.0))


@pytest.mark.prometheus
@pytest.mark.parametrize("store", STORES)
async def test_outage_is_source_unavailable(
    store: str, prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    """The store goes away between two looks. VictoriaMetrics: a process of its own (the session's one
    serves other tests), started in well under a second."""
    server: PrometheusServer | VictoriaMetricsServer
    if store == "prometheus":
        server = prometheus_factory()
    else:
        if not HAVE_VICTORIA_METRICS:
            pytest.skip(VM_SKIP_REASON)
        server = VictoriaMetricsServer(tmp_path)
        server.start()
    src = PrometheusMetricSource(server.url, timeout=2)
    try:
        assert await src.check() is None
        server.stop()
        problem = await src.check()
        assert problem is not None and problem.cause is Unavailability.unreachable
        now = datetime.now(UTC)
        results = await src.fetch_many(requests_for(PRESETS, now - timedelta(minutes=5), now))
    finally:
        await src.aclose()
        server.stop()  # already stopped unless the test failed before; stopping twice is harmless
    assert len(results) == 3
    for key, result in results.items():
        assert isinstance(result, SourceUnavailable), result
        assert result.cause is Unavailability.unreachable and result.metric == str(key)
        assert "_bucket{ namespace=\"llm\", pod=~\"chat-v1-" in result.query


class SilentServer:
    """Accepts TCP connections and never answers (a hung Prometheus or a black-holing proxy)."""

    def __init__(self) -> None:
        self.accepted = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.url = ""
        self.hung_up = False
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SilentServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self.hung_up:
                writer.close()
                return
            self.writers.append(writer)
            self.accepted.set()
            await reader.read()  # until the client gives up and closes

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def hang_up(self) -> None:
        """Close every connection, now and from now on."""
        self.hung_up = True
        for w in self.writers:
            w.close()

    async def __aexit__(self, *exc: object) -> None:
        self.hang_up()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def test_slow_server_times_out() -> None:
    async with SilentServer() as silent:
        src = PrometheusMetricSource(silent.url, timeout=0.3, retries=0)
        try:
            now = datetime.now(UTC)
            results = await src.fetch_many(requests_for(PRESETS, now - timedelta(minutes=5), now))
        finally:
            await src.aclose()
    assert {type(r) for r in results.values()} == {SourceUnavailable}
    for r in results.values():
        assert isinstance(r, SourceUnavailable)
        assert r.cause is Unavailability.timeout and "0.3s" in r.reason


async def test_cancelling_a_look_abandons_its_queries() -> None:
    async with SilentServer() as silent:
        src = PrometheusMetricSource(silent.url, timeout=30, retries=0)
        now = datetime.now(UTC)
        task = asyncio.create_task(src.fetch_many(requests_for(PRESETS, now - timedelta(minutes=5), now)))
        await asyncio.wait_for(silent.accepted.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        silent.hang_up()  # the abandoned worker threads see the connection end
        await src.aclose()
    assert task.cancelled()


@pytest.fixture
async def recording_server() -> AsyncIterator[dict[str, Any]]:
    """An HTTP server that records request headers and answers like Prometheus (or with HTML)."""
    state: dict[str, Any] = {"headers": [], "body": b""}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        state["headers"].append({k.lower(): v for k, _, v in (ln.partition(": ") for ln in lines[1:] if ln)})
        body = state["body"]
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state["url"] = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield state
    server.close()
    await server.wait_closed()


async def test_bearer_token_and_basic_auth_are_sent(recording_server: dict[str, Any]) -> None:
    recording_server["body"] = json.dumps(
        {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "1"]}]}}
    ).encode()
    src = PrometheusMetricSource(recording_server["url"], bearer_token="s3cret")
    assert await src.check() is None
    await src.aclose()
    src = PrometheusMetricSource(recording_server["url"], basic_auth=("ann", "pw"))
    assert await src.check() is None
    await src.aclose()
    first, second = recording_server["headers"]
    assert first["authorization"] == "Bearer s3cret"
    assert second["authorization"] == "Basic YW5uOnB3"


async def test_non_prometheus_answer_is_bad_response(recording_server: dict[str, Any]) -> None:
    recording_server["body"] = b"<html>login</html>"
    src = PrometheusMetricSource(recording_server["url"])
    now = datetime.now(UTC)
    result = await src.fetch(requests_for(["vllm-ttft"], now - timedelta(minutes=1), now)[0])
    await src.aclose()
    assert isinstance(result, SourceUnavailable) and result.cause is Unavailability.bad_response


def test_cli_query_unreachable_exits_1(tmp_path: Any) -> None:
    import yaml

    url = f"http://127.0.0.1:{free_port()}"
    pol = policy([{"name": "ttft", "preset": "vllm-ttft"}], url=url)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pol.model_dump(mode="json", by_alias=True, exclude_defaults=True)))
    result = CliRunner().invoke(app, ["query", str(path), "-o", "json", "--timeout", "2"], env={})
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["status"] == "unavailable" and rows[0]["cause"] == "unreachable"


def test_auth_options_are_checked() -> None:
    from shadowctl.sources.base import SourceConfigError

    with pytest.raises(SourceConfigError, match="not both"):
        PrometheusMetricSource("http://x", bearer_token="t", basic_auth=("a", "b"))
    with pytest.raises(SourceConfigError, match="not an http"):
        PrometheusMetricSource("ftp://x")


@pytest.fixture
def threaded_recorder() -> Iterator[dict[str, Any]]:
    """Like recording_server, in a thread: the CLI runs its own event loop and blocks the test's."""
    empty = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode()
    with serving(empty) as stub:
        yield stub


def test_cli_query_reads_credentials_from_files(threaded_recorder: dict[str, Any], tmp_path: Any) -> None:
    """`query` (and `run`, which shares the options) sends the credentials the files hold."""
    import yaml

    recording_server = threaded_recorder
    pol = policy([{"name": "errors", "preset": "vllm-errors", "kind": "ratio", "statistic": "rate", "margin": "1pp"}],
                 url=recording_server["url"])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pol.model_dump(mode="json", by_alias=True, exclude_defaults=True)))
    auth = tmp_path / "auth"
    auth.write_text("ann:pw:with:colons\n")
    result = CliRunner().invoke(app, ["query", str(path), "-o", "json", "--prometheus-basic-auth-file", str(auth)], env={})
    assert result.exit_code == 0, result.output
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    result = CliRunner().invoke(app, ["query", str(path), "-o", "json", "--prometheus-token-file", str(token)], env={})
    assert result.exit_code == 0, result.output
    basic, bearer = recording_server["headers"]
    assert basic["authorization"] == "Basic " + base64.b64encode(b"ann:pw:with:colons").decode()
    assert bearer["authorization"] == "Bearer s3cret"


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("no-colon", [], "expected USER:PASSWORD"),
        ("", [], "the file is empty"),
        ("a:b", ["--prometheus-token-file", "TOKEN"], "not both"),
    ],
)
def test_cli_credential_files_are_checked(tmp_path: Any, content: str, extra: list[str], message: str) -> None:
    auth = tmp_path / "auth"
    auth.write_text(content)
    token = tmp_path / "token"
    token.write_text("t")
    args = [a.replace("TOKEN", str(token)) for a in extra]
    for command in (["query", "policies/chat-istio.yaml"], ["run"]):
        result = CliRunner().invoke(
            app, [*command, "--prometheus", "http://127.0.0.1:1", "--prometheus-basic-auth-file", str(auth), *args],
            env={},
        )
        assert result.exit_code == 2, (command, result.output)
        assert message in " ".join(result.output.split())


def test_run_refuses_an_embedding_model_it_cannot_load(tmp_path: Any) -> None:
    """Whether or not the semantic extra is installed, a bad --embedding-model is a usage error, not a traceback."""
    result = CliRunner().invoke(app, ["run", "--embedding-model", str(tmp_path / "none")], env={})
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "--embedding-model" in text and ("cannot load the embedding model" in text or "optional extra" in text)
