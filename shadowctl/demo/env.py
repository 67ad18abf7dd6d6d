"""The local environment: everything `shadowctl demo` starts, wired on free local ports.

Real: the Kubernetes API (kube-apiserver and etcd, the local control plane of
:mod:`shadowctl.sim.cluster`, RBAC on), Prometheus and Mosquitto (Debian
packages, child processes), HTTP traffic, the taps, the controller (`shadowctl
run`, a child process, as deploy/rbac.yaml's ServiceAccount) and the CLI.
Simulated, because they cannot run here: Envoy (a mesh simulator that routes
real requests by the VirtualService in the API server, mirroring with Istio's
semantics; with ``target="gateway-api"`` by the HTTPRoute of gateway-api/chat.yaml,
weights as proportions and RequestMirror filters; with ``target="kserve"`` by the traffic a stand-in for
KServe's controller reports for kserve/chat.yaml's InferenceService), and GPU model servers (OpenAI-compatible, vLLM metric names,
latency really spent). No kubelet runs: nothing here is a Pod.

Topology::

    load generator ──▶ mesh (VirtualService chat) ──▶ tap(primary) ──▶ model server chat-v1 ─┐
                            │ mirror x% (Host -shadow)      └─ app-level mirror ─▶ tap(baseline) ─▶ chat-baseline
                            └──────────────────────────▶ tap(candidate) ──▶ model server chat-v2
    taps ── output events ──▶ Mosquitto ──▶ controller's output source
    model servers, taps, controller ◀── scrape every 1s ── Prometheus ◀── controller's queries
    controller ◀──▶ kube-apiserver + etcd (ShadowPolicy, VirtualService, Events, status)
    mesh simulator ◀── watch ── kube-apiserver (the VirtualService the controller writes)

With ``target="kserve"`` KServe cannot mirror, so the primary's tap is the shadow phase's router: it
follows the controller's route setting over Mosquitto, copies its share to the candidate's tap, and
sends 30% of requests once more to its own model server for the noise baseline (the policy's
``baseline.mode: resend``; no second primary replica)::

    mesh (InferenceService chat: revision 1 / revision 2 by canaryTrafficPercent)
      ├─▶ tap(primary, routed) ──▶ chat-v1  (and 30% once more: variant baseline)
      │        └─ mirror x% (the route setting) ─▶ tap(candidate)
      └─▶ tap(candidate) ──▶ chat-v2
"""

from __future__ import annotations

import asyncio
import contextlib
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
from shadowctl.kube import (
    HTTP_ROUTE,
    INFERENCE_SERVICE,
    NAMESPACE,
    SHADOW_POLICY,
    VIRTUAL_SERVICE,
    Forbidden,
    KubeClient,
    NotFound,
    ResourceRef,
)
from shadowctl.sim.cluster import LocalCluster
from shadowctl.sim.dcgm import SimDcgmExporter
from shadowctl.sim.errors import SimError
from shadowctl.sim.mesh import GatewaySource, IstioSource, KServeSource, MeshSimulator, mirror_percent
from shadowctl.sim.modelserver import ModelKnobs, SimModelServer
from shadowctl.sim.services import MosquittoProcess, PrometheusProcess, ScrapeTarget, free_port
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.proxy import MirrorConfig, TapConfig, TapProxy, bound_port, default_topic, start_server
from shadowctl.tap.publisher import BrokerSettings, EventPublisher
from shadowctl.tap.routes import RouteFollower

REPO = Path(__file__).resolve().parents[2]
DEMO_NAMESPACE = "llm"
HOST = "chat.llm.svc.cluster.local"
MODEL = "llama-chat"
"""The model name every model server serves (as a real candidate behind the same route would, with vLLM's
``--served-model-name``: a mirrored copy carries the primary's name) and the load generator asks for."""
POLICY_REF = ResourceRef(SHADOW_POLICY, "chat", DEMO_NAMESPACE)
VS_REF = ResourceRef(VIRTUAL_SERVICE, "chat", DEMO_NAMESPACE)
ROUTE_REF = ResourceRef(HTTP_ROUTE, "chat", DEMO_NAMESPACE)
ISVC_REF = ResourceRef(INFERENCE_SERVICE, "chat", DEMO_NAMESPACE)
ROUTES = {"istio": REPO / "istio" / "chat.yaml", "gateway-api": REPO / "gateway-api" / "chat.yaml",
          "kserve": REPO / "kserve" / "chat.yaml"}
