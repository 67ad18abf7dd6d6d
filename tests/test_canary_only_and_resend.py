"""A canary-only tap target, and the resent noise baseline for taps that no route setting drives (#18).

- A tap target may have no shadow phase: a canary judged on metrics alone (moving users to a new adapter on errors
  and latency) keeps ``analysis.outputs.mqtt`` only as the taps' route channel. Any other target's outputs still
  need a shadow phase (they compare mirrored answers), and so does a resent baseline.
- ``baseline.mode: resend`` works with a VirtualService or an HTTPRoute mirroring: the primary's taps are started
  with ``--baseline-resend PERCENT``. The policy's ``baseline.percent`` travels in the route setting, so it is for
  ``shadow.mode: tap`` only; ``shadow.budget`` too.

Real parts: the policy model; the real kube-apiserver with the generated CRD and the real kubectl (the CEL rules);
the tap started by ``shadowctl tap --baseline-resend`` through the CLI, in front of the OpenAI stub, publishing to
a real Mosquitto. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml
from conftest_kube import KubeEnv
from openai_stub import OpenAIStub
from pydantic import ValidationError
from tap_helpers import eventually, free_port
from test_tap_rewrite import events
from typer.testing import CliRunner

from shadowctl.cli.app import app
from shadowctl.compare.comparators import AgreementInput
from shadowctl.compare.events import Variant
from shadowctl.compare.routing import in_share
from shadowctl.controller.analysis import NO_BASELINE_RESEND, agreement_input
from shadowctl.policy.model import (
    CANARY_ONLY_OUTPUTS_MESSAGE,
    NO_COMPARATOR_MESSAGE,
    RESEND_PERCENT_MESSAGE,
    TAP_ONLY_MESSAGE,
    ShadowPolicy,
)
from shadowctl.sim.cluster import find_binaries

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

BROKER = "mqtt://mosquitto.shadowctl.svc:1883"
TAP_CANARY: dict[str, Any] = {
    "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy",
    "metadata": {"name": "summarize-adapter", "namespace": "llm"},
    "spec": {
        "target": {"tap": {"service": "summarize", "rewrite": {"model": "summarize-lora-v2"}}},
        "canary": {"steps": [5, 50], "stepDuration": "10m"},
        "analysis": {
            "interval": "30s",
            "variants": {"primary": {"workload": "summarize"}, "candidate": {"workload": "summarize"}},
            "metrics": [{"name": "errors", "preset": "vllm-errors", "kind": "ratio", "statistic": "rate",
                         "margin": "1pp"}],
            "outputs": {"mqtt": {"broker": BROKER, "topic": "shadowctl/outputs/llm/summarize/+"}},
        },
    },
}
ISTIO: dict[str, Any] = {
    "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy",
    "metadata": {"name": "chat", "namespace": "llm"},
    "spec": {
        "target": {"istio": {"virtualService": "chat", "primary": {"host": "chat-v1"},
                             "candidate": {"host": "chat-v2"}}},
        "shadow": {"mirrorPercent": 20},
        "analysis": {
            "interval": "30s",
            "variants": {"primary": {"workload": "chat-v1"}, "candidate": {"workload": "chat-v2"}},
            "metrics": [{"name": "errors", "preset": "vllm-errors", "kind": "ratio", "statistic": "rate",
                         "margin": "1pp"}],
            "outputs": {"mqtt": {"broker": BROKER, "topic": "shadowctl/outputs/llm/chat/+"},
                        "comparators": [{"name": "token-f1"}], "baseline": {"mode": "resend"}},
        },
    },
}


def edited(doc: dict[str, Any], *path_and_value: Any) -> dict[str, Any]:
    """A deep copy of `doc` with the value at the path set (None: removed)."""
    out = copy.deepcopy(doc)
    *path, value = path_and_value
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is None:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return out


CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("a canary-only tap target", TAP_CANARY, None),
    ("an Istio resend baseline (taps with --baseline-resend)", ISTIO, None),
    ("a canary-only Istio target with outputs",
     edited(edited(ISTIO, "spec", "shadow", None), "spec", "canary", {"steps": [10]}), CANARY_ONLY_OUTPUTS_MESSAGE),
    ("a canary-only tap target with a resent baseline",
     edited(TAP_CANARY, "spec", "analysis", "outputs", "baseline", {"mode": "resend"}), CANARY_ONLY_OUTPUTS_MESSAGE),
    ("baseline.percent without shadow.mode tap",
     edited(ISTIO, "spec", "analysis", "outputs", "baseline", {"mode": "resend", "percent": 10}),
     RESEND_PERCENT_MESSAGE),
    ("a shadow phase without comparators",
     edited(ISTIO, "spec", "analysis", "outputs", "comparators", []), NO_COMPARATOR_MESSAGE),
    ("shadow.budget without shadow.mode tap",
     edited(ISTIO, "spec", "shadow", {"mirrorPercent": 20, "budget": {"requestsPerSecond": 5}}), TAP_ONLY_MESSAGE),
]


@pytest.mark.parametrize(("what", "doc", "refused"), CASES, ids=[c[0] for c in CASES])
def test_the_model_takes_a_canary_only_tap_target_and_a_resend_baseline_behind_a_mesh(
        what: str, doc: dict[str, Any], refused: str | None) -> None:
    if refused is None:
        ShadowPolicy.model_validate(doc)
        return
    with pytest.raises(ValidationError) as info:
        ShadowPolicy.model_validate(doc)
    assert refused in str(info.value), (what, str(info.value))


def test_a_canary_only_policy_is_judged_on_metrics() -> None:
    """Without a shadow phase there are no pairs: a paired-latency metric, or no metric at all, is refused."""
    paired = edited(TAP_CANARY, "spec", "analysis", "metrics",
                    [*TAP_CANARY["spec"]["analysis"]["metrics"],
                     {"name": "ttft-paired", "kind": "paired-latency", "quantity": "ttft", "margin": "10%"}])
    with pytest.raises(ValidationError, match=r"'ttft-paired' .kind paired-latency. pairs mirrored answers"):
        ShadowPolicy.model_validate(paired)
    with pytest.raises(ValidationError, match="judged on metrics alone"):
        ShadowPolicy.model_validate(edited(TAP_CANARY, "spec", "analysis", "metrics", []))
    with pytest.raises(ValidationError, match=r"needs spec\.analysis\.outputs\.mqtt"):  # the route channel
        ShadowPolicy.model_validate(edited(TAP_CANARY, "spec", "analysis", "outputs", None))


def test_the_api_server_applies_the_same_rules(kube_env: KubeEnv, tmp_path: Path) -> None:
    """The CRD's CEL rules say the same on the real API server (kubectl apply --dry-run=server)."""
    config = kube_env.direct_kubeconfig(tmp_path / "admin.kubeconfig", namespace="llm")
    path = tmp_path / "policy.yaml"
    for what, doc, refused in CASES:
        path.write_text(yaml.safe_dump(doc))
        done = subprocess.run([str(find_binaries().kubectl), f"--kubeconfig={config}", "apply", "--dry-run=server",
                               "-f", str(path)], capture_output=True, text=True, timeout=60, check=False)
        if refused is None:
            assert done.returncode == 0, (what, done.stderr)
        else:
            assert done.returncode != 0 and refused in done.stderr, (what, done.stderr)


