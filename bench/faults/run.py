"""Fault campaign (#16 item 2): whole rollouts on the real control plane, many at once, each with a random
schedule of faults; the invariants are checked afterwards from the API server's audit log.

One :class:`~shadowctl.sim.cluster.LocalCluster` (etcd + kube-apiserver with RBAC, audit log on) behind a
:class:`~shadowctl.sim.faultproxy.FaultProxy`; two controller processes (bench/faults/controller.py:
`shadowctl run`'s wiring, Lease election, a stub metric source) each with its own ServiceAccount, so the
audit log says which replica wrote what. Up to ``--concurrency`` rollouts run at once, each on its own
VirtualService; each draws 1-3 faults (seeded) from :data:`FAULTS`, at random times in its first seconds.
The campaign's own writes (setup, GitOps drift, edits, commands, deletes, the concurrent writer) go
straight to the API server as the admin, never through the proxy.

When every rollout is terminal (or past ``--rollout-timeout``) the audit log is replayed
(bench/faults/audit.py) and the final objects checked. Written: bench/results/faults-<seed>.json.

Run: .venv/bin/python bench/faults/run.py --rollouts 100 --seed 1 [--concurrency 40] [--faults api-429,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import audit  # noqa: E402  (bench/faults/audit.py: the checker)
from broker import DelayProxy, Mosquitto, Publisher  # noqa: E402  (bench/faults/broker.py: the MQTT side)

from shadowctl.sim.cluster import LocalCluster, free_port  # noqa: E402
from shadowctl.sim.faultproxy import FaultProxy  # noqa: E402

NS = "faults"
SA_NS = "shadowctl"
CONTROLLERS = ("ctl-a", "ctl-b")
WRITERS = tuple(f"system:serviceaccount:shadowctl:{c}" for c in CONTROLLERS)  # the controllers' user names
LEASE_DURATION = 4.0
VS_API = f"/apis/networking.istio.io/v1/namespaces/{NS}/virtualservices"
HTTPROUTE_API = f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes"
ROUTE_API = {"istio": VS_API, "gateway": HTTPROUTE_API}
"""Where each target kind's route object lives: an Istio VirtualService, or a Gateway API HTTPRoute."""
POLICY_API = f"/apis/shadowctl.dev/v1alpha1/namespaces/{NS}/shadowpolicies"
LEASE_API = f"/apis/coordination.k8s.io/v1/namespaces/{SA_NS}/leases/shadowctl-faults"
MERGE = {"Content-Type": "application/merge-patch+json"}

# Each kind, what it does (docs/reliability.md has the same table).
FAULTS: dict[str, str] = {
    "api-429": "the API server answers 429 (Retry-After: 1) to the next 1-5 requests for this rollout's objects",
    "api-500": "the API server answers 500 to the next 1-5 requests for this rollout's objects",
    "api-reset": "the connection of the next 1-3 requests for this rollout's objects is reset",
    "api-slow": "every API answer delayed 0.3-1.5 s for 3-6 s (all rollouts)",
    "watch-cut": "every open watch stream is cut (all rollouts)",
    "watch-expire": "watches from before now answer 410 Expired, as after an etcd compaction (all rollouts)",
    "conflict-409": "a concurrent writer edits the policy and the VirtualService every 0.1 s for 3 s (real 409s)",
    "gitops-drift": "another client rewrites the VirtualService to the manifest in git (100% primary, no mirror)",
    "new-candidate": "the policy's candidate changes to a new revision (subset v3) mid-analysis",
    "policy-edit": "the policy's spec is edited (stepDuration) mid-rollout",
    "policy-pause": "the pause command, then resume 2-5 s later",
    "policy-delete": "the policy is deleted mid-rollout",
    "progress-deadline": "progressDeadline 10s (the least the phases need is 9s), shorter than a rollout with looks",
    "controller-kill": "a controller process is SIGKILLed and restarted",
    "leader-pause": "the leading controller is SIGSTOPped past its lease (4 s + 2 s), then resumed",
    "prom-down": "Prometheus unreachable for this rollout for 2-6 s",
    "prom-slow": "Prometheus answers 3 s late for 2-6 s",
    "prom-nan": "Prometheus answers NaN for 2-6 s",
    "prom-empty": "Prometheus answers nothing for 2-6 s",
    "prom-reset": "a counter reset inside the window for 2-6 s",
    "mqtt-down": "the MQTT broker stopped (SIGKILL) for 2-6 s, then started again on the same port (all rollouts)",
    "mqtt-slow": "every byte between the controllers and the MQTT broker 0.5-2 s late for 2-6 s (all rollouts)",
    "mqtt-restart": "the MQTT broker killed and started again at once: sessions, subscriptions and retained "
                    "messages lost (all rollouts)",
}
PROM = {"prom-down", "prom-slow", "prom-nan", "prom-empty", "prom-reset"}
MQTT = {"mqtt-down", "mqtt-slow", "mqtt-restart"}
OUTPUTS = {"mqtt": {"broker": "BROKER"}, "comparators": [{"name": "token-f1", "threshold": 0.5}],
           "baseline": {"mode": "fixed", "agreement": 0.95}, "minPairs": 30, "pairTTL": "10s"}
