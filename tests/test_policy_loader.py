"""Loader errors: FILE:LINE:COL, every problem at once, did-you-mean; fuzzed: never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowctl.cli.policy_files import load_policies
from shadowctl.policy import PolicyError, parse_policies
from shadowctl.policy.yaml_bounds import YamlLimits

REPO = Path(__file__).resolve().parent.parent
CHAT = (REPO / "policies" / "chat-istio.yaml").read_text()


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_misspelt_key_points_at_its_line_with_suggestion() -> None:
    bad = CHAT.replace("    steps: [5, 20, 50]", "    stepz: [5, 20, 50]")
    with pytest.raises(PolicyError) as info:
        parse_policies(bad, "policies/chat.yaml")
    line = _line_of(bad, "stepz")
    assert [str(p) for p in info.value.problems] == [
        f"policies/chat.yaml:{line}:5: spec.canary.stepz: unknown field, did you mean 'steps'?"
    ]


def test_every_problem_reported_at_once_in_line_order() -> None:
    bad = (
        CHAT.replace("mirrorPercent: 20", "mirrorPercent: 150")
        .replace("steps: [5, 20, 50]", "steps: [5, 50, 20]")
        .replace("alpha: 0.05", "alpha: 0.9")
        .replace("interval: 30s", "interval: soon")
    )
    with pytest.raises(PolicyError) as info:
        parse_policies(bad, "f.yaml")
    problems = info.value.problems
    paths = [p.path for p in problems]
    assert paths == ["spec.shadow.mirrorPercent", "spec.canary.steps", "spec.analysis.interval", "spec.analysis.alpha"]
    assert [p.line for p in problems] == sorted(p.line for p in problems)
    interval = problems[2]
    assert interval.line == _line_of(bad, "interval: soon")
    assert interval.column == len("    interval: ") + 1
    assert "'soon' is not a duration" in interval.message


def test_list_item_error_points_into_the_list() -> None:
    bad = CHAT.replace("        margin: 15%", "        margin: lots", 1)
    with pytest.raises(PolicyError) as info:
        parse_policies(bad, "f.yaml")
    (problem,) = info.value.problems
    assert problem.path == "spec.analysis.metrics[1].margin"
    assert problem.line == _line_of(bad, "margin: lots")


def test_missing_required_field_points_at_parent() -> None:
    bad = CHAT.replace("      virtualService: chat\n", "")
    with pytest.raises(PolicyError) as info:
        parse_policies(bad, "f.yaml")
    (problem,) = info.value.problems
    assert problem.path == "spec.target.istio.virtualService"
    assert problem.message == "required field is missing"
    assert problem.line == _line_of(bad, "route: chat-default")


def test_yaml_syntax_error_has_position() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policies("apiVersion: x\nspec: [1, 2\n", "f.yaml")
    (problem,) = info.value.problems
    assert re.match(r"f\.yaml:\d+:\d+: invalid YAML", str(problem))


def test_duplicate_key_is_an_error() -> None:
    text = CHAT.replace("  trigger: manual\n", "  trigger: manual\n  trigger: auto\n")
    with pytest.raises(PolicyError) as info:
        parse_policies(text, "f.yaml")
    assert info.value.problems[0].message == "duplicate key 'trigger'"
    assert info.value.problems[0].line == _line_of(text, "trigger: auto")


def test_several_documents_and_non_mapping() -> None:
    two = CHAT + "\n---\n" + CHAT.replace("name: chat-llama", "name: chat-two")
    assert [p.metadata.name for p in parse_policies(two, "f.yaml")] == ["chat-llama", "chat-two"]
    with pytest.raises(PolicyError, match="expected a mapping"):
        parse_policies("- a\n- b\n", "f.yaml")
    with pytest.raises(PolicyError, match="no ShadowPolicy document"):
        parse_policies("", "f.yaml")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file"):
        load_policies(tmp_path / "missing.yaml")
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PolicyError, match="cannot read"):
        load_policies(binary)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text_never_raises_anything_else(text: str) -> None:
    try:
        parse_policies(text, "fuzz.yaml")
    except PolicyError as exc:
        assert all(p.line >= 1 and p.column >= 1 for p in exc.problems)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["spec", "spec.target", "spec.shadow", "spec.canary", "spec.analysis", "metadata"]), _values)
def test_fuzz_mutated_policy_never_raises_anything_else(where: str, value: object) -> None:
    doc = yaml.safe_load(CHAT)
    node = doc
    keys = where.split(".")
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    try:
        parse_policies(yaml.safe_dump(doc), "fuzz.yaml")
    except PolicyError as exc:
        assert exc.problems


def _alias_bomb(levels: int = 10, fanout: int = 9) -> str:
    """Anchors each used ``fanout`` times by the next: a few hundred bytes standing for fanout**levels nodes."""
    lines = ['a0: &a0 [' + ", ".join(['"x"'] * fanout) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\napiVersion: shadowctl.dev/v1alpha1\nkind: ShadowPolicy\nspec: *a{levels - 1}\n"


def test_an_alias_bomb_is_one_problem_at_its_line() -> None:
    """Before the bound, validating this did not end within 20 s: each alias was walked expanded."""
    text = _alias_bomb()
    with pytest.raises(PolicyError) as info:
        parse_policies(text, "bomb.yaml")
    [problem] = info.value.problems
    assert (problem.line, problem.message) == (6, "YAML stands for more than 200000 nodes (aliases expanded)")
    assert str(problem).startswith("bomb.yaml:6:")


def test_deep_nesting_is_one_problem_not_a_recursion_error() -> None:
    for depth in (65, 5000):
        with pytest.raises(PolicyError) as info:
            parse_policies("[" * depth + "]" * depth, "deep.yaml")
        assert [p.message for p in info.value.problems] == ["YAML nested more than 64 levels deep"]
    with pytest.raises(PolicyError) as shallow:  # at the limit: read, then refused as not a policy
        parse_policies("[" * 64 + "]" * 64, "deep.yaml")
    assert "nested" not in str(shallow.value)


def test_the_limits_can_be_raised_and_lowered() -> None:
    text = "[" * 70 + "]" * 70
    with pytest.raises(PolicyError) as raised:
        parse_policies(text, "deep.yaml", YamlLimits(max_depth=100))
    assert "nested" not in str(raised.value) and "expected a mapping" in str(raised.value)
    small = YamlLimits(max_nodes=20)
    with pytest.raises(PolicyError, match="more than 20 nodes"):
        parse_policies(CHAT, "chat.yaml", small)
    with pytest.raises(PolicyError, match=f"the file is {len(CHAT.encode())} bytes, more than the limit of 100"):
        parse_policies(CHAT, "chat.yaml", YamlLimits(max_bytes=100))


def test_validate_refuses_past_the_limits_with_flags_to_raise_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from shadowctl.cli.app import app

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    runner = CliRunner()
    refused = runner.invoke(app, ["validate", str(bomb), str(REPO / "policies" / "chat-istio.yaml")])
    assert refused.exit_code == 1, refused.output
    assert f"{bomb}:6:" in refused.output and "aliases expanded" in refused.output
    assert "1 of 2 file(s) valid" in refused.output
    tight = runner.invoke(app, ["validate", "--max-nodes", "30", str(REPO / "policies" / "chat-istio.yaml")])
    assert tight.exit_code == 1 and "more than 30 nodes" in tight.output
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 5000 + "\n" + CHAT)
    assert runner.invoke(app, ["validate", "--max-bytes", "1000", str(big)]).exit_code == 1
    assert runner.invoke(app, ["validate", str(big)]).exit_code == 0


_yamlish = st.lists(st.sampled_from(["[", "]", "{", "}", ",", ": ", "- ", "&a ", "&b ", "*a", "*b", "x", "1",
                                     "\n", "  ", "'", '"', "? ", "!!str ", "---\n", "#"]), max_size=200).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_yamlish)
def test_fuzz_yaml_structure_never_raises_anything_else(text: str) -> None:
    """Anchors, aliases, flow and block collections in any order: a PolicyError or policies, nothing else."""
    try:
        parse_policies(text, "fuzz.yaml", YamlLimits(max_nodes=500, max_depth=16))
    except PolicyError as exc:
        assert all(p.line >= 1 and p.column >= 1 for p in exc.problems)


@pytest.mark.parametrize("interval", ["1" + "0" * 30 + "s", 10**400, 1e308, "100000000d"])
def test_a_duration_too_long_is_a_problem_not_an_overflow(interval: object) -> None:
    """A duration past 100 years is a typo; beyond it timedelta overflows (an OverflowError traceback before,
    found by bench/fuzz)."""
    doc = yaml.safe_load(CHAT)
    doc["spec"]["analysis"]["interval"] = interval
    with pytest.raises(PolicyError) as info:
        parse_policies(yaml.safe_dump(doc), "chat.yaml")
    assert any("at most 100 years" in p.message for p in info.value.problems), info.value


@pytest.mark.parametrize("escape", ["\\U00110000", "\\U99999999", "\\UFFFFFFFF"])
def test_an_escape_out_of_unicode_is_a_problem_not_a_traceback(escape: str) -> None:
    """PyYAML's scanner raises ValueError or OverflowError, not a YAML error, on a \\U escape beyond
    Unicode (found by bench/fuzz's atheris census)."""
    with pytest.raises(PolicyError) as info:
        parse_policies(f'a: "{escape}"\n', "escape.yaml")
    [problem] = info.value.problems
    assert (problem.line, problem.column) == (1, 7) and "escape out of range" in problem.message


def test_an_unknown_key_holding_a_bracket_is_named() -> None:
    """A key such as ``x[0]`` is a key, not one of pydantic's validator tags (those were dropped from the
    path by a "[" test, which left an empty path and an IndexError; found by bench/fuzz's atheris census)."""
    with pytest.raises(PolicyError) as info:
        parse_policies(CHAT + "weights[0]: 5\n", "chat.yaml")
    [problem] = info.value.problems
    assert problem.path == "weights[0]" and problem.message.startswith("unknown field")
