"""The simulated model servers and DCGM exporter, scraped by a real Prometheus as a cluster scrapes them,
read through every vLLM and DCGM preset: what the servers counted is what the presets return.

Real: Prometheus (Debian package) and VictoriaMetrics (Debian package), both scraping the same targets every
second, the same traffic; every test runs against each (ids ``prometheus`` / ``victoria-metrics``). The targets carry the labels a
kube-prometheus PodMonitor gives a vLLM pod, and the DCGM exporter is scraped with
``honor_labels: false`` as the dcgm-exporter chart's ServiceMonitor does, so the GPU's pod
arrives as ``exported_namespace`` / ``exported_pod`` and ``namespace`` / ``pod`` name the exporter.
Simulated (no GPU here): the model servers and the exporter (shadowctl.sim).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import pytest_asyncio
from conftest_prometheus import HAVE_VICTORIA_METRICS, STORES, VM_SKIP_REASON, Scrapers

from shadowctl.policy.model import ShadowPolicy
from shadowctl.sim.dcgm import SimDcgmExporter
from shadowctl.sim.modelserver import ModelKnobs, ServerStats, SimModelServer
from shadowctl.sim.services import ScrapeTarget
from shadowctl.sources.base import CountWindow, GaugeWindow, HistogramWindow, NoData, VariantPair
from shadowctl.sources.prometheus import PrometheusMetricSource
from shadowctl.sources.prometheus.promql import build_request

if TYPE_CHECKING:
    from conftest_prometheus import MetricStore

pytestmark = pytest.mark.prometheus

PODS = {"primary": "chat-v1-6d8f7c-k2x9q", "candidate": "chat-v2-7b9c4d-r2n5t"}
KNOBS = ModelKnobs(time_scale=0.002, ttft_median_s=0.1, tpot_median_s=0.02, output_words_median=20)
ERROR_RATE = {"primary": 0.0, "candidate": 0.15}
GPUS = {"primary": 2, "candidate": 1}
GPU_UTIL = {"primary": 55.0, "candidate": 92.0}
REQUESTS, BAD_REQUESTS = 120, 7
DCGM_POD = "nvidia-dcgm-exporter-7xk2p"
MINE = f'pod=~"{PODS["primary"]}|{PODS["candidate"]}|{DCGM_POD}"'
"""This module's targets: the session's VictoriaMetrics may hold other modules' series too."""


@dataclass
class Cluster:
    servers: dict[str, SimModelServer]
    stores: dict[str, MetricStore]
    """Each store scraping the targets, by name (VictoriaMetrics only where its binary is installed)."""
    warm_up: dict[str, ServerStats]
    """Each server's counts before the first scrape: a labelled series is created at its first increment,
    and ``increase`` cannot see the value a series is born with (vLLM's HTTP counts are created so too)."""
    starts: dict[str, dict[str, datetime]]
    """For each store, each pod's last scrape before the traffic: windows start there, on a sample, so that ``increase``
    extrapolates nothing (Prometheus 2 ranges include both ends)."""


def _instant(url: str, expr: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=5) as resp:
        result: list[dict[str, Any]] = json.load(resp)["data"]["result"]
    return result


