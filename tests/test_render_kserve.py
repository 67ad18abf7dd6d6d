"""`shadowctl render` on a KServe InferenceService, through the real typer app: --weight only, --mirror refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kserve_helpers import kserve  # noqa: F401 - the fixture
from routers_util import FIXTURES, assert_valid
from typer.testing import CliRunner

from shadowctl.cli.app import app
from shadowctl.routers.base import MANAGED_ANNOTATION

runner = CliRunner()
ISVC = str(FIXTURES / "isvc-llm.yaml")
REPO = Path(__file__).resolve().parent.parent


def _text(result: object) -> str:
    return " ".join(result.output.split())  # type: ignore[attr-defined]


@pytest.mark.usefixtures("kserve")  # assert_valid asks the real API server, with KServe's CRD
def test_renders_a_canary_step() -> None:
    result = runner.invoke(app, ["render", ISVC, "--weight", "25"])
    assert result.exit_code == 0, result.output
    obj = yaml.safe_load(result.stdout)
    assert obj["spec"]["predictor"]["canaryTrafficPercent"] == 25
    assert MANAGED_ANNOTATION in obj["metadata"]["annotations"]
    assert_valid(obj)


def test_diff_shows_only_the_percent_and_the_record() -> None:
    result = runner.invoke(app, ["render", ISVC, "--weight", "10", "--diff"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    added = [ln[1:].strip() for ln in lines if ln.startswith("+") and not ln.startswith("+++")]
    removed = [ln[1:].strip() for ln in lines if ln.startswith("-") and not ln.startswith("---")]
    assert removed == ["canaryTrafficPercent: 0"]
    assert added[0].startswith(f"{MANAGED_ANNOTATION}: ") and added[1:] == ["canaryTrafficPercent: 10"]


def test_mirror_is_refused_pointing_to_the_tap() -> None:
    result = runner.invoke(app, ["render", ISVC, "--weight", "0", "--mirror", "5"])
    assert result.exit_code == 2
    assert "cannot mirror" in _text(result) and "shadow.mode: tap" in _text(result)


@pytest.mark.parametrize("args", [["--primary", "llm-predictor-00001"], ["--candidate", "x"], ["--rule", "chat"],
                                  ["--route", "chat"], ["--tag", "canary"]])
def test_other_options_are_refused(args: list[str]) -> None:
    result = runner.invoke(app, ["render", ISVC, "--weight", "10", *args])
    assert result.exit_code == 2
    assert f"{args[0]}: not for an InferenceService" in _text(result) and "--weight only" in _text(result)


def test_an_object_without_a_candidate_names_what_is_missing() -> None:
    result = runner.invoke(app, ["render", str(REPO / "kserve" / "chat.yaml"), "--weight", "10"])
    assert result.exit_code == 1
    assert "InferenceService llm/chat" in _text(result) and "no ready revision" in _text(result)


def test_a_mangled_object_is_refused_in_words(tmp_path: Path) -> None:
    obj = yaml.safe_load(Path(ISVC).read_text())
    obj["spec"]["predictor"]["canaryTrafficPercent"] = "ten"
    path = tmp_path / "isvc.yaml"
    path.write_text(yaml.safe_dump(obj))
    result = runner.invoke(app, ["render", str(path), "--weight", "10"])
    assert result.exit_code == 1
    assert "spec.predictor.canaryTrafficPercent: expected an integer, got 'ten'" in _text(result)
