"""deploy/grafana/shadowctl.json: the committed JSON is what deploy/grafana/build.py builds, every query is
PromQL a real Prometheus accepts, and every series it reads is one shadowctl exposes. That each query
also returns data during a rollout is checked by tests/test_demo_e2e.py (the "good" scenario runs the
whole dashboard against the demo's Prometheus before it stops)."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from conftest_prometheus import HAVE_PROMETHEUS, SKIP_REASON, PrometheusFactory
from dashboard_queries import DASHBOARD, Checker, builder, dashboard, queries, variables
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shadowctl.controller.metrics import ControllerMetrics
from shadowctl.tap.metrics import TapMetrics

_NAME = re.compile(r"\b(shadowctl_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
_SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def test_the_committed_json_is_what_the_code_builds() -> None:
    assert DASHBOARD.read_text() == builder().render(), "run: python deploy/grafana/build.py"
    assert builder().main(["--check"]) == 0


def test_it_draws_what_the_issue_asks_for() -> None:
    model = dashboard()
    exprs = "\n".join(q.expr for q in queries(model))
    for series in ("shadowctl_rollout_phase", "shadowctl_canary_weight_percent", "shadowctl_mirror_percent",
                   "shadowctl_metric_value", "shadowctl_metric_interval_lower", "shadowctl_metric_interval_upper",
                   "shadowctl_metric_margin", "shadowctl_output_agreement_ratio", "shadowctl_tap_events_dropped_total",
                   "vllm:e2e_request_latency_seconds_sum"):
        assert series in exprs, series
    assert [v["name"] for v in variables(model)] == ["policy", "namespace", "metric"]
    evidence = [q for q in queries(model) if q.repeat == "metric"]
    assert len(evidence) >= 5 and all('metric="$metric"' in q.expr for q in evidence)
    assert {a["name"] for a in model["annotations"]["list"]} == {"Decisions", "Phase changes"}
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))


def _exposed() -> set[str]:
    """Every sample name shadowctl's controller and tap expose (after a tick and a request)."""
    from shadowctl.machine import RolloutState
    from shadowctl.policy.status import Phase

    controller = ControllerMetrics()
    controller.observe_tick("llm/chat", RolloutState(phase=Phase.shadowing, step=0, weight=0), None, 0.01, False)
    tap = TapMetrics("primary")
    tap.observe(model="m", status=200, ttft_s=0.1, e2e_s=0.2, output_tokens=3)
    names = set()
    for registry in (controller.registry, tap.registry):
        names |= {s.name for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    return names | {f.name for f in text_string_to_metric_families(generate_latest(controller.registry).decode())}


def test_every_shadowctl_series_it_reads_exists() -> None:
    exposed = _exposed()
    model = dashboard()
    texts = [q.expr for q in queries(model)] + [str(v["query"]) for v in variables(model)]
    used = {name for text in texts for name in _NAME.findall(text) if name.startswith("shadowctl_")}
    # Gauges the controller sets only from a verdict (their names are in its registry's families).
    families = {f.name for f in text_string_to_metric_families(generate_latest(ControllerMetrics().registry).decode())}
    missing = sorted(n for n in used if n not in exposed and n not in families
                     and not any(n.endswith(s) and n.removesuffix(s) in families for s in _SUFFIXES))
    assert not missing, missing


@pytest.mark.skipif(not HAVE_PROMETHEUS, reason=SKIP_REASON)
async def test_every_query_is_promql_a_real_prometheus_accepts(prometheus_factory: PrometheusFactory) -> None:
    prom = prometheus_factory()
    model = dashboard()
    async with httpx.AsyncClient() as client:
        checker = Checker(client, prom.url, time.time() - 60, time.time())
        await checker.check(model, {"policy": "llm/chat", "namespace": "llm", "metric": "ttft-p50"})
        assert checker.ran >= len(queries(model))
        # No data here (an empty Prometheus): only refusals count.
        invalid = [p for p in checker.problems if p.startswith("invalid")]
        assert not invalid, invalid
        bad = await checker.range("sum(rate(shadowctl_decisions_total[1m]")
        assert bad is None and checker.problems[-1].startswith("invalid")  # the checker does see a refusal
