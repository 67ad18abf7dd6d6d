"""``kubectl shadow ...``: the real kubectl finds the ``kubectl-shadow`` plugin and runs shadowctl's commands.

The real parts: kubectl (built by hack/setup.sh into .venv/bin, next to the installed ``kubectl-shadow``
console script), its plugin discovery on ``PATH``, and the local kube-apiserver. kubectl hands the plugin
every argument after ``shadow`` (its own global flags included) as argv; the plugin must read kubectl's
spellings of ``--kubeconfig``, ``--context``, ``-n`` and ``-A`` wherever they stand and answer exactly
what ``shadowctl`` answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest_kube import KubeEnv
from controller_helpers import POLICY

from shadowctl.cli.kubectl_plugin import COMMANDS, PluginUsage, translate
from shadowctl.kube import SHADOW_POLICY

BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
PLUGIN = BIN / "kubectl-shadow"


# --------------------------------------------------------------------------- argv translation (no cluster)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status", "chat", "-n", "llm"], ["status", "--namespace", "llm", "chat"]),
        (["-n", "llm", "status", "chat"], ["status", "--namespace", "llm", "chat"]),
        (["status", "-nllm", "chat"], ["status", "--namespace", "llm", "chat"]),
        (["status", "-n=llm", "chat"], ["status", "--namespace", "llm", "chat"]),
        (["--namespace=llm", "get", "-o", "yaml"], ["get", "--namespace", "llm", "-o", "yaml"]),
        (["get", "--kubeconfig", "/k", "--context=c", "-A"],
         ["get", "--kubeconfig", "/k", "--context", "c", "--all-namespaces"]),
        (["--all-namespaces=false", "get"], ["get"]),
        (["-n", "a", "get", "-n", "b"], ["get", "--namespace", "b"]),  # the last one wins, as in kubectl
        (["promote", "chat", "--full", "--wait", "30s"], ["promote", "chat", "--full", "--wait", "30s"]),
        (["describe", "--", "-n"], ["describe", "--", "-n"]),  # after --, nothing is a flag
        ([], []), (["--help"], []), (["-n", "llm"], []),
    ],
)
def test_kubectl_flags_are_read_in_any_position(argv: list[str], expected: list[str]) -> None:
    assert translate(argv) == expected


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["promote", "chat", "-A"], "-A (--all-namespaces) is for get and status, not promote"),
        (["get", "--as", "bob"], "kubectl's --as is not supported"),
        (["get", "--user=bob"], "kubectl's --user is not supported"),
        (["get", "-v=6"], "kubectl's -v is not supported"),
        (["apply", "-f", "x.yaml"], "unknown command 'apply'; commands: get, status, describe"),
        (["-o", "yaml", "get"], "put the command first"),
        (["get", "-n"], "flag needs an argument: -n"),
    ],
)
def test_what_it_cannot_run_is_refused_in_words(argv: list[str], words: str) -> None:
    with pytest.raises(PluginUsage, match=words.replace("(", r"\(").replace(")", r"\)")):
        translate(argv)


def test_every_offered_command_is_a_shadowctl_command() -> None:
    from shadowctl.cli.app import BY_NAME

    assert set(COMMANDS) <= set(BY_NAME)
    assert {"get", "status", "describe", "promote", "rollback", "pause", "resume", "retry"} == set(COMMANDS)


# --------------------------------------------------------------------------- the real kubectl


def _kubectl(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(KUBECTL), *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


@pytest.fixture
def plugin_env(kube_env: KubeEnv) -> dict[str, str]:
    """kubectl's environment: the venv's bin (kubectl-shadow) first on PATH, no KUBECONFIG of the runner's."""
    if not KUBECTL.exists():
        pytest.fail(f"no kubectl in {BIN}: run hack/setup.sh")
    if not PLUGIN.exists():
        pytest.fail(f"no {PLUGIN}: the package is not installed with its console scripts (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"
    doc = yaml.safe_load(POLICY)
    kube_env.put_object(SHADOW_POLICY, doc)
    kube_env.patch_status(SHADOW_POLICY, "llm", "chat", {"status": {
        "phase": "WaitingPromotion", "step": 2, "canaryWeight": 50, "message": "step 2 (50%) passed",
        "rollout": {"phase": "WaitingPromotion", "step": 2, "canaryWeight": 50}}})
    return env


def test_kubectl_lists_the_plugin(plugin_env: dict[str, str]) -> None:
    done = _kubectl("plugin", "list", env=plugin_env)
    assert str(PLUGIN) in done.stdout.splitlines(), done.stdout


def test_kubectl_shadow_answers_as_shadowctl_does(kube_env: KubeEnv, plugin_env: dict[str, str], tmp_path: Path) -> None:
    config = str(kube_env.kubeconfig(tmp_path / "kubeconfig", namespace="default"))
    status = _kubectl("shadow", "status", "chat", "-n", "llm", "--kubeconfig", config, env=plugin_env)
    assert status.stdout.splitlines()[0] == "shadowpolicy llm/chat"
    assert "WaitingPromotion (step 2/2)" in status.stdout

    # Flags in kubectl's other spellings and positions; the same bytes as shadowctl's own.
    plugin = _kubectl("shadow", f"--kubeconfig={config}", "get", "-o", "json", "-nllm", env=plugin_env)
    own = subprocess.run([str(BIN / "shadowctl"), "get", "-n", "llm", "-o", "json", "--kubeconfig", config],
                         capture_output=True, text=True, timeout=60, check=True)
    assert plugin.stdout == own.stdout
    assert [i["metadata"]["name"] for i in json.loads(plugin.stdout)["items"]] == ["chat"]

    listed = _kubectl("shadow", "get", "-A", "--kubeconfig", config, env=plugin_env)
    header, row = listed.stdout.splitlines()[:2]
    assert header.split()[:3] == ["NAMESPACE", "NAME", "PHASE"] and row.split()[:3] == ["llm", "chat", "WaitingPromotion"]

    described = _kubectl("shadow", "describe", "chat", "--namespace", "llm", "--kubeconfig", config, env=plugin_env)
    assert "Name:         chat" in described.stdout

    # KUBECONFIG from kubectl's environment, and the context's namespace when no -n is given.
    env = {**plugin_env, "KUBECONFIG": str(kube_env.kubeconfig(tmp_path / "llm-kubeconfig", namespace="llm"))}
    assert _kubectl("shadow", "status", "chat", env=env).stdout.startswith("shadowpolicy llm/chat")

    # An error is shadowctl's: one line, exit 1.
    missing = _kubectl("shadow", "status", "nope", "-n", "llm", "--kubeconfig", config, env=plugin_env, check=False)
    assert missing.returncode == 1 and missing.stderr.strip() == "error: shadowpolicy llm/nope not found"
    refused = _kubectl("shadow", "rollback", "chat", "-A", env=plugin_env, check=False)
    assert refused.returncode == 2 and "-A (--all-namespaces) is for get and status" in refused.stderr


def test_context_picks_the_kubeconfig_context(kube_env: KubeEnv, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """--context selects a context of the file: the current one points at nothing that answers."""
    config = kube_env.kubeconfig_dict(namespace="llm")
    real = config["contexts"][0]["name"]
    config["clusters"].append({"name": "down", "cluster": {"server": "http://127.0.0.1:9"}})
    config["contexts"].append({"name": "down", "context": {"cluster": "down", "user": config["users"][0]["name"]}})
    config["current-context"] = "down"
    path = tmp_path / "two-contexts"
    path.write_text(yaml.safe_dump(config))
    env = {**plugin_env, "KUBECONFIG": str(path)}
    down = _kubectl("shadow", "status", "chat", env=env, check=False)
    assert down.returncode == 1 and "cannot reach the Kubernetes API server" in down.stderr
    up = _kubectl("shadow", "status", "--context", real, "chat", env=env)
    assert up.stdout.startswith("shadowpolicy llm/chat")


def test_kubectl_shadow_promote_writes_the_command(kube_env: KubeEnv, plugin_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    config = str(kube_env.kubeconfig(tmp_path / "kubeconfig"))
    done = _kubectl("shadow", "promote", "-n", "llm", "chat", f"--kubeconfig={config}", env=plugin_env)
    assert "promote" in done.stdout
    obj = kube_env.get_object(SHADOW_POLICY, "llm", "chat")
    assert obj is not None
    assert json.loads(obj["metadata"]["annotations"]["shadowctl.dev/command"])["command"] == "promote"
