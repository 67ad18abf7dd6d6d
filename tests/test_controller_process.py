"""The controller as a process: watch-driven workers, crashes between writes, two leaders, leader handover,
409 storms, Knative targets, and RBAC that matches exactly the calls the controller makes.

Everything is real (the local kube-apiserver with its RBAC, Leases and watches, reached through the fault
proxy; the Knative stand-in's webhook and controller; kubernetes.aio, routers, judge) except the metric
source, a double at the port (tests/controller_helpers.py). Conflicts come from real second writers
(:func:`controller_helpers.second_writer`, or a second controller), never from injected 409s.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest_kube import KubeEnv, eventually
from controller_helpers import (
    REF,
    REPO,
    VS_REF,
    Arm,
    FakeMetricSource,
    Harness,
    load_vs,
    policy_doc,
    second_writer,
    touch,
)
from fake_clock import FakeClock
from gateway_helpers import TARGET as GATEWAY_TARGET
from gateway_helpers import load_route
from kserve_helpers import kserve  # noqa: F401 - the fixture
from typer.testing import CliRunner

from shadowctl.aio import cancel_and_wait
from shadowctl.cli.app import app
from shadowctl.controller.analysis import Analyzer
from shadowctl.controller.manager import Manager, next_tick
from shadowctl.controller.notify import ClusterNotifier
from shadowctl.controller.reconciler import Reconciler
from shadowctl.kube import (
    HTTP_ROUTE,
    INFERENCE_SERVICE,
    KNATIVE_SERVICE,
    SECRET,
    SHADOW_POLICY,
    VIRTUAL_SERVICE,
    Forbidden,
    KubeClient,
    LeaderElector,
    NotFound,
    ResourceRef,
    RetryPolicy,
)
from shadowctl.policy.status import Phase, PolicyStatus
from shadowctl.routers._io import DEFAULT_ATTEMPTS
from shadowctl.routers.factory import router_for
from shadowctl.sources.base import ServerRef
from shadowctl.sources.routing import secret_connect


@pytest.fixture
async def h(kube_env: KubeEnv, kube_client: KubeClient) -> Harness:
    return Harness(kube_env, kube_client)


def test_next_tick_is_aligned() -> None:
    assert next_tick(100.0, 30.0) == 120.0
    assert next_tick(120.0, 30.0) == 150.0
    assert next_tick(0.5, 1.0) == 1.0


async def _drive(clock: FakeClock, until: Any, *, step: float = 10.0, rounds: int = 400) -> None:
    for _ in range(rounds):
        if await until():
            return
        clock.advance(step)
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_manager_runs_a_rollout_from_the_watch(h: Harness) -> None:
    manager = Manager(h.kube, h.reconciler, h.clock)
    task = asyncio.create_task(manager.run())
    try:
        await h.setup()

        async def done() -> bool:
            return (await h.status()).phase == "Succeeded"

        await _drive(h.clock, done)
        assert await h.weights() == (0, 100, None)
        assert manager.ready.is_set()
        # Deleting the policy stops its worker.
        await h.kube.delete(REF)  # finished: no finalizer holds it, the watch says DELETED
        await eventually(lambda: not manager.workers)
    finally:
        await cancel_and_wait(task)


async def test_policy_deleted_mid_rollout_restores_routes(h: Harness) -> None:
    manager = Manager(h.kube, h.reconciler, h.clock)
    task = asyncio.create_task(manager.run())
    try:
        await h.setup()

        async def canary() -> bool:
            return (await h.status()).phase == "Progressing"

        await _drive(h.clock, canary)
        assert (await h.weights())[1] == 10
        await h.kube.delete(REF)  # the finalizer holds it: the watch says MODIFIED (deletionTimestamp)

        async def restored_and_gone() -> bool:
            assert await h.weights() == (100, 0, None)
            with pytest.raises(NotFound):  # the finalizer was let go once the routes were restored
                await h.kube.get(REF)
            return True

        await eventually(restored_and_gone)
        await eventually(lambda: not manager.workers)
    finally:
        await cancel_and_wait(task)


async def test_crash_between_route_write_and_status_write_resumes_to_same_end(h: Harness) -> None:
    """Right after every route write the status write of that tick is refused (503, the first try and each
    retry: a 409 would be re-read and recorded within the tick, see test_controller_fencing.py): as if the
    process died between its route write and its status write. A fresh reconciler (a restarted process)
    continues; end state and invariants are the same, and a transition whose status write failed is
    recorded by the next tick, once."""
    await h.setup()
    failed_transitions = 0
    for _ in range(120):
        before = (await h.status()).history
        h.reconciler = Reconciler(h.kube, router_for, Analyzer(h.source), h.clock)  # "restart"
        with second_writer(h.kube, "replace", lambda gvr, obj: gvr == VIRTUAL_SERVICE,
                           lambda: h.env.fail_next(h.kube.retry.attempts, 503, verb="patch", path="/status$"),
                           times=1) as edits:
            result = await h.tick()
        after = (await h.status()).history
        if edits[0]:
            assert result.route_writes == 1 and result.error and "cannot write the status" in result.error, result
            failed_transitions += 1
            assert after == before  # nothing recorded
        else:
            assert not result.conflict and not result.error, result
        result = await h.tick(advance=0.5)  # the restarted process recomputes
        assert result.route_writes == 0, result  # the routes it finds are already right
        if (await h.status()).phase == "Succeeded":
            break
    assert (await h.status()).phase == "Succeeded"
    assert failed_transitions > 3
    h.check_invariants([10, 50])
    history = [t.to for t in (await h.status()).history]
    assert history == ["Shadowing", "Progressing", "Progressing", "Promoting", "Succeeded"]


async def test_two_controllers_that_both_think_they_lead_do_not_double_apply(h: Harness,
                                                                           kube_env: KubeEnv,
                                                                           tmp_path: Path) -> None:
    await h.setup()
    other_kube = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "kc2"),
                                          retry=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05))
    try:
        other = Reconciler(other_kube, router_for, Analyzer(h.source), h.clock)
        conflicts = 0
        for _ in range(80):
            h.clock.advance(10)
            a, b = await asyncio.gather(h.reconciler.tick(REF), other.tick(REF))
            conflicts += int(a.conflict) + int(b.conflict)
            primary, candidate, mirror = await h.weights()
            status = await h.status()
            h.history.append({"phase": status.phase, "primary": primary, "candidate": candidate,
                              "mirror": mirror, "step": status.step})
            if status.phase == "Succeeded":
                break
        assert (await h.status()).phase == "Succeeded"
        history = [t.to for t in (await h.status()).history]
        assert history == ["Shadowing", "Progressing", "Progressing", "Promoting", "Succeeded"]
        assert conflicts > 0  # they did race; the loser's write was refused
        h.check_invariants([10, 50])
    finally:
        await other_kube.close()


async def test_409_storm_on_routes_records_error_and_recovers(h: Harness) -> None:
    """Another writer edits the VirtualService after every read of it during one tick, so each of the
    router's conditional writes meets a newer version (real 409s from the API server): the tick gives
    up after its attempts, records why without moving the step, and a later tick completes."""
    await h.setup()
    await h.tick()
    await h.run_until({"Progressing"})
    assert (await h.weights())[1] == 10
    step = (await h.status()).step
    h.env.reset_counts()
    with second_writer(h.kube, "get", lambda ref: ref == VS_REF, lambda: touch(h.env, VIRTUAL_SERVICE, "llm", "chat")):
        for _ in range(10):  # until the step's analysis passes and 10% -> 50% is due
            result = await h.tick()
            if result.error or result.route_writes:
                break
    assert result.error is not None and "cannot set the routes" in result.error, result
    assert "409 Conflict" in result.error
    writes = [r for r in h.env.request_log if r.verb == "update" and "/virtualservices/chat" in r.path]
    assert [r.status for r in writes] == [409] * DEFAULT_ATTEMPTS  # each attempt re-read, none succeeded
    status = await h.status()
    ready = status.condition("Ready")
    assert ready.status == "False"
    assert status.phase == "Progressing"  # nothing half-applied: the step did not advance
    assert status.step == step
    assert (await h.weights())[1] == 10
    assert await h.run_until({"Succeeded"}) == "Succeeded"
    h.check_invariants([10, 50])


async def test_new_candidate_mid_rollout_restarts_analysis(h: Harness) -> None:
    await h.setup()
    await h.run_until({"Progressing"})
    doc = await h.kube.get(REF)
    doc["spec"]["target"]["istio"]["candidate"]["subset"] = "v3"
    doc["spec"]["analysis"]["variants"]["candidate"]["subset"] = "v3"
    doc["spec"]["analysis"]["variants"]["candidate"]["workload"] = "chat-v3"
    await h.kube.replace(SHADOW_POLICY, doc)
    await h.tick(advance=1)
    status = await h.status()
    assert status.phase == "Shadowing"
    assert "mid-rollout" in status.message
    route = await h.vs_route()
    assert route["mirror"]["subset"] == "v3"
    weights = {d["destination"]["subset"]: d.get("weight", 0) for d in route["route"]}
    assert weights.get("v2", 0) == 0
    assert weights.get("v3", 0) == 0


# --------------------------------------------------------------------------- leader election


async def test_leader_handover_mid_rollout(h: Harness, kube_env: KubeEnv, tmp_path: Path) -> None:
    """Two controller replicas with real Lease election (short durations); the leader dies mid-rollout."""
    await h.setup()
    clients = [await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / f"kc{i}")) for i in range(2)]
    electors = [LeaderElector(c, name="shadowctl", namespace="llm", identity=f"replica-{i}", lease_duration=0.6,
                              renew_deadline=0.4, retry_period=0.1) for i, c in enumerate(clients)]
    managers = [Manager(c, Reconciler(c, router_for, Analyzer(h.source), h.clock), h.clock) for c in clients]
    tasks = [asyncio.create_task(e.run(m.run)) for e, m in zip(electors, managers, strict=True)]
    try:
        async def canary() -> bool:
            return (await h.status()).phase == "Progressing"

        await _drive(h.clock, canary, step=5.0)
        leader = next(i for i, e in enumerate(electors) if e.is_leader)
        follower = 1 - leader
        assert not managers[follower].workers  # the stand-by runs no workers
        await cancel_and_wait(tasks[leader])  # the leader dies (releases the Lease on the way out)

        async def done() -> bool:
            return (await h.status()).phase == "Succeeded"

        await _drive(h.clock, done, step=5.0)
        assert electors[follower].is_leader
        history = [t.to for t in (await h.status()).history]
        assert history == ["Shadowing", "Progressing", "Progressing", "Promoting", "Succeeded"]
    finally:
        await cancel_and_wait(*tasks)
        for c in clients:
            await c.close()


# --------------------------------------------------------------------------- Knative + RBAC


KSVC = {
    "apiVersion": "serving.knative.dev/v1",
    "kind": "Service",
    "metadata": {"name": "summarize", "namespace": "llm"},
    "spec": {"template": {"metadata": {"annotations": {"v": "1"}},
                          "spec": {"containers": [{"image": "vllm/vllm-openai:v1"}]}}},
}

KNATIVE_POLICY = """
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {name: summarize, namespace: llm}
spec:
  target:
    knative: {service: summarize}
  canary: {steps: [20, 50], stepDuration: 20s}
  analysis:
    interval: 10s
    variants:
      primary: {revision: summarize-00001}
      candidate: {revision: summarize-00002}
    metrics:
      - {name: ttft-p95, preset: vllm-ttft, statistic: p95, margin: 10%, minSamples: 50}
  progressDeadline: 1h