"""The routing objects each `--target` applies, and whose managed route (``chat-default``; for KServe the
predictor's canaryTrafficPercent) the controller changes."""
CRDS = {"istio": "virtualservices.networking.istio.io", "gateway-api": "httproutes.gateway.networking.k8s.io",
        "kserve": "inferenceservices.serving.kserve.io"}
KSERVE_REVISIONS = ("chat-predictor-00001", "chat-predictor-00002")
"""The InferenceService's revisions: the first model (rolled out) and the candidate, which the demo applies as a
team would, with canaryTrafficPercent: 0."""
KSERVE_CANDIDATE_URI = "hf://meta-llama/Llama-3.1-8B-Instruct-v2"
# deploy/rbac.yaml's ServiceAccount: the controller runs with exactly the RBAC that is deployed.
CONTROLLER_SA = ("shadowctl", "shadowctl")
# What kubectl applies, in order: the controller's namespace and RBAC, then the routing objects.
MANIFESTS = (REPO / "deploy" / "namespace.yaml", REPO / "deploy" / "rbac.yaml")
RBAC_WAIT_S = 15.0

BASE_KNOBS = ModelKnobs(time_scale=1.0, ttft_median_s=0.12, ttft_sigma=0.3, tpot_median_s=0.01,
                        output_words_median=24, noise_rate=0.01, max_running=512)