"""A policy's output comparison (``--outputs-share`` of the rollouts): the taps' answers paired over MQTT and
compared token by token against a fixed baseline agreement; 30 agreeing pairs pass (3 s of the publisher's
10 pairs/s: the shadow phase's minDuration), a bad candidate's half-wrong answers fail."""

POLICY = """
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {name: NAME, namespace: faults}
spec:
  target:
    istio:
      virtualService: NAME
      route: chat-default
      primary: {host: chat.llm.svc.cluster.local, subset: v1, port: 8000}
      candidate: {host: chat.llm.svc.cluster.local, subset: v2, port: 8000}
  shadow: {mirrorPercent: 20, minDuration: 3s, maxDuration: 60s, minPairs: 0}
  canary: {steps: [10, 50], stepDuration: 3s, maxStepDuration: 60s}
  analysis:
    interval: 1s
    variants:
      primary: {workload: chat-v1, subset: v1}
      candidate: {workload: chat-v2, subset: v2}
    metrics:
      - {name: ttft-p95, preset: vllm-ttft, statistic: p95, margin: 10%, critical: true, minSamples: 50}
      - {name: errors, preset: vllm-errors, kind: ratio, statistic: rate, margin: 1pp, minSamples: 50}
  progressDeadline: 5m
"""


def original_vs(name: str) -> dict[str, Any]:
    return original_route(name, "istio")


def original_route(name: str, target: str = "istio") -> dict[str, Any]:
    """The route object as in git: istio/chat.yaml's VirtualService, or gateway-api/chat.yaml's HTTPRoute
    (each with a header-matched debug route shadowctl must never touch)."""
    path, kind = (("istio", "VirtualService") if target == "istio" else ("gateway-api", "HTTPRoute"))
    docs = list(yaml.safe_load_all((REPO / path / "chat.yaml").read_text()))
    obj = copy.deepcopy(next(d for d in docs if d["kind"] == kind))
    obj["metadata"] = {"name": name, "namespace": NS}
    return dict(obj)


GATEWAY_TARGET = {"httpRoute": "NAME", "rule": "chat-default", "primary": {"name": "chat-v1", "port": 8000},
                  "candidate": {"name": "chat-v2", "port": 8000}}


def policy_doc(name: str, faults: Sequence[str], target: str = "istio", broker: str | None = None) -> dict[str, Any]:
    """The rollout's policy; with `broker` (mqtt://host:port), it also compares outputs over that broker."""
    doc: dict[str, Any] = yaml.safe_load(POLICY)
    doc["metadata"]["name"] = name
    if broker is not None:
        doc["spec"]["analysis"]["outputs"] = {**copy.deepcopy(OUTPUTS), "mqtt": {"broker": broker}}
    if target == "gateway":
        doc["spec"]["target"] = {"gatewayAPI": {**GATEWAY_TARGET, "httpRoute": name}}
    else:
        doc["spec"]["target"]["istio"]["virtualService"] = name
    if "progress-deadline" in faults:
        doc["spec"]["progressDeadline"] = "10s"
    return doc


