"""End to end: the demo's prompt rollouts (`shadowctl demo --scenario prompt-good | prompt-bad`) in their short form.

Through the whole local environment of shadowctl/demo/prompt_rollout.py: the real Kubernetes API with RBAC on
(the controller runs as deploy/rbac.yaml's ServiceAccount plus only the Role `shadowctl rbac configmaps` prints
for the policy, and reads the two prompt versions and the judge's prompt from their ConfigMaps with it), a real
Prometheus and Mosquitto, HTTP traffic, the primary's tap as the only router (route settings v2 with the prompt
rewrite, the resent noise baseline) and `shadowctl run` as a process. Simulated: the model server (answers as good
as its table of system prompts says) and the judge model (a second simulated server). Every route setting the tap
applied is checked against the DESIGN.md invariants, and the report and chart are written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from shadowctl.demo.prompt_rollout import PROMPT_SCENARIOS
from shadowctl.demo.report import write_report
from shadowctl.demo.run import run_scenario
from shadowctl.demo.scenarios import SHORT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (shutil.which("prometheus") or Path("/usr/bin/prometheus").exists())
                       or not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
                       reason="needs the prometheus and mosquitto binaries (hack/setup.sh installs them)"),
]


def _judge(data: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Every verdict's evidence for metric `name`."""
    out: list[dict[str, Any]] = []
    for verdict in data["verdicts"]:
        out.extend(m for m in verdict["metrics"] if m["name"] == name)
    return out


@pytest.mark.parametrize("name", list(PROMPT_SCENARIOS))
async def test_prompt_scenario(name: str, tmp_path: Path) -> None:
    scenario = PROMPT_SCENARIOS[name]
    data = await run_scenario(scenario, SHORT, console=Console(quiet=True), live=False)
    (tmp_path / "data.json").write_text(json.dumps(data, default=str))  # evidence when it fails
    assert data["outcome"] == scenario.expected, (
        data["outcome"], data.get("final_message"), data.get("transitions"), data.get("load"),
        data.get("controller_log_tail", "")[-3000:])
    assert data["passed"] and data["target"] == "tap"
    assert data["invariants"]["violations"] == []
    assert any(line.startswith("Prompt rollouts") for line in data["simulated"])
    assert not any(line.startswith(("Istio data plane", "Gateway API", "KServe")) for line in data["simulated"])
    changes = data["route_changes"]
    assert changes[0]["mirror"] is None and changes[0]["candidate"] == 0  # before the first route setting
    assert any(c["mirror"] == 50.0 for c in changes)  # the policy's shadow share, applied by the tap
    # The llm-judge read its prompt from the ConfigMap and judged pairs: evidence with samples.
    judged = [m for m in _judge(data, "agreement/llm-judge") if (m["samples"] or {}).get("candidate")]
    assert judged, [v["reason"] for v in data["verdicts"]]
    phases = [t["to"] for t in data["transitions"]]
    if scenario.expected == "RolledBack":
        assert "Progressing" not in phases and phases[-1] == "RolledBack"  # caught in shadow: no user saw it
        assert any(metric in data["final_message"] for metric in scenario.expect_failed), data["final_message"]
        assert (changes[-1]["primary"], changes[-1]["candidate"], changes[-1]["mirror"]) == (100, 0, None)
    else:
        assert phases[-2:] == ["Promoting", "Succeeded"]
        assert changes[-1]["candidate"] == 100  # the final setting: every request gets the new prompt
        assert any(0 < c["candidate"] < 100 for c in changes)  # the canary step
    paths = write_report(data, tmp_path / "report")
    assert paths.markdown.exists() and paths.chart.exists() and paths.chart.stat().st_size > 0
    assert name in paths.markdown.read_text()
