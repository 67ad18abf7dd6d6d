"""The README's examples run as written (issue #20 item 5).

Every ``shadowctl`` command in the README's ``sh`` blocks is parsed out of the README itself (line
continuations joined, comments dropped) and run in a subprocess from the repository root, as a reader
who typed it would: the offline ones (``--help``, ``validate``, ``render``) as they are; the cluster
ones (``apply``, ``status --watch``, ``run``, ``promote``) against the real local control plane with
``KUBECONFIG`` pointing at it, as the README says ("against any cluster your kubeconfig reaches").
The one change to what is written: ``run`` also gets ``--listen`` on a free port, since the default
``:8080`` may be taken on a shared machine. The ``kubectl`` examples (the plugin, the Argo CD health
check's install) run with the real kubectl of .venv/bin against the same control plane. A README
example of a command this file does not know fails :func:`test_every_readme_command_is_covered`, so a
new example cannot go untried.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from conftest_kube import KubeEnv

from shadowctl.kube import SHADOW_POLICY
from shadowctl.kube.refs import GVR

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SHADOWCTL = str(Path(sys.executable).parent / "shadowctl")
OFFLINE = {"--help", "validate", "render"}
CLUSTER = {"apply", "status", "run", "promote"}
LEASES = GVR("coordination.k8s.io", "v1", "leases", "")
KUBECTL = str(Path(sys.executable).parent / "kubectl")
ARGOCD_PATCH = ["kubectl", "-n", "argocd", "patch", "configmap", "argocd-cm", "--type", "merge", "--patch-file",
                "deploy/argocd/argocd-cm-patch.yaml"]
GRAFANA = [["kubectl", "-n", "monitoring", "create", "configmap", "shadowctl-dashboard",
            "--from-file=deploy/grafana/shadowctl.json"],
           ["kubectl", "-n", "monitoring", "label", "configmap", "shadowctl-dashboard", "grafana_dashboard=1"]]


def readme_commands(text: str | None = None, program: str = "shadowctl") -> list[list[str]]:
    """Each ``program ...`` command line of the README's ``sh`` blocks, as argv."""
    text = README.read_text(encoding="utf-8") if text is None else text
    found = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == program:
                found.append(argv)
    return found


def by_command(name: str) -> list[str]:
    matches = [argv for argv in readme_commands() if argv[1] == name]
    assert len(matches) == 1, f"expected one README example of `shadowctl {name}`, found {matches}"
    return matches[0]


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SHADOWCTL, *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_the_parser_reads_continuations_and_comments() -> None:
    text = "x\n```sh\nshadowctl a b \\\n    --c d   # why\nls\n```\n```\nshadowctl not-sh\n```\n"
    assert readme_commands(text) == [["shadowctl", "a", "b", "--c", "d"]]


def test_every_readme_command_is_covered() -> None:
    names = [argv[1] for argv in readme_commands()]
    assert set(names) == OFFLINE | CLUSTER, "a README example that no test runs: add it to tests/test_readme.py"
    kubectl = readme_commands(program="kubectl")
    assert [argv for argv in kubectl if argv[1] != "shadow"] == [ARGOCD_PATCH, *GRAFANA], kubectl
    assert [argv[2] for argv in kubectl if argv[1] == "shadow"] == ["status"]


def test_offline_examples_run_as_written() -> None:
    for argv in readme_commands():
        if argv[1] not in OFFLINE:
            continue
        done = run(argv)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        if argv[1] == "validate":
            assert "policies/chat-istio.yaml" in done.stdout, done.stdout
        if argv[1] == "render":
            # The candidate's share goes to the port the primary's destination has (the new-user finding):
            # the diff adds the candidate's destination with `port: number: 8000`.
            added = [line[1:] for line in done.stdout.splitlines() if line.startswith("+") and not line.startswith("+++")]
            block = "\n".join(added)
            assert re.search(r"subset: v2\n\s+port:\n\s+number: 8000\n\s+weight: 10", block), done.stdout
            assert "weight: 90" in block


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_cluster_examples_run_as_written(kube_env: KubeEnv, tmp_path: Path) -> None:
    env = {**os.environ, "KUBECONFIG": str(kube_env.kubeconfig(tmp_path / "kubeconfig")), "COLUMNS": "200"}

    apply = by_command("apply")
    done = run(apply, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "shadowpolicy llm/chat-llama created"

    # status --watch: in a pipe each change is printed below the last; Ctrl-C ends it with 0.
    watch = subprocess.Popen([SHADOWCTL, *by_command("status")[1:]], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert watch.stdout is not None
        first = watch.stdout.readline()
        lines = [first]
        while "Phase" not in lines[-1]:
            lines.append(watch.stdout.readline())
        assert any("shadowpolicy llm/chat-llama" in line for line in lines), lines
    finally:
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=20)
    assert watch.returncode == 0, err

    # The controller, as written (plus a free --listen port): it takes the Lease and writes the policy's .status.
    controller = by_command("run")
    proc = subprocess.Popen([SHADOWCTL, *controller[1:], "--listen", f"127.0.0.1:{_free_port()}"], cwd=REPO,
                            env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: (kube_env.get_object(SHADOW_POLICY, "llm", "chat-llama") or {}).get("status"), 60,
              "the controller to write .status")
        lease = kube_env.get_object(LEASES, "shadowctl", "shadowctl-controller")
        assert lease is not None and lease["spec"].get("holderIdentity")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-3000:]

    # promote: what a person runs when a rollout waits for approval (the controller's status put in its place).
    kube_env.patch_status(SHADOW_POLICY, "llm", "chat-llama", {"status": {
        "phase": "WaitingPromotion", "step": 3, "canaryWeight": 50,
        "rollout": {"phase": "WaitingPromotion", "step": 3, "canaryWeight": 50}}})
    done = run(by_command("promote"), env)
    assert done.returncode == 0, done.stderr
    obj = kube_env.get_object(SHADOW_POLICY, "llm", "chat-llama")
    assert obj is not None and '"promote"' in obj["metadata"]["annotations"]["shadowctl.dev/command"]