async def _until(url: str, expr: str, expected: float, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        rows = await asyncio.to_thread(_instant, url, expr)
        if rows and float(rows[0]["value"][1]) == expected:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{expr} did not reach {expected} within {deadline_s}s: {rows}")


async def _last_scrape(url: str, variant: str) -> datetime:
    expr = f'max(timestamp(vllm:request_success_total{{pod="{PODS[variant]}"}}))'
    return datetime.fromtimestamp(float((await asyncio.to_thread(_instant, url, expr))[0]["value"][1]), UTC)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    servers = {
        v: SimModelServer("llama", variant=v, pod=pod, namespace="llm", seed=i,
                          knobs=KNOBS.updated({"error_rate": ERROR_RATE[v], "gpu_util_percent": GPU_UTIL[v]}))
        for i, (v, pod) in enumerate(PODS.items())
    }
    dcgm = SimDcgmExporter("gpu-node-1")
    for variant, server in servers.items():
        await server.start()
        dcgm.attach(server, GPUS[variant])
    dcgm.add_idle_gpus(1)
    await dcgm.start()
    targets = [ScrapeTarget("llm/vllm", s.url.removeprefix("http://"),
                            {"namespace": "llm", "pod": s.pod, "container": "vllm", "endpoint": "http"})
               for s in servers.values()]
    targets.append(ScrapeTarget("dcgm-exporter", dcgm.url.removeprefix("http://"), {
        "namespace": "gpu-operator", "pod": DCGM_POD, "container": "nvidia-dcgm-exporter",
        "service": "nvidia-dcgm-exporter", "endpoint": "gpu-metrics"}))
    scrapers = Scrapers(request)
    try:
        async with aiohttp.ClientSession() as session:
            async def one(server: SimModelServer, i: int) -> None:
                body = {"model": "llama", "messages": [{"role": "user", "content": f"question {i}"}],
                        "max_tokens": 8, "stream": i % 2 == 0}
                async with session.post(server.url + "/v1/chat/completions", json=body) as resp:
                    await resp.read()

            async def bad(server: SimModelServer) -> None:  # refused before the engine: 400
                async with session.post(server.url + "/v1/completions", json={"prompt": 3}) as resp:
                    assert resp.status == 400

            # Warm-up: every series the test reads exists before Prometheus first scrapes it.
            warm_up = {}
            for variant, server in servers.items():
                i = 0
                while server.stats.succeeded == 0 or (ERROR_RATE[variant] > 0 and server.stats.errors == 0):
                    await one(server, -1 - i)
                    i += 1
                await bad(server)
                warm_up[variant] = dataclasses.replace(server.stats)
            names = [s for s in STORES if s != "victoria-metrics" or HAVE_VICTORIA_METRICS]
            stores = {name: await asyncio.to_thread(scrapers, name, targets) for name in names}
            for store in stores.values():
                await _until(store.url, f"count(up{{{MINE}}} == 1)", 3)
                await _until(store.url, f"count(http_requests_total{{{MINE}}})", 5)  # 2xx and 4xx each, the candidate's 5xx
            await asyncio.sleep(1.5)
            starts = {name: {v: await _last_scrape(store.url, v) for v in PODS} for name, store in stores.items()}
            # Both at once, spread over 2.5 scrape intervals: the window of one variant (from its pod's scrape
            # before the traffic to its last) holds all of that variant's traffic and some of the other's.
            batches = 5
            for b in range(batches):
                await asyncio.gather(
                    *(one(server, i) for server in servers.values() for i in range(b, REQUESTS, batches)),
                    *(bad(server) for server in servers.values() for _ in range(b, BAD_REQUESTS, batches)))
                await asyncio.sleep(0.5)
        answered = sum(s.stats.requests + s.stats.bad_requests for s in servers.values())
        for store in stores.values():
            await _until(store.url, f"sum(http_requests_total{{{MINE}}})", answered)
        await asyncio.sleep(1.5)  # one more scrape of every target, so each pod's last scrape has every count
        yield Cluster(servers, stores, warm_up, starts)
    finally:
        await asyncio.to_thread(scrapers.stop_all)
        await dcgm.stop()
        for server in servers.values():
            await server.stop()


def _policy(price: float | None = None, candidate_pod: str | None = None, namespace: str = "llm") -> ShadowPolicy:
    variants = {v: {"pod": f"{pod.rsplit('-', 2)[0]}-.*"} for v, pod in PODS.items()}
    if candidate_pod is not None:
        variants["candidate"] = {"pod": candidate_pod}
    analysis: dict[str, Any] = {
        "interval": "1s",
        "variants": variants,
        "metrics": [{"name": "m", "preset": "vllm-ttft"}],
    }
    if price is not None:
        analysis["gpuPricePerHour"] = price
    return ShadowPolicy.model_validate({
        "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy", "metadata": {"name": "chat", "namespace": namespace},
        "spec": {"target": {"istio": {"virtualService": "chat", "primary": {"host": "chat", "subset": "v1"},
                                       "candidate": {"host": "chat", "subset": "v2"}}},
                 "canary": {"steps": [50]}, "analysis": analysis},
    })


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, cluster: Cluster) -> str:
    """Which store a test reads the cluster's metrics from: "prometheus" or "victoria-metrics"."""
    name = str(request.param)
    if name not in cluster.stores:
        pytest.skip(VM_SKIP_REASON)
    return name


