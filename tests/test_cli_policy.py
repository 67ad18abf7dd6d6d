"""`shadowctl validate`, `schema`, `--version`; the committed CRD matches the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from shadowctl import __version__
from shadowctl.cli.app import app
from shadowctl.cli.policy_cmds import render_crd_yaml
from shadowctl.policy.crd import crd

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_validate_examples_ok() -> None:
    result = runner.invoke(app, ["validate", str(REPO / "policies")])
    assert result.exit_code == 0, result.output
    assert "3 of 3 file(s) valid" in result.output or "of" in result.output


def test_validate_reports_unknown_key_and_decreasing_step(tmp_path: Path) -> None:
    for name in ("chat-istio.yaml", "knative-canary.yaml"):
        shutil.copy(REPO / "policies" / name, tmp_path / name)
    chat = tmp_path / "chat-istio.yaml"
    chat.write_text(chat.read_text().replace("    maxWeight: 50", "    maxWeight: 50\n    maxWieght: 40"))
    kn = tmp_path / "knative-canary.yaml"
    kn.write_text(kn.read_text().replace("steps: [10, 25, 50, 100]", "steps: [10, 50, 25, 100]"))
    result = runner.invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 1
    chat_line = next(i for i, ln in enumerate(chat.read_text().splitlines(), 1) if "maxWieght" in ln)
    kn_line = next(i for i, ln in enumerate(kn.read_text().splitlines(), 1) if "steps:" in ln)
    assert f"{chat}:{chat_line}:5: spec.canary.maxWieght: unknown field, did you mean 'maxWeight'?" in result.output
    assert f"{kn}:{kn_line}:12: spec.canary.steps: steps must be strictly increasing" in result.output
    assert "Traceback" not in result.output


def test_validate_usage_errors_exit_2(tmp_path: Path) -> None:
    assert runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")]).exit_code == 2
    assert runner.invoke(app, ["validate", str(tmp_path)]).exit_code == 2  # no yaml files
    assert runner.invoke(app, ["validate"]).exit_code == 2


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(app, ["validate", "--help"])
    assert result.exit_code == 0 and "FILE:LINE:COL" in result.output


def test_schema_is_json_schema_with_policy_fields() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["title"] == "ShadowPolicy"
    assert "PT" not in result.output  # durations are written as people write them
    assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])


def _walk(node: object) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    if isinstance(node, dict):
        out.append(node)
        for v in node.values():
            out.extend(_walk(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(_walk(v))
    return out


def test_committed_crd_matches_model() -> None:
    committed = (REPO / "deploy" / "crd.yaml").read_text()
    assert committed == render_crd_yaml(crd()), "deploy/crd.yaml is stale: run `shadowctl schema --crd > deploy/crd.yaml`"


def test_crd_schema_is_structural() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for node in _walk(schema):
        assert "$ref" not in node and "const" not in node and "title" not in node
        if "properties" in node:
            assert node.get("type") == "object" and "additionalProperties" not in node
        if isinstance(node.get("anyOf"), list):
            assert all(b.get("type") != "null" for b in node["anyOf"])  # type: ignore[union-attr]
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Weight", "Mirror", "Verdict", "Age"]
