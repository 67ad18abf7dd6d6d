"""The controller reads exactly the Secrets policies name: `shadowctl rbac secrets` and the real authorizer.

The Role and RoleBinding printed by the command are applied with the real kubectl to the real
local API server (RBAC enforced); the controller's identity is a ServiceAccount token with no other
grant on Secrets. It reads the named Secrets (also after a rotation), and is refused another Secret
of the same namespace, a list, and a watch of the namespace's Secrets.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest_kube import KubeEnv
from typer.testing import CliRunner

from shadowctl.cli.app import app
from shadowctl.kube import SECRET, Forbidden, KubeClient
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.secret_refs import secret_refs
from shadowctl.sources.secrets import SecretReader, SecretUnavailable

KUBECTL = str(Path(sys.executable).parent / "kubectl")

POLICY = """\
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {name: chat, namespace: llm}
spec:
  target:
    istio: {virtualService: chat, primary: {host: chat, subset: v1}, candidate: {host: chat, subset: v2}}
  shadow: {mirrorPercent: 20, minDuration: 10m}
  canary: {steps: [10]}
  analysis:
    variants: {primary: {workload: chat-v1}, candidate: {workload: chat-v2}}
    metrics: [{name: ttft, preset: vllm-ttft}]
    prometheus:
      url: https://thanos.tenant:10902
      bearerTokenSecret: prom-token
      tls: {caSecret: prom-ca/bundle.pem}
    outputs:
      mqtt: {broker: "mqtts://mosquitto:8883", username: shadowctl, passwordSecret: mqtt/pw,
             tls: {caSecret: prom-ca, certSecret: mqtt-client}}
      comparators: [{name: exact}]
"""


def _kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), *args], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


def _secret(name: str, data: dict[str, bytes]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "llm"},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def test_the_policy_names_each_secret_with_its_field() -> None:
    policy = ShadowPolicy.model_validate(yaml.safe_load(POLICY))
    assert secret_refs(policy) == [
        ("prom-token", "spec.analysis.prometheus.bearerTokenSecret"),
        ("prom-ca", "spec.analysis.prometheus.tls.caSecret"),
        ("mqtt", "spec.analysis.outputs.mqtt.passwordSecret"),
        ("prom-ca", "spec.analysis.outputs.mqtt.tls.caSecret"),
        ("mqtt-client", "spec.analysis.outputs.mqtt.tls.certSecret"),
    ]


async def test_the_generated_role_lets_the_controller_read_only_the_named_secrets(
    kube_env: KubeEnv, tmp_path: Path
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "chat.yaml").write_text(POLICY)
    printed = CliRunner().invoke(app, ["rbac", "secrets", str(tmp_path / "policies")])
    assert printed.exit_code == 0, printed.output
    docs = list(yaml.safe_load_all(printed.stdout))
    assert [d["kind"] for d in docs] == ["Role", "RoleBinding"]
    assert docs[0]["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                                 "resourceNames": ["mqtt", "mqtt-client", "prom-ca", "prom-token"]}]
    admin = kube_env.direct_kubeconfig(tmp_path / "admin")
    applied = await asyncio.to_thread(_kubectl, admin, "apply", "-f", "-", stdin=printed.stdout)
    assert applied.returncode == 0, applied.stderr
    for name in ("prom-token", "other"):
        kube_env.put_object(SECRET, _secret(name, {"token": f"{name}-value".encode()}))

    kube = await KubeClient.connect(kubeconfig=kube_env.service_account_kubeconfig(
        tmp_path / "sa", "shadowctl", "shadowctl"))
    try:
        reader = SecretReader(kube, ttl=0.0)
        assert await reader.text("llm", "prom-token", "token", field="f") == "prom-token-value"
        with pytest.raises(SecretUnavailable, match=r"cannot read Secret llm/other \(f\)"):
            await reader.text("llm", "other", "token", field="f")
        with pytest.raises(Forbidden):
            await kube.list(SECRET, namespace="llm")
        # Rotated: read again by name, no restart, no list or watch needed.
        kube_env.put_object(SECRET, _secret("prom-token", {"token": b"rotated"}))
        assert await reader.text("llm", "prom-token", "token", field="f") == "rotated"
    finally:
        await kube.close()
    # What the authorizer says, as kubectl reports it for the ServiceAccount (the admin impersonating it):
    # get by name yes; list and watch no, also with the fieldSelector a watch by name would need.
    for verb, target, want in (("get", "secret/prom-token", "yes"), ("get", "secret/other", "no"),
                               ("list", "secrets", "no"), ("watch", "secrets", "no"),
                               ("watch", "secret/prom-token", "no"), ("get", "secrets", "no")):
        answer = await asyncio.to_thread(_kubectl, admin, "--as", "system:serviceaccount:shadowctl:shadowctl",
                                         "-n", "llm", "auth", "can-i", verb, target)
        assert answer.stdout.strip() == want, (verb, target, answer.stdout, answer.stderr)
