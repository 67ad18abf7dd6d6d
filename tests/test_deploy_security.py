"""deploy/ as a security reviewer reads it: the pods' hardening, the NetworkPolicy, and the RBAC table of
docs/security.md, checked on the rendered manifests and by the real kube-apiserver.

* Every container of every pod under deploy/ (what ``kubectl kustomize deploy/`` renders, and the examples
  in deploy/examples/) carries the hardening fields itself; :func:`hardening_problems` is the checker, and a
  test drops each field in turn to show it notices.
* The API server accepts all of it in a server-side dry run, and its Pod Security admission ("restricted",
  the label deploy/namespace.yaml puts on the controller's namespace) admits every pod template.
* ``kubectl auth can-i --list`` for the controller's ServiceAccount, in its own namespace and in a workload
  namespace, equals the table in docs/security.md (the test fails if either changes without the other).
"""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest_kube import KubeEnv

from shadowctl.sim.cluster import find_binaries

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
EXAMPLES = sorted((DEPLOY / "examples").glob("*.yaml"))
SECURITY_DOC = REPO / "docs" / "security.md"
SA = "system:serviceaccount:shadowctl:shadowctl"
# A ServiceAccount nothing is bound to: what every authenticated caller may do (discovery, self reviews).
NOBODY = "system:serviceaccount:shadowctl:nobody-shadowctl-test"
# The only containers that mount a service-account token: the controller calls the API server.
TOKEN_CONTAINERS = {("Deployment", "shadowctl", "shadowctl", "controller")}
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
WORKLOAD_NAMESPACE = "llm"

JSON = dict[str, Any]


# ----------------------------------------------------------------------------------------------- rendering


def kubectl_binary() -> str:
    return str(find_binaries().kubectl)


def rendered_deploy() -> list[JSON]:
    """What `kubectl apply -k deploy/` sends: every object, as parsed YAML."""
    done = subprocess.run([kubectl_binary(), "kustomize", str(DEPLOY)], capture_output=True, text=True,
                          timeout=60, check=True)
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def rendered() -> list[JSON]:
    """deploy/ as kustomize renders it, then the examples of deploy/examples/."""
    docs = rendered_deploy()
    for path in EXAMPLES:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def pod_specs(docs: list[JSON]) -> Iterator[tuple[tuple[str, str, str], JSON]]:
    """(kind, namespace, name) and the pod spec of every object that makes pods."""
    for doc in docs:
        kind, meta, spec = doc.get("kind"), doc.get("metadata") or {}, doc.get("spec") or {}
        where = (str(kind), str(meta.get("namespace", "")), str(meta.get("name", "")))
        if kind == "Pod":
            yield where, spec
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield where, spec["template"]["spec"]
        elif kind == "CronJob":
            yield where, spec["jobTemplate"]["spec"]["template"]["spec"]


def hardening_problems(where: tuple[str, str, str], pod: JSON) -> list[str]:
    """Every hardening field a pod spec lacks, as 'Kind ns/name container: what'; empty when all are there.

    Each container must carry the fields itself (a container a patch adds must not lean on the pod's
    defaults), and the pod sets user and seccomp profile too, for containers it does not list (kubectl
    debug's ephemeral containers). A service-account token is mounted explicitly, by the containers of
    TOKEN_CONTAINERS only."""
    name = f"{where[0]} {where[1]}/{where[2]}"
    problems: list[str] = []
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: automountServiceAccountToken is not false")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(f"{name}: {key}")
    pod_context = pod.get("securityContext") or {}
    if pod_context.get("runAsNonRoot") is not True:
        problems.append(f"{name}: pod securityContext.runAsNonRoot is not true")
    if (pod_context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: pod securityContext.seccompProfile is not RuntimeDefault")
    token_volumes = {
        volume["name"] for volume in pod.get("volumes") or []
        if any("serviceAccountToken" in source for source in (volume.get("projected") or {}).get("sources") or [])
    }
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
    if not containers:
        problems.append(f"{name}: no containers")
    for container in containers:
        where_c = f"{name} container {container.get('name')}"
        context = container.get("securityContext") or {}
        if context.get("runAsNonRoot") is not True:
            problems.append(f"{where_c}: runAsNonRoot is not true")
        user = context.get("runAsUser")
        if not isinstance(user, int) or isinstance(user, bool) or user <= 0:
            problems.append(f"{where_c}: runAsUser is not a numeric non-root uid ({user!r})")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where_c}: allowPrivilegeEscalation is not false")
        if context.get("privileged"):
            problems.append(f"{where_c}: privileged")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where_c}: readOnlyRootFilesystem is not true")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{where_c}: capabilities.drop lacks ALL")
        if capabilities.get("add"):
            problems.append(f"{where_c}: capabilities.add {capabilities['add']}")
        if (context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where_c}: seccompProfile is not RuntimeDefault")
        mounts = container.get("volumeMounts") or []
        if (*where, container.get("name")) not in TOKEN_CONTAINERS:
            for mount in mounts:
                if mount.get("name") in token_volumes or mount.get("mountPath", "").startswith(TOKEN_PATH):
                    problems.append(f"{where_c}: mounts a service-account token it does not need")
    return problems


