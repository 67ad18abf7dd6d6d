"""`shadowctl render`: the pure builders on the command line, through the real typer app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from routers_util import FIXTURES, assert_valid
from typer.testing import CliRunner

from shadowctl.cli.app import app
from shadowctl.routers.base import MANAGED_ANNOTATION

runner = CliRunner()
VS = str(FIXTURES / "vs-llm.yaml")
KSVC = str(FIXTURES / "ksvc-llm.yaml")
HOST = "llm.models.svc.cluster.local"


def _text(result: object) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())  # type: ignore[attr-defined]


def _chat(obj: dict) -> dict:  # type: ignore[type-arg]
    return next(r for r in obj["spec"]["http"] if r.get("name") == "chat")


@pytest.mark.usefixtures("local_cluster")  # assert_valid asks the real API server
def test_renders_a_canary_step_as_yaml() -> None:
    result = runner.invoke(app, ["render", VS, "--primary", f"{HOST}/v1:8000", "--candidate", f"{HOST}/v2:8000",
                                 "--route", "chat", "--weight", "25", "--mirror", "2.5"])
    assert result.exit_code == 0, result.output
    obj = yaml.safe_load(result.stdout)
    chat = _chat(obj)
    assert [e["weight"] for e in chat["route"]] == [75, 25]
    assert chat["mirrorPercentage"] == {"value": 2.5}
    assert MANAGED_ANNOTATION in obj["metadata"]["annotations"]
    assert_valid(obj)


def test_diff_shows_only_the_change() -> None:
    result = runner.invoke(app, ["render", VS, "--primary", f"{HOST}/v1", "--candidate", f"{HOST}/v2",
                                 "--route", "chat", "--weight", "10", "--diff"])
    assert result.exit_code == 0, result.output
    added = [line for line in result.stdout.splitlines() if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in result.stdout.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert result.stdout.startswith("---")
    assert removed == []
    assert "+      weight: 90" in added and "+      weight: 10" in added
    assert not any("debug" in line or "fallback" in line for line in added)


def test_missing_route_lists_the_routes() -> None:
    result = runner.invoke(app, ["render", VS, "--primary", f"{HOST}/v1", "--candidate", f"{HOST}/v2",
                                 "--route", "chats", "--weight", "10"])
    assert result.exit_code == 1
    assert "no http route named 'chats'" in _text(result) and "debug, chat, default" in _text(result)
    assert "Traceback" not in _text(result)


def test_missing_destination_lists_the_destinations() -> None:
    result = runner.invoke(app, ["render", VS, "--primary", f"{HOST}/v0", "--candidate", f"{HOST}/v2",
                                 "--route", "chat", "--weight", "10"])
    assert result.exit_code == 1
    assert f"no primary destination {HOST}/v0" in _text(result) and f"{HOST}/v1:8000" in _text(result)


@pytest.mark.usefixtures("local_cluster")
def test_knative_service() -> None:
    result = runner.invoke(app, ["render", KSVC, "--candidate", "llm-00002", "--weight", "20", "--tag", "canary"])
    assert result.exit_code == 0, result.output
    obj = yaml.safe_load(result.stdout)
    assert obj["spec"]["traffic"][0] == {"revisionName": "llm-00001", "percent": 80}
    assert obj["spec"]["traffic"][-1] == {"tag": "canary", "revisionName": "llm-00002", "percent": 20}
    assert_valid(obj)


def test_knative_errors() -> None:
    mirror = runner.invoke(app, ["render", KSVC, "--weight", "0", "--mirror", "5"])
    assert mirror.exit_code == 2 and "cannot mirror" in _text(mirror)
    missing = runner.invoke(app, ["render", KSVC, "--candidate", "llm-00009", "--weight", "5"])
    assert missing.exit_code == 1 and "llm-00009" in _text(missing) and "llm-00001, llm-00002" in _text(missing)


def test_usage_errors(tmp_path: Path) -> None:
    no_primary = runner.invoke(app, ["render", VS, "--candidate", f"{HOST}/v2", "--weight", "10"])
    assert no_primary.exit_code == 2 and "--primary and --candidate" in _text(no_primary)
    other = tmp_path / "cm.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    wrong = runner.invoke(app, ["render", str(other), "--weight", "10"])
    assert wrong.exit_code == 1 and "is not an Istio VirtualService, a Gateway API HTTPRoute, a Knative Service or a KServe InferenceService" in _text(wrong)
    bad_weight = runner.invoke(app, ["render", VS, "--weight", "101"])
    assert bad_weight.exit_code == 2


CHAT = "chat.llm.svc.cluster.local"


def test_a_file_with_a_destination_rule_beside_the_virtual_service(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    result = runner.invoke(app, ["render", str(repo / "istio" / "chat.yaml"), "--primary", f"{CHAT}/v1:8000",
                                 "--candidate", f"{CHAT}/v2:8000", "--route", "chat-default", "--weight", "10"])
    assert result.exit_code == 0, result.output
    obj = yaml.safe_load(result.output)
    assert obj["kind"] == "VirtualService"
    route = next(r for r in obj["spec"]["http"] if r["name"] == "chat-default")
    assert sorted(d["weight"] for d in route["route"]) == [10, 90]
    two = tmp_path / "two.yaml"
    two.write_text((repo / "istio" / "chat.yaml").read_text() + "\n---\n" + (repo / "istio" / "embed.yaml").read_text())
    result = runner.invoke(app, ["render", str(two), "--primary", f"{CHAT}/v1", "--candidate", f"{CHAT}/v2",
                                 "--weight", "10"])
    assert result.exit_code == 1
    assert "found 2 among 4 documents" in " ".join(result.output.split())


def test_hostile_or_mangled_files_are_one_line_errors(tmp_path: Path) -> None:
    """An alias bomb, deep nesting, bytes that are not UTF-8, metadata or a weight of the wrong type:
    exit 1 with the file and where, never a traceback (before: AttributeError/TypeError from the builder)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a0: &a0 [x, x, x, x, x, x, x, x, x]\n"
                    + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)))
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000 + "]" * 5000)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    vs = yaml.safe_load(Path(VS).read_text())
    meta = tmp_path / "meta.yaml"
    meta.write_text(yaml.safe_dump({**vs, "metadata": ["chat"]}))
    weight = tmp_path / "weight.yaml"
    _chat(vs)["route"][0]["weight"] = "ten"
    weight.write_text(yaml.safe_dump(vs))
    expected = {
        bomb: f"{bomb}:6:", deep: "nested more than 64 levels", binary: "not UTF-8 text",
        meta: "metadata: expected a mapping, got list",
        weight: "spec.http[1].route[0].weight: expected an integer, got 'ten'",
    }
    for path, words in expected.items():
        result = runner.invoke(app, ["render", str(path), "--primary", f"{HOST}/v1", "--candidate", f"{HOST}/v2",
                                     "--route", "chat", "--weight", "10"])
        assert result.exit_code == 1, (path.name, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert words in _text(result), (path.name, result.output)


def test_an_escape_out_of_unicode_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "escape.yaml"
    bad.write_text('apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: "\\U00110000"}\n')
    result = runner.invoke(app, ["render", str(bad), "--weight", "10"])
    assert result.exit_code == 1 and "escape out of range" in _text(result), result.output