def test_the_judge_says_where_a_resent_baseline_comes_from() -> None:
    item = AgreementInput(comparator="token-f1", critical=False, candidate_agree=9, candidate_pairs=10,
                          baseline_agree=0, baseline_pairs=0, fixed_baseline=None, min_relative_agreement=0.9)
    primary = agreement_input(item, 5, resend=True).primary
    assert getattr(primary, "reason", None) == NO_BASELINE_RESEND and "--baseline-resend" in NO_BASELINE_RESEND


async def test_baseline_resend_without_a_route_setting(mosquitto: MosquittoBroker, stub: OpenAIStub,
                                                       tmp_path: Path) -> None:
    """``shadowctl tap --baseline-resend 40`` (a process, no --route-policy): exactly the requests whose id falls in
    the first 40% are sent once more, unchanged and marked as copies, to the upstream and published as variant
    baseline; a mirrored copy arriving at this tap (an Istio mirror's Host ends in -shadow) is not resent. With
    --route-policy, or at 0, the flag is refused."""
    refused = CliRunner().invoke(app, ["tap", "--upstream", stub.url, "--service", "llm/summarize",
                                       "--baseline-resend", "10", "--mqtt", mosquitto.url,
                                       "--route-policy", "llm/summarize"])
    assert refused.exit_code == 2 and "--baseline-resend is for taps without --route-policy" in refused.output
    zero = CliRunner().invoke(app, ["tap", "--upstream", stub.url, "--service", "llm/summarize",
                                    "--baseline-resend", "0"])
    assert zero.exit_code == 2 and "--baseline-resend 0: a percent above 0" in zero.output
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "tap.log").open("wb")
    ids = [f"id{i}" for i in range(30)]
    body = json.dumps({"model": "base", "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with events(mosquitto) as seen, httpx.AsyncClient(trust_env=False, timeout=30) as client:
        tap = subprocess.Popen([sys.executable, "-m", "shadowctl", "tap", "--upstream", stub.url,  # noqa: ASYNC220
                                "--service", "llm/summarize", "--listen", f"127.0.0.1:{port}", "--mqtt",
                                mosquitto.url, "--baseline-resend", "40"], stdout=log, stderr=log)
        try:
            async def up() -> bool:
                try:
                    return (await client.get(url + "/metrics")).status_code == 200
                except httpx.HTTPError:
                    return False
            for _ in range(300):
                if await up():
                    break
                await asyncio.sleep(0.1)
            for rid in ids:
                r = await client.post(url + "/v1/chat/completions", content=body,
                                      headers={"content-type": "application/json", "x-request-id": rid})
                assert r.status_code == 200
            mirrored = await client.post(url + "/v1/chat/completions", content=body,
                                         headers={"host": "summarize-shadow", "x-request-id": ids[0]})
            assert mirrored.status_code == 200
            resent = {rid for rid in ids if in_share(rid, 40.0)}
            assert resent and len(resent) < len(ids)
            await eventually(lambda: len(stub.seen) == len(ids) + 1 + len(resent),
                             what="users' requests and resends")
            await eventually(lambda: sum(e.variant is Variant.baseline for e in seen) == len(resent),
                             what="the baseline events")
            page = (await client.get(url + "/metrics")).text
        finally:
            tap.terminate()
            tap.wait(20)
            log.close()
    again = [s for s in stub.seen if s.headers.get("x-shadowctl-shadow") == "1"]
    assert {s.headers["x-request-id"] for s in again} == resent and all(s.body == body for s in again)
    assert {e.request_id for e in seen if e.variant is Variant.baseline} == resent
    assert f'shadowctl_tap_baseline_requests_total{{outcome="sent"}} {float(len(resent))}' in page
