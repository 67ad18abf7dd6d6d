"""Prompt versions in git, read by the controller from ConfigMaps with `get` on exactly those (#18 item 1).

Real parts: kustomize (the real kubectl's `kustomize`) builds policies/Kustomization (configMapGenerator, the
hashed names written into the policy); `shadowctl rbac configmaps` prints the Role; the real kubectl applies it
to the real local API server (RBAC enforced); the controller's identity is a ServiceAccount token with no other
grant on ConfigMaps, and reads the two versions as :func:`route_rewrite` does when it computes a route setting.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest_kube import KubeEnv
from typer.testing import CliRunner

from shadowctl.cli.app import app
from shadowctl.compare.prompts import prompt_digest
from shadowctl.kube import CONFIG_MAP, KubeClient
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.prompts import PromptApply
from shadowctl.routers.tap_prompts import PromptUnavailable, candidate_identity, route_rewrite

REPO = Path(__file__).resolve().parents[1]
KUBECTL = str(Path(sys.executable).parent / "kubectl")


def _kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)


async def test_the_controller_reads_both_prompt_versions_and_nothing_else(kube_env: KubeEnv, tmp_path: Path) -> None:
    """policies/Kustomization builds two ConfigMaps named by their content and the policy that names them (the API
    server takes all three); the generated Role lets the controller get exactly those two; the texts and their digest are the files'; another
    ConfigMap is refused (PromptUnavailable, saying which field and object); a ConfigMap edited in place is a new
    candidate identity (the analysis restarts); a missing key is said as such."""
    built = await asyncio.to_thread(_kubectl, "kustomize", str(REPO / "policies"))
    assert built.returncode == 0, built.stderr
    docs = list(yaml.safe_load_all(built.stdout))
    maps = [d for d in docs if d["kind"] == "ConfigMap"]
    policy = ShadowPolicy.model_validate(next(d for d in docs if d["kind"] == "ShadowPolicy"))
    tap = policy.spec.target.tap
    assert tap is not None and tap.rewrite is not None and tap.rewrite.prompt is not None
    names = sorted(m["metadata"]["name"] for m in maps)
    assert names[0].startswith("summarize-prompt-v1-") and names[1].startswith("summarize-prompt-v2-")
    assert tap.rewrite.prompt.candidate.config_map_ref.name == names[1]
    (tmp_path / "built.yaml").write_text(yaml.safe_dump(next(d for d in docs if d["kind"] == "ShadowPolicy")))

    printed = CliRunner().invoke(app, ["rbac", "configmaps", str(tmp_path / "built.yaml")])
    assert printed.exit_code == 0, printed.output
    roles = list(yaml.safe_load_all(printed.stdout))
    assert roles[0]["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
                                  "resourceNames": names}]
    admin = kube_env.direct_kubeconfig(tmp_path / "admin")
    applied = await asyncio.to_thread(_kubectl, "--kubeconfig", str(admin), "apply", "-f", "-", stdin=printed.stdout)
    assert applied.returncode == 0, applied.stderr
    whole = await asyncio.to_thread(_kubectl, "--kubeconfig", str(admin), "apply", "-f", "-", stdin=built.stdout)
    assert whole.returncode == 0, whole.stderr  # the ConfigMaps, and the policy past the CRD's schema and CEL rules
    kube_env.put_object(CONFIG_MAP, {"apiVersion": "v1", "kind": "ConfigMap",
                                     "metadata": {"name": "other", "namespace": "llm"}, "data": {"system.txt": "x"}})

    kube = await KubeClient.connect(kubeconfig=kube_env.service_account_kubeconfig(
        tmp_path / "sa", "shadowctl", "shadowctl"))
    try:
        rewrite = await route_rewrite(kube, "llm", tap.rewrite)
        v1 = (REPO / "policies/prompts/summarize-v1.txt").read_text()
        v2 = (REPO / "policies/prompts/summarize-v2.txt").read_text()
        assert rewrite.prompt is not None
        assert (rewrite.prompt.primary, rewrite.prompt.candidate) == (v1, v2)
        assert rewrite.prompt.digest == prompt_digest(PromptApply.replace_system, v1, v2)
        before = candidate_identity(None, rewrite)

        elsewhere = tap.rewrite.model_copy(update={"prompt": tap.rewrite.prompt.model_copy(update={
            "candidate": tap.rewrite.prompt.candidate.model_copy(update={
                "config_map_ref": tap.rewrite.prompt.candidate.config_map_ref.model_copy(update={"name": "other"})})})})
        with pytest.raises(PromptUnavailable, match=r"rewrite.prompt.candidate: ConfigMap llm/other key 'system.txt': "
                                                    r"cannot read it"):
            await route_rewrite(kube, "llm", elsewhere)

        edited = next(m for m in maps if m["metadata"]["name"] == names[1])
        kube_env.put_object(CONFIG_MAP, edited | {"data": {"system.txt": v2 + "Answer in French.\n"}})
        assert candidate_identity(None, await route_rewrite(kube, "llm", tap.rewrite)) != before

        kube_env.put_object(CONFIG_MAP, edited | {"data": {"other.txt": v2}})
        with pytest.raises(PromptUnavailable, match="no such key"):
            await route_rewrite(kube, "llm", tap.rewrite)
    finally:
        await kube.close()