"""


async def _ready_revision(kube: KubeClient, name: str) -> bool:
    status = (await kube.get(ResourceRef(KNATIVE_SERVICE, "summarize", "llm"))).get("status") or {}
    return status.get("latestReadyRevisionName") == name


async def _knative_setup(kube: KubeClient) -> None:
    """The Service with revision 1 serving, then revision 2 deployed with all traffic pinned to 1, and the policy.

    Knative's controller (the stand-in) creates each Revision and writes the Service's status a moment
    after the write, so each step waits for it, as a person deploying with kubectl would.
    """
    await kube.create(KNATIVE_SERVICE, KSVC)
    await eventually(lambda: _ready_revision(kube, "summarize-00001"))
    ref = ResourceRef(KNATIVE_SERVICE, "summarize", "llm")
    svc = await kube.get(ref)  # read after the status write: its resourceVersion is current
    svc["spec"]["template"]["metadata"]["annotations"]["v"] = "2"
    svc["spec"]["template"]["spec"]["containers"][0]["image"] = "vllm/vllm-openai:v2"
    svc["spec"]["traffic"] = [{"revisionName": "summarize-00001", "percent": 100}]
    await kube.replace(KNATIVE_SERVICE, svc)
    await eventually(lambda: _ready_revision(kube, "summarize-00002"))
    await kube.create(SHADOW_POLICY, yaml.safe_load(KNATIVE_POLICY))


ISVC_REF = ResourceRef(INFERENCE_SERVICE, "chat", "llm")


async def _kserve_predictor(kube: KubeClient, key: str, revision: str) -> bool:
    status = (await kube.get(ISVC_REF)).get("status") or {}
    return bool(((status.get("components") or {}).get("predictor") or {}).get(key) == revision)


async def _kserve_setup(kube: KubeClient) -> None:
    """kserve/chat.yaml's InferenceService rolled out (revision 1), then a new model applied as git holds it
    (canaryTrafficPercent 0: revision 2 ready, no traffic), and a policy stepping it. The KServe stand-in writes
    the status a moment after each write, so each step waits for it. The policy has no shadow phase: KServe's
    goes through the taps, which this test does not run; the InferenceService's grants are the router's."""
    await kube.create(INFERENCE_SERVICE, yaml.safe_load((REPO / "kserve" / "chat.yaml").read_text()))
    await eventually(lambda: _kserve_predictor(kube, "latestRolledoutRevision", "chat-predictor-00001"))
    isvc = await kube.get(ISVC_REF)
    isvc["spec"]["predictor"]["model"]["storageUri"] = "hf://example/llama-chat-v2"
    isvc["spec"]["predictor"]["canaryTrafficPercent"] = 0
    await kube.replace(INFERENCE_SERVICE, isvc)
    await eventually(lambda: _kserve_predictor(kube, "latestReadyRevision", "chat-predictor-00002"))
    policy = policy_doc(shadow=None)
    policy["metadata"]["name"] = "chat-kserve"
    policy["spec"]["target"] = {"kserve": {"inferenceService": "chat"}}
    await kube.create(SHADOW_POLICY, policy)


async def test_knative_canary_promoted(h: Harness) -> None:
    await _knative_setup(h.kube)
    ref = ResourceRef(SHADOW_POLICY, "summarize", "llm")
    ksvc = ResourceRef(KNATIVE_SERVICE, "summarize", "llm")
    seen: set[int] = set()
    for _ in range(60):
        h.clock.advance(10)
        await h.reconciler.tick(ref)
        traffic = (await h.kube.get(ksvc))["spec"]["traffic"]
        assert sum(int(t.get("percent") or 0) for t in traffic) == 100
        seen |= {int(t.get("percent") or 0) for t in traffic if t.get("revisionName") == "summarize-00002"}
        if ((await h.kube.get(ref)).get("status") or {}).get("phase") == "Succeeded":
            break
    assert ((await h.kube.get(ref)).get("status") or {})["phase"] == "Succeeded"
    assert seen <= {0, 20, 50, 100}
    assert {20, 50, 100} <= seen
    final = (await h.kube.get(ksvc))["spec"]["traffic"]
    assert [(t.get("revisionName"), t.get("percent")) for t in final if t.get("percent")] == [("summarize-00002", 100)]


async def _knative_three_revisions(kube: KubeClient, policy: dict[str, Any]) -> ResourceRef:
    """Revisions 1, 2 and 3 of the Service; 2 serves 90% and a `previous` tag keeps 10% on 1; 3 is the candidate."""
    await kube.create(KNATIVE_SERVICE, KSVC)
    await eventually(lambda: _ready_revision(kube, "summarize-00001"))
    ref = ResourceRef(KNATIVE_SERVICE, "summarize", "llm")
    for version in (2, 3):
        svc = await kube.get(ref)
        svc["spec"]["template"]["metadata"]["annotations"]["v"] = str(version)
        svc["spec"]["traffic"] = [{"revisionName": "summarize-00002" if version == 3 else "summarize-00001",
                                   "percent": 90},
                                  {"tag": "previous", "revisionName": "summarize-00001", "percent": 10}]
        await kube.replace(KNATIVE_SERVICE, svc)
        await eventually(lambda v=version: _ready_revision(kube, f"summarize-0000{v}"))
    await kube.create(SHADOW_POLICY, policy)
    return ref


@pytest.mark.parametrize("outcome", ["Succeeded", "RolledBack"])
async def test_knative_third_target_keeps_its_share(h: Harness, outcome: str) -> None:
    """A `previous` tag holding 10% through a whole canary (issue #17 item 4): each step's percent comes from
    the primary, checked after every tick on the Service the webhook accepted; promotion hands the primary's
    90% to the candidate, a rollback gives the primary its 90% back."""
    policy = yaml.safe_load(KNATIVE_POLICY)
    policy["spec"]["analysis"]["variants"] = {"primary": {"revision": "summarize-00002"},
                                              "candidate": {"revision": "summarize-00003"}}
    ksvc = await _knative_three_revisions(h.kube, policy)
    if outcome == "RolledBack":
        h.source.candidate = Arm(error_rate=0.08)
        policy_metrics = [{"name": "errors", "preset": "vllm-errors", "kind": "ratio", "statistic": "rate",
                           "margin": "1pp", "minSamples": 50}]
        await h.kube.patch_merge(ResourceRef(SHADOW_POLICY, "summarize", "llm"),
                                 {"spec": {"analysis": {"metrics": policy_metrics}}})
    ref = ResourceRef(SHADOW_POLICY, "summarize", "llm")
    seen: set[int] = set()
    phase = None
    for _ in range(60):
        h.clock.advance(10)
        await h.reconciler.tick(ref)
        traffic = (await h.kube.get(ksvc))["spec"]["traffic"]
        assert sum(int(t.get("percent") or 0) for t in traffic) == 100
        assert [t["percent"] for t in traffic if t.get("tag") == "previous"] == [10], traffic
        candidate = sum(int(t.get("percent") or 0) for t in traffic if t.get("revisionName") == "summarize-00003")
        seen.add(candidate)
        phase = ((await h.kube.get(ref)).get("status") or {}).get("phase")
        if phase in ("Succeeded", "RolledBack"):
            break
    assert phase == outcome
    final = [(t.get("tag"), t.get("revisionName"), t.get("percent")) for t in (await h.kube.get(ksvc))["spec"]["traffic"]]
    if outcome == "Succeeded":
        assert seen <= {0, 20, 50, 90} and {20, 50, 90} <= seen
        assert final == [(None, "summarize-00003", 90), ("previous", "summarize-00001", 10)]
    else:
        assert seen <= {0, 20}
        assert final == [(None, "summarize-00002", 90), ("previous", "summarize-00001", 10)]


def _rules(extra: Sequence[dict[str, Any]] = ()) -> set[tuple[str, str, str]]:
    """(group, resource, verb) granted by deploy/rbac.yaml and the ``extra`` RBAC documents."""
    allowed: set[tuple[str, str, str]] = set()
    for doc in [*yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()), *extra]:
        if doc and doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for res in rule["resources"]:
                        for verb in rule["verbs"]:
                            allowed.add((group, res, verb))
    return allowed


_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/[^/]+)?/(?P<res>[^/]+)(?:/[^/]+)?(?:/(?P<sub>status))?$")

SA_NAMESPACE, SA_NAME = "shadowctl", "shadowctl"  # deploy/rbac.yaml's ServiceAccount
SA_USER = f"system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}"
_RBAC_PATHS = {
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
}


def _apply(kube_env: KubeEnv, doc: dict[str, Any]) -> None:
    """Create ``doc`` as the admin, or replace it when it exists (as ``kubectl apply`` ends up doing)."""
    collection = _RBAC_PATHS[doc["kind"]].format(ns=doc["metadata"].get("namespace"))
    answer = kube_env.admin.post(collection, json=doc)
    if answer.status_code == 409:
        url = f"{collection}/{doc['metadata']['name']}"
        current = kube_env.admin.get(url).json()
        body = {**doc, "metadata": {**doc["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
        answer = kube_env.admin.put(url, json=body)
    assert answer.status_code in (200, 201), f"{doc['kind']} {doc['metadata']['name']}: {answer.text[:300]}"


def _allowed_for_sa(kube_env: KubeEnv, verb: str, group: str, resource: str, namespace: str | None = None,
                    name: str | None = None) -> bool:
    """What the API server's authorizer answers for the controller's ServiceAccount (a SubjectAccessReview)."""
    attributes = {"verb": verb, "group": group, "resource": resource, **({"namespace": namespace} if namespace else {}),
                  **({"name": name} if name else {})}
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
              "spec": {"user": SA_USER, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{SA_NAMESPACE}"],
                       "resourceAttributes": attributes}}
    answer = kube_env.admin.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", json=review)
    assert answer.status_code == 201, answer.text[:300]
    return bool(answer.json()["status"].get("allowed"))


@pytest.mark.usefixtures("kserve")
async def test_rbac_is_exactly_what_the_controller_uses(kube_env: KubeEnv, tmp_path: Path) -> None:
    """Apply deploy/rbac.yaml to the real API server and run the controller (leader election, Istio,
    Gateway API, Knative and KServe rollouts, one rolled back, Events, a policy's own Prometheus token Secret) AS its
    ServiceAccount, with a token from the TokenRequest API, through the fault proxy. Secrets: only the Role that
    `shadowctl rbac secrets` prints for a policy naming its token Secret (get, by resourceNames).

    The real RBAC authorizer refuses (403) any call the RBAC does not grant, so every rollout finishing
    without one shows the RBAC is enough; the proxy's log of every request the controller made shows
    it uses every grant, so the RBAC is no wider than needed."""
    for doc in yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()):
        if doc:
            _apply(kube_env, doc)
    # As deploy/rbac.yaml says: per namespace, the Role `shadowctl rbac secrets` prints for the policies there
    # (here one naming its own Prometheus and the token Secret "prom").
    naming = policy_doc()
    naming["spec"]["analysis"]["prometheus"] = {"url": "http://127.0.0.1:9", "bearerTokenSecret": "prom"}
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "own.yaml").write_text(yaml.safe_dump(naming))
    printed = CliRunner().invoke(app, ["rbac", "secrets", str(tmp_path / "policies")])
    assert printed.exit_code == 0, printed.output
    secret_rbac = [d for d in yaml.safe_load_all(printed.stdout) if d]
    assert [d["kind"] for d in secret_rbac] == ["Role", "RoleBinding"]
    for doc in secret_rbac:
        _apply(kube_env, doc)
    # The authorizer learns of new RBAC objects from its informers, a moment after they are stored.
    await eventually(lambda: _allowed_for_sa(kube_env, "create", "coordination.k8s.io", "leases", SA_NAMESPACE)
                     and _allowed_for_sa(kube_env, "get", "", "secrets", "llm", "prom")
                     and _allowed_for_sa(kube_env, "watch", "shadowctl.dev", "shadowpolicies"))
    assert not _allowed_for_sa(kube_env, "get", "", "secrets", "llm", "other")  # only the Secret named
    assert not _allowed_for_sa(kube_env, "list", "", "secrets", "llm")
    assert not _allowed_for_sa(kube_env, "get", "", "secrets", "models", "prom")  # not bound there
    token = kube_env.cluster.service_account_token(kube_env.admin, SA_NAMESPACE, SA_NAME, seconds=3600)

    setup = await KubeClient.connect(kubeconfig=kube_env.direct_kubeconfig(tmp_path / "setup"))  # not via the proxy
    h = Harness(kube_env, setup)
    await h.setup()
    await _knative_setup(setup)
    await _kserve_setup(setup)
    bad = policy_doc()
    bad["metadata"]["name"] = "chat-bad"
    bad["spec"]["target"]["istio"]["virtualService"] = "chat-bad"
    vs = load_vs()
    vs["metadata"]["name"] = "chat-bad"
    await setup.create(VIRTUAL_SERVICE, vs)
    await setup.create(SHADOW_POLICY, bad)
    gateway = policy_doc()
    gateway["metadata"]["name"] = "chat-gateway"
    gateway["spec"]["target"] = {"gatewayAPI": GATEWAY_TARGET}
    await setup.create(HTTP_ROUTE, load_route())
    await setup.create(SHADOW_POLICY, gateway)
    await setup.create(SECRET, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "prom", "namespace": "llm"},
                                "data": {"token": base64.b64encode(b"t0k3n").decode()}})

    kube = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "controller", token=token))
    with pytest.raises(Forbidden):  # the controller really runs as the ServiceAccount, not as an admin
        await kube.list(SECRET, "llm")
    kube_env.reset_counts()
    clock = FakeClock()
    # A policy naming its own Prometheus and token Secret: the controller's connect reads the Secret.
    own = await secret_connect(kube, {})(ServerRef("http://127.0.0.1:9", ("llm", "prom")))
    await own.aclose()
    source = FakeMetricSource()
    reconciler = Reconciler(kube, router_for, Analyzer(source), clock, notifier=ClusterNotifier(kube, clock))
    manager = Manager(kube, reconciler, clock)
    elector = LeaderElector(kube, name="shadowctl", namespace=SA_NAMESPACE, identity="me", lease_duration=0.6,
                            renew_deadline=0.4, retry_period=0.1)
    task = asyncio.create_task(elector.run(manager.run))
    phases: dict[str, Any] = {}
    try:
        async def all_done() -> bool:
            for name in ("chat", "summarize", "chat-bad", "chat-gateway", "chat-kserve"):
                obj = await setup.get(ResourceRef(SHADOW_POLICY, name, "llm"))
                phases[name] = (obj.get("status") or {}).get("phase")
            return set(phases.values()) <= {"Succeeded", "RolledBack"}

        # chat-bad gets the slow candidate: make the source slow for it only by policy key.
        original = source.fetch_many

        async def per_policy(requests: Any) -> Any:
            out = await original(requests)
            for req in requests:
                if req.key.policy == "llm/chat-bad" and req.key.metric == "ttft-p95":
                    slow = FakeMetricSource(candidate=Arm(median=0.8))
                    out[req.key] = (await slow.fetch_many([req]))[req.key]
            return out

        source.fetch_many = per_policy  # type: ignore[method-assign]
        await _drive(clock, all_done, step=10.0, rounds=600)
    finally:
        await cancel_and_wait(task)
        await kube.close()
        await setup.close()
    assert phases == {"chat": "Succeeded", "summarize": "Succeeded", "chat-bad": "RolledBack",
                      "chat-gateway": "Succeeded", "chat-kserve": "Succeeded"}
    records = list(kube_env.request_log)
    refused = [(r.verb, r.path, r.status) for r in records if r.status in (401, 403)]
    assert not refused, f"the API server refused the controller: {refused[:10]}"
    used: set[tuple[str, str, str]] = set()
    for record in records:
        m = _PATH.match(record.path.split("?", 1)[0])
        assert m, record.path
        res = m.group("res") + ("/status" if m.group("sub") else "")
        used.add((m.group("group") or "", res, record.verb))
    allowed = _rules(secret_rbac)
    assert used <= allowed, f"calls the RBAC does not allow: {sorted(used - allowed)}"
    assert allowed <= used, f"RBAC grants what the controller never uses: {sorted(allowed - used)}"


async def test_a_missing_verb_is_a_clear_forbidden_and_nothing_else_is_written(kube_env: KubeEnv,
                                                                               tmp_path: Path) -> None:
    """deploy/rbac.yaml less one verb (``update`` on virtualservices), the controller as its ServiceAccount.

    The real authorizer refuses the route write; the policy's Ready condition then carries the API
    server's own words (verb, resource, API group, namespace), the VirtualService is exactly as it was,
    and the rollout does not move on as if traffic had been shifted."""
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()) if d]
    controller_role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "shadowctl-controller")
    full = [dict(rule) for rule in controller_role["rules"]]
    for rule in controller_role["rules"]:
        if rule["resources"] == ["virtualservices"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "update"]
    assert controller_role["rules"] != full
    for doc in docs:
        _apply(kube_env, doc)
    try:
        await eventually(lambda: _allowed_for_sa(kube_env, "get", "networking.istio.io", "virtualservices", "llm")
                         and not _allowed_for_sa(kube_env, "update", "networking.istio.io", "virtualservices", "llm"))
        setup = await KubeClient.connect(kubeconfig=kube_env.direct_kubeconfig(tmp_path / "setup"))
        token = kube_env.cluster.service_account_token(kube_env.admin, SA_NAMESPACE, SA_NAME, seconds=3600)
        kube = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "controller", token=token))
        try:
            await Harness(kube_env, setup).setup()
            before = await setup.get(VS_REF)
            kube_env.reset_counts()
            clock = FakeClock()
            reconciler = Reconciler(kube, router_for, Analyzer(FakeMetricSource()), clock)
            errors = []
            for _ in range(4):
                clock.advance(10)
                errors.append((await reconciler.tick(REF)).error)
            after = await setup.get(VS_REF)
            status = PolicyStatus.of(await setup.get(REF))
        finally:
            await kube.close()
            await setup.close()
    finally:
        controller_role["rules"] = full
        _apply(kube_env, controller_role)

    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["spec"] == before["spec"]
    assert status.phase is Phase.pending, status
    ready = status.condition("Ready")
    assert ready.status == "False" and ready.reason == "ReconcileError"
    words = ready.message
    for part in ('"system:serviceaccount:shadowctl:shadowctl"', 'cannot update resource "virtualservices"',
                 'in API group "networking.istio.io"', 'in the namespace "llm"'):
        assert part in words, words
    assert all(e and "Forbidden" in e for e in errors[1:]), errors
    # Nothing else was written: the controller's requests, as the proxy saw them, are reads, the
    # finalizer and the status (with the error), and the refused route update.
    writes = [(r.verb, r.path.split("?")[0], r.status) for r in kube_env.request_log
              if r.verb not in ("get", "list", "watch")]
    policy_path = "/apis/shadowctl.dev/v1alpha1/namespaces/llm/shadowpolicies/chat"
    vs_path = "/apis/networking.istio.io/v1/namespaces/llm/virtualservices/chat"
    assert {path for _, path, _ in writes} <= {policy_path, policy_path + "/status", vs_path}, writes
    assert [status for verb, path, status in writes if path == vs_path] and all(
        status == 403 for verb, path, status in writes if path == vs_path), writes
