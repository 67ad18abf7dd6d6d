"""The local environment: everything `shadowctl demo` starts, wired on free local ports.

Real: Prometheus and Mosquitto (Debian packages, child processes), HTTP
traffic, the taps, the controller (`shadowctl run`, a child process) and the
CLI. Simulated, because they cannot run here: the Kubernetes API server
(kmock-based emulator with real resourceVersion/409/validation semantics),
Envoy (a mesh simulator that routes real requests by the VirtualService in the
emulated API, mirroring with Istio's semantics), and GPU model servers
(OpenAI-compatible, vLLM metric names, latency really spent).

Topology::

    load generator ──▶ mesh (VirtualService chat) ──▶ tap(primary) ──▶ model server chat-v1 ─┐
                            │ mirror x% (Host -shadow)      └─ app-level mirror ─▶ tap(baseline) ─▶ chat-baseline
                            └──────────────────────────▶ tap(candidate) ──▶ model server chat-v2
    taps ── output events ──▶ Mosquitto ──▶ controller's output source
    model servers ◀── scrape every 1s ── Prometheus ◀── controller's queries
    controller ◀──▶ emulated Kubernetes API (ShadowPolicy, VirtualService, Events, status)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.events import Variant
from shadowctl.kube import SHADOW_POLICY, VIRTUAL_SERVICE, KubeClient, ResourceRef
from shadowctl.sim.kubeapi import KubeAPIEmulator
from shadowctl.sim.mesh import IstioSource, MeshSimulator
from shadowctl.sim.modelserver import ModelKnobs, SimModelServer
from shadowctl.sim.services import MosquittoProcess, PrometheusProcess, ScrapeTarget, free_port
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.proxy import MirrorConfig, TapConfig, TapProxy, bound_port, default_topic, start_server
from shadowctl.tap.publisher import BrokerSettings, EventPublisher

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "llm"
HOST = "chat.llm.svc.cluster.local"
POLICY_REF = ResourceRef(SHADOW_POLICY, "chat", NAMESPACE)
VS_REF = ResourceRef(VIRTUAL_SERVICE, "chat", NAMESPACE)

BASE_KNOBS = ModelKnobs(time_scale=1.0, ttft_median_s=0.12, ttft_sigma=0.3, tpot_median_s=0.01,
                        output_words_median=24, noise_rate=0.01, max_running=512)


async def _bounded(awaitable: Any, seconds: float = 10.0) -> None:
    """Await a shutdown step, giving up after `seconds` (errors while stopping are not interesting)."""
    task = asyncio.ensure_future(awaitable)
    _, pending = await asyncio.wait({task}, timeout=seconds)
    await cancel_and_wait(*pending)
    if not pending and not task.cancelled():
        task.exception()  # retrieved: errors while stopping are not interesting


@dataclass
class _Tap:
    proxy: TapProxy
    publisher: EventPublisher
    runner: Any
    task: asyncio.Task[None]
    url: str


@dataclass
class Environment:
    """Started pieces of the local environment; `close()` stops all of them and removes the temp dir."""

    workdir: Path
    keep_workdir: bool = False
    emulator: KubeAPIEmulator | None = None
    kube: KubeClient | None = None
    servers: dict[str, SimModelServer] = field(default_factory=dict)
    taps: dict[str, _Tap] = field(default_factory=dict)
    mesh: MeshSimulator | None = None
    prometheus: PrometheusProcess | None = None
    mosquitto: MosquittoProcess | None = None
    controller: subprocess.Popen[bytes] | None = None
    controller_log: Path | None = None
    kubeconfig: Path | None = None

    # ------------------------------------------------------------------ start

    @classmethod
    async def start(cls, candidate_knobs: dict[str, Any], policy_text_for: Any, *,
                    workdir: Path | None = None, seed: int = 7) -> Environment:
        """Start everything; `policy_text_for(broker_url)` gives the ShadowPolicy YAML to apply."""
        env = cls(workdir or Path(tempfile.mkdtemp(prefix="shadowctl-demo-")), keep_workdir=workdir is not None)
        try:
            await env._start(candidate_knobs, policy_text_for, seed)
        except BaseException:
            await env.close()
            raise
        return env

    async def _start(self, candidate_knobs: dict[str, Any], policy_text_for: Any, seed: int) -> None:
        self.mosquitto = MosquittoProcess(self.workdir / "mosquitto")
        await self.mosquitto.start()

        # Model servers: the primary, a second primary replica (the noise baseline), the candidate.
        pods = {"primary": "chat-v1-5c7d9f-x8k2p", "baseline": "chat-baseline-6f8b7c-q4m1z",
                "candidate": "chat-v2-7b9c4d-r2n5t"}
        for i, (variant, pod) in enumerate(pods.items()):
            knobs = BASE_KNOBS.updated(candidate_knobs) if variant == "candidate" else BASE_KNOBS
            server = SimModelServer("llama-chat", variant=variant, knobs=knobs, seed=seed + i, pod=pod,
                                    namespace=NAMESPACE, fine_buckets=True)
            await server.start()
            self.servers[variant] = server

        # Taps in front of them; the primary's tap copies 30% of requests to the baseline replica.
        for variant in ("baseline", "candidate", "primary"):
            mirror = None
            if variant == "primary":
                mirror = MirrorConfig(url=self.taps["baseline"].url, percent=30.0)
            await self._start_tap(variant, mirror)

        # The emulated Kubernetes API with the CRDs, the VirtualService and DestinationRule.
        self.emulator = KubeAPIEmulator(policy_crd=REPO / "deploy" / "crd.yaml")
        await self.emulator.start()
        self.kubeconfig = self.emulator.kubeconfig(self.workdir / "kubeconfig", namespace=NAMESPACE)
        self.kube = await KubeClient.connect(kubeconfig=self.kubeconfig)
        for doc in yaml.safe_load_all((REPO / "istio" / "chat.yaml").read_text()):
            gvr = VIRTUAL_SERVICE if doc["kind"] == "VirtualService" else None
            if gvr is not None:
                await self.kube.create(gvr, doc)

        # The mesh routes by that VirtualService to the taps.
        self.mesh = MeshSimulator(
            self.kube, [IstioSource(NAMESPACE, "chat")],
            upstreams={(HOST, "v1", 8000): self.taps["primary"].url, (HOST, "v2", 8000): self.taps["candidate"].url},
            seed=seed,
        )
        await self.mesh.start()
        await self.mesh.wait_ready(10.0)

        # Prometheus scrapes the model servers (vLLM metrics) and the taps every second.
        targets = [ScrapeTarget("vllm", s.url.removeprefix("http://").rstrip("/"),
                                {"namespace": NAMESPACE, "pod": s.pod}) for s in self.servers.values()]
        targets += [ScrapeTarget("tap", t.url.removeprefix("http://").rstrip("/"),
                                 {"namespace": NAMESPACE, "pod": pods[v]}) for v, t in self.taps.items()]
        self.prometheus = PrometheusProcess(self.workdir / "prometheus", targets)
        await self.prometheus.start()

        # The policy, then the controller: the real `shadowctl run`, as a child process.
        policy = yaml.safe_load(policy_text_for(self.mosquitto.url))
        await self.kube.create(SHADOW_POLICY, policy)
        self.controller_log = self.workdir / "controller.log"
        log = self.controller_log.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.controller = subprocess.Popen(  # noqa: ASYNC220 - a child process that outlives this call
            [sys.executable, "-m", "shadowctl", "run", "--kubeconfig", str(self.kubeconfig),
             "--prometheus", self.prometheus.url, "--events-mqtt", self.mosquitto.url, "--no-leader-elect",
             "--listen", f"127.0.0.1:{free_port()}", "--log-format", "json"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
        )
        log.close()

    async def _start_tap(self, variant: str, mirror: MirrorConfig | None) -> None:
        assert self.mosquitto is not None
        v = Variant(variant)
        metrics = TapMetrics(variant)
        publisher = EventPublisher(BrokerSettings("127.0.0.1", self.mosquitto.port,
                                                  client_id=f"tap-{variant}-{os.getpid()}"), metrics)
        config = TapConfig(upstream=self.servers[variant].url, variant=v, namespace=NAMESPACE, service="chat",
                           topic=default_topic(NAMESPACE, "chat", v), mirror=mirror)
        proxy = TapProxy(config, publisher, metrics)
        runner = await start_server(proxy, "127.0.0.1", 0)
        task = asyncio.create_task(publisher.run())
        self.taps[variant] = _Tap(proxy, publisher, runner, task, f"http://127.0.0.1:{bound_port(runner)}")

    # ------------------------------------------------------------------ reading

    def policy_object(self) -> dict[str, Any]:
        assert self.emulator is not None
        return self.emulator.get_object(SHADOW_POLICY, NAMESPACE, "chat") or {}

    def route_weights(self) -> tuple[int, int, float | None]:
        """(primary, candidate, mirror %) of the managed route, read from the emulated API."""
        assert self.emulator is not None
        vs = self.emulator.get_object(VIRTUAL_SERVICE, NAMESPACE, "chat") or {}
        route: dict[str, Any] = next(
            (r for r in (vs.get("spec") or {}).get("http", []) if r.get("name") == "chat-default"), {})
        dests = route.get("route") or []
        weights = {d["destination"].get("subset"): int(d.get("weight", 100 if len(dests) == 1 else 0)) for d in dests}
        mirror = (route.get("mirrorPercentage") or {}).get("value", 100.0) if "mirror" in route else None
        return weights.get("v1", 0), weights.get("v2", 0), mirror

    def controller_alive(self) -> bool:
        return self.controller is not None and self.controller.poll() is None

    # ------------------------------------------------------------------ stop

    async def close(self) -> None:
        """Stop everything (the controller first, so it does not act on a half-stopped world)."""
        if self.controller is not None and self.controller.poll() is None:
            self.controller.terminate()
            for _ in range(50):
                if self.controller.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                self.controller.kill()
                self.controller.wait(5)
        # Each piece gets a bounded time to stop: a demo must end even if a handler is stuck
        # (aiohttp waits up to a minute per server for requests in flight).
        if self.mesh is not None:
            await _bounded(self.mesh.stop())
        for tap in self.taps.values():
            tap.task.cancel()
            await _bounded(tap.task)
            await _bounded(tap.runner.cleanup())
            await _bounded(tap.proxy.aclose())
        for server in self.servers.values():
            await _bounded(server.stop())
        if self.kube is not None:
            await _bounded(self.kube.close())
        if self.emulator is not None:
            await _bounded(self.emulator.stop())
        for proc in (self.prometheus, self.mosquitto):
            if proc is not None:
                await proc.stop()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
