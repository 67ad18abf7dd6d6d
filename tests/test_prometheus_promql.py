"""Rendering policies into PromQL (no server): presets, selectors, escaping, batching, load-time checks."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shadowctl.cli.policy_files import load_policies
from shadowctl.cli.query_cmd import describe_window
from shadowctl.policy import PolicyError, parse_policies
from shadowctl.policy.model import MetricKind, ShadowPolicy, check_preset
from shadowctl.policy.templates import PLACEHOLDERS, check_template, placeholders, render
from shadowctl.sources.base import HistogramWindow, SourceConfigError, Variant
from shadowctl.sources.prometheus.presets import PRESETS, SelectorStyle
from shadowctl.sources.prometheus.promql import (
    build_request,
    escape_regex,
    escape_string,
    format_window,
    selector,
    service_name,
)
from shadowctl.sources.prometheus.source import batch_expression

REPO = Path(__file__).resolve().parent.parent
END = datetime(2024, 1, 1, 12, tzinfo=UTC)


def test_every_preset_is_a_valid_template_with_a_selector() -> None:
    for preset in PRESETS.values():
        for template in filter(None, (preset.query, preset.error_query)):
            check_template(template)
            assert "selector" in placeholders(template), preset.name
        assert (preset.error_query is not None) == (preset.kind is MetricKind.ratio), preset.name
    istio = [p for p in PRESETS.values() if p.selector is SelectorStyle.istio]
    assert istio and all('reporter="destination"' in p.query for p in istio)


def test_example_policies_still_validate() -> None:
    for name in ("chat-istio.yaml", "knative-canary.yaml", "shadow-only.yaml"):
        assert load_policies(REPO / "policies" / name)


def _doc(metric: str) -> str:
    return f"""apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {{name: p, namespace: llm}}
spec:
  target:
    istio:
      virtualService: vs
      primary: {{host: h, subset: a}}
      candidate: {{host: h, subset: b}}
  canary: {{steps: [10]}}
  analysis:
    metrics:
      - {metric}
