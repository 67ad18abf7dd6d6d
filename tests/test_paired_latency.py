"""Paired latency in the policy (kind paired-latency) and in `shadowctl judge replay` (paired looks).

Real files through typer's CliRunner; the policy through its loader. Nothing is mocked.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from shadowctl.cli.app import app
from shadowctl.cli.policy_files import load_policy
from shadowctl.policy import PolicyError, parse_policies
from shadowctl.policy.model import LatencyQuantity, MetricKind, Statistic
from shadowctl.sources.prometheus.promql import build_requests

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "policies" / "chat-paired-latency.yaml"
runner = CliRunner()


def _doc() -> dict[str, Any]:
    return yaml.safe_load(CHAT.read_text())


def _errors(doc: dict[str, Any]) -> str:
    with pytest.raises(PolicyError) as info:
        parse_policies(yaml.safe_dump(doc, sort_keys=False), "p.yaml")
    return " | ".join(f"{p.path}: {p.message}" for p in info.value.problems)


def _with_metric(metric: dict[str, Any], doc: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = doc or _doc()
    doc["spec"]["analysis"]["metrics"] = [m for m in doc["spec"]["analysis"]["metrics"] if m["name"] != metric["name"]]
    doc["spec"]["analysis"]["metrics"].append(metric)
    return doc


# --------------------------------------------------------------------------- policy


def test_the_example_policy_has_a_paired_metric_the_prometheus_plan_leaves_out() -> None:
    policy = load_policy(CHAT)
    paired = next(m for m in policy.spec.analysis.metrics if m.name == "ttft-paired")
    assert paired.kind is MetricKind.paired_latency and paired.quantity is LatencyQuantity.ttft
    assert paired.statistic is Statistic.median and paired.margin.relative and paired.margin.value == 0.10
    now = datetime(2025, 1, 1, tzinfo=UTC)
    planned = [m.name for m, _ in build_requests(policy, start=now.replace(hour=0), end=now.replace(hour=1))]
    assert planned == ["ttft-p99"]
    assert [m.quantity.value for m in policy.spec.analysis.metrics if m.quantity] == ["ttft", "tpot", "e2e"]


def test_a_paired_metric_defaults_to_the_median_and_takes_the_mean() -> None:
    base = {"name": "e2e-paired", "kind": "paired-latency", "quantity": "e2e", "margin": "15%"}
    [policy] = parse_policies(yaml.safe_dump(_with_metric(base)), "p.yaml")
    assert policy.spec.analysis.metrics[-1].statistic is Statistic.median
    [policy] = parse_policies(yaml.safe_dump(_with_metric({**base, "statistic": "mean"})), "p.yaml")
    assert policy.spec.analysis.metrics[-1].statistic is Statistic.mean


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ({"preset": "vllm-ttft"}, "remove preset"),
        ({"query": "x", "errorQuery": "y"}, "remove query, errorQuery"),
        ({"quantity": None}, "needs 'quantity': ttft, tpot or e2e"),
        ({"quantity": "itl"}, "quantity"),
        ({"statistic": "p95"}, "'median' or 'mean'"),
        ({"margin": 0.1}, "relative margin"),
        ({"margin": "0.5pp"}, "relative margin"),
    ],
)
def test_paired_metric_mistakes_say_what_to_do(metric: dict[str, Any], message: str) -> None:
    base = {"name": "x-paired", "kind": "paired-latency", "quantity": "ttft", "margin": "10%"}
    doc = _with_metric({k: v for k, v in {**base, **metric}.items() if v is not None})
    assert message in _errors(doc)


def test_paired_words_on_other_kinds_are_refused() -> None:
    doc = _with_metric({"name": "x", "preset": "vllm-ttft", "statistic": "p95", "quantity": "ttft"})
    assert "'quantity' is for kind paired-latency" in _errors(doc)
    doc = _with_metric({"name": "x", "preset": "vllm-ttft", "statistic": "median"})
    assert "a latency histogram's median is 'p50'" in _errors(doc)


def test_a_paired_metric_needs_outputs_and_the_sequential_method() -> None:
    doc = _doc()
    del doc["spec"]["analysis"]["outputs"]
    text = _errors(doc)
    assert "'ttft-paired' (kind paired-latency)" in text and "set spec.analysis.outputs" in text
    assert "spec.analysis" in text  # says where
    doc = _doc()
    doc["spec"]["analysis"]["method"] = "fixed"
    assert "is judged by method sequential only" in _errors(doc)


def test_the_crd_knows_the_paired_kind() -> None:
    crd = yaml.safe_load((REPO / "deploy" / "crd.yaml").read_text())
    metric = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "analysis"]["properties"]["metrics"]["items"]["properties"]
    assert "paired-latency" in metric["kind"]["enum"] and "median" in metric["statistic"]["enum"]
    assert metric["quantity"]["enum"] == ["ttft", "tpot", "e2e"]


# --------------------------------------------------------------------------- judge replay


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    res = runner.invoke(app, ["judge", "replay", *args])
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return res.exit_code, out, " ".join(res.output.split())


def _paired(rng: np.random.Generator, stream: str, factor: float, looks: int, n: int = 40) -> list[dict[str, Any]]:
    rows = []
    for k in range(looks):
        req = rng.lognormal(0.0, 1.0, n)
        p = req * rng.lognormal(0.0, 0.2, n)
        c = req * factor * rng.lognormal(0.0, 0.2, n)
        rows.append({"stream": stream, "t": 30 * (k + 1), "paired": np.stack([p, c], 1).round(6).tolist()})
    return rows


@pytest.mark.parametrize("statistic", ["median", "mean"])
def test_paired_streams_decide_independently(tmp_path: Path, statistic: str) -> None:
    rng = np.random.default_rng(5)
    rows = _paired(rng, "slow", 1.3, 10) + _paired(rng, "same", 1.0, 20)
    rows += [{"stream": "empty", "t": 30, "paired": [[1.0, None], [0.5, 0], [None, 2.0]]}]
    rc, out, text = _run(str(_write(tmp_path / "p.jsonl", rows)), "--statistic", statistic, "--margin", "10%")
    assert rc == 0, text
    by = {r["stream"]: r for r in out}
    assert [r["stream"] for r in out] == ["slow", "same", "empty"]
    assert by["slow"]["decision"] == "fail" and by["slow"]["look"] <= 3
    assert by["slow"]["evidence"]["statistic"] == f"paired-{statistic}"
    assert by["slow"]["evidence"]["interval"][0] > 1.0
    assert by["same"]["decision"] == "pass" and by["same"]["evidence"]["interval"][1] < 1.10
    empty = by["empty"]["evidence"]
    assert by["empty"]["decision"] == "nodata" and empty["extra"]["pairsDropped"] == 3
    assert "3 without the quantity on a side" in empty["sentence"]


def test_paired_looks_from_a_policy_metric(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    path = _write(tmp_path / "p.jsonl", _paired(rng, "s", 1.3, 5))
    rc, out, text = _run(str(path), "--policy", str(CHAT), "--metric", "ttft-paired")
    assert rc == 0, text
    ev = out[0]["evidence"]
    assert out[0]["decision"] == "fail" and ev["name"] == "ttft-paired" and ev["statistic"] == "paired-median"
    assert ev["critical"] is True and ev["margin"] == "10%"


@pytest.mark.parametrize(
    ("row", "args", "message"),
    [
        ({"stream": "a", "t": 30, "paired": [[1.0]]}, [], "line 1: paired[0]: expected [primary, candidate]"),
        ({"stream": "a", "t": 30, "paired": [[1.0, "x"]]}, [], "line 1: paired[0]: expected [primary, candidate]"),
        ({"stream": "a", "t": 30, "paired": [[1.0, True]]}, [], "line 1: paired[0]"),
        ({"stream": "a", "t": 30, "paired": {"p": 1}}, [], "line 1: paired: expected a list"),
        ({"stream": "a", "t": 30, "paired": [], "primary": [1.0]}, [], "give one pair"),
        ({"stream": "a", "t": 30, "paired": [], "dropped": 3}, [], "unknown field(s) dropped"),
        ({"stream": "a", "t": 30, "paired": [[1.0, 1.1]]}, ["--statistic", "p95"], "paired looks need --statistic"),
        ({"stream": "a", "t": 30, "primary": [1.0], "candidate": [1.0]}, ["--statistic", "median"],
         "needs paired looks"),
        ({"stream": "a", "t": 30, "paired": [[1.0, 1.1]]}, ["--statistic", "median", "--margin", "0.1"],
         "relative"),
    ],
)
def test_malformed_paired_input_names_the_line(tmp_path: Path, row: dict[str, Any], args: list[str],
                                               message: str) -> None:
    rc, _, text = _run(str(_write(tmp_path / "bad.jsonl", [row])), *args)
    assert rc == 1 and message in text, text
