"""End to end with `--target gateway-api`: each demo scenario in its short form, routed by an HTTPRoute.

As tests/test_demo_e2e.py, through the whole local environment (real Kubernetes API with Gateway API
v1.6.1's HTTPRoute CRD and RBAC on, Prometheus, Mosquitto, HTTP traffic, taps, `shadowctl run` as
deploy/rbac.yaml's ServiceAccount); the mesh simulator routes by the HTTPRoute the controller writes
(weights as proportions of the rule's total, RequestMirror filters). Every route change the mesh
observed is checked against the DESIGN.md invariants. About two minutes per scenario.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from shadowctl.demo.run import run_scenario
from shadowctl.demo.scenarios import SCENARIOS, SHORT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (shutil.which("prometheus") or Path("/usr/bin/prometheus").exists())
                       or not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
                       reason="needs the prometheus and mosquitto binaries (hack/setup.sh installs them)"),
]


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_gateway_api_scenario(name: str, tmp_path: Path) -> None:
    scenario = SCENARIOS[name]
    data = await run_scenario(scenario, SHORT, console=Console(quiet=True), live=False, target="gateway-api")
    (tmp_path / "data.json").write_text(json.dumps(data, default=str))  # evidence when it fails
    assert data["outcome"] == scenario.expected, (
        data["outcome"], data.get("final_message"), data.get("transitions"), data.get("load"),
        data.get("controller_log_tail", "")[-2000:])
    assert data["target"] == "gateway-api"
    assert data["invariants"]["violations"] == []
    changes = data["route_changes"]
    assert data["invariants"]["checked"] >= 2 and len(changes) == data["invariants"]["checked"]
    versions = [int(c["resource_version"]) for c in changes]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert changes[0]["mirror"] is None and changes[1]["mirror"] == 50.0  # the policy's RequestMirror
    assert any(line.startswith("Gateway API data plane") for line in data["simulated"])
    assert not any(line.startswith("Istio data plane") for line in data["simulated"])
    phases = [t["to"] for t in data["transitions"]]
    if scenario.expected == "RolledBack":
        assert phases[-1] == "RolledBack"
        assert any(metric in data["final_message"] for metric in scenario.expect_failed), data["final_message"]
        assert (changes[-1]["primary"], changes[-1]["candidate"], changes[-1]["mirror"]) == (100, 0, None)
    else:
        assert phases[-2:] == ["Promoting", "Succeeded"]
        assert (changes[-1]["primary"], changes[-1]["candidate"]) == (0, 100)
    if name == "bad-latency":
        assert "Progressing" not in phases  # caught in the shadow phase: users never saw it