async def _fetch(cluster: Cluster, store: str, preset: str, variant: str, kind: str = "latency-histogram",
                 statistic: str = "p50") -> Any:
    """One variant's window of ``preset``, ending at that variant's pod's last scrape (for counters, so that
    ``increase`` extrapolates nothing: the two pods are scraped at different times)."""
    url = cluster.stores[store].url
    policy = _policy(price=2.5)
    metric = policy.spec.analysis.metrics[0].model_copy(update={"preset": preset, "kind": kind, "statistic": statistic})
    request = build_request(policy, metric, start=cluster.starts[store][variant], end=await _last_scrape(url, variant))
    source = PrometheusMetricSource(url)
    try:
        result = await source.fetch(request)
    finally:
        await source.aclose()
    assert isinstance(result, VariantPair), result
    return result.primary if variant == "primary" else result.candidate


@pytest.mark.parametrize("variant", list(PODS))
async def test_error_presets_count_what_the_server_failed(cluster: Cluster, store: str, variant: str) -> None:
    stats, before = cluster.servers[variant].stats, cluster.warm_up[variant]
    errors = stats.errors - before.errors
    if variant == "candidate":
        assert errors > 5  # the candidate does fail
    engine = await _fetch(cluster, store, "vllm-errors", variant, "ratio", "rate")
    assert engine == CountWindow(failures=float(errors), total=float(REQUESTS))
    http = await _fetch(cluster, store, "vllm-http-errors", variant, "ratio", "rate")
    assert http == CountWindow(failures=float(errors), total=float(REQUESTS + BAD_REQUESTS))


@pytest.mark.parametrize("variant", list(PODS))
async def test_latency_presets_count_every_observation(cluster: Cluster, store: str, variant: str) -> None:
    server = cluster.servers[variant]
    finished = [r for r in list(server.served)[cluster.warm_up[variant].requests:] if r.finish_reason in ("stop", "length")]
    counts = {
        "vllm-ttft": len(finished),
        "vllm-e2e": REQUESTS,  # failed requests too: the engine finished them
        "vllm-tpot": sum(r.completion_tokens - 1 for r in finished),
        "vllm-request-tpot": sum(1 for r in finished if r.completion_tokens > 1),
    }
    for preset, count in counts.items():
        window = await _fetch(cluster, store, preset, variant)
        assert isinstance(window, HistogramWindow), (preset, window)
        assert window.counts[-1] == count, preset


@pytest.mark.parametrize("variant", list(PODS))
async def test_gpu_presets_see_the_pods_gpus_through_exported_labels(cluster: Cluster, store: str, variant: str) -> None:
    # The exporter's series reached Prometheus with the GPU's pod renamed, as under the chart's defaults.
    rows = await asyncio.to_thread(_instant, cluster.stores[store].url, f'DCGM_FI_DEV_GPU_UTIL{{exported_pod="{PODS[variant]}"}}')
    assert len(rows) == GPUS[variant] and {r["metric"]["pod"] for r in rows} == {DCGM_POD}
    util = await _fetch(cluster, store, "dcgm-gpu-util", variant, "gauge", "mean")
    assert isinstance(util, GaugeWindow) and util.samples and set(util.samples) == {GPU_UTIL[variant]}
    memory = await _fetch(cluster, store, "dcgm-fb-used", variant, "gauge", "mean")
    assert set(memory.samples) == {GPUS[variant] * KNOBS.gpu_memory_used_mib}
    power = await _fetch(cluster, store, "dcgm-power", variant, "gauge", "mean")
    assert set(power.samples) == {GPUS[variant] * KNOBS.gpu_power_watts}
    cost = await _fetch(cluster, store, "gpu-cost-per-1k-tokens", variant, "gauge", "mean")
    assert isinstance(cost, GaugeWindow) and all(c > 0 for c in cost.samples)


async def test_a_pod_without_gpus_is_no_data_not_the_exporters(cluster: Cluster, store: str) -> None:
    """The exporter's own pod (``namespace`` / ``pod`` under honorLabels: false) never stands for a variant."""
    policy = _policy(candidate_pod="nvidia-dcgm-exporter-.*", namespace="gpu-operator")
    metric = policy.spec.analysis.metrics[0].model_copy(update={"preset": "dcgm-gpu-util", "kind": "gauge",
                                                                "statistic": "mean"})
    now = datetime.now(UTC)
    source = PrometheusMetricSource(cluster.stores[store].url)
    try:
        result = await source.fetch(build_request(policy, metric, start=now - timedelta(seconds=30), end=now))
    finally:
        await source.aclose()
    assert isinstance(result, NoData), result
