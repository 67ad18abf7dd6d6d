"""shadowctl.kube.kubeconfig: which kubeconfig, its contexts and namespace, and what a person reads when it is wrong.

Real kubeconfig files in a temporary folder, read by the kubernetes library; no server is needed (a
client is built, never used). The pod's service account is the one boundary that cannot be real
here: its namespace file's path is pointed at a temporary file, and KUBERNETES_SERVICE_HOST is set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from shadowctl.kube import (
    ConfigError,
    KubeconfigContext,
    connect_as_kubectl,
    default_namespace,
    kubeconfig_contexts,
    require_kubeconfig,
)
from shadowctl.kube import kubeconfig as kc


def write(path: Path, current: str | None, contexts: dict[str, str | None]) -> Path:
    """A kubeconfig with one cluster and user, and a context per entry of ``contexts`` (name: namespace)."""
    config: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "ana", "user": {"token": "t"}}],
        "contexts": [{"name": name, "context": {"cluster": "local", "user": "ana",
                                                 **({"namespace": ns} if ns else {})}}
                     for name, ns in contexts.items()],
    }
    if current is not None:
        config["current-context"] = current
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def no_pod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Outside a pod, with no ~/.kube/config."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_contexts_and_the_namespace_of_the_one_in_use(tmp_path: Path, no_pod: None) -> None:
    config = write(tmp_path / "config", "team-a", {"team-a": "a", "plain": None})
    contexts, current = kubeconfig_contexts(str(config))
    assert current == "team-a"
    assert contexts == [KubeconfigContext("team-a", "local", "ana", "a"), KubeconfigContext("plain", "local", "ana", None)]
    assert default_namespace(str(config)) == "a"
    assert default_namespace(str(config), "plain") == "default"  # a context without a namespace: as kubectl
    assert default_namespace(str(config), "nowhere") == "default"


def test_a_path_list_is_merged_as_kubectl_merges_it(tmp_path: Path, no_pod: None) -> None:
    first = write(tmp_path / "first", "b", {"a": "from-first"})
    second = write(tmp_path / "second", None, {"b": "from-second"})
    paths = os.pathsep.join([str(first), str(second)])
    assert [c.name for c in kubeconfig_contexts(paths)[0]] == ["a", "b"]
    assert default_namespace(paths) == "from-second"
    require_kubeconfig(os.pathsep.join([str(tmp_path / "missing"), str(second)]))  # one of them exists: enough


def test_a_missing_or_broken_kubeconfig_is_one_config_error_with_what_to_pass(tmp_path: Path, no_pod: None) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as absent:
        require_kubeconfig(str(missing))
    assert absent.value.message == f"kubeconfig {missing}: no such file (pass --kubeconfig, or set KUBECONFIG)"
    with pytest.raises(ConfigError, match="no such file"):
        require_kubeconfig(None)  # ~/.kube/config does not exist in this HOME

    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nkind: Config\ncontexts: [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as unreadable:
        kubeconfig_contexts(str(broken))
    assert unreadable.value.message.startswith(f"cannot load kubeconfig {broken}: ")
    assert unreadable.value.message.endswith("(pass --kubeconfig or --context, or set KUBECONFIG)")
    assert isinstance(unreadable.value.__cause__, yaml.YAMLError)  # the library's exception, chained
    assert default_namespace(str(broken)) == "default"  # connecting is what reports it


async def test_connect_names_the_problem_or_builds_a_client(tmp_path: Path, no_pod: None) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        await connect_as_kubectl(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("apiVersion: v1\nkind: Config\ncontexts: []\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        await connect_as_kubectl(str(empty))
    assert refused.value.message.startswith(f"cannot load kubeconfig {empty}: ")
    assert refused.value.message.endswith(" (pass --kubeconfig or --context, or set KUBECONFIG)")
    assert isinstance(refused.value.__cause__, ConfigError)  # KubeClient.connect's, which chains the library's
    config = write(tmp_path / "config", "team-a", {"team-a": "a", "other": "b"})
    with pytest.raises(ConfigError, match="nowhere"):
        await connect_as_kubectl(str(config), "nowhere")
    client = await connect_as_kubectl(str(config), "other")
    await client.close()


def test_in_a_pod_without_a_kubeconfig_the_service_account_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_pod: None
) -> None:
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("llm\n", encoding="utf-8")
    monkeypatch.setattr(kc, "SERVICE_ACCOUNT_NAMESPACE", namespace_file)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert kc.in_pod_without_kubeconfig(None)
    assert default_namespace() == "llm"
    config = write(tmp_path / "config", "team-a", {"team-a": "a"})
    assert not kc.in_pod_without_kubeconfig(str(config))  # a kubeconfig named wins, as in kubectl
    assert default_namespace(str(config)) == "a"
    namespace_file.unlink()
    assert default_namespace() == "default"