def test_kubectl_examples_run_as_written(kube_env: KubeEnv, tmp_path: Path) -> None:
    """The plugin through the real kubectl (kubectl-shadow found on PATH), the argocd-cm patch, and the
    Grafana dashboard's ConfigMap."""
    env = {**os.environ, "KUBECONFIG": str(kube_env.direct_kubeconfig(tmp_path / "kubeconfig")),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200"}
    policy = next(d for d in yaml.safe_load_all((REPO / "policies" / "chat-istio.yaml").read_text()) if d)
    kube_env.put_object(SHADOW_POLICY, policy)
    kubectl = readme_commands(program="kubectl")
    shadow = next(argv for argv in kubectl if argv[1] == "shadow")
    done = subprocess.run([KUBECTL, *shadow[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "shadowpolicy llm/chat-llama"

    def kubectl_run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([KUBECTL, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                              check=check)

    kubectl_run("create", "namespace", "argocd", check=False)  # kept across tests: namespaces never finish deleting
    kubectl_run("-n", "argocd", "delete", "configmap", "argocd-cm", "--ignore-not-found")
    kubectl_run("-n", "argocd", "create", "configmap", "argocd-cm", "--from-literal=url=https://argocd.example.com")
    try:
        patch = next(argv for argv in kubectl if argv[1] != "shadow" and "argocd" in argv)
        done = kubectl_run(*patch[1:], check=False)
        assert done.returncode == 0, done.stderr
        data = json.loads(kubectl_run("-n", "argocd", "get", "configmap", "argocd-cm", "-o", "json").stdout)["data"]
        assert data["url"] == "https://argocd.example.com"
        script = (REPO / "deploy" / "argocd" / "health.lua").read_text(encoding="utf-8")
        assert data["resource.customizations.health.shadowctl.dev_ShadowPolicy"] == script
    finally:
        kubectl_run("-n", "argocd", "delete", "configmap", "argocd-cm", "--ignore-not-found", check=False)

    # The Grafana dashboard as a ConfigMap the Grafana sidecar picks up.
    kubectl_run("create", "namespace", "monitoring", check=False)
    kubectl_run("-n", "monitoring", "delete", "configmap", "shadowctl-dashboard", "--ignore-not-found")
    try:
        for argv in (a for a in kubectl if "monitoring" in a):
            done = kubectl_run(*argv[1:], check=False)
            assert done.returncode == 0, (argv, done.stderr)
        made = json.loads(kubectl_run("-n", "monitoring", "get", "configmap", "shadowctl-dashboard", "-o",
                                      "json").stdout)
        assert made["metadata"]["labels"] == {"grafana_dashboard": "1"}
        assert made["data"]["shadowctl.json"] == (REPO / "deploy" / "grafana" / "shadowctl.json").read_text()
    finally:
        kubectl_run("-n", "monitoring", "delete", "configmap", "shadowctl-dashboard", "--ignore-not-found",
                    check=False)


def test_the_readme_names_every_demo_scenario() -> None:
    """The README's list of `shadowctl demo` scenarios is the command's: every `--scenario NAME` it names is one
    the command knows, every one the command knows is named (the prompt rollouts included), and `shadowctl demo
    --help` lists them all (the demos themselves run in tests/test_demo_*_e2e.py)."""
    from shadowctl.demo.prompt_rollout import PROMPT_SCENARIOS
    from shadowctl.demo.scenarios import SCENARIOS

    text = README.read_text(encoding="utf-8").replace("\n", " ")
    named = set(re.findall(r"--scenario\s+([a-z][a-z-]*)", text))
    known = set(SCENARIOS) | set(PROMPT_SCENARIOS)
    assert {"prompt-good", "prompt-bad"} <= known
    assert named == known, (sorted(named - known), sorted(known - named))
    done = run(["shadowctl", "demo", "--help"])
    assert done.returncode == 0, done.stderr
    help_text = " ".join(done.stdout.split())
    for name in known:
        assert name in help_text, name