def test_every_container_under_deploy_is_hardened() -> None:
    docs = rendered()
    found = list(pod_specs(docs))
    names = {where for where, _ in found}
    # The controller and the tap example are both there (a kustomization that lost them would pass vacuously).
    assert ("Deployment", "shadowctl", "shadowctl") in names, names
    assert any(any(c["name"] == "tap" for c in pod["containers"]) for _, pod in found), names
    problems = [p for where, pod in found for p in hardening_problems(where, pod)]
    assert problems == []


def test_the_controller_mounts_its_token_explicitly() -> None:
    """automountServiceAccountToken is off, so the controller must mount the token itself where its
    in-cluster config reads it (shadowctl/kube/rest.py): token, CA and namespace."""
    [pod] = [pod for where, pod in pod_specs(rendered()) if where == ("Deployment", "shadowctl", "shadowctl")]
    [controller] = [c for c in pod["containers"] if c["name"] == "controller"]
    [mount] = [m for m in controller["volumeMounts"] if m["mountPath"] == TOKEN_PATH]
    assert mount.get("readOnly") is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    sources = volume["projected"]["sources"]
    paths = {s["serviceAccountToken"]["path"] for s in sources if "serviceAccountToken" in s}
    paths |= {item["path"] for s in sources if "configMap" in s for item in s["configMap"]["items"]}
    paths |= {item["path"] for s in sources if "downwardAPI" in s for item in s["downwardAPI"]["items"]}
    assert paths == {"token", "ca.crt", "namespace"}
    assert [s["configMap"]["name"] for s in sources if "configMap" in s] == ["kube-root-ca.crt"]
    [account] = [d for d in rendered() if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "shadowctl"]
    assert account.get("automountServiceAccountToken") is False


def _drop(*path: str | int) -> Callable[[JSON], None]:
    def mutate(pod: JSON) -> None:
        node: Any = pod
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


def _set(value: Any, *path: str | int) -> Callable[[JSON], None]:
    def mutate(pod: JSON) -> None:
        node: Any = pod
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


