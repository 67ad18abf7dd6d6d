"""`shadowctl render` on an HTTPRoute and on a Knative Service with a third target, through the real typer app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from routers_util import FIXTURES, assert_valid
from typer.testing import CliRunner

from shadowctl.cli.app import app
from shadowctl.routers.base import MANAGED_ANNOTATION

runner = CliRunner()
ROUTE = str(FIXTURES / "httproute-llm.yaml")
REPO = Path(__file__).resolve().parent.parent


def _text(result: object) -> str:
    return " ".join(result.output.split())  # type: ignore[attr-defined]


def _chat(obj: dict) -> dict:  # type: ignore[type-arg]
    return next(r for r in obj["spec"]["rules"] if r.get("name") == "chat")


@pytest.mark.usefixtures("local_cluster")  # assert_valid asks the real API server
def test_renders_a_canary_step_and_a_mirror() -> None:
    result = runner.invoke(app, ["render", ROUTE, "--primary", "models/llm-v1", "--candidate", "llm-v2:8000",
                                 "--rule", "chat", "--weight", "25", "--mirror", "2.5"])
    assert result.exit_code == 0, result.output
    obj = yaml.safe_load(result.stdout)
    chat = _chat(obj)
    assert [(r["name"], r.get("weight")) for r in chat["backendRefs"]] == [("llm-v1", 3), ("llm-v2", 1)]
    assert chat["filters"][-1]["requestMirror"] == {"backendRef": {"name": "llm-v2", "port": 8000},
                                                    "fraction": {"numerator": 25, "denominator": 1000}}
    assert MANAGED_ANNOTATION in obj["metadata"]["annotations"]
    assert_valid(obj)


def test_diff_shows_only_the_weights() -> None:
    result = runner.invoke(app, ["render", str(REPO / "gateway-api" / "chat.yaml"), "--primary", "chat-v1",
                                 "--candidate", "chat-v2", "--rule", "chat-default", "--weight", "10", "--diff"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    added = [ln[1:].strip() for ln in lines if ln.startswith("+") and not ln.startswith("+++")]
    assert "weight: 9" in added and "weight: 1" in added and "- name: chat-v2" in added
    assert not [ln for ln in lines if ln.startswith("-") and not ln.startswith("---")]


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--rule", "chats"], 1, ["no rule named 'chats'", "debug, chat, default"]),
    (["--rule", "chat", "--primary", "llm-v9"], 1, ["no primary backendRef llm-v9", "it has: llm-v1:8000"]),
    ([], 1, ["3 rules", "name the one to manage"]),
    (["--rule", "chat", "--primary", "llm-v1:80x"], 2, ["the port after ':' must be a number"]),
    (["--rule", "chat", "--candidate", "llm-v1"], 2, ["the same backend"]),
    (["--route", "chat"], 2, ["--route is for VirtualServices"]),
    (["--rule", "chat", "--weight", "10", "--mirror", "0.000000001"], 1, ["at most 7 decimals"]),
])
def test_errors_say_what_is_missing(args: list[str], code: int, words: list[str]) -> None:
    base = {"--primary": "llm-v1", "--candidate": "llm-v2", "--weight": "10"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    flat = [x for kv in base.items() for x in kv]
    result = runner.invoke(app, ["render", ROUTE, *flat])
    assert result.exit_code == code, result.output
    for w in words:
        assert w in _text(result)
    assert "Traceback" not in _text(result)


def test_an_httproute_needs_primary_and_candidate() -> None:
    result = runner.invoke(app, ["render", ROUTE, "--weight", "10", "--rule", "chat"])
    assert result.exit_code == 2 and "needs --primary and --candidate" in _text(result)


def test_knative_with_a_third_target_is_rendered(tmp_path: Path) -> None:
    """Issue #17 item 4: a `previous` tag holding 10% keeps it; the candidate's 20% comes from the primary."""
    svc = yaml.safe_load((FIXTURES / "ksvc-llm.yaml").read_text())
    svc["spec"]["traffic"][0]["percent"] = 90
    svc["spec"]["traffic"].append({"tag": "previous", "revisionName": "llm-00000", "percent": 10})
    svc["status"]["traffic"].append({"tag": "previous", "revisionName": "llm-00000", "percent": 10})
    path = tmp_path / "ksvc.yaml"
    path.write_text(yaml.safe_dump(svc))
    result = runner.invoke(app, ["render", str(path), "--weight", "20"])
    assert result.exit_code == 0, result.output
    traffic = yaml.safe_load(result.stdout)["spec"]["traffic"]
    assert [(t.get("tag"), t["percent"]) for t in traffic] == [
        (None, 70), ("latest", 0), ("stable", 0), ("previous", 10), ("candidate", 20)]
    over = runner.invoke(app, ["render", str(path), "--weight", "95"])
    assert over.exit_code == 1 and "hold 10% of the traffic, so the candidate cannot get 95%" in _text(over)
