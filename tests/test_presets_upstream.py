"""Every preset against a real Prometheus holding series shaped as the upstream software emits them.

Each upstream has one generator below, writing OpenMetrics text from the tables of what was put in
(per pod: requests, tokens, observations per bucket; per GPU: utilisation, memory, power), with the
metric names, labels, buckets and scrape labels that upstream and its usual scrape config give:

- vLLM 0.33's /metrics scraped by a kube-prometheus PodMonitor (:func:`vllm_series`), an older vLLM
  that still has ``vllm:time_per_output_token_seconds`` only, and vLLM's HTTP server metrics
  (prometheus-fastapi-instrumentator's ``http_requests_total``, grouped status codes);
- the DCGM exporter (:func:`dcgm_series`) in the three setups of docs/metrics.md, "GPU metrics";
- Istio's sidecar standard metrics (:func:`istio_series`), destination and source reports.

Samples are written every 15 s for 30 minutes from T0 (a multiple of 2h: one TSDB block) with
``promtool tsdb create-blocks-from openmetrics``; queries run on sample boundaries, so ``increase``
and ``rate`` are exact and every expected number is computed from the tables (``expected_*``).
Every request is answered both ways, grouped (one query for all rollouts of a preset) and per
rollout, and the two must agree (:func:`fetch_both_ways`). :data:`COVERAGE` must name every preset.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest

from shadowctl.policy.loader import parse_policies
from shadowctl.policy.model import ShadowPolicy
from shadowctl.sources.base import (
    CounterWindow,
    CountWindow,
    GaugeWindow,
    HistogramWindow,
    MetricKey,
    NoData,
    Variant,
    VariantPair,
    Window,
    WindowRequest,
    WindowResult,
)
from shadowctl.sources.prometheus import PrometheusMetricSource
from shadowctl.sources.prometheus.presets import PRESETS
from shadowctl.sources.prometheus.promql import build_request

if TYPE_CHECKING:
    from conftest_prometheus import PrometheusFactory, PrometheusServer

pytestmark = pytest.mark.prometheus

T0 = 1_700_006_400  # a multiple of 2h
STEP = 15  # seconds between samples (and between scrapes)
STEPS = 120  # samples at T0 + 15 s * k, k = 0..120
END = STEP * STEPS  # every look ends here (offset from T0)
PRICE = 2.5  # spec.analysis.gpuPricePerHour
NS = "llm"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"

# --------------------------------------------------------------------------- upstream names and buckets

TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
REQUEST_TPOT = "vllm:request_time_per_output_token_seconds"
OLD_TPOT = "vllm:time_per_output_token_seconds"  # vLLM 0.12 and older; removed since
E2E = "vllm:e2e_request_latency_seconds"
QUEUE = "vllm:request_queue_time_seconds"
ISTIO_DURATION = "istio_request_duration_milliseconds"

_TOKEN_BUCKETS = ("0.01", "0.025", "0.05", "0.075", "0.1", "0.15", "0.2", "0.3", "0.4", "0.5", "0.75", "1.0",
                  "2.5", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "+Inf")
_REQUEST_BUCKETS = ("0.3", "0.5", "0.8", "1.0", "1.5", "2.0", "2.5", "5.0", "10.0", "15.0", "20.0", "30.0", "40.0",
                    "50.0", "60.0", "120.0", "240.0", "480.0", "960.0", "1920.0", "7680.0", "+Inf")
BUCKETS: Mapping[str, tuple[str, ...]] = {
    # vLLM writes bounds as Python floats ("1.0"); Envoy as integers where they are ("1").
    TTFT: ("0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5", "0.75", "1.0", "2.5",
           "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "160.0", "640.0", "2560.0", "+Inf"),
    ITL: _TOKEN_BUCKETS,
    REQUEST_TPOT: _TOKEN_BUCKETS,
    OLD_TPOT: _TOKEN_BUCKETS,
    E2E: _REQUEST_BUCKETS,
    QUEUE: _REQUEST_BUCKETS,
    ISTIO_DURATION: ("0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000", "30000",
                     "60000", "300000", "600000", "1800000", "3600000", "+Inf"),
}
NEW_VLLM_FAMILIES = (TTFT, ITL, REQUEST_TPOT, E2E, QUEUE)  # vLLM 0.33: no vllm:time_per_output_token_seconds
OLD_VLLM_FAMILIES = (TTFT, OLD_TPOT, E2E, QUEUE)
CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
COMPLETION_HANDLERS = (CHAT, COMPLETIONS)  # vllm-http-errors counts these; /v1/models is no completion

# --------------------------------------------------------------------------- what was put in

PerBucket = Mapping[str, int]
"""Observations per 15 s step that fall in each bucket (not cumulative), by upper bound."""


@dataclass(frozen=True)
class Caller:
    """A workload that sends requests through its sidecar (Istio's source_* labels)."""

    workload: str
    namespace: str
    pod: str
    ip: str
    service_account: str


GATEWAY = Caller("istio-ingressgateway", "istio-system", "istio-ingressgateway-7c9d8f6b5-g8w2x", "10.0.1.5",
                 "istio-ingressgateway-service-account")
FRONTEND = Caller("frontend", "web", "frontend-6b5c4d3e2-f9r1t", "10.0.2.9", "frontend")
CALLERS = {c.workload: c for c in (GATEWAY, FRONTEND)}

IstioKey = tuple[str, str, str]
"""(source_workload, response_code, response_flags) of the requests a destination sidecar reported."""


@dataclass(frozen=True)
class Pod:
    """One pod of a Deployment (``<workload>-<template hash>-<id>``) and what it did per 15 s step."""

    name: str
    ip: str
    namespace: str = NS
    app: str = "chat"
    version: str = ""  # the pod's `version` label: its Istio subset
    vllm: str | None = "0.33"  # vLLM release it runs (None: not a vLLM pod)
    histograms: Mapping[str, PerBucket] = field(default_factory=dict)
    finished: Mapping[str, int] = field(default_factory=dict)  # finished_reason -> requests
    http: Mapping[tuple[str, str, str], int] = field(default_factory=dict)  # (handler, method, status) -> responses
    generation_tokens: int = 0
    prompt_tokens: int = 0
    istio: Mapping[IstioKey, PerBucket] = field(default_factory=dict)  # requests by duration bucket (ms)

    @property
    def workload(self) -> str:
        return self.name.rsplit("-", 2)[0]


P1 = Pod(
    "chat-v1-6c8f9d7b5-k2x9p", "10.0.3.7", version="v1",
    histograms={
        TTFT: {"0.04": 20, "0.06": 50, "0.1": 25, "0.25": 5},
        ITL: {"0.01": 400, "0.025": 900, "0.05": 100},
        REQUEST_TPOT: {"0.025": 70, "0.05": 30},
        E2E: {"1.5": 10, "2.0": 40, "2.5": 30, "5.0": 20},
        QUEUE: {"0.3": 95, "0.5": 5},
    },
    finished={"stop": 80, "length": 12, "abort": 6, "error": 1, "repetition": 1},
    http={(CHAT, "POST", "2xx"): 90, (CHAT, "POST", "4xx"): 4, (CHAT, "POST", "5xx"): 1,
          (COMPLETIONS, "POST", "2xx"): 5, (MODELS, "GET", "2xx"): 30},
    generation_tokens=1500, prompt_tokens=6000,
    istio={("istio-ingressgateway", "200", "-"): {"100": 30, "250": 40, "500": 20},
           ("istio-ingressgateway", "400", "-"): {"5": 2},
           ("istio-ingressgateway", "503", "UF"): {"1": 1}},
)
P2 = Pod(
    "chat-v1-6c8f9d7b5-m4q7z", "10.0.4.12", version="v1",
    histograms={
        TTFT: {"0.02": 5, "0.04": 30, "0.06": 30, "0.1": 10},
        ITL: {"0.01": 300, "0.025": 800, "0.05": 25},
        REQUEST_TPOT: {"0.025": 60, "0.05": 15},
        E2E: {"1.0": 5, "1.5": 20, "2.0": 30, "2.5": 20},
        QUEUE: {"0.3": 75},
    },
    finished={"stop": 60, "length": 10, "abort": 4, "error": 0, "repetition": 1},  # no error yet: the series is 0
    http={(CHAT, "POST", "2xx"): 70, (CHAT, "POST", "4xx"): 1, (COMPLETIONS, "POST", "2xx"): 4,
          (MODELS, "GET", "2xx"): 30},
    generation_tokens=1200, prompt_tokens=4800,
    istio={("istio-ingressgateway", "200", "-"): {"100": 20, "250": 40, "500": 14},
           ("frontend", "500", "-"): {"1000": 1}},
)
C1 = Pod(
    "chat-v2-5b7c8d9f6-r8t2w", "10.0.3.8", version="v2",
    histograms={
        TTFT: {"0.06": 10, "0.08": 30, "0.1": 40, "0.25": 15, "0.5": 5},
        ITL: {"0.025": 300, "0.05": 1500, "0.075": 500},
        REQUEST_TPOT: {"0.05": 60, "0.075": 30, "0.1": 10},
        E2E: {"2.5": 30, "5.0": 50, "10.0": 20},
        QUEUE: {"0.3": 80, "0.5": 15, "0.8": 5},
    },
    # 9 of the 100 requests the engine finished per step end with an error; the 5 aborts are no failures.
    finished={"stop": 70, "length": 12, "abort": 5, "error": 9, "repetition": 4},
    # 7 of the 100 completion requests are answered 5xx (the 3 4xx count in the total); /v1/models never counts.
    http={(CHAT, "POST", "2xx"): 80, (CHAT, "POST", "4xx"): 3, (CHAT, "POST", "5xx"): 6,
          (COMPLETIONS, "POST", "2xx"): 10, (COMPLETIONS, "POST", "5xx"): 1,
          (MODELS, "GET", "2xx"): 20, (MODELS, "GET", "5xx"): 2},
    generation_tokens=2400, prompt_tokens=9000,
    istio={("istio-ingressgateway", "200", "-"): {"250": 20, "500": 40, "1000": 20},
           ("istio-ingressgateway", "400", "-"): {"5": 2},
           ("istio-ingressgateway", "500", "-"): {"1000": 5},
           ("istio-ingressgateway", "503", "UF"): {"1": 3},
           ("frontend", "200", "-"): {"500": 6}},
)
OLD = Pod(  # the primary Deployment chat-v0 before an upgrade: an older vLLM
    "chat-v0-9a8b7c6d5-o1d0p", "10.0.3.9", version="v0", vllm="0.12",
    histograms={
        TTFT: {"0.04": 40, "0.1": 20},
        OLD_TPOT: {"0.025": 200, "0.05": 700, "0.075": 140},
        E2E: {"2.0": 40, "5.0": 20},
        QUEUE: {"0.3": 60},
    },
    finished={"stop": 50, "length": 8, "abort": 2},
    generation_tokens=1100,
)
UPGRADED = dataclasses.replace(P2, name="chat-v0-5d4c3b2a1-n3w0p", ip="10.0.4.13", version="v0", istio={})
"""chat-v0 mid rolling upgrade: a pod of the new ReplicaSet, with vLLM 0.33."""
_ALL_FAIL = {("istio-ingressgateway", "503", "-"): {"1": 50}}  # a decoy's Istio traffic: would show if counted
DECOYS = (  # never selected: another Deployment whose name starts alike, and the same pod in another namespace
    dataclasses.replace(P1, name="chat-v1-canary-6c8f9d7b5-c4n4r", ip="10.0.4.14", version="canary", istio=_ALL_FAIL),
    dataclasses.replace(P1, namespace="research", ip="10.0.5.3", istio=_ALL_FAIL),
)
EMBEDDER = Pod("embedder-57d9c6f8b-q3w4e", "10.0.3.10", app="embedder", vllm=None)  # holds a GPU, no vLLM
BOOKINFO = (  # Istio's bookinfo layout, in namespace shop: two services whose pods both carry version v1
    Pod("reviews-v1-7f8e9d6c5-a1b2c", "10.0.6.2", "shop", "reviews", "v1", None, istio={("frontend", "200", "-"): {"50": 48}}),
    Pod("reviews-v2-6e5d4c3b2-d3e4f", "10.0.6.3", "shop", "reviews", "v2", None, istio={("frontend", "200", "-"): {"100": 40}}),
    Pod("ratings-v1-5d4c3b2a1-g5h6i", "10.0.6.4", "shop", "ratings", "v1", None, istio={("frontend", "500", "-"): {"5": 20}}),
)
PRIMARY, CANDIDATE = (P1, P2), (C1,)
POD_TABLE = (P1, P2, C1, OLD, UPGRADED, *DECOYS, EMBEDDER)


@dataclass(frozen=True)
class Gpu:
    node: str
    index: int
    pod: Pod | None  # None: no pod holds it
    util: float  # DCGM_FI_DEV_GPU_UTIL, %
    fb_used: float  # DCGM_FI_DEV_FB_USED, MiB
    power: float  # DCGM_FI_DEV_POWER_USAGE, W


GPU_TABLE = (
    Gpu("node-a", 0, P1, 60, 40000, 350.5),
    Gpu("node-a", 1, P1, 70, 41000, 360.25),
    Gpu("node-a", 2, C1, 90, 62000, 610.75),
    Gpu("node-a", 3, EMBEDDER, 40, 12000, 200),  # an unrelated pod on the same exporter
    Gpu("node-a", 4, DECOYS[1], 5, 1000, 100),
    Gpu("node-a", 5, None, 0, 0, 70),  # idle: in setup (a) it carries only the exporter's namespace and pod
    Gpu("node-b", 0, P2, 80, 39000, 340),
    Gpu("node-b", 1, DECOYS[0], 5, 1000, 100),
    Gpu("node-b", 2, None, 0, 0, 69.5),
)
EXPORTERS = {"node-a": ("dcgm-exporter-x7k2p", "10.0.3.21"), "node-b": ("dcgm-exporter-m9v4q", "10.0.4.22")}

# --------------------------------------------------------------------------- OpenMetrics text


def cumulative(buckets: tuple[str, ...], per_bucket: PerBucket) -> tuple[int, ...]:
    """Cumulative bucket counts per step, in the order of ``buckets``."""
    assert set(per_bucket) <= set(buckets), (per_bucket, buckets)
    out, total = [], 0
    for le in buckets:
        total += per_bucket.get(le, 0)
        out.append(total)
    return tuple(out)


class OpenMetrics:
    """Families of series sampled every STEP from T0, as text for promtool (one ``# TYPE`` line per family)."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, list[str]]] = {}

    def _add(self, family: str, kind: str, sample: str, labels: Mapping[str, str], per_step: float,
             value: float = 0.0) -> None:
        """One series: ``value + per_step * k`` at sample k."""
        lines = self._families.setdefault(family, (kind, []))[1]
        body = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.extend(f"{sample}{{{body}}} {float(value + per_step * k)!r} {T0 + STEP * k}" for k in range(STEPS + 1))

    def counter(self, name: str, labels: Mapping[str, str], per_step: float) -> None:
        self._add(name.removesuffix("_total"), "counter", name, labels, per_step)

    def gauge(self, name: str, labels: Mapping[str, str], value: float) -> None:
        self._add(name, "gauge", name, labels, 0.0, value)

    def histogram(self, family: str, labels: Mapping[str, str], per_bucket: PerBucket) -> None:
        buckets = BUCKETS[family]
        for le, count in zip(buckets, cumulative(buckets, per_bucket), strict=True):
            self._add(family, "histogram", f"{family}_bucket", {**labels, "le": le}, count)
        finite = [float(b) for b in buckets[:-1]]
        observed = sum(n * (float(le) if le != "+Inf" else 2 * finite[-1]) for le, n in per_bucket.items())
        self._add(family, "histogram", f"{family}_sum", labels, observed)
        self._add(family, "histogram", f"{family}_count", labels, sum(per_bucket.values()))

    def text(self) -> str:
        return "".join(f"# TYPE {f} {kind}\n" + "\n".join(lines) + "\n" for f, (kind, lines) in self._families.items())


def vllm_series(om: OpenMetrics, pods: tuple[Pod, ...], *, tokens_only: bool = False) -> None:
    """vLLM's /metrics (labels model_name, engine) and its HTTP server's http_requests_total (no model
    labels), as a kube-prometheus PodMonitor scrapes them: namespace, pod, container="vllm",
    endpoint="http", job="<namespace>/vllm", instance="<pod IP>:8000". vLLM 0.33 has no
    vllm:time_per_output_token_seconds; the older vLLM has it instead of vllm:inter_token_latency_seconds
    and no vllm:request_time_per_output_token_seconds."""
    for pod in pods:
        if pod.vllm is None:
            continue
        target = {"namespace": pod.namespace, "pod": pod.name, "container": "vllm", "endpoint": "http",
                  "job": f"{pod.namespace}/vllm", "instance": f"{pod.ip}:8000"}
        engine = {"model_name": MODEL, "engine": "0", **target}
        om.counter("vllm:generation_tokens_total", engine, pod.generation_tokens)
        if tokens_only:
            continue
        om.counter("vllm:prompt_tokens_total", engine, pod.prompt_tokens)
        for family in NEW_VLLM_FAMILIES if pod.vllm == "0.33" else OLD_VLLM_FAMILIES:
            om.histogram(family, engine, pod.histograms[family])
        for reason in ("stop", "length", "abort", "error", "repetition"):  # vLLM creates every one at start
            om.counter("vllm:request_success_total", {**engine, "finished_reason": reason}, pod.finished.get(reason, 0))
        for (handler, method, status), n in pod.http.items():
            om.counter("http_requests_total", {"handler": handler, "method": method, "status": status, **target}, n)


DCGM_SETUPS = ("chart", "honor-labels", "old-namespace")
"""docs/metrics.md, GPU metrics: the dcgm-exporter chart's ServiceMonitor (honorLabels: false), a scrape
with honor_labels: true, the exporter started with --use-old-namespace (and honorLabels: false)."""


def dcgm_series(om: OpenMetrics, setup: str) -> None:
    """DCGM_FI_DEV_GPU_UTIL, _FB_USED and _POWER_USAGE from the DaemonSet's exporter pod on each node, with
    DCGM_EXPORTER_KUBERNETES=true naming the GPU's pod, scraped by a ServiceMonitor (job, service,
    endpoint, instance = exporter pod IP:9400, and the exporter pod's namespace, pod, container)."""
    for gpu in GPU_TABLE:
        exporter_pod, exporter_ip = EXPORTERS[gpu.node]
        labels = {
            "gpu": str(gpu.index), "UUID": f"GPU-5f3e8a1c-{gpu.node[-1]}{gpu.index}7d-4b2e-9c1a-00d8e4f1a{gpu.index}b2",
            "pci_bus_id": f"00000000:{0x18 + 0x10 * gpu.index:02X}:1E.0", "device": f"nvidia{gpu.index}",
            "modelName": "NVIDIA H100 80GB HBM3", "Hostname": gpu.node, "DCGM_FI_DRIVER_VERSION": "570.124.06",
        }
        target = {"namespace": "gpu-operator", "pod": exporter_pod, "container": "exporter"}
        if gpu.pod is not None:
            container = gpu.pod.app if gpu.pod.vllm is None else "vllm"
            mapped = {"namespace": gpu.pod.namespace, "pod": gpu.pod.name, "container": container}
            if setup == "chart":  # the exporter's labels clash with the target's: Prometheus renames them
                labels |= {f"exported_{k}": v for k, v in mapped.items()}
            elif setup == "honor-labels":  # the exporter's labels win
                target = mapped
            else:  # --use-old-namespace: no clash
                labels |= {"pod_namespace": mapped["namespace"], "pod_name": mapped["pod"],
                           "container_name": mapped["container"]}
        scrape = {**target, "job": "dcgm-exporter", "service": "dcgm-exporter", "endpoint": "metrics",
                  "instance": f"{exporter_ip}:9400"}
        om.gauge("DCGM_FI_DEV_GPU_UTIL", {**labels, **scrape}, gpu.util)
        om.gauge("DCGM_FI_DEV_FB_USED", {**labels, **scrape}, gpu.fb_used)
        om.gauge("DCGM_FI_DEV_POWER_USAGE", {**labels, **scrape}, gpu.power)


SOURCE_ONLY: Mapping[IstioKey, PerBucket] = {("istio-ingressgateway", "503", "URX"): {"10000": 4}}
"""Requests to a chat workload the caller's sidecar failed after retries: reported by the source only."""
SOURCE_REPORTED = {(NS, "chat-v1"), (NS, "chat-v2")}
"""The destination workloads whose callers' reports (reporter="source", decoys that must not count) are
written too; the others' are left out to keep the data small."""


def _sidecar_scrape(namespace: str, pod: str, ip: str, app: str, version: str) -> dict[str, str]:
    """What Istio's recommended Prometheus config (job kubernetes-pods) attaches: namespace, pod and the
    pod's labels (labelmap), instance = pod IP:15020 (the merged metrics port)."""
    out = {"namespace": namespace, "pod": pod, "instance": f"{ip}:15020", "job": "kubernetes-pods", "app": app,
           "pod_template_hash": pod.rsplit("-", 2)[1], "security_istio_io_tlsMode": "istio",
           "service_istio_io_canonical_name": app}
    if version:
        out |= {"version": version, "service_istio_io_canonical_revision": version}
    return out


def _istio_report(om: OpenMetrics, reporter: str, key: IstioKey, per_bucket: PerBucket, dest: Pod) -> None:
    source, code, flags = key
    caller = CALLERS[source]
    labels = {
        "reporter": reporter, "source_workload": caller.workload, "source_workload_namespace": caller.namespace,
        "source_principal": f"spiffe://cluster.local/ns/{caller.namespace}/sa/{caller.service_account}",
        "source_app": caller.workload, "source_version": "unknown", "source_cluster": "Kubernetes",
        "destination_workload": dest.workload, "destination_workload_namespace": dest.namespace,
        "destination_principal": f"spiffe://cluster.local/ns/{dest.namespace}/sa/{dest.app}",
        "destination_app": dest.app, "destination_version": dest.version,
        "destination_service": f"{dest.app}.{dest.namespace}.svc.cluster.local",
        "destination_service_name": dest.app, "destination_service_namespace": dest.namespace,
        "destination_cluster": "Kubernetes", "request_protocol": "http", "response_code": code,
        "grpc_response_status": "", "response_flags": flags,
        # the caller's sidecar does not know the policy the destination applied
        "connection_security_policy": "mutual_tls" if reporter == "destination" else "unknown",
    }
    if reporter == "destination":  # scraped from the destination pod's sidecar
        scrape = _sidecar_scrape(dest.namespace, dest.name, dest.ip, dest.app, dest.version)
    else:  # scraped from the caller's pod
        scrape = _sidecar_scrape(caller.namespace, caller.pod, caller.ip, caller.workload, "")
    om.counter("istio_requests_total", {**labels, **scrape}, sum(per_bucket.values()))
    om.histogram(ISTIO_DURATION, {**labels, **scrape}, per_bucket)


def istio_series(om: OpenMetrics, pods: tuple[Pod, ...]) -> None:
    """istio_requests_total and istio_request_duration_milliseconds with Istio's standard labels, as each
    destination pod's sidecar reports them (reporter="destination"), and as the callers' sidecars report
    the same requests, per destination workload, and those that never reached it (reporter="source")."""
    workloads: dict[tuple[str, str], list[Pod]] = {}
    for pod in pods:
        for key, per_bucket in pod.istio.items():
            _istio_report(om, "destination", key, per_bucket, pod)
        if pod.istio:
            workloads.setdefault((pod.namespace, pod.workload), []).append(pod)
    for workload in sorted(SOURCE_REPORTED):
        merged: dict[IstioKey, dict[str, int]] = {}
        for reported in [*(pod.istio for pod in workloads[workload]), SOURCE_ONLY]:
            for key, per_bucket in reported.items():
                into = merged.setdefault(key, {})
                for le, n in per_bucket.items():
                    into[le] = into.get(le, 0) + n
        for key, per_bucket in merged.items():
            _istio_report(om, "source", key, per_bucket, workloads[workload][0])


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def servers(prometheus_factory: PrometheusFactory) -> dict[str, PrometheusServer]:
    """One server per DCGM setup. The one of the chart's setup holds everything; the others hold the
    DCGM series and the vLLM token counters the cost preset divides by."""
    out = {}
    for setup in DCGM_SETUPS:
        om = OpenMetrics()
        if setup == "chart":
            vllm_series(om, POD_TABLE)
            istio_series(om, (*POD_TABLE, *BOOKINFO))
        else:
            vllm_series(om, POD_TABLE, tokens_only=True)
        dcgm_series(om, setup)
        out[setup] = prometheus_factory(om.text() + "# EOF\n")
    return out


# --------------------------------------------------------------------------- policies and requests


@dataclass(frozen=True)
class Rollout:
    """A policy's variants (YAML under spec.analysis.variants) and the pods they mean, looked at over [start, END]."""

    name: str
    primary: str
    candidate: str
    primary_pods: tuple[Pod, ...]
    candidate_pods: tuple[Pod, ...]
    start: int = 0
    namespace: str = NS
    host: str = "chat"

    def pods(self, variant: Variant) -> tuple[Pod, ...]:
        return self.primary_pods if variant is Variant.primary else self.candidate_pods

    @property
    def steps(self) -> int:
        return (END - self.start) // STEP


POLICY = """\
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata:
  name: {name}
  namespace: {namespace}
spec:
  target:
    istio:
      virtualService: {host}
      primary: {{host: {host}.{namespace}.svc.cluster.local, subset: v1}}
      candidate: {{host: {host}.{namespace}.svc.cluster.local, subset: v2}}
  canary:
    steps: [10, 50]
  analysis:
    interval: 30s
    gpuPricePerHour: {price}
    variants:
      primary: {primary}
      candidate: {candidate}
    metrics:
      - {metric}
"""

METRIC_YAML = {
    "latency-histogram": "{{name: m, preset: {preset}, statistic: p95}}",
    "ratio": "{{name: m, preset: {preset}, kind: ratio, statistic: rate, margin: 1pp}}",
    "counter": "{{name: m, preset: {preset}, kind: counter, statistic: rate}}",
    "gauge": "{{name: m, preset: {preset}, kind: gauge, statistic: mean}}",
}


def policy(rollout: Rollout, preset: str) -> ShadowPolicy:
    metric = METRIC_YAML[PRESETS[preset].kind.value].format(preset=preset)
    text = POLICY.format(name=rollout.name, namespace=rollout.namespace, host=rollout.host, price=PRICE,
                         primary=rollout.primary, candidate=rollout.candidate, metric=metric)
    [pol] = parse_policies(text, f"{rollout.name}.yaml")
    return pol


def request(rollout: Rollout, preset: str) -> WindowRequest:
    pol = policy(rollout, preset)
    req = build_request(pol, pol.spec.analysis.metrics[0], start=at(rollout.start), end=at(END))
    assert req.grouped is not None and req.start == at(rollout.start)
    return req


def at(offset: float) -> datetime:
    return datetime.fromtimestamp(T0 + offset, UTC)


async def fetch_both_ways(server: PrometheusServer, reqs: list[WindowRequest]) -> dict[MetricKey, WindowResult]:
    """All requests in one fetch_many (the grouped path: one query per preset), and each one alone
    without its grouped form (one query per rollout); the two answers must be equal."""
    grouped = PrometheusMetricSource(server.url, timeout=20)
    plain = PrometheusMetricSource(server.url, timeout=20)
    try:
        got = await grouped.fetch_many(reqs)
        assert grouped.queries_sent == len({r.template for r in reqs})
        for r in reqs:
            alone = await plain.fetch(dataclasses.replace(r, grouped=None))
            assert got[r.key] == alone, f"grouped != per rollout for {r.key}: {got[r.key]} != {alone}; {r.primary.expr}"
    finally:
        await grouped.aclose()
        await plain.aclose()
    return got


def assert_pair(result: WindowResult, want: VariantPair, req: WindowRequest) -> None:
    assert isinstance(result, VariantPair), f"{result}"
    for v in Variant:
        got, expected = result[v], want[v]
        if isinstance(expected, GaugeWindow) and isinstance(got, GaugeWindow):
            assert got.times == expected.times and got.dropped == expected.dropped, (v, req[v].expr)
            assert got.samples == pytest.approx(expected.samples, rel=1e-12), (v, req[v].expr)
        else:
            assert got == expected, f"{req.key} {v.value}: got {got}, put in {expected}; query: {req[v].expr}"


# --------------------------------------------------------------------------- expected from the tables


def expected_buckets(family: str, put_in: Iterable[PerBucket], steps: int) -> HistogramWindow:
    """The cumulative counts over ``steps`` of everything put in (summed over pods, or Istio's series)."""
    buckets = BUCKETS[family]
    per_step = [sum(counts) for counts in zip(*(cumulative(buckets, pb) for pb in put_in), strict=True)]
    return HistogramWindow(tuple(float(le) for le in buckets), tuple(float(c * steps) for c in per_step))


def expected_histogram(family: str, pods: tuple[Pod, ...], steps: int) -> HistogramWindow:
    return expected_buckets(family, (pod.histograms[family] for pod in pods), steps)


def expected_istio_histogram(pods: tuple[Pod, ...], steps: int) -> HistogramWindow:
    return expected_buckets(ISTIO_DURATION, (pb for pod in pods for pb in pod.istio.values()), steps)


def expected_vllm_errors(pods: tuple[Pod, ...], steps: int) -> CountWindow:
    """finished_reason="error" of every request the engine finished (abort included in the total only)."""
    return CountWindow(float(sum(p.finished.get("error", 0) for p in pods) * steps),
                       float(sum(n for p in pods for n in p.finished.values()) * steps))


def expected_http_errors(pods: tuple[Pod, ...], steps: int) -> CountWindow:
    """5xx of the completion handlers, among all their responses (4xx included); /v1/models never counts."""
    answered = [(status, n) for p in pods for (handler, _, status), n in p.http.items() if handler in COMPLETION_HANDLERS]
    return CountWindow(float(sum(n for s, n in answered if s == "5xx") * steps), float(sum(n for _, n in answered) * steps))


def expected_istio_errors(pods: tuple[Pod, ...], steps: int) -> CountWindow:
    requests = [(code, sum(pb.values())) for p in pods for (_, code, _), pb in p.istio.items()]
    return CountWindow(float(sum(n for c, n in requests if c.startswith("5")) * steps),
                       float(sum(n for _, n in requests) * steps))


def expected_tokens(pods: tuple[Pod, ...], steps: int) -> CounterWindow:
    return CounterWindow(float(sum(p.generation_tokens for p in pods) * steps), float(steps * STEP))


def gpus(pods: tuple[Pod, ...]) -> list[Gpu]:
    return [g for g in GPU_TABLE if g.pod in pods]


GAUGE_VALUE: Mapping[str, Callable[[tuple[Pod, ...]], float]] = {
    "dcgm-gpu-util": lambda pods: sum(g.util for g in gpus(pods)) / len(gpus(pods)),
    "dcgm-fb-used": lambda pods: sum(g.fb_used for g in gpus(pods)),
    "dcgm-power": lambda pods: sum(g.power for g in gpus(pods)),
    # GPUs x price / 3600 over thousands of output tokens per second
    "gpu-cost-per-1k-tokens": lambda pods: (
        len(gpus(pods)) * PRICE / 3600 / (sum(p.generation_tokens for p in pods) / STEP / 1000)
    ),
}


def expected_gauge(preset: str, pods: tuple[Pod, ...], start: int) -> GaugeWindow:
    times = tuple(float(T0 + t) for t in range(start + 30, END + 1, 30))  # one sample per 30 s interval
    return GaugeWindow(tuple(GAUGE_VALUE[preset](pods) for _ in times), times)


# --------------------------------------------------------------------------- coverage

HISTOGRAM_PRESETS = {  # preset -> the vLLM 0.33 family it must read
    "vllm-ttft": TTFT,
    "vllm-tpot": ITL,
    "vllm-request-tpot": REQUEST_TPOT,
    "vllm-e2e": E2E,
    "vllm-queue-time": QUEUE,
}
VLLM_RATIO_PRESETS = {"vllm-errors": expected_vllm_errors, "vllm-http-errors": expected_http_errors}
COUNTER_PRESETS = {"vllm-generation-tokens": expected_tokens}
GAUGE_PRESETS = tuple(GAUGE_VALUE)
ISTIO_PRESETS = ("istio-errors", "istio-latency")
COVERAGE = (*HISTOGRAM_PRESETS, *VLLM_RATIO_PRESETS, *COUNTER_PRESETS, *GAUGE_PRESETS, *ISTIO_PRESETS)


def test_every_preset_is_checked_against_upstream_series() -> None:
    """A new preset needs a case here (and its upstream's series above)."""
    assert len(COVERAGE) == len(set(COVERAGE))
    assert set(COVERAGE) == set(PRESETS)


# --------------------------------------------------------------------------- vLLM

VLLM_ROLLOUTS = (  # several rollouts of one look, with different windows and selections, in one batch
    Rollout("by-workload", "{workload: chat-v1}", "{workload: chat-v2}", PRIMARY, CANDIDATE),
    Rollout("by-pod", '{pod: "chat-v1-6c8f9d7b5-.+"}', '{pod: "chat-v2-.*"}', PRIMARY, CANDIDATE, start=600),
    Rollout("one-pod-each", '{pod: "chat-v1-6c8f9d7b5-m4q7z"}', "{workload: chat-v2}", (P2,), CANDIDATE, start=1170),
)


@pytest.mark.parametrize("preset", sorted(HISTOGRAM_PRESETS))
async def test_vllm_histograms(servers: dict[str, PrometheusServer], preset: str) -> None:
    """vLLM 0.33 /metrics through a kube-prometheus PodMonitor: the histograms
    vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
    vllm:request_time_per_output_token_seconds, vllm:e2e_request_latency_seconds and
    vllm:request_queue_time_seconds with vLLM's buckets, labels model_name, engine and the target's
    namespace, pod, container, endpoint, job, instance. Each preset gives the per-bucket counts put in,
    summed over the variant's pods (vllm-tpot: inter-token latency; vllm-request-tpot: per request)."""
    family = HISTOGRAM_PRESETS[preset]
    reqs = [request(r, preset) for r in VLLM_ROLLOUTS]
    got = await fetch_both_ways(servers["chart"], reqs)
    for rollout, req in zip(VLLM_ROLLOUTS, reqs, strict=True):
        want = VariantPair(*(expected_histogram(family, rollout.pods(v), rollout.steps) for v in Variant))
        assert_pair(got[req.key], want, req)


async def test_vllm_tpot_reads_the_old_name_on_old_vllm(servers: dict[str, PrometheusServer]) -> None:
    """vLLM 0.12 and older (only vllm:time_per_output_token_seconds, same buckets) as the primary, vLLM
    0.33 (only vllm:inter_token_latency_seconds) as the candidate: vllm-tpot reads each one's name."""
    assert OLD_TPOT in OLD.histograms and ITL not in OLD.histograms and OLD_TPOT not in C1.histograms
    rollout = Rollout("old-vllm", '{pod: "chat-v0-9a8b7c6d5-.*"}', "{workload: chat-v2}", (OLD,), CANDIDATE)
    other = dataclasses.replace(VLLM_ROLLOUTS[1], name="other")  # a new-vLLM rollout in the same batch
    reqs = [request(rollout, "vllm-tpot"), request(other, "vllm-tpot")]
    got = await fetch_both_ways(servers["chart"], reqs)
    want = VariantPair(expected_histogram(OLD_TPOT, (OLD,), rollout.steps), expected_histogram(ITL, CANDIDATE, rollout.steps))
    assert_pair(got[reqs[0].key], want, reqs[0])
    assert_pair(got[reqs[1].key], VariantPair(*(expected_histogram(ITL, other.pods(v), other.steps) for v in Variant)),
                reqs[1])


async def test_vllm_tpot_counts_every_pod_during_an_upgrade_to_new_vllm(servers: dict[str, PrometheusServer]) -> None:
    """Deployment chat-v0 mid rolling upgrade: one pod still on vLLM 0.12 (vllm:time_per_output_token_seconds
    only), one on vLLM 0.33 (vllm:inter_token_latency_seconds only). Both pods' token gaps were put in."""
    rollout = Rollout("upgrading", "{workload: chat-v0}", "{workload: chat-v2}", (OLD, UPGRADED), CANDIDATE)
    [req] = reqs = [request(rollout, "vllm-tpot")]
    old, new = expected_histogram(OLD_TPOT, (OLD,), rollout.steps), expected_histogram(ITL, (UPGRADED,), rollout.steps)
    both = HistogramWindow(old.le, tuple(a + b for a, b in zip(old.counts, new.counts, strict=True)))
    got = await fetch_both_ways(servers["chart"], reqs)
    assert_pair(got[req.key], VariantPair(both, expected_histogram(ITL, CANDIDATE, rollout.steps)), req)


@pytest.mark.parametrize("preset", sorted(VLLM_RATIO_PRESETS))
async def test_vllm_error_ratios(servers: dict[str, PrometheusServer], preset: str) -> None:
    """vLLM 0.33: vllm:request_success_total by finished_reason (stop, length, abort, error, repetition; all
    created at start, so the primary's error series is there with 0 on one pod) and the HTTP server's
    http_requests_total{handler, method, status="2xx"|"4xx"|"5xx"} (prometheus-fastapi-instrumentator, no
    model labels), both through the PodMonitor. vllm-errors: failures are finished_reason="error" only
    (aborts count in the total); vllm-http-errors: 5xx of /v1/chat/completions and /v1/completions among
    all their answers (4xx in the total), /v1/models not at all."""
    expected = VLLM_RATIO_PRESETS[preset]
    reqs = [request(r, preset) for r in VLLM_ROLLOUTS]
    got = await fetch_both_ways(servers["chart"], reqs)
    for rollout, req in zip(VLLM_ROLLOUTS, reqs, strict=True):
        assert_pair(got[req.key], VariantPair(*(expected(rollout.pods(v), rollout.steps) for v in Variant)), req)
    # What the tables were written to say: 9% and 7% for the candidate, at most 1% for the primary.
    pair = got[reqs[0].key]
    assert isinstance(pair, VariantPair)
    c, p = pair.candidate, pair.primary
    assert isinstance(c, CountWindow) and isinstance(p, CountWindow)
    assert c.rate == pytest.approx(0.09 if preset == "vllm-errors" else 0.07) and p.rate <= 0.01
    if preset == "vllm-errors":  # the aborts are in the total and are no failures
        aborts = sum(pod.finished["abort"] for pod in CANDIDATE) * VLLM_ROLLOUTS[0].steps
        assert aborts > 0 and c.failures == C1.finished["error"] * VLLM_ROLLOUTS[0].steps


async def test_vllm_generation_tokens(servers: dict[str, PrometheusServer]) -> None:
    """vLLM 0.33: vllm:generation_tokens_total (vllm:prompt_tokens_total next to it must not count), through
    the PodMonitor: the increase put in, summed over the variant's pods."""
    reqs = [request(r, "vllm-generation-tokens") for r in VLLM_ROLLOUTS]
    got = await fetch_both_ways(servers["chart"], reqs)
    for rollout, req in zip(VLLM_ROLLOUTS, reqs, strict=True):
        assert_pair(got[req.key], VariantPair(*(expected_tokens(rollout.pods(v), rollout.steps) for v in Variant)), req)


# --------------------------------------------------------------------------- DCGM exporter

GPU_ROLLOUTS = (
    Rollout("gpu-by-workload", "{workload: chat-v1}", "{workload: chat-v2}", PRIMARY, CANDIDATE, start=600),
    Rollout("gpu-by-pod", '{pod: "chat-v1-6c8f9d7b5-k2x9p"}', '{pod: "chat-v2-.*"}', (P1,), CANDIDATE, start=1200),
)
NO_GPU = Rollout("no-gpu", "{workload: chat-v1}", '{pod: "chat-v0-9a8b7c6d5-.*"}', PRIMARY, (OLD,), start=900)
"""The candidate's pod holds no GPU: NoData (never the exporter's own idle GPUs, nor anyone else's)."""


@pytest.mark.parametrize("setup", DCGM_SETUPS)
@pytest.mark.parametrize("preset", GAUGE_PRESETS)
async def test_dcgm_gauges(servers: dict[str, PrometheusServer], preset: str, setup: str) -> None:
    """DCGM exporter series (labels gpu, UUID, pci_bus_id, device, modelName, Hostname,
    DCGM_FI_DRIVER_VERSION; one exporter pod per node, scraped by a ServiceMonitor) naming the GPU's pod
    as the dcgm-exporter chart leaves it (exported_namespace/exported_pod/exported_container), with
    honor_labels: true (namespace/pod/container) or with --use-old-namespace
    (pod_namespace/pod_name/container_name), next to an unrelated pod's, a same-named pod's in another
    namespace and idle GPUs. dcgm-gpu-util is the mean over the variant's GPUs, dcgm-fb-used and
    dcgm-power are sums, gpu-cost-per-1k-tokens is GPUs x price / 3600 / (vLLM 0.33's
    vllm:generation_tokens_total per second / 1000) of the same pods."""
    reqs = [request(r, preset) for r in (*GPU_ROLLOUTS, NO_GPU)]
    got = await fetch_both_ways(servers[setup], reqs)
    for rollout, req in zip(GPU_ROLLOUTS, reqs[:-1], strict=True):
        want = VariantPair(*(expected_gauge(preset, rollout.pods(v), rollout.start) for v in Variant))
        assert_pair(got[req.key], want, req)
    no_gpu = got[reqs[-1].key]
    assert not gpus(NO_GPU.candidate_pods) and gpus(NO_GPU.primary_pods)
    assert isinstance(no_gpu, NoData) and no_gpu.variant is Variant.candidate, no_gpu
    assert no_gpu.reason == "the query returned no series"


async def test_dcgm_idle_gpus_carry_the_exporters_pod_in_the_charts_setup(servers: dict[str, PrometheusServer]) -> None:
    """dcgm-exporter chart (honorLabels: false): a GPU no pod holds has only the target's namespace and pod,
    the exporter's own; the data holds such series, so the NoData above is not for want of them."""
    src = PrometheusMetricSource(servers["chart"].url)
    try:
        rows = await src.instant(
            'count by (namespace, pod) (DCGM_FI_DEV_GPU_UTIL{namespace="gpu-operator", exported_pod=""})', at(END)
        )
    finally:
        await src.aclose()
    idle = Counter(EXPORTERS[g.node][0] for g in GPU_TABLE if g.pod is None)
    assert {r["metric"]["pod"]: int(r["value"][1]) for r in rows} == idle


# --------------------------------------------------------------------------- Istio

ISTIO_ROLLOUTS = (
    Rollout("mesh-by-workload", "{workload: chat-v1}", "{workload: chat-v2}", PRIMARY, CANDIDATE),
    Rollout("mesh-by-subset", "{subset: v1}", "{subset: v2}", PRIMARY, CANDIDATE, start=600),
    Rollout("mesh-by-target-subset", "{}", "{}", PRIMARY, CANDIDATE, start=1170),  # the target's subsets
)


def expected_istio(preset: str, pods: tuple[Pod, ...], steps: int) -> Window:
    return expected_istio_errors(pods, steps) if preset == "istio-errors" else expected_istio_histogram(pods, steps)


@pytest.mark.parametrize("preset", ISTIO_PRESETS)
async def test_istio(servers: dict[str, PrometheusServer], preset: str) -> None:
    """Istio sidecar standard metrics (istio_requests_total, istio_request_duration_milliseconds with
    Istio's default buckets) with the full label set (reporter, source_*, destination_*,
    request_protocol, response_code, grpc_response_status, response_flags, connection_security_policy)
    and the labels Istio's recommended Prometheus config adds (namespace, pod, instance, job, the pod's
    labels). The callers' reports (reporter="source"), with requests that never reached the
    destination, must not count, nor the canary's or another namespace's chat-v1. istio-errors: 5xx
    among all responses; istio-latency: the buckets put in. Variants by destination_workload and by
    destination_version (a subset)."""
    reqs = [request(r, preset) for r in ISTIO_ROLLOUTS]
    got = await fetch_both_ways(servers["chart"], reqs)
    for rollout, req in zip(ISTIO_ROLLOUTS, reqs, strict=True):
        assert_pair(got[req.key], VariantPair(*(expected_istio(preset, rollout.pods(v), rollout.steps) for v in Variant)),
                    req)


@pytest.mark.parametrize("preset", ISTIO_PRESETS)
async def test_istio_subset_counts_only_the_target_service(servers: dict[str, PrometheusServer], preset: str) -> None:
    """Istio's bookinfo layout: reviews v1/v2 and ratings v1 in one namespace; the policy's target is the
    reviews host with subsets v1 and v2, variants chosen by subset."""
    rollout = Rollout("reviews", "{subset: v1}", "{subset: v2}", BOOKINFO[:1], BOOKINFO[1:2], namespace="shop",
                      host="reviews")
    [req] = reqs = [request(rollout, preset)]
    got = await fetch_both_ways(servers["chart"], reqs)
    assert_pair(got[req.key], VariantPair(*(expected_istio(preset, rollout.pods(v), rollout.steps) for v in Variant)),
                req)