@dataclass
class Plan:
    """One rollout's draw: its faults with their offsets (seconds after creation), and a bad candidate or not."""

    name: str
    faults: list[tuple[str, float]]
    bad: bool
    target: str = "istio"
    outputs: bool = False
    """The policy compares outputs over MQTT (the publisher sends its taps' events)."""


@dataclass
class Outcome:
    name: str
    faults: list[str]
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bad: bool = False
    target: str = "istio"
    outputs: bool = False
    outcome: str = "?"
    seconds: float = 0.0
    final_vs: dict[str, Any] | None = None
    final_policy: dict[str, Any] | None = None


def draw(rng: random.Random, index: int, kinds: Sequence[str], gateway_share: float = 0.0, seed: int = 0,
         outputs_share: float = 1.0) -> Plan:
    count = rng.choice((1, 1, 2, 2, 3))
    chosen = rng.sample(list(kinds), min(count, len(kinds)))
    # The target and the output comparison from their own streams, so that --gateway-share 0 draws what the
    # campaign drew before targets, and the shares never move the faults drawn.
    target = "gateway" if random.Random(f"{seed}/target/{index}").random() < gateway_share else "istio"
    outputs = random.Random(f"{seed}/outputs/{index}").random() < outputs_share
    return Plan(f"r-{index:05d}", [(kind, round(rng.uniform(0.5, 10.0), 2)) for kind in chosen], rng.random() < 0.3,
                target, outputs)


