"""End to end: each demo scenario in its short form, through the whole local environment.

Real: the Kubernetes API (kube-apiserver and etcd of shadowctl.sim.cluster, RBAC on: the controller
runs as deploy/rbac.yaml's ServiceAccount), Prometheus, Mosquitto, HTTP traffic, taps, the controller
process (`shadowctl run`). Simulated (they cannot run here): the Istio data plane (mesh simulator, which
watches the VirtualService in the API server), GPU model servers. Each run asserts the outcome, that
every DESIGN.md routing invariant held at every route change the mesh observed (each one a
resourceVersion of the real API server), and that the report was written. About two minutes per
scenario. Without the control plane's binaries the test fails, naming hack/setup.sh.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from dashboard_queries import Checker, dashboard
from rich.console import Console

from shadowctl.demo.env import DEMO_NAMESPACE, POLICY_REF, Environment
from shadowctl.demo.report import write_report
from shadowctl.demo.run import check_invariants, run_scenario
from shadowctl.demo.scenarios import SCENARIOS, SHORT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (shutil.which("prometheus") or Path("/usr/bin/prometheus").exists())
                       or not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
                       reason="needs the prometheus and mosquitto binaries (hack/setup.sh installs them)"),
]


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_scenario(name: str, tmp_path: Path) -> None:
    scenario = SCENARIOS[name]
    dashboard_problems: list[str] = []

    async def run_dashboard(env: Environment, started: float) -> None:
        """deploy/grafana/shadowctl.json against this rollout's Prometheus, which scraped the controller, the
        taps and the model servers: every query must be valid and return series over the rollout."""
        assert env.prometheus is not None
        async with httpx.AsyncClient() as client:
            checker = Checker(client, env.prometheus.url, started, time.time())
            await checker.check(dashboard(), {"policy": f"{POLICY_REF.namespace}/{POLICY_REF.name}",
                                              "namespace": DEMO_NAMESPACE})
        dashboard_problems.extend(checker.problems or ([] if checker.ran else ["no query ran"]))

    # One scenario (a whole rollout: shadow, a canary step, promotion) also runs the Grafana dashboard.
    data = await run_scenario(scenario, SHORT, console=Console(quiet=True), live=False,
                              inspect=run_dashboard if name == "good" else None)
    (tmp_path / "data.json").write_text(json.dumps(data, default=str))  # evidence when it fails
    assert data["outcome"] == scenario.expected, (
        data["outcome"], data.get("final_message"), data.get("duration_s"), data.get("transitions"),
        [(v["t"], v["phase"], v["outcome"], [(m["name"], m["outcome"], m.get("samples"), m.get("interval"))
                                             for m in v["metrics"]]) for v in data.get("verdicts", [])[-3:]],
        data.get("load"),
    )
    assert data["invariants"]["violations"] == []
    # The load generator asks for the name the model servers serve (they answer any other 404, as vLLM does).
    assert "404" not in data["load"]["status_counts"], data["load"]
    assert data["invariants"]["checked"] >= 2
    # Every route change the mesh saw is a version the real API server stored, in order.
    versions = [int(c["resource_version"]) for c in data["route_changes"]]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert re.match(r"Kubernetes API \(kube-apiserver v1\.\d+\.\d+, etcd \d+\.\d+\.\d+\)", data["real"][0]), data["real"]
    assert not any("Kubernetes API" in line for line in data["simulated"])
    phases = [t["to"] for t in data["transitions"]]
    if scenario.expected == "RolledBack":
        assert phases[-1] == "RolledBack"
        assert scenario.expect_failed, scenario  # a rollback scenario names the metrics that may cause it
        assert any(metric in data["final_message"] for metric in scenario.expect_failed), data["final_message"]
        last = data["route_changes"][-1]
        assert (last["candidate"], last["mirror"]) == (0, None)
    else:
        assert phases[-2:] == ["Promoting", "Succeeded"]
        assert "Progressing" in phases
        assert data["route_changes"][-1]["candidate"] == 100
    if name == "bad-latency":
        assert "Progressing" not in phases  # caught in the shadow phase: users never saw it
    if name == "bad-output":  # the drifting answers, each with the trace of the request the load generator sent
        assert data["disagreements"] and all(re.fullmatch(r"[0-9a-f]{32}", d["traceId"] or "")
                                             for d in data["disagreements"]), data["disagreements"]
    assert not dashboard_problems, dashboard_problems
    paths = write_report(data, tmp_path / "report")
    markdown = paths.markdown.read_text()
    assert markdown.count("|") > 10
    assert "- real: Kubernetes API (kube-apiserver v" in markdown
    assert paths.chart.stat().st_size > 10_000
    if name == "bad-output":
        assert "## Answers that disagreed" in markdown


def test_invariant_checker_catches_violations() -> None:
    transitions = [{"at": 10.0, "from": "Shadowing", "to": "Progressing", "reason": ""}]
    ok = [{"at": 5.0, "resource_version": "1", "primary": 100, "candidate": 0, "mirror": 50.0},
          {"at": 11.0, "resource_version": "2", "primary": 40, "candidate": 60, "mirror": None}]
    assert check_invariants(ok, transitions, (60,), "Succeeded")["violations"] == []
    early = [{"at": 5.0, "resource_version": "1", "primary": 40, "candidate": 60, "mirror": None}]
    assert "before the shadow phase passed" in check_invariants(early, transitions, (60,), "x")["violations"][0]
    bad_sum = [{"at": 11.0, "resource_version": "3", "primary": 50, "candidate": 60, "mirror": None}]
    assert "sum to 110" in check_invariants(bad_sum, transitions, (60,), "x")["violations"][0]
    not_step = [{"at": 11.0, "resource_version": "4", "primary": 70, "candidate": 30, "mirror": None}]
    assert "not a step" in check_invariants(not_step, transitions, (60,), "x")["violations"][0]
    left_mirror = [{"at": 11.0, "resource_version": "5", "primary": 100, "candidate": 0, "mirror": 50.0}]
    assert "after rollback" in check_invariants(left_mirror, transitions, (60,), "RolledBack")["violations"][0]