SC = ("containers", -1, "securityContext")
MUTATIONS: dict[str, Callable[[JSON], None]] = {
    "automount": _drop("automountServiceAccountToken"),
    "pod runAsNonRoot": _drop("securityContext", "runAsNonRoot"),
    "pod seccomp": _drop("securityContext", "seccompProfile"),
    "runAsNonRoot": _drop(*SC, "runAsNonRoot"),
    "runAsUser": _drop(*SC, "runAsUser"),
    "runAsUser root": _set(0, *SC, "runAsUser"),
    "allowPrivilegeEscalation": _drop(*SC, "allowPrivilegeEscalation"),
    "privileged": _set(True, *SC, "privileged"),
    "readOnlyRootFilesystem": _drop(*SC, "readOnlyRootFilesystem"),
    "capabilities": _drop(*SC, "capabilities"),
    "capabilities add": _set({"drop": ["ALL"], "add": ["NET_ADMIN"]}, *SC, "capabilities"),
    "seccomp": _set({"type": "Unconfined"}, *SC, "seccompProfile"),
    "hostNetwork": _set(True, "hostNetwork"),
    "token in another container": lambda pod: pod["containers"].append(
        {"name": "added", "image": "example", "securityContext": copy.deepcopy(pod["containers"][-1]["securityContext"]),
         "volumeMounts": [{"name": "token", "mountPath": TOKEN_PATH, "readOnly": True}]}),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_checker_notices_each_dropped_field(mutation: str) -> None:
    """Each hardening field, taken from the last container (the tap in the example, the controller in deploy/),
    is reported, and so is a token mounted into a container that needs none: the check above cannot pass
    with a field gone."""
    for where, pod in pod_specs(rendered()):
        assert hardening_problems(where, pod) == []
        changed = copy.deepcopy(pod)
        MUTATIONS[mutation](changed)
        assert hardening_problems(where, changed), (mutation, where)


def test_the_image_runs_as_the_numeric_user_of_the_manifests() -> None:
    """A numeric USER: runAsNonRoot can only be checked by the kubelet against a numeric uid."""
    users = re.findall(r"^USER\s+(\S+)\s*$", (REPO / "Dockerfile").read_text(), re.M)
    assert users, "the Dockerfile sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) > 0, users
    [pod] = [pod for where, pod in pod_specs(rendered()) if where == ("Deployment", "shadowctl", "shadowctl")]
    for container in pod["containers"]:
        assert (container["securityContext"]["runAsUser"], container["securityContext"]["runAsGroup"]) == (
            int(uid), int(gid))


def test_the_network_policy_selects_the_controller_and_opens_only_its_ports() -> None:
    docs = rendered()
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    [deployment] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "shadowctl"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    # Ingress: the metrics port, from the monitoring namespace only.
    [ingress] = policy["spec"]["ingress"]
    [controller] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "controller"]
    assert [(p["protocol"], p["port"]) for p in ingress["ports"]] == [("TCP", controller["ports"][0]["containerPort"])]
    assert ingress["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    # Egress: DNS, the API server, Prometheus, the broker (plain and TLS), webhooks; no rule without ports.
    ports = set()
    for rule in policy["spec"]["egress"]:
        assert rule.get("ports"), rule
        ports |= {(p["protocol"], p["port"]) for p in rule["ports"]}
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 6443), ("TCP", 9090), ("TCP", 1883),
                     ("TCP", 8883)}


# ------------------------------------------------------------------------------------- the real API server


