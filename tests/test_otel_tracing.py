"""The controller's spans over OTLP/HTTP: the SDK's real exporter posts to a real HTTP receiver started
here, which decodes the protobuf (ExportTraceServiceRequest) as a collector would. The ticks run
against the real API server (tests/controller_helpers.py: its metric source is the usual double at
the port boundary)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest_kube import KubeEnv
from controller_helpers import FakeMetricSource, Harness, load_vs, policy_doc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from tap_helpers import free_port

from shadowctl.cli.run_cmd import RunOptions, run_controller
from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.reconciler import Reconciler
from shadowctl.controller.tracing import DECISION_SPAN, LOOK_SPAN
from shadowctl.kube import SHADOW_POLICY, VIRTUAL_SERVICE, KubeClient
from shadowctl.otel import OtelTracer, TracingConfigError, traces_url
from shadowctl.routers.factory import router_for


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class Received:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass
class OtlpReceiver:
    """An OTLP/HTTP traces endpoint (POST /v1/traces, protobuf), on its own thread: the SDK exports from
    its thread and its shutdown blocks until the export is answered."""

    port: int
    spans: list[Received] = field(default_factory=list)
    posts: int = 0
    paths: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def named(self, name: str) -> list[Received]:
        return [s for s in self.spans if s.name == name]


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    state = OtlpReceiver(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            state.paths.append(self.path)
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        state.spans.append(Received(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                                    {a.key: _value(a.value) for a in s.attributes}, resource))
            state.posts += 1
            out = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_traces_url() -> None:
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("https://c:4318/v1/traces/") == "https://c:4318/v1/traces"
    for bad in ("collector:4318", "grpc://c:4317", "http://"):
        with pytest.raises(TracingConfigError, match="http"):
            traces_url(bad)


async def test_a_look_and_a_decision_reach_an_otlp_receiver(kube_env: KubeEnv, kube_client: KubeClient,
                                                             receiver: OtlpReceiver) -> None:
    h = Harness(kube_env, kube_client)
    tracer = OtelTracer(receiver.url, "9.9.9")
    h.reconciler = Reconciler(kube_client, router_for, Analyzer(h.source, tracer=tracer), h.clock)
    await h.setup()
    await h.tick()  # Pending -> Shadowing: a decision, no look
    await h.tick()  # Shadowing: a look inside the decision
    await asyncio.to_thread(tracer.shutdown)

    assert receiver.paths and set(receiver.paths) == {"/v1/traces"}
    decisions, looks = receiver.named(DECISION_SPAN), receiver.named(LOOK_SPAN)
    assert len(decisions) == 2 and len(looks) == 1
    start, shadowing = decisions
    for span in (*decisions, *looks):
        assert span.resource["service.name"] == "shadowctl-controller"
        assert span.resource["service.version"] == "9.9.9"
        assert span.attributes["shadowctl.policy.namespace"] == "llm"
        assert span.attributes["shadowctl.policy.name"] == "chat"
    assert start.attributes["shadowctl.before.phase"] == "Pending"
    assert start.attributes["shadowctl.after.phase"] == "Shadowing"
    assert start.attributes["shadowctl.transitioned"] is True
    assert start.attributes["shadowctl.after.mirror_percent"] == 20.0
    assert start.attributes["shadowctl.after.weight.primary"] == 100
    assert start.attributes["shadowctl.actions"] == ["Intent", "SetRoutes"]  # a start is recorded first
    assert "shadowctl.verdict.outcome" not in start.attributes

    [look] = looks
    assert look.trace_id == shadowing.trace_id and look.parent_id == shadowing.span_id  # the look is the child
    assert shadowing.attributes["shadowctl.before.phase"] == "Shadowing"
    assert shadowing.attributes["shadowctl.verdict.outcome"] == look.attributes["shadowctl.verdict.outcome"]
    assert shadowing.attributes["shadowctl.verdict.reason"] == look.attributes["shadowctl.verdict.reason"]
    assert look.attributes["shadowctl.phase"] == "Shadowing"
    assert look.attributes["shadowctl.metrics"] == ["ttft-p95", "errors"]
    ttft = {k.removeprefix("shadowctl.metric.ttft-p95."): v for k, v in look.attributes.items()
            if k.startswith("shadowctl.metric.ttft-p95.")}
    assert ttft["statistic"] == "p95" and ttft["critical"] is True and ttft["effect_scale"] == "ratio"
    assert ttft["samples.primary"] > 0 and ttft["samples.candidate"] > 0  # 10 s at 200 requests/s per arm
    assert ttft["interval.low"] <= ttft["effect"] <= ttft["interval.high"]
    assert ttft["outcome"] in {"continue", "pass", "fail", "inconclusive"}
    status = await h.status()
    evidence = {m.name: m for m in status.last_verdict.metrics} if status.last_verdict is not None else {}
    assert evidence["ttft-p95"].samples.primary == ttft["samples.primary"]  # the same numbers as `.status`


def _options(kubeconfig: Path, namespace: str, otlp: str | None) -> RunOptions:
    return RunOptions(kubeconfig=str(kubeconfig), context=None, namespace=namespace, selector=None, prometheus=None,
                      events_mqtt=None, listen=f"127.0.0.1:{free_port()}", leader_elect=False, lease_name="x",
                      lease_namespace=namespace, lease_duration=15, renew_deadline=10, retry_period=2,
                      min_interval=0.0, otlp_endpoint=otlp)


@pytest.mark.parametrize("otlp", [True, False], ids=["with-endpoint", "off-by-default"])
async def test_shadowctl_run_exports_only_with_an_endpoint(kube_env: KubeEnv, kube_client: KubeClient,
                                                           receiver: OtlpReceiver, tmp_path: Path, otlp: bool) -> None:
    """The controller as `shadowctl run` wires it: with --otlp-endpoint its decisions arrive at the receiver
    (flushed when it stops); without (the default) it takes the same decision and nothing is exported."""
    await kube_client.create(VIRTUAL_SERVICE, load_vs())
    await kube_client.create(SHADOW_POLICY, policy_doc())
    h = Harness(kube_env, kube_client)
    stop = asyncio.Event()
    opts = _options(kube_env.kubeconfig(tmp_path / "kc"), "llm", receiver.url if otlp else None)
    task = asyncio.create_task(run_controller(opts, stop, metric_source=FakeMetricSource()))
    try:
        for _ in range(200):
            if task.done() or (await h.status()).phase.value == "Shadowing":
                break
            await asyncio.sleep(0.1)
        assert (await h.status()).phase.value == "Shadowing"
    finally:
        stop.set()
        await task
    if otlp:
        decisions = receiver.named(DECISION_SPAN)
        assert decisions and decisions[0].attributes["shadowctl.after.phase"] == "Shadowing"
        assert decisions[0].resource["service.name"] == "shadowctl-controller"
    else:
        assert receiver.posts == 0 and receiver.spans == []