class Controllers:
    """The two controller processes: start, SIGKILL + restart, SIGSTOP + SIGCONT; logs in the work folder."""

    def __init__(self, workdir: Path, kubeconfigs: dict[str, Path], schedule: Path) -> None:
        self.workdir = workdir
        self.kubeconfigs = kubeconfigs
        self.schedule = schedule
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.lock = asyncio.Lock()
        self.kills = 0
        self.pauses = 0

    def start(self, name: str) -> None:
        port = free_port()
        self.ports[name] = port
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "faults" / "controller.py"), "--kubeconfig",
             str(self.kubeconfigs[name]), "--schedule", str(self.schedule), "--listen", f"127.0.0.1:{port}",
             "--namespace", NS, "--lease-namespace", SA_NS, "--lease-duration", str(LEASE_DURATION),
             "--renew-deadline", str(LEASE_DURATION * 0.75), "--retry-period", "0.5"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
        log.close()

    async def leader(self) -> str | None:
        async with httpx.AsyncClient(timeout=2) as client:
            for name, port in self.ports.items():
                with contextlib.suppress(httpx.HTTPError):
                    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                    if "\nshadowctl_leader 1.0" in text:
                        return name
        return None

    async def kill(self, rng: random.Random) -> bool:
        if self.lock.locked():
            return False
        async with self.lock:
            name = await self.leader() if rng.random() < 0.7 else None
            name = name or rng.choice(CONTROLLERS)
            proc = self.procs[name]
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            self.start(name)
            self.kills += 1
            await asyncio.sleep(1.0)
            return True

    async def pause_leader(self) -> bool:
        if self.lock.locked():
            return False
        async with self.lock:
            name = await self.leader()
            if name is None:
                return False
            proc = self.procs[name]
            proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(LEASE_DURATION + 2.0)
            finally:
                proc.send_signal(signal.SIGCONT)
            self.pauses += 1
            await asyncio.sleep(1.0)
            return True

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@dataclass
class MqttSide:
    """The broker the policies compare outputs over, the controllers' way to it, and the taps' stand-in."""

    broker: Mosquitto
    proxy: DelayProxy
    publisher: Publisher
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while a broker fault is under way: one drawn meanwhile is skipped (as controller kills are)."""
    downs: int = 0
    slows: int = 0
    restarts: int = 0

    tasks: set[asyncio.Task[bool]] = field(default_factory=set)

    def start(self, kind: str, rng: random.Random) -> asyncio.Task[bool]:
        """The fault as a task of its own (kept until done, and awaited by :meth:`settle`)."""
        task = asyncio.create_task(self.fault(kind, rng))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def settle(self) -> None:
        """Wait for the broker faults under way (the broker is up and undelayed after)."""
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def fault(self, kind: str, rng: random.Random) -> bool:
        """Carry out an mqtt-* fault; False: skipped, another broker fault is under way."""
        if self.lock.locked():
            return False
        async with self.lock:
            if kind == "mqtt-down":
                await asyncio.to_thread(self.broker.stop)
                await asyncio.sleep(rng.uniform(2, 6))
                await asyncio.to_thread(self.broker.start)
                self.downs += 1
            elif kind == "mqtt-restart":
                await asyncio.to_thread(self.broker.stop)
                await asyncio.to_thread(self.broker.start)
                self.restarts += 1
            elif kind == "mqtt-slow":
                self.proxy.delay = rng.uniform(0.5, 2.0)
                try:
                    await asyncio.sleep(rng.uniform(2, 6))
                finally:
                    self.proxy.delay = 0.0
                self.slows += 1
            await asyncio.sleep(1.0)
            return True

    def record(self) -> dict[str, int]:
        pub = self.publisher
        return {"mqtt-down": self.downs, "mqtt-slow": self.slows, "mqtt-restart": self.restarts,
                "events published": pub.published, "events lost while the broker was down": pub.lost,
                "publisher reconnects": pub.reconnects}


class Campaign:
    def __init__(self, cluster: LocalCluster, proxy: FaultProxy, controllers: Controllers, schedule: Path,
                 rng: random.Random, rollout_timeout: float, mqtt: MqttSide | None = None) -> None:
        self.mqtt = mqtt
        self.cluster = cluster
        self.proxy = proxy
        self.controllers = controllers
        self.schedule_path = schedule
        self.schedule: dict[str, Any] = {"policies": {}}
        self.rng = rng
        self.rollout_timeout = rollout_timeout
        plane = cluster.plane
        assert plane.ca is not None and plane.admin_cert is not None
        context = ssl.create_default_context(cafile=str(plane.ca.cert_file))
        context.load_cert_chain(str(plane.admin_cert.cert), str(plane.admin_cert.key))
        self.admin = httpx.AsyncClient(base_url=plane.url, verify=context, timeout=30,
                                       limits=httpx.Limits(max_connections=20))
        self.touches = 0

    def _write_schedule(self) -> None:
        tmp = self.schedule_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.schedule))
        os.replace(tmp, self.schedule_path)

    async def _ok(self, answer: httpx.Response, what: str, *also: int) -> httpx.Response:
        if answer.status_code >= 300 and answer.status_code not in also:
            raise RuntimeError(f"{what}: {answer.status_code} {answer.text[:300]}")
        return answer

    async def phase(self, name: str) -> str | None:
        """The policy's phase (None: deleted). A recorded route intent (``status.pendingRoute``) means a write
        under way that leads to another phase (a start, a step): the phase is then the intent's, never a
        terminal one, so the routes read after it are not taken for the end state of the phase before."""
        answer = await self.admin.get(f"{POLICY_API}/{name}")
        if answer.status_code == 404:
            return None
        status = answer.json().get("status") or {}
        if status.get("pendingRoute"):
            return "Intent"
        return str(status.get("phase") or "Pending")

    async def fault(self, plan: Plan, kind: str, out: Outcome) -> None:
        name, proxy, rng = plan.name, self.proxy, self.rng
        route_api = ROUTE_API[plan.target]
        path = rf"/{NS}/(virtualservices|httproutes|shadowpolicies)/{name}(/status)?$"
        applied = True
        if kind == "api-429":
            proxy.fail_next(rng.randint(1, 5), 429, path=path, retry_after=1)
        elif kind == "api-500":
            proxy.fail_next(rng.randint(1, 5), 500, path=path)
        elif kind == "api-reset":
            proxy.reset_next(rng.randint(1, 3), path=path)
        elif kind == "api-slow":
            proxy.set_latency(rng.uniform(0.3, 1.5))
            await asyncio.sleep(rng.uniform(3, 6))
            proxy.set_latency(0)
        elif kind == "watch-cut":
            proxy.cut_watches()
        elif kind == "watch-expire":
            listing = (await self.admin.get("/api/v1/namespaces", params={"limit": "1"})).json()
            proxy.expire_watches(int(listing["metadata"]["resourceVersion"]))
        elif kind == "conflict-409":
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                self.touches += 1
                note = {"metadata": {"annotations": {"example.com/touched": str(self.touches)}}}
                await self.admin.patch(f"{POLICY_API}/{name}", json=note, headers=MERGE)
                await self.admin.patch(f"{route_api}/{name}", json=note, headers=MERGE)
                await asyncio.sleep(0.1)
        elif kind == "gitops-drift":
            for _ in range(5):
                current = (await self.admin.get(f"{route_api}/{name}")).json()
                body = original_route(name, plan.target)
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                if (await self.admin.put(f"{route_api}/{name}", json=body)).status_code != 409:
                    break
        elif kind == "new-candidate":
            moved: dict[str, Any] = ({"istio": {"candidate": {"subset": "v3"}}} if plan.target == "istio"
                     else {"gatewayAPI": {"candidate": {"name": "chat-v3"}}})
            patch: dict[str, Any] = {"spec": {"target": moved,
                              "analysis": {"variants": {"candidate": {"subset": "v3", "workload": "chat-v3"}}}}}
            await self._ok(await self.admin.patch(f"{POLICY_API}/{name}", json=patch, headers=MERGE), kind, 404)
        elif kind == "policy-edit":
            patch = {"spec": {"canary": {"stepDuration": "4s"}}}
            await self._ok(await self.admin.patch(f"{POLICY_API}/{name}", json=patch, headers=MERGE), kind, 404)
        elif kind == "policy-pause":
            await self._command(name, "pause")
            await asyncio.sleep(rng.uniform(2, 5))
            await self._command(name, "resume")
        elif kind == "policy-delete":
            await self._ok(await self.admin.delete(f"{POLICY_API}/{name}"), kind, 404)
        elif kind == "controller-kill":
            applied = await self.controllers.kill(rng)
        elif kind == "leader-pause":
            applied = await self.controllers.pause_leader()
        elif kind in MQTT:
            # Its own task, shielded: a rollout that ends (or times out) meanwhile must not leave the broker down.
            applied = self.mqtt is not None and await asyncio.shield(self.mqtt.start(kind, rng))
        elif kind in ("progress-deadline", *PROM):
            pass  # set in the policy at creation / in the stub's schedule
        (out.applied if applied else out.skipped).append(kind)

    async def _command(self, name: str, command: str) -> None:
        value = json.dumps({"command": command, "id": uuid.uuid4().hex[:12], "at": "", "by": "fault-campaign"})
        patch = {"metadata": {"annotations": {"shadowctl.dev/command": value}}}
        await self._ok(await self.admin.patch(f"{POLICY_API}/{name}", json=patch, headers=MERGE), command, 404)

    async def rollout(self, plan: Plan) -> Outcome:
        kinds = [k for k, _ in plan.faults]
        out = Outcome(plan.name, kinds, bad=plan.bad, target=plan.target, outputs=plan.outputs)
        started = time.time()
        entry = {"bad": plan.bad, "faults": [
            {"kind": k, "from": started + at, "to": started + at + self.rng.uniform(2, 6)}
            for k, at in plan.faults if k in PROM]}
        self.schedule["policies"][f"{NS}/{plan.name}"] = entry
        self._write_schedule()
        route_api = ROUTE_API[plan.target]
        await self._ok(await self.admin.post(route_api, json=original_route(plan.name, plan.target)), "create route")
        broker = self.mqtt.proxy.url if self.mqtt is not None and plan.outputs else None
        if broker is not None and self.mqtt is not None:
            self.mqtt.publisher.rollouts[plan.name] = plan.bad
        await self._ok(await self.admin.post(POLICY_API, json=policy_doc(plan.name, kinds, plan.target, broker)),
                       "create policy")
        tasks = []
        for kind, at in plan.faults:
            async def later(kind: str = kind, at: float = at) -> None:
                await asyncio.sleep(at)
                await self.fault(plan, kind, out)

            tasks.append(asyncio.create_task(later()))
        deadline = time.monotonic() + self.rollout_timeout
        deleted = False
        while True:
            await asyncio.sleep(0.5)
            phase = await self.phase(plan.name)
            if phase is None:
                out.outcome = "Deleted"
                deleted = True
            elif phase in ("Succeeded", "RolledBack", "Failed"):
                out.outcome = phase
            else:
                out.outcome = "?"  # a fault that came after its end (a new candidate) started it again
            if (deleted or out.outcome != "?") and all(t.done() for t in tasks):
                break
            if deleted:
                continue
            if time.monotonic() > deadline:
                out.outcome = f"Stuck:{phase}"
                break
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.mqtt is not None:
            self.mqtt.publisher.rollouts.pop(plan.name, None)
        out.seconds = round(time.time() - started, 1)
        out.final_vs = (await self.admin.get(f"{route_api}/{plan.name}")).json()
        policy = await self.admin.get(f"{POLICY_API}/{plan.name}")
        out.final_policy = policy.json() if policy.status_code == 200 else None
        if out.final_policy is not None and not out.outcome.startswith("Stuck"):
            # Done with: a finished policy left in place is still watched and ticked by both controllers, and a
            # thousand of them starve the rollouts still running (the first 1,000-rollout run: 143 Stuck).
            await self.admin.delete(f"{POLICY_API}/{plan.name}")
        return out

    async def run(self, plans: Sequence[Plan], concurrency: int, progress: bool) -> list[Outcome]:
        gate = asyncio.Semaphore(concurrency)
        done: list[Outcome] = []

        async def one(plan: Plan) -> None:
            async with gate:
                done.append(await self.rollout(plan))
                if progress and len(done) % 10 == 0:
                    print(f"  {len(done)}/{len(plans)} rollouts done", flush=True)

        await asyncio.gather(*(one(p) for p in plans))
        return sorted(done, key=lambda o: o.name)


def setup_cluster(workdir: Path) -> tuple[LocalCluster, FaultProxy, dict[str, Path]]:
    cluster = LocalCluster(knative=False, audit_log=workdir / "audit.log")
    cluster.start()
    try:
        with cluster.plane.admin_client() as client:
            for ns in (NS, SA_NS):
                answer = client.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                                  "metadata": {"name": ns}})
                assert answer.status_code in (201, 409), answer.text
            tokens = {name: cluster.service_account_token(client, SA_NS, name, cluster_role="cluster-admin")
                      for name in CONTROLLERS}
        assert cluster.plane.ca is not None
        proxy = FaultProxy(cluster.url, str(cluster.plane.ca.cert_file))
        proxy.start()
    except BaseException:
        cluster.stop()
        raise
    kubeconfigs = {name: cluster.plane.write_kubeconfig(workdir / f"{name}.kubeconfig", token=token,
                                                        server=proxy.url, namespace=NS)
                   for name, token in tokens.items()}
    return cluster, proxy, kubeconfigs


def summarize(outcomes: Sequence[Outcome], report: audit.Report) -> dict[str, Any]:
    per_kind: dict[str, dict[str, Any]] = {}
    for kind in FAULTS:
        rows = [o for o in outcomes if kind in o.applied]
        bad = {v["rollout"] for v in report.violations}
        per_kind[kind] = {"rollouts": len(rows), "skipped": sum(kind in o.skipped for o in outcomes),
                          "outcomes": dict(Counter(o.outcome for o in rows)),
                          "violations": sum(1 for o in rows if o.name in bad)}
    return per_kind


async def campaign(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], list[Outcome]]:
    """Run the campaign in ``workdir`` (the audit log stays there as audit.log); the result and each rollout."""
    kinds = [k for k in (args.faults.split(",") if args.faults else FAULTS) if k]
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        raise SystemExit(f"unknown fault kinds: {sorted(unknown)}; known: {', '.join(FAULTS)}")
    rng = random.Random(args.seed)
    plans = [draw(rng, i, kinds, args.gateway_share, args.seed, args.outputs_share) for i in range(args.rollouts)]
    mqtt: MqttSide | None = None
    publishing: asyncio.Task[None] | None = None
    if any(p.outputs for p in plans):
        broker = Mosquitto(workdir)
        await asyncio.to_thread(broker.start)
        delay = DelayProxy(broker.host, broker.port)
        await delay.start()
        mqtt = MqttSide(broker, delay, Publisher(broker, NS, pairs_per_s=args.pairs_per_s))
        publishing = asyncio.create_task(mqtt.publisher.run())
    cluster, proxy, kubeconfigs = await asyncio.to_thread(setup_cluster, workdir)
    schedule = workdir / "schedule.json"
    schedule.write_text(json.dumps({"policies": {}}))
    controllers = Controllers(workdir, kubeconfigs, schedule)
    started = time.time()
    camp = None
    try:
        for name in CONTROLLERS:
            controllers.start(name)
        camp = Campaign(cluster, proxy, controllers, schedule, rng, args.rollout_timeout, mqtt)
        outcomes = await camp.run(plans, args.concurrency, args.progress)
        wall = time.time() - started
    finally:
        if camp is not None:
            await camp.admin.aclose()
        controllers.stop()
        proxy.stop()
        if mqtt is not None:
            await mqtt.settle()
            if publishing is not None:
                publishing.cancel()
                await asyncio.gather(publishing, return_exceptions=True)
            await mqtt.proxy.stop()
            mqtt.broker.stop()
        await asyncio.sleep(0.5)  # the last audit events reach the file a moment after their answers
        cluster.stop()
    finals = {o.name: o.final_vs for o in outcomes}
    report = audit.check(audit.read_log(workdir / "audit.log"), namespace=NS, writers=WRITERS,
                         outcomes={o.name: o.outcome for o in outcomes}, finals=finals,
                         final_policies={o.name: o.final_policy for o in outcomes})
    result = {
        "command": " ".join(["bench/faults/run.py", *sys.argv[1:]]) if args.record_argv else None,
        "seed": args.seed, "rollouts": args.rollouts, "concurrency": args.concurrency, "kinds": kinds,
        "wall_s": round(wall, 1), "kube": str(cluster.plane.versions),
        "outcomes": dict(Counter(o.outcome for o in outcomes)),
        "violations": len(report.violations), "checked": report.counts,
        "per_kind": summarize(outcomes, report),
        "per_target": {t: {"rollouts": sum(o.target == t for o in outcomes),
                           "outcomes": dict(Counter(o.outcome for o in outcomes if o.target == t)),
                           "violations": sum(1 for v in report.violations
                                             if any(o.name == v["rollout"] and o.target == t for o in outcomes))}
                       for t in ROUTE_API},
        "controller_kills": controllers.kills, "leader_pauses": controllers.pauses,
        "outputs": {"rollouts comparing outputs": sum(o.outputs for o in outcomes),
                    **(mqtt.record() if mqtt is not None else {})},
        "violation_list": report.violations[:50],
        "rollout_list": [{k: v for k, v in o.__dict__.items() if k not in ("final_vs", "final_policy")}
                         for o in outcomes],
        "violations_all": report.violations,
    }
    return result, outcomes


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's output (#16 item 2): rollouts run, faults per kind, every violation with the write and
    the invariant it broke, and the phases the rollouts ended in."""
    faults = {kind: row["rollouts"] for kind, row in result["per_kind"].items() if row["rollouts"] or row["skipped"]}
    return {
        "command": result["command"], "seed": result["seed"], "rollouts": result["rollouts"],
        "wall_s": result["wall_s"], "kube": result["kube"],
        "faults": faults,
        "faults_skipped": {k: row["skipped"] for k, row in result["per_kind"].items() if row["skipped"]},
        "controller_kills": result["controller_kills"], "leader_pauses": result["leader_pauses"],
        "outputs": result["outputs"],
        "violations": result["violations_all"],
        "end_phases": result["outcomes"],
        "targets": result["per_target"],
        "checked": result["checked"],
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=20, help="how many rollouts to run (each with 1-3 faults)")
    p.add_argument("--seed", type=int, default=1, help="seeds the draw of faults, their times and bad candidates")
    p.add_argument("--concurrency", type=int, default=40,
                   help="rollouts at once (size it to the machine: a starved rollout times out as Stuck)")
    p.add_argument("--faults", default="", help="comma-separated kinds to draw from (default: all)")
    p.add_argument("--gateway-share", type=float, default=0.0,
                   help="share of rollouts (0 to 1) whose target is a Gateway API HTTPRoute (gateway-api/chat.yaml) "
                        "instead of an Istio VirtualService (istio/chat.yaml)")
    p.add_argument("--outputs-share", type=float, default=1.0,
                   help="share of rollouts (0 to 1, drawn by seed) whose policy also compares outputs over MQTT "
                        "(spec.analysis.outputs: a real Mosquitto, token-f1 against a fixed baseline, 30 pairs); "
                        "0 runs no broker, and the mqtt-* faults are then skipped")
    p.add_argument("--pairs-per-s", type=float, default=10.0,
                   help="paired primary/candidate output events published per second for each running rollout "
                        "that compares outputs (one publisher for all, the taps' stand-in)")
    p.add_argument("--rollout-timeout", type=float, default=180.0,
                   help="seconds after which an unfinished rollout is reported as Stuck:<phase>")
    p.add_argument("--out", type=Path, default=None,
                   help="the detailed result (per kind, every rollout's draw and outcome); "
                        "default: bench/results/faults-<seed>.json")
    p.add_argument("--summary", type=Path, default=REPO / "bench" / "results" / "faults.json",
                   help="the issue's summary: rollouts, faults per kind, violations (each with the write and the "
                        "invariant it broke), end phases; default: bench/results/faults.json")
    p.add_argument("--keep", action="store_true", help="keep the work folder (audit log, controller logs)")
    p.add_argument("--progress", action="store_true", help="print a line every 10 rollouts")
    p.add_argument("--no-record-argv", dest="record_argv", action="store_false",
                   help="leave the command line out of the results")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="shadowctl-faults-"))
    try:
        result, _ = asyncio.run(campaign(args, workdir))
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    out = args.out or REPO / "bench" / "results" / f"faults-{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({k: v for k, v in result.items() if k != "violations_all"}, indent=1) + "\n")
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary(result), indent=1) + "\n")
    print(f"{result['rollouts']} rollouts, seed {result['seed']}, {result['wall_s']} s: outcomes {result['outcomes']}; "
          f"{result['violations']} invariant violations; checked {result['checked']}")
    if result["outputs"]:
        print(f"  outputs: {result['outputs']}")
    for target, row in result["per_target"].items():
        if row["rollouts"]:
            print(f"  target {target:11} rollouts {row['rollouts']:4}  violations {row['violations']}  {row['outcomes']}")
    for kind, row in result["per_kind"].items():
        if row["rollouts"] or row["skipped"]:
            print(f"  {kind:18} rollouts {row['rollouts']:4}  skipped {row['skipped']:3}  "
                  f"violations {row['violations']}  {row['outcomes']}")
    print(f"written {out} and {args.summary}")
    return result


if __name__ == "__main__":
    main()