"""


def test_unknown_preset_is_rejected_at_load_with_the_known_ones() -> None:
    with pytest.raises(PolicyError) as err:
        parse_policies(_doc("{name: x, preset: vllm-ttfb}"), "p.yaml")
    text = str(err.value)
    assert "p.yaml:13:" in text and "unknown preset 'vllm-ttfb'" in text
    assert "vllm-ttft" in text and "istio-errors" in text and "gpu-cost-per-1k-tokens" in text


def test_preset_kind_must_match() -> None:
    with pytest.raises(PolicyError, match="preset 'vllm-errors' is of kind 'ratio'; set kind: ratio"):
        parse_policies(_doc("{name: x, preset: vllm-errors}"), "p.yaml")
    check_preset("vllm-ttft", MetricKind.latency_histogram)
    with pytest.raises(ValueError, match="unknown preset"):
        check_preset("nope", MetricKind.gauge)


def test_render_fills_and_refuses_missing_values() -> None:
    assert render("a{{ x }}b{{y}}", {"x": "1", "y": "2"}) == "a1b2"
    with pytest.raises(KeyError, match="y"):
        render("{{ x }}{{ y }}", {"x": "1"})
    assert set(PLACEHOLDERS) >= {"selector", "window", "namespace", "pod", "subset", "revision"}


@pytest.mark.parametrize(
    ("value", "escaped"),
    [('a"b', 'a\\"b'), ("a\\b", "a\\\\b"), ("a\nb", "a\\nb"), ('"}', '\\"}'), ("\x00", "\\u0000"), ("é", "é")],
)
def test_escape_string(value: str, escaped: str) -> None:
    assert escape_string(value) == escaped


def test_escaped_values_never_contain_a_bare_quote_or_newline() -> None:
    nasty = 'x"} or vector(1) or {a="\\\n\r\t\x7f\u2028'
    out = escape_string(nasty)
    assert "\n" not in out and "\r" not in out and "\u2028" not in out
    unescaped_quotes = [i for i, ch in enumerate(out) if ch == '"' and (len(out[:i]) - len(out[:i].rstrip("\\"))) % 2 == 0]
    assert unescaped_quotes == []


def test_escape_regex_covers_re2_metacharacters() -> None:
    assert escape_regex("a.b+c*d?(e)|[f]{g}^h$\\") == "a\\.b\\+c\\*d\\?\\(e\\)\\|\\[f\\]\\{g\\}\\^h\\$\\\\"


def test_format_window_in_milliseconds() -> None:
    assert format_window(timedelta(minutes=30)) == "1800000ms"
    assert format_window(timedelta(microseconds=10)) == "1ms"


def _policy(variants: dict[str, Any] | None, target: dict[str, Any], metrics: list[dict[str, Any]]) -> ShadowPolicy:
    analysis: dict[str, Any] = {"metrics": metrics, "interval": "30s"}
    if variants is not None:
        analysis["variants"] = variants
    return ShadowPolicy.model_validate({
        "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy",
        "metadata": {"name": "p", "namespace": "llm"},
        "spec": {"target": target, "canary": {"steps": [10]}, "analysis": analysis},
    })


KNATIVE = {"knative": {"service": "summarize", "primaryRevision": "summarize-00001",
                       "candidateRevision": "summarize-00002"}}
ISTIO = {"istio": {"virtualService": "vs", "primary": {"host": "chat", "subset": "v1"},
                   "candidate": {"host": "chat", "subset": "v2"}}}


def test_knative_revisions_select_pods_and_istio_workloads() -> None:
    pol = _policy(None, KNATIVE, [
        {"name": "ttft", "preset": "vllm-ttft"},
        {"name": "err", "preset": "istio-errors", "kind": "ratio", "statistic": "rate", "margin": "1pp"},
    ])
    ttft, err = (build_request(pol, m, start=END - timedelta(hours=1), end=END) for m in pol.spec.analysis.metrics)
    assert 'pod=~"summarize-00002-deployment-[a-z0-9]+-[a-z0-9]+"' in ttft.candidate.expr
    assert "[3600000ms]" in ttft.candidate.expr
    assert 'destination_workload="summarize-00001-deployment"' in err.primary.expr
    assert err.primary.failures is not None and 'response_code=~"5.."' in err.primary.failures
    assert 'reporter="destination"' in err.primary.failures


def test_istio_subset_comes_from_the_target_and_custom_queries_are_aggregated() -> None:
    query = 'rate(x_bucket{ver="{{ subset }}", ns="{{ namespace }}", h="{{ host }}"}[{{ window }}])'
    pol = _policy(None, ISTIO, [{"name": "lat", "query": query}])
    req = build_request(pol, pol.spec.analysis.metrics[0], start=END - timedelta(minutes=5), end=END)
    assert req.primary.expr == 'sum by (le) (rate(x_bucket{ver="v1", ns="llm", h="chat"}[300000ms]))'
    assert req.candidate.expr.count('ver="v2"') == 1


def test_gauge_window_is_the_interval_but_at_least_a_minute() -> None:
    pol = _policy({"primary": {"workload": "a"}, "candidate": {"workload": "b"}}, ISTIO, [
        {"name": "c", "preset": "gpu-cost-per-1k-tokens", "kind": "gauge", "statistic": "mean"},
    ])
    pol = pol.model_copy(update={"spec": pol.spec.model_copy(update={"analysis": pol.spec.analysis.model_copy(
        update={"gpu_price_per_hour": 3.0})})})
    req = build_request(pol, pol.spec.analysis.metrics[0], start=END - timedelta(hours=1), end=END)
    assert "[60000ms]" in req.primary.expr and req.scale == 3.0 and req.step == timedelta(seconds=30)


def test_config_errors_name_policy_metric_and_field() -> None:
    pol = _policy({"primary": {"subset": "v1"}, "candidate": {"subset": "v2"}}, ISTIO, [
        {"name": "ttft", "preset": "vllm-ttft"},
        {"name": "r", "query": "x", "kind": "ratio", "statistic": "rate", "margin": "1pp"},
    ])
    ttft, ratio = pol.spec.analysis.metrics
    with pytest.raises(SourceConfigError, match=r"llm/p:ttft: cannot select the primary.*variants\.primary\.pod"):
        build_request(pol, ttft, start=END - timedelta(hours=1), end=END)
    with pytest.raises(SourceConfigError, match="errorQuery"):
        build_request(pol, ratio, start=END - timedelta(hours=1), end=END)
    metric = [{"name": "t", "preset": "vllm-ttft"}]
    pol2 = _policy({"primary": {"pod": "a-.*"}, "candidate": {"pod": "b-.*"}}, ISTIO, metric)
    with pytest.raises(SourceConfigError, match="window ends"):
        build_request(pol2, pol2.spec.analysis.metrics[0], start=END, end=END)
    pol3 = _policy({"primary": {"pod": "a-.*"}, "candidate": {"pod": "a-.*"}}, ISTIO, metric)
    with pytest.raises(SourceConfigError, match="same query"):
        build_request(pol3, pol3.spec.analysis.metrics[0], start=END - timedelta(hours=1), end=END)


def test_selector_styles() -> None:
    from shadowctl.policy.model import VariantSelector

    assert selector(SelectorStyle.pod, "llm", VariantSelector(pod="x-.*", workload="w")) == 'namespace="llm", pod=~"x-.*"'
    assert selector(SelectorStyle.istio, "llm", VariantSelector(subset="v2")) == (
        'destination_workload_namespace="llm", destination_version="v2"'
    )
    assert selector(SelectorStyle.pod, "llm", VariantSelector(subset="v2")) is None
    # A subset is matched with the destination host's service: other services may share the version label.
    assert selector(SelectorStyle.istio, "llm", VariantSelector(subset="v2"), "chat.llm.svc.cluster.local") == (
        'destination_workload_namespace="llm", destination_service_name="chat", destination_version="v2"'
    )
    for host, name in (("chat", "chat"), ("chat.llm", "chat"), ("chat.llm.svc", "chat"),
                       ("chat.llm.svc.corp.internal", "chat"), ("api.example.com", "api.example.com"),
                       ("example.com", "example.com")):
        assert service_name(host, "llm") == name, host


def test_batch_expression_tags_every_variant_and_part() -> None:
    pol = _policy({"primary": {"workload": "a"}, "candidate": {"workload": "b"}}, ISTIO, [
        {"name": "e", "preset": "vllm-errors", "kind": "ratio", "statistic": "rate", "margin": "1pp"},
    ])
    req = build_request(pol, pol.spec.analysis.metrics[0], start=END - timedelta(hours=1), end=END)
    expr = batch_expression([req])
    for tag in ("0/p/v", "0/c/v", "0/p/f", "0/c/f"):
        assert f'"shadowctl_key", "{tag}", "", ""' in expr
    assert f"({req[Variant.candidate].failures}) or (0 * ({req.candidate.expr}))" in expr


def test_query_shows_the_judges_quantiles() -> None:
    h = HistogramWindow((0.1, 0.5, 1.0, math.inf), (40.0, 60.0, 80.0, 100.0))
    shown = describe_window(h)
    assert shown["p50"] == pytest.approx(0.1 + 0.4 * (50 - 40) / 20)  # the median's bucket: linear, as PromQL
    assert shown["p95"] == 1.0 and shown["p99"] == 1.0  # in the +Inf bucket: at least the highest finite bound
    assert shown["at_least"] == ["p95", "p99"]
    tail = describe_window(HistogramWindow((0.1, 1.0, 10.0, math.inf), (50.0, 90.0, 99.0, 100.0)))
    assert 1.0 < tail["p95"] < 10.0 and tail["p95"] < 1.0 + 9.0 * (95 - 90) / 9  # a power law, below linear
    assert "at_least" not in tail and describe_window(HistogramWindow((1.0, math.inf), (0.0, 0.0)))["p50"] is None


def test_docs_show_every_preset_query_verbatim() -> None:
    docs = (REPO / "docs" / "metrics.md").read_text()
    for preset in PRESETS.values():
        assert f"### `{preset.name}`" in docs
        for template in filter(None, (preset.query, preset.error_query)):
            assert template in docs, preset.name
