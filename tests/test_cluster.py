"""The local control plane as a user meets it: the real kubectl against the real kube-apiserver.

What the emulator got wrong and a cluster does not: `kubectl apply -k deploy/`,
printer columns, server-side dry runs that change nothing, the CRD's own
validation (OpenAPI and CEL), least-privilege RBAC, and `shadowctl sim cluster`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest_kube import KubeEnv
from kserve_helpers import kserve  # noqa: F401 - the fixture

from shadowctl.kube import SHADOW_POLICY, KubeClient
from shadowctl.sim.cluster import KSERVE_CRD_FILE, SHARED_CRDS, LocalCluster, find_binaries
from shadowctl.sim.faultproxy import verb_of

REPO = Path(__file__).resolve().parent.parent
SA = "system:serviceaccount:shadowctl:shadowctl"


@pytest.fixture
def kubectl(kube_env: KubeEnv, tmp_path: Path) -> Any:
    config = kube_env.direct_kubeconfig(tmp_path / "admin.kubeconfig", namespace="llm")
    binary = str(find_binaries().kubectl)

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([binary, f"--kubeconfig={config}", *args], input=stdin, capture_output=True,
                              text=True, timeout=60, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    return run


def policy(path: str = "policies/chat-istio.yaml") -> dict[str, Any]:
    doc = yaml.safe_load((REPO / path).read_text())
    assert isinstance(doc, dict)
    return doc


def test_kubectl_and_server_report_the_pinned_version(kubectl: Any) -> None:
    pinned = re.search(r"^\s*k8s.io/kubernetes (v\S+)",  (REPO / "hack/kube/go.mod").read_text(), re.M)
    assert pinned is not None
    versions = yaml.safe_load(kubectl("version", "-o", "yaml").stdout)
    assert versions["clientVersion"]["gitVersion"] == pinned.group(1)
    assert versions["serverVersion"]["gitVersion"] == pinned.group(1)


def test_apply_k_deploy_creates_every_object(kubectl: Any, kube_env: KubeEnv) -> None:
    out = kubectl("apply", "-k", str(REPO / "deploy")).stdout
    for created in ("namespace/shadowctl", "customresourcedefinition.apiextensions.k8s.io/shadowpolicies.shadowctl.dev",
                    "serviceaccount/shadowctl", "clusterrole.rbac.authorization.k8s.io/shadowctl-controller",
                    "deployment.apps/shadowctl"):
        assert created in out, out
    deployment = yaml.safe_load(kubectl("get", "deployment", "shadowctl", "-n", "shadowctl", "-o", "yaml").stdout)
    assert deployment["spec"]["replicas"] == 2
    # Applied a second time, nothing changes.
    again = kubectl("apply", "-k", str(REPO / "deploy")).stdout
    assert "deployment.apps/shadowctl unchanged" in again, again


def test_printer_columns_show_phase_weight_mirror_verdict(kubectl: Any, kube_env: KubeEnv) -> None:
    doc = policy()
    doc["status"] = {"phase": "Progressing", "canaryWeight": 20, "mirrorPercent": 0,
                     "lastVerdict": {"outcome": "pass"}}
    kube_env.put_object(SHADOW_POLICY, doc)
    lines = kubectl("get", "shadowpolicies", "-n", "llm").stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "WEIGHT", "MIRROR", "VERDICT", "AGE"], lines
    assert lines[1].split()[:5] == [doc["metadata"]["name"], "Progressing", "20", "0", "pass"], lines
    # The short name works too.
    assert doc["metadata"]["name"] in kubectl("get", "shp", "-n", "llm").stdout


def test_server_dry_runs_change_nothing(kubectl: Any, kube_env: KubeEnv, tmp_path: Path) -> None:
    doc = policy()
    name = doc["metadata"]["name"]
    before = kube_env.put_object(SHADOW_POLICY, doc)
    changed = policy()
    changed["spec"]["canary"]["steps"] = [10, 30, 60]
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(changed))
    out = kubectl("apply", "--dry-run=server", "-f", str(path)).stdout
    assert "(server dry run)" in out, out
    diff = kubectl("diff", "-f", str(path), check=False)
    assert diff.returncode == 1 and "+    - 30" in diff.stdout, diff
    kubectl("delete", "shadowpolicies", "--all", "-n", "llm", "--dry-run=server")
    after = kube_env.get_object(SHADOW_POLICY, "llm", name)
    assert after is not None, "a server dry-run delete deleted the policy"
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["spec"]["canary"]["steps"] == doc["spec"]["canary"]["steps"]


def test_the_server_refuses_decreasing_steps_with_the_field_path(kubectl: Any, tmp_path: Path) -> None:
    doc = policy()
    doc["spec"]["canary"]["steps"] = [50, 20]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    done = kubectl("apply", "-f", str(path), check=False)
    assert done.returncode != 0
    assert "spec.canary.steps" in done.stderr and "steps must be strictly increasing" in done.stderr, done.stderr
    doc["spec"]["canary"]["steps"] = [20, 20]
    path.write_text(yaml.safe_dump(doc))
    assert "strictly increasing" in kubectl("apply", "-f", str(path), check=False).stderr


def test_the_server_refuses_a_knative_target_that_mirrors_without_a_virtualservice(
    kubectl: Any, tmp_path: Path
) -> None:
    doc = policy("policies/knative-canary.yaml")
    doc["spec"]["shadow"] = {"mirrorPercent": 10}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    done = kubectl("apply", "-f", str(path), check=False)
    assert done.returncode != 0
    assert "spec.shadow" in done.stderr and "cannot mirror by itself" in done.stderr, done.stderr
    doc["spec"]["shadow"]["mode"] = "tap"
    path.write_text(yaml.safe_dump(doc))
    done = kubectl("apply", "-f", str(path), check=False)  # the taps get their setting over MQTT
    assert done.returncode != 0
    assert "shadow.mode: tap needs spec.analysis.outputs.mqtt" in done.stderr, done.stderr
    doc["spec"]["analysis"]["outputs"] = {
        "mqtt": {"broker": "mqtt://mosquitto.shadowctl.svc:1883", "topic": "shadowctl/outputs/llm/summarize/+"},
        "comparators": [{"name": "token-f1"}]}
    path.write_text(yaml.safe_dump(doc))
    kubectl("apply", "-f", str(path))


def test_the_server_refuses_a_gateway_api_target_with_a_mirror_virtualservice(kubectl: Any, tmp_path: Path) -> None:
    doc = policy("policies/chat-gateway-api.yaml")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    kubectl("apply", "-f", str(REPO / "gateway-api" / "chat.yaml"), "-f", str(path))  # both as committed
    doc["spec"]["shadow"]["virtualService"] = {"name": "chat", "candidate": {"host": "chat-v2"}}
    path.write_text(yaml.safe_dump(doc))
    done = kubectl("apply", "-f", str(path), check=False)
    assert done.returncode != 0
    assert "spec.shadow.virtualService" in done.stderr and "the HTTPRoute mirrors itself" in done.stderr, done.stderr


@pytest.mark.usefixtures("kserve")
def test_the_kserve_example_is_accepted_and_a_kserve_target_that_mirrors_is_refused(
    kubectl: Any, tmp_path: Path
) -> None:
    doc = policy("policies/chat-kserve.yaml")
    path = tmp_path / "kserve.yaml"
    path.write_text(yaml.safe_dump(doc))
    kubectl("apply", "-f", str(REPO / "kserve" / "chat.yaml"), "-f", str(path))  # both as committed
    for shadow in ({"mirrorPercent": 10}, {"mirrorPercent": 10, "mode": "istio"},
                   {"mirrorPercent": 10, "mode": "tap", "virtualService": {"name": "chat", "candidate": {"host": "x"}}}):
        doc["spec"]["shadow"] = shadow
        path.write_text(yaml.safe_dump(doc))
        done = kubectl("apply", "-f", str(path), check=False)
        assert done.returncode != 0, shadow
        assert "spec.shadow" in done.stderr and "a KServe target cannot mirror" in done.stderr, done.stderr
    kubectl("delete", "-f", str(REPO / "kserve" / "chat.yaml"))


def test_unknown_fields_are_refused_and_explain_works(kubectl: Any, tmp_path: Path) -> None:
    doc = policy()
    doc["spec"]["canary"]["stepz"] = [1]
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(doc))
    done = kubectl("apply", "-f", str(path), check=False)
    assert done.returncode != 0 and 'unknown field "spec.canary.stepz"' in done.stderr, done.stderr
    explained = kubectl("explain", "shadowpolicy.spec.canary.steps").stdout
    assert "FIELD: steps" in explained and "<[]integer>" in explained, explained


@pytest.mark.parametrize(
    ("verb", "resource", "where", "allowed"),
    [
        ("update", "virtualservices.networking.istio.io", ["-n", "llm"], "yes"),
        ("update", "httproutes.gateway.networking.k8s.io", ["-n", "llm"], "yes"),
        ("delete", "httproutes.gateway.networking.k8s.io", ["-n", "llm"], "no"),
        ("update", "inferenceservices.serving.kserve.io", ["-n", "llm"], "yes"),
        ("delete", "inferenceservices.serving.kserve.io", ["-n", "llm"], "no"),
        ("patch", "inferenceservices.serving.kserve.io", ["-n", "llm"], "no"),
        ("patch", "shadowpolicies.shadowctl.dev/status", ["-n", "llm"], "yes"),
        ("create", "leases.coordination.k8s.io", ["-n", "shadowctl"], "yes"),
        ("delete", "virtualservices.networking.istio.io", ["-n", "llm"], "no"),
        ("delete", "services.serving.knative.dev", ["-n", "llm"], "no"),
        ("get", "secrets", ["-A"], "no"),
        ("get", "secrets", ["-n", "llm"], "no"),
        ("list", "pods", ["-A"], "no"),
        ("create", "leases.coordination.k8s.io", ["-n", "llm"], "no"),
        ("update", "shadowpolicies.shadowctl.dev", ["-n", "llm"], "no"),
    ],
)
def test_the_controller_has_least_privilege(
    kubectl: Any, verb: str, resource: str, where: list[str], allowed: str, request: pytest.FixtureRequest
) -> None:
    if "kserve" in resource:
        request.getfixturevalue("kserve")  # kubectl resolves the resource only once its CRD is installed
    kubectl("apply", "-k", str(REPO / "deploy"))
    done = kubectl("auth", "can-i", verb, resource, *where, f"--as={SA}", check=False)
    assert done.stdout.strip() == allowed, (verb, resource, where, done.stdout, done.stderr)


def test_secrets_are_granted_by_name_per_namespace(kubectl: Any, tmp_path: Path) -> None:
    """deploy/ grants no Secret; `shadowctl rbac secrets` piped to kubectl grants `get` on exactly the Secrets the
    policies name, in their namespace (tests/test_secrets_rbac.py reads them as the ServiceAccount)."""
    kubectl("apply", "-k", str(REPO / "deploy"))
    own = policy()
    own["spec"]["analysis"]["prometheus"] = {"url": "https://thanos.tenant:10902", "bearerTokenSecret": "prom-token"}
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(own))
    printed = subprocess.run([sys.executable, "-m", "shadowctl", "rbac", "secrets", str(tmp_path / "own.yaml")],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    kubectl("apply", "-f", "-", stdin=printed)

    def can_i(verb: str, what: str, namespace: str) -> str:
        return str(kubectl("auth", "can-i", verb, what, "-n", namespace, f"--as={SA}", check=False).stdout.strip())

    assert can_i("get", "secret/prom-token", "llm") == "yes"
    assert can_i("get", "secret/other", "llm") == "no"
    assert can_i("get", "secrets", "llm") == "no" and can_i("list", "secrets", "llm") == "no"
    assert can_i("get", "secret/prom-token", "models") == "no"


def test_sim_cluster_runs_until_sigterm_and_cleans_up(tmp_path: Path, local_cluster: LocalCluster) -> None:
    """`shadowctl sim cluster`: a second, separate control plane, as a user starts it."""
    config = tmp_path / "kc"
    env = {**os.environ, "SHADOWCTL_CLUSTER_TMP": str(tmp_path)}
    with subprocess.Popen([sys.executable, "-m", "shadowctl", "sim", "cluster", "--kubeconfig", str(config)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        line = _run_sim_cluster(proc, config, tmp_path)
    # Both processes are gone: nothing still listens on the server's port.
    port = int(line.split(":")[2].split()[0])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def _run_sim_cluster(proc: subprocess.Popen[str], config: Path, tmp_path: Path) -> str:
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready https://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        assert "kube-apiserver v1.37" in line and "etcd 3.6" in line, line
        data_dirs = list(tmp_path.glob("shadowctl-cluster-*"))
        assert len(data_dirs) == 1
        kubectl = str(find_binaries().kubectl)
        crds = subprocess.run([kubectl, f"--kubeconfig={config}", "get", "crd", "-o", "name"], capture_output=True,
                              text=True, timeout=60, check=True).stdout
        kserve = ("inferenceservices.serving.kserve.io",) if (SHARED_CRDS / KSERVE_CRD_FILE).is_file() else ()
        for name in ("shadowpolicies.shadowctl.dev", "virtualservices.networking.istio.io",
                     "services.serving.knative.dev", "httproutes.gateway.networking.k8s.io", *kserve):
            assert name in crds
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not config.exists() and not data_dirs[0].exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return line


async def test_controller_events_show_in_kubectl_describe(kubectl: Any, kube_env: KubeEnv,
                                                          kube_client: KubeClient) -> None:
    stored = kube_env.put_object(SHADOW_POLICY, policy())
    await kube_client.create_event(stored, reason="ShadowStarted", message="mirroring 20% to the candidate")
    described = kubectl("describe", "shadowpolicy", stored["metadata"]["name"], "-n", "llm").stdout
    events = described[described.index("Events:"):]
    assert "ShadowStarted" in events and "mirroring 20% to the candidate" in events, events
    # The same Event through events.k8s.io/v1, the API kubectl's newer commands read.
    listed = yaml.safe_load(kubectl("get", "events.v1.events.k8s.io", "-n", "llm", "-o", "yaml").stdout)
    assert [e["note"] for e in listed["items"]] == ["mirroring 20% to the candidate"]


@pytest.mark.parametrize(
    ("method", "path", "query", "verb"),
    [
        ("GET", "/apis/networking.istio.io/v1/namespaces/llm/virtualservices/chat", {}, "get"),
        ("GET", "/apis/networking.istio.io/v1/namespaces/llm/virtualservices", {}, "list"),
        ("GET", "/apis/networking.istio.io/v1/virtualservices", {}, "list"),
        ("GET", "/apis/networking.istio.io/v1/namespaces/llm/virtualservices", {"watch": "true"}, "watch"),
        ("GET", "/api/v1/namespaces/llm", {}, "get"),
        ("GET", "/api/v1/namespaces", {}, "list"),
        ("GET", "/apis/shadowctl.dev/v1alpha1/namespaces/llm/shadowpolicies/chat/status", {}, "get"),
        ("PATCH", "/apis/shadowctl.dev/v1alpha1/namespaces/llm/shadowpolicies/chat/status", {}, "patch"),
        ("PUT", "/apis/coordination.k8s.io/v1/namespaces/llm/leases/x", {}, "update"),
        ("POST", "/api/v1/namespaces/llm/events", {}, "create"),
        ("DELETE", "/api/v1/namespaces/llm/secrets/s", {}, "delete"),
    ],
)
def test_fault_proxy_names_the_kubernetes_verb(method: str, path: str, query: dict[str, str], verb: str) -> None:
    assert verb_of(method, path, query) == verb