@pytest.fixture
def kubectl(kube_env: KubeEnv, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    config = kube_env.direct_kubeconfig(tmp_path / "admin.kubeconfig", namespace=WORKLOAD_NAMESPACE)

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([kubectl_binary(), f"--kubeconfig={config}", *args], input=stdin, capture_output=True,
                              text=True, timeout=60, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    return run


def test_the_api_server_accepts_deploy_and_the_examples_in_a_dry_run(kubectl: Any) -> None:
    done = kubectl("apply", "-k", str(DEPLOY), "--dry-run=server")
    lines = done.stdout.splitlines()
    assert len(lines) == len(rendered_deploy()), done.stdout
    assert all(line.endswith("(server dry run)") for line in lines), done.stdout
    for path in EXAMPLES:
        example = kubectl("apply", "-f", str(path), "--dry-run=server")
        assert example.stdout.strip().endswith("(server dry run)"), example.stdout
        assert "PodSecurity" not in example.stderr, example.stderr
    # Nothing was created.
    assert kubectl("get", "deployment", "shadowctl", "-n", "shadowctl", check=False).returncode != 0


def _as_pod(pod: JSON, name: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shadowctl"},
                           "spec": pod})


def test_pod_security_restricted_admits_every_pod_and_refuses_a_weaker_one(kubectl: Any) -> None:
    """deploy/namespace.yaml labels the controller's namespace for the "restricted" Pod Security
    Standard: the API server itself then judges each pod template (as a Pod, in a server dry run)."""
    done = kubectl("apply", "-k", str(DEPLOY))
    assert "PodSecurity" not in done.stderr, done.stderr  # warn=restricted: a Deployment that breaks it is warned
    found = list(pod_specs(rendered()))
    for i, (_, pod) in enumerate(found):
        admitted = kubectl("apply", "--dry-run=server", "-f", "-", stdin=_as_pod(pod, f"hardening-{i}"))
        assert "created (server dry run)" in admitted.stdout, admitted
        assert "PodSecurity" not in admitted.stderr, admitted.stderr
    weaker = copy.deepcopy(found[0][1])
    del weaker["containers"][0]["securityContext"]["capabilities"]
    del weaker["containers"][0]["securityContext"]["allowPrivilegeEscalation"]
    refused = kubectl("apply", "--dry-run=server", "-f", "-", stdin=_as_pod(weaker, "weaker"), check=False)
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr
    assert "allowPrivilegeEscalation" in refused.stderr and "capabilities" in refused.stderr, refused.stderr


# ---------------------------------------------------------------------------------------------- RBAC table

ROW = re.compile(r"^(\S*)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")
Rule = tuple[str, str, str, str]  # namespaces, resource, resource names, verbs


def can_i_list(kubectl: Any, user: str, namespace: str) -> set[tuple[str, str, str, str]]:
    """`kubectl auth can-i --list` as rows (resource, non-resource URLs, resource names, verbs)."""
    out = kubectl("auth", "can-i", "--list", f"--as={user}", "-n", namespace, "--no-headers").stdout
    rows = set()
    for line in out.splitlines():
        match = ROW.match(line)
        assert match, f"unexpected line from kubectl auth can-i --list: {line!r}"
        rows.add((match[1], match[2], match[3], match[4]))
    return rows


def _words(text: str) -> str:
    return ", ".join(sorted(w for w in re.split(r"[\s,]+", text) if w))


def granted(kubectl: Any) -> set[Rule]:
    """What the controller may do beyond any authenticated caller: (namespaces, resource, names, verbs)."""
    per_namespace: dict[str, dict[tuple[str, str], set[str]]] = {}
    for namespace in ("shadowctl", WORKLOAD_NAMESPACE):
        rows = can_i_list(kubectl, SA, namespace) - can_i_list(kubectl, NOBODY, namespace)
        merged: dict[tuple[str, str], set[str]] = {}
        for resource, urls, names, verbs in rows:
            assert resource and not urls, f"a non-resource URL granted to the controller: {urls}"
            merged.setdefault((resource, _words(names)), set()).update(verbs.split())
        per_namespace[namespace] = merged
    rules = set()
    for namespace, merged in per_namespace.items():
        for key, allowed in merged.items():
            alike = {n for n, m in per_namespace.items() if m.get(key) == allowed}
            where = "all" if len(alike) == len(per_namespace) else namespace
            rules.add((where, key[0], key[1], ", ".join(sorted(allowed))))
    return rules


def documented() -> set[Rule]:
    """The table under '### What the controller may do' in docs/security.md."""
    text = SECURITY_DOC.read_text()
    start = text.index("### What the controller may do")
    lines = text[start:].splitlines()
    table = [line for line in lines[lines.index(next(x for x in lines if x.startswith("|"))):]]
    table = table[:next((i for i, x in enumerate(table) if not x.startswith("|")), len(table))]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["namespaces", "resource", "resource names", "verbs"], header
    rules = set()
    for line in table[2:]:
        cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]
        where, resource, names, verbs = cells
        rules.add((where, resource, _words("" if names == "-" else names), _words(verbs)))
    return rules


def test_kubectl_auth_can_i_list_equals_the_table_in_docs_security(kubectl: Any) -> None:
    kubectl("apply", "-k", str(DEPLOY))
    actual, doc = granted(kubectl), documented()
    assert actual, "kubectl auth can-i --list showed nothing granted to the controller"
    missing = sorted(actual - doc)
    extra = sorted(doc - actual)
    assert not missing and not extra, (
        "docs/security.md's RBAC table and the API server disagree.\n"
        f"granted but not in the table: {missing}\nin the table but not granted: {extra}\n"
        "Table rows as the API server has them:\n"
        + "\n".join(f"| {w} | `{r}` | {n or '-'} | {v} |" for w, r, n, v in sorted(actual)))
