"""End to end with `--target kserve`: each demo scenario in its short form, on a KServe InferenceService.

As tests/test_demo_gateway_e2e.py, through the whole local environment (real Kubernetes API with KServe's
InferenceService CRD and RBAC on, Prometheus, Mosquitto, HTTP traffic, taps, `shadowctl run` as
deploy/rbac.yaml's ServiceAccount), with the stand-in for KServe's controller writing the InferenceService's
status. The mesh simulator routes by the traffic that status reports; KServe cannot mirror, so the shadow
phase's copies come from the primary's tap, following the controller's route setting over Mosquitto, and so
does the noise baseline (the tap resends 30% of requests to its own server: baseline.mode resend). Every
route change the mesh observed is checked against the DESIGN.md invariants, and the tap's mirror is sampled
every second. About two minutes per scenario.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from shadowctl.demo.run import run_scenario
from shadowctl.demo.scenarios import SCENARIOS, SHORT
from shadowctl.sim.cluster import KSERVE_CRD_FILE, SHARED_CRDS, default_crds_dir

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (shutil.which("prometheus") or Path("/usr/bin/prometheus").exists())
                       or not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
                       reason="needs the prometheus and mosquitto binaries (hack/setup.sh installs them)"),
    pytest.mark.skipif(not any((d / KSERVE_CRD_FILE).is_file() for d in (default_crds_dir(), SHARED_CRDS)),
                       reason="needs KServe's CRD (../shared/crds/kserve-inferenceservices.yaml)"),
]


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_kserve_scenario(name: str, tmp_path: Path) -> None:
    scenario = SCENARIOS[name]
    data = await run_scenario(scenario, SHORT, console=Console(quiet=True), live=False, target="kserve")
    (tmp_path / "data.json").write_text(json.dumps(data, default=str))  # evidence when it fails
    assert data["outcome"] == scenario.expected, (
        data["outcome"], data.get("final_message"), data.get("transitions"), data.get("load"), data.get("copies"),
        data.get("controller_log_tail", "")[-2000:])
    assert data["target"] == "kserve"
    assert data["invariants"]["violations"] == []
    changes = data["route_changes"]
    assert data["invariants"]["checked"] >= 1 and len(changes) == data["invariants"]["checked"]
    versions = [int(c["resource_version"]) for c in changes]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert (changes[0]["primary"], changes[0]["candidate"]) == (100, 0)
    assert any(line.startswith("KServe:") for line in data["simulated"])
    assert not any(line.startswith(("Istio data plane", "Gateway API")) for line in data["simulated"])
    phases = [t["to"] for t in data["transitions"]]
    shadowing = [s for s in data["samples"] if s["phase"] == "Shadowing"]
    assert any(s["mirror"] == 50.0 for s in shadowing), "the primary's tap applied the policy's mirror"
    assert all(s["candidate_weight"] == 0 for s in shadowing)
    if scenario.expected == "RolledBack":
        assert phases[-1] == "RolledBack"
        assert any(metric in data["final_message"] for metric in scenario.expect_failed), data["final_message"]
        assert (changes[-1]["primary"], changes[-1]["candidate"]) == (100, 0)
    else:
        assert phases[-2:] == ["Promoting", "Succeeded"]
        assert (changes[-1]["primary"], changes[-1]["candidate"]) == (0, 100)
    if name == "bad-latency":
        assert "Progressing" not in phases  # caught in the shadow phase: users never saw it
