"""Names from a policy or the cluster reach PromQL only as data (issue #16 item 6).

Every name is escaped for a double-quoted PromQL string (and regex-escaped where it is matched with
``=~``); a template that puts a name anywhere else is refused when the policy loads. The names below go
through every query shadowctl writes (presets of both selector styles, a gauge's three label sets, a
custom template, the batched and grouped forms) and are checked by a real Prometheus's parser: the query
parses, has the structure it has with plain names, and each name reads back exactly as the label value
and as the regex shadowctl writes for it (bench/fuzz/targets.py `promql`, where the census runs 10,000
drawn names; tests/test_fuzz_targets.py runs 40 more).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest_prometheus import HAVE_PROMETHEUS, SKIP_REASON

from shadowctl.policy import PolicyError, parse_policies
from shadowctl.sources.prometheus.promql import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "fuzz"))

import targets

REPO = Path(__file__).resolve().parent.parent

NASTY = [
    'a"b', "a\\", '\\"}) or vector(1) #', "x\ny\r\tz", "{{ namespace }}", "}}{{ pod }}", "é🙂日本",
    "a`b'c", "\x00\x01\x7f\u0085\u2028", 'v1", destination_workload=~".*', "a.b+c*d?(e)|[f]{g}^h$",
    'a"a"\ufffd\ufffd',  # atheris: Prometheus's lexer refuses a raw U+FFFD ("invalid UTF-8 rune")
]


@pytest.mark.skipif(not HAVE_PROMETHEUS, reason=SKIP_REASON)
@pytest.mark.parametrize("name", NASTY)
def test_a_name_is_only_data_to_prometheus(name: str) -> None:
    """Workload, revision and subset carry the name, the pod pattern its regex-escaped form."""
    targets._promql("\x1f".join([name, name + "r", name + "s", name]).encode("utf-8"))


def test_a_finding_here_would_be_seen() -> None:
    """The check itself: a query whose names were pasted in unescaped fails it."""
    import shadowctl.sources.prometheus.promql as promql

    if not HAVE_PROMETHEUS:
        pytest.skip(SKIP_REASON)
    original = promql.escape_string
    try:
        promql.escape_string = lambda value: value  # type: ignore[assignment]
        with pytest.raises(AssertionError):
            targets._promql(b'v1", destination_workload=~".*\x1fr\x1fs\x1fp')
    finally:
        promql.escape_string = original


def _doc(query: str | None = None, variants: dict[str, Any] | None = None,
         knative: dict[str, Any] | None = None) -> str:
    doc = yaml.safe_load((REPO / "policies" / "chat-istio.yaml").read_text())
    if query is not None:
        doc["spec"]["analysis"]["metrics"] = [{"name": "q", "query": query, "kind": "counter", "statistic": "rate"}]
    if variants is not None:
        doc["spec"]["analysis"]["variants"] = variants
    if knative is not None:
        doc["spec"]["target"] = {"knative": knative}
        doc["spec"]["shadow"]["mode"] = "tap"
    return yaml.safe_dump(doc)


@pytest.mark.parametrize(("query", "where"), [
    ("sum(x{version={{ subset }}})", "outside a string"),
    ("sum(x{version='{{ subset }}'})", "inside a '-quoted string"),
    ("sum(x{version=`{{ workload }}`})", "inside a `-quoted string"),
    ('sum(x{a="\\"", b={{ namespace }}})', "outside a string"),  # an escaped quote does not open a string
])
def test_a_template_must_quote_the_names_it_uses(query: str, where: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policies(_doc(query))
    assert where in str(info.value) and "spec.analysis.metrics[0].query" in str(info.value)


def test_quoted_names_selectors_and_windows_are_fine() -> None:
    query = 'sum(rate(x{ {{ selector }}, v="{{ subset }}", w="a\\"{{ workload }}" }[{{ window }}])) by ({{ variant }})'
    assert parse_policies(_doc(query))[0].spec.analysis.metrics[0].query == query


def test_names_that_cannot_be_sent_are_refused_at_load() -> None:
    with pytest.raises(PolicyError, match="unable to parse raw data as a unicode string"):
        parse_policies(_doc(variants={"primary": {"workload": "a\ud800"}}))
    with pytest.raises(PolicyError, match="empty name selects nothing"):
        parse_policies(_doc(variants={"primary": {"subset": ""}}))
    with pytest.raises(PolicyError, match="not a valid name"):
        parse_policies(_doc(knative={"service": "chat", "candidateRevision": 'x"} or vector(1)'}))


RE2_REFUSED = ["chat-(?=v2)", "(chat)-\\1", "chat-.*+", "chat-v2-[a-z]++", "chat-a{2}+", "(?P<n>a)(?P=n)",
               "chat\\Z", "(?>chat)", "chat-(", "chat-[a-"]
RE2_ACCEPTED = ["chat-v2-.*", "(?i)chat-v2-[a-z0-9]+", "[[:alpha:]]+-v2", "\\pL+-v2", "chat-[(?=]", "[]a]x",
                "chat-v2-.+?", "chat-v2-\\d{3}"]


@pytest.mark.parametrize("pattern", RE2_REFUSED)
def test_a_pod_pattern_prometheus_cannot_compile_is_refused_at_load(pattern: str) -> None:
    """One such pattern would fail the batched query of every rollout it shares a look with."""
    with pytest.raises(PolicyError, match=r"spec.analysis.variants.primary.pod: .* \(RE2\) can use"):
        parse_policies(_doc(variants={"primary": {"pod": pattern}}))
    if HAVE_PROMETHEUS:  # and Prometheus itself refuses it: the rule is not stricter than RE2
        with pytest.raises(AssertionError, match="error parsing regexp"):
            _prometheus().call("/api/v1/format_query", f"up{{pod=~{quote(pattern)}}}")


@pytest.mark.parametrize("pattern", RE2_ACCEPTED)
def test_pod_patterns_in_re2_syntax_are_accepted(pattern: str) -> None:
    assert parse_policies(_doc(variants={"primary": {"pod": pattern}}))[0].spec.analysis.variants.primary.pod == pattern
    if HAVE_PROMETHEUS:
        _prometheus().call("/api/v1/format_query", f"up{{pod=~{quote(pattern)}}}")


def _prometheus() -> targets._RealPrometheus:
    if not targets._REAL_PROMETHEUS:
        targets._REAL_PROMETHEUS.append(targets._RealPrometheus())
    return targets._REAL_PROMETHEUS[0]