def _address(url: str) -> str:
    """``host:port`` of a local ``http://`` URL, as a scrape target."""
    return url.removeprefix("http://").rstrip("/")


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
    follower_tasks: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class Environment:
    """Started pieces of the local environment; `close()` stops all of them and removes the temp dir."""

    workdir: Path
    keep_workdir: bool = False
    cluster: LocalCluster | None = None
    kube: KubeClient | None = None
    servers: dict[str, SimModelServer] = field(default_factory=dict)
    taps: dict[str, _Tap] = field(default_factory=dict)
    mesh: MeshSimulator | None = None
    dcgm: SimDcgmExporter | None = None
    prometheus: PrometheusProcess | None = None
    mosquitto: MosquittoProcess | None = None
    controller: subprocess.Popen[bytes] | None = None
    controller_log: Path | None = None
    controller_metrics_url: str | None = None  # the controller's /metrics (Prometheus scrapes it too)
    kubeconfig: Path | None = None  # the admin's (the demo's own reads and writes, the mesh simulator)
    controller_kubeconfig: Path | None = None  # deploy/rbac.yaml's ServiceAccount, with a bearer token
    target: str = "istio"  # a key of ROUTES: what routes the traffic (an Istio VirtualService, an HTTPRoute)

    # ------------------------------------------------------------------ start

    @classmethod
    async def start(cls, candidate_knobs: dict[str, Any], policy_text_for: Any, *,
                    workdir: Path | None = None, seed: int = 7, target: str = "istio") -> Environment:
        """Start everything; `policy_text_for(broker_url)` gives the ShadowPolicy YAML to apply; `target` says
        whether an Istio VirtualService or a Gateway API HTTPRoute routes the traffic."""
        if target not in ROUTES:
            raise SimError(f"unknown target {target!r}; choose one of: {', '.join(ROUTES)}")
        env = cls(workdir or Path(tempfile.mkdtemp(prefix="shadowctl-demo-")), keep_workdir=workdir is not None,
                  target=target)
        try:
            await env._start(candidate_knobs, policy_text_for, seed)
        except BaseException:
            await env.close()
            raise
        return env

    async def _start_cluster(self, *, kserve: bool) -> tuple[LocalCluster, KubeClient]:
        """A real kube-apiserver and etcd (no Knative stand-in; KServe's when asked), a client for it, and the
        demo's namespace; callers keep both (``self.cluster, self.kube = ...``)."""
        self.cluster = cluster = LocalCluster(knative=False, kserve=kserve)
        starting = asyncio.ensure_future(asyncio.to_thread(cluster.start))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Ctrl-C while it starts: let the thread finish, so that close() stops every process it started.
            with contextlib.suppress(BaseException):
                await starting
            raise
        self.kubeconfig = cluster.plane.write_kubeconfig(self.workdir / "kubeconfig", namespace=DEMO_NAMESPACE)
        self.kube = kube = await KubeClient.connect(kubeconfig=self.kubeconfig)
        # A real API server stores an object only in a Namespace that exists.
        await kube.create(NAMESPACE, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEMO_NAMESPACE}})
        return cluster, kube

    async def _start(self, candidate_knobs: dict[str, Any], policy_text_for: Any, seed: int) -> None:
        # The Kubernetes API first (it says plainly when hack/setup.sh has not been run): a real
        # kube-apiserver and etcd, shadowctl's and Istio's CRDs installed.
        self.cluster, self.kube = await self._start_cluster(kserve=self.target == "kserve")
        plane = self.cluster.plane
        if CRDS[self.target] not in plane.installed_crds:
            raise SimError(f"the CRD {CRDS[self.target]} is not in {plane.crds_dir}: run hack/setup.sh, which copies "
                           "it there")
        # The controller's namespace, ServiceAccount and RBAC as deployed, the VirtualService and
        # DestinationRule: applied with kubectl, as a person would.
        manifests = (*MANIFESTS, ROUTES[self.target])
        await self._kubectl("apply", *(arg for path in manifests for arg in ("-f", str(path))))
        await self._controller_credentials()
        if self.target == "kserve":
            await self._kserve_candidate()

        self.mosquitto = MosquittoProcess(self.workdir / "mosquitto")
        await self.mosquitto.start()

        # Model servers: the primary, a second primary replica (the noise baseline; KServe's comes from the
        # primary's tap resending), the candidate.
        pods = {"primary": "chat-v1-5c7d9f-x8k2p", "baseline": "chat-baseline-6f8b7c-q4m1z",
                "candidate": "chat-v2-7b9c4d-r2n5t"}
        if self.target == "kserve":
            del pods["baseline"]
        for i, (variant, pod) in enumerate(pods.items()):
            knobs = BASE_KNOBS.updated(candidate_knobs) if variant == "candidate" else BASE_KNOBS
            server = SimModelServer(MODEL, variant=variant, knobs=knobs, seed=seed + i, pod=pod,
                                    namespace=DEMO_NAMESPACE, fine_buckets=True)
            await server.start()
            self.servers[variant] = server

        # Taps in front of them; the primary's tap copies 30% of requests to the baseline replica (KServe: the
        # route setting says what it copies to the candidate and resends to its own server).
        if self.target == "kserve":
            await self._start_tap("candidate", None)
            await self._start_tap("primary", MirrorConfig(url=self.taps["candidate"].url, percent=0.0),
                                  routed=True)
        else:
            for variant in ("baseline", "candidate", "primary"):
                mirror = None
                if variant == "primary":
                    mirror = MirrorConfig(url=self.taps["baseline"].url, percent=30.0)
                await self._start_tap(variant, mirror)

        # The mesh routes by that VirtualService (or HTTPRoute) to the taps.
        if self.target == "kserve":
            self.mesh = MeshSimulator(
                self.kube, [KServeSource(DEMO_NAMESPACE, "chat")],
                revisions={KSERVE_REVISIONS[0]: self.taps["primary"].url,
                           KSERVE_REVISIONS[1]: self.taps["candidate"].url},
                seed=seed,
            )
        elif self.target == "gateway-api":
            self.mesh = MeshSimulator(
                self.kube, [GatewaySource(DEMO_NAMESPACE, "chat")],
                upstreams={("chat-v1", None, 8000): self.taps["primary"].url,
                           ("chat-v2", None, 8000): self.taps["candidate"].url},
                seed=seed,
            )
        else:
            self.mesh = MeshSimulator(
                self.kube, [IstioSource(DEMO_NAMESPACE, "chat")],
                upstreams={(HOST, "v1", 8000): self.taps["primary"].url,
                           (HOST, "v2", 8000): self.taps["candidate"].url},
                seed=seed,
            )
        await self.mesh.start()
        await self.mesh.wait_ready(10.0)

        # The GPU node's DCGM exporter: one GPU per model server's pod, and an idle one.
        self.dcgm = SimDcgmExporter("gpu-node-1")
        for server in self.servers.values():
            self.dcgm.attach(server)
        self.dcgm.add_idle_gpus(1)
        await self.dcgm.start()

        # Prometheus scrapes every second: the model servers (vLLM metrics) and the taps with the labels a
        # kube-prometheus PodMonitor gives them, the DCGM exporter as the dcgm-exporter chart's
        # ServiceMonitor does (honorLabels: false, so the GPU's pod arrives as exported_namespace/exported_pod).
        targets = [ScrapeTarget("vllm", _address(s.url), {"namespace": DEMO_NAMESPACE, "pod": s.pod,
                                                           "container": "vllm", "endpoint": "http"})
                   for s in self.servers.values()]
        targets += [ScrapeTarget("tap", _address(t.url), {"namespace": DEMO_NAMESPACE, "pod": pods[v],
                                                          "container": "tap", "endpoint": "tap-metrics"})
                    for v, t in self.taps.items()]
        targets.append(ScrapeTarget("dcgm-exporter", _address(self.dcgm.url), {
            "namespace": "gpu-operator", "pod": "nvidia-dcgm-exporter-7xk2p", "container": "nvidia-dcgm-exporter",
            "service": "nvidia-dcgm-exporter", "endpoint": "gpu-metrics"}))
        # The controller's own /metrics, as a PodMonitor on deploy/deployment.yaml's port gives them (it starts
        # below; until then the target is down). deploy/grafana/shadowctl.json reads these series.
        controller_port = free_port()
        self.controller_metrics_url = f"http://127.0.0.1:{controller_port}"
        targets.append(ScrapeTarget("shadowctl", f"127.0.0.1:{controller_port}", {
            "namespace": CONTROLLER_SA[0], "pod": "shadowctl-6d4f8b9c7-h2x9q", "container": "controller",
            "endpoint": "http-metrics"}))
        self.prometheus = PrometheusProcess(self.workdir / "prometheus", targets)
        await self.prometheus.start()

        # The policy, then the controller: the real `shadowctl run`, as a child process.
        policy = yaml.safe_load(policy_text_for(self.mosquitto.url))
        await self.kube.create(SHADOW_POLICY, policy)
        self.controller_log = self.workdir / "controller.log"
        log = self.controller_log.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.controller = subprocess.Popen(  # noqa: ASYNC220 - a child process that outlives this call
            [sys.executable, "-m", "shadowctl", "run", "--kubeconfig", str(self.controller_kubeconfig),
             "--prometheus", self.prometheus.url, "--events-mqtt", self.mosquitto.url, "--no-leader-elect",
             "--status-refresh", "0",  # the report charts every look's evidence, not one per 30 s (controller/writes.py)
             "--listen", f"127.0.0.1:{controller_port}", "--log-format", "json"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
        )
        log.close()

    async def _kserve_candidate(self) -> None:
        """Wait until KServe (its stand-in) rolled the first model out, then apply the candidate as a team would:
        the same InferenceService with the new model and canaryTrafficPercent: 0, with kubectl."""
        assert self.kube is not None
        await self._wait_isvc(lambda p: p.get("latestRolledoutRevision") == KSERVE_REVISIONS[0], "the first model")
        doc = yaml.safe_load(ROUTES["kserve"].read_text())
        doc["spec"]["predictor"]["model"]["storageUri"] = KSERVE_CANDIDATE_URI
        doc["spec"]["predictor"]["canaryTrafficPercent"] = 0
        path = self.workdir / "chat-candidate.yaml"
        path.write_text(yaml.safe_dump(doc))
        await self._kubectl("apply", "-f", str(path))
        await self._wait_isvc(lambda p: p.get("latestReadyRevision") == KSERVE_REVISIONS[1], "the candidate")

    async def _wait_isvc(self, ready: Any, what: str, within: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            isvc = await self._read(ISVC_REF)
            if ready(((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise SimError(f"KServe's stand-in did not report {what} within {within:g} s: {isvc.get('status')}")
            await asyncio.sleep(0.1)

    async def _kubectl(self, *args: str) -> None:
        """Run the control plane's kubectl as the admin; SimError with its output when it fails."""
        assert self.cluster is not None and self.kubeconfig is not None
        argv = [str(self.cluster.plane.binaries.kubectl), "--kubeconfig", str(self.kubeconfig), *args]
        try:
            done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=120,
                                           check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SimError(f"kubectl {' '.join(args)}: {exc}") from exc
        if done.returncode != 0:
            raise SimError(f"kubectl {' '.join(args)} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")

    async def _controller_credentials(self) -> None:
        """A kubeconfig with a token of deploy/rbac.yaml's ServiceAccount; wait until the authorizer knows its RBAC."""
        assert self.cluster is not None
        cluster = self.cluster

        def token() -> str:
            with cluster.plane.admin_client() as client:
                return cluster.service_account_token(client, *CONTROLLER_SA, seconds=86_400)

        self.controller_kubeconfig = cluster.plane.write_kubeconfig(
            self.workdir / "controller.kubeconfig", token=await asyncio.to_thread(token), namespace=DEMO_NAMESPACE,
            user="shadowctl")
        # RBAC objects reach the authorizer through its informers, a moment after they are stored.
        probe = await KubeClient.connect(kubeconfig=self.controller_kubeconfig)
        try:
            deadline = asyncio.get_running_loop().time() + RBAC_WAIT_S
            while True:
                try:
                    await probe.list(SHADOW_POLICY, None)
                    return
                except Forbidden as exc:
                    if asyncio.get_running_loop().time() > deadline:
                        raise SimError(f"deploy/rbac.yaml applied, but its ServiceAccount still cannot list "
                                       f"ShadowPolicies after {RBAC_WAIT_S:g} s: {exc.message}") from exc
                    await asyncio.sleep(0.1)
        finally:
            await probe.close()

    async def _start_tap(self, name: str, mirror: MirrorConfig | None, *, routed: bool = False) -> None:
        """The tap of variant `name`, in front of its model server; with `routed` it follows the policy's route
        setting (the tap router) over Mosquitto."""
        assert self.mosquitto is not None
        v = Variant(name)
        metrics = TapMetrics(v.value)
        broker = BrokerSettings("127.0.0.1", self.mosquitto.port, client_id=f"tap-{name}-{os.getpid()}")
        publisher = EventPublisher(broker, metrics)
        config = TapConfig(upstream=self.servers[name].url, variant=v, namespace=DEMO_NAMESPACE, service="chat",
                           topic=default_topic(DEMO_NAMESPACE, "chat", v), mirror=mirror, routed=routed)
        follower = None
        if routed:
            follower = RouteFollower(BrokerSettings("127.0.0.1", self.mosquitto.port,
                                                    client_id=f"tap-{name}-route-{os.getpid()}"),
                                     DEMO_NAMESPACE, POLICY_REF.name, f"{name}-{os.getpid()}", metrics,
                                     own_candidate_url=mirror is not None)
        proxy = TapProxy(config, publisher, metrics, routes=follower)
        runner = await start_server(proxy, "127.0.0.1", 0)
        task = asyncio.create_task(publisher.run())
        tasks = [task]
        if follower is not None:
            tasks.append(asyncio.create_task(follower.run()))
        self.taps[name] = _Tap(proxy, publisher, runner, task, f"http://127.0.0.1:{bound_port(runner)}", tasks[1:])

    # ------------------------------------------------------------------ reading

    @property
    def api_versions(self) -> str:
        """What serves the Kubernetes API, e.g. ``kube-apiserver v1.37.2, etcd 3.6.16``."""
        return str(self.cluster.plane.versions) if self.cluster is not None else "not started"

    async def _read(self, ref: ResourceRef) -> dict[str, Any]:
        assert self.kube is not None
        try:
            return await self.kube.get(ref)
        except NotFound:
            return {}

    async def policy_object(self) -> dict[str, Any]:
        """The ShadowPolicy as stored ({} when it does not exist)."""
        return await self._read(POLICY_REF)

    async def route_weights(self) -> tuple[int, int, float | None]:
        """(primary, candidate, mirror %) of the managed route, read from the API server (for an HTTPRoute,
        each backend's share of the rule's total weight, rounded to a whole percent; for an InferenceService
        the traffic its status reports, and the mirror the primary's tap applies)."""
        if self.target == "kserve":
            isvc = await self._read(ISVC_REF)
            percents: dict[str, int] = {}
            component = ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}
            for t in component.get("traffic") or []:
                percents[t.get("revisionName")] = percents.get(t.get("revisionName"), 0) + int(t.get("percent") or 0)
            routes = self.taps["primary"].proxy.routes if "primary" in self.taps else None
            mirror = routes.current.mirror_percent if routes is not None else None
            return percents.get(KSERVE_REVISIONS[0], 0), percents.get(KSERVE_REVISIONS[1], 0), mirror
        if self.target == "gateway-api":
            obj = await self._read(ROUTE_REF)
            rule: dict[str, Any] = next(
                (r for r in (obj.get("spec") or {}).get("rules", []) if r.get("name") == "chat-default"), {})
            refs = rule.get("backendRefs") or []
            total = sum(int(r.get("weight", 1)) for r in refs)
            shares = {r.get("name"): round(100 * int(r.get("weight", 1)) / total) if total else 0 for r in refs}
            mirrors = [mirror_percent(f["requestMirror"]) for f in rule.get("filters") or []
                       if f.get("type") == "RequestMirror" and (f.get("requestMirror") or {}).get("backendRef", {})
                       .get("name") == "chat-v2"]
            return shares.get("chat-v1", 0), shares.get("chat-v2", 0), mirrors[0] if mirrors else None
        vs = await self._read(VS_REF)
        route: dict[str, Any] = next(
            (r for r in (vs.get("spec") or {}).get("http", []) if r.get("name") == "chat-default"), {})
        dests = route.get("route") or []
        weights = {d["destination"].get("subset"): int(d.get("weight", 100 if len(dests) == 1 else 0)) for d in dests}
        mirror = (route.get("mirrorPercentage") or {}).get("value", 100.0) if "mirror" in route else None
        return weights.get("v1", 0), weights.get("v2", 0), mirror

    def copies(self) -> dict[str, dict[str, int]]:
        """Each tap's copies by outcome (sent, failed, dropped_in_flight_cap, ...): ``mirror`` to the candidate and
        ``baseline`` resent to its own server; taps that sent none are left out."""
        out: dict[str, dict[str, int]] = {}
        for name, tap in self.taps.items():
            for kind, counter in (("mirror", tap.proxy.metrics.mirrored), ("baseline", tap.proxy.metrics.baseline)):
                counts = {sample.labels["outcome"]: int(sample.value) for metric in counter.collect()
                          for sample in metric.samples if sample.name.endswith("_total") and sample.value}
                if counts:
                    out[f"{name}/{kind}"] = counts
        return out

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
            if tap.proxy.routes is not None:
                await _bounded(tap.proxy.routes.say_gone(), 5.0)
            for follower in tap.follower_tasks:
                follower.cancel()
                await _bounded(follower)
            tap.task.cancel()
            await _bounded(tap.task)
            await _bounded(tap.runner.cleanup())
            await _bounded(tap.proxy.aclose())
        if self.dcgm is not None:
            await _bounded(self.dcgm.stop())
        for server in self.servers.values():
            await _bounded(server.stop())
        if self.kube is not None:
            await _bounded(self.kube.close())
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)  # bounded: SIGKILL after 10 s per process
        for proc in (self.prometheus, self.mosquitto):
            if proc is not None:
                await proc.stop()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
