"""Builds deploy/grafana/shadowctl.json, the Grafana dashboard of shadowctl rollouts, with grafana-foundation-sdk.

    python deploy/grafana/build.py           # (re)write shadowctl.json beside this file
    python deploy/grafana/build.py --check   # exit 1 when the committed JSON differs from what this builds

What it draws, per policy (variable ``policy``, ``namespace/name``): the phase, the candidate's live
share and mirror share, the judge's verdicts (also as annotations on every panel, with phase changes),
per metric of the policy (a repeated row, variable ``metric``) the primary's and the candidate's
statistic and the effect with the judge's interval and the margin, output agreement per comparator
against the primary-vs-primary baseline, and the taps in the policy's namespace: the latency a tap adds
(its mean end-to-end latency minus the model server's, per pod; the tap runs as a sidecar in the model
server's pod), output events published, dropped and queued, application-level mirror copies. The
controller's series come from its /metrics (docs/controller.md); a standby replica that led before keeps
its last values, so the controller's gauges are read from the replica with ``shadowctl_leader == 1``.

tests/test_dashboard.py checks that the JSON is what this builds and runs every query of it against
the demo's real Prometheus during a rollout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableHide,
    VariableRefresh,
    VariableSort,
)

OUT = Path(__file__).with_name("shadowctl.json")
UID = "shadowctl-rollouts"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
POLICY = 'policy="$policy"'
LEADER = "and on (namespace, pod) (shadowctl_leader == 1)"
"""Appended to a query of the controller's gauges: only the leading replica's values."""
TAP = 'namespace="$namespace"'
RATE = "$__rate_interval"


def _query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS).range()


def _leader(selector: str) -> str:
    return f"({selector}) {LEADER}"


def _series(title: str, description: str, queries: list[tuple[str, str]], *, unit: str = "short",
            width: int = 12, height: int = 8) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).datasource(DS).unit(unit).span(width)
             .height(height).line_width(2).fill_opacity(0).show_points(common.VisibilityMode.NEVER)
             .legend(cb.VizLegendOptions().show_legend(True)
                     .display_mode(common.LegendDisplayMode.LIST).placement(common.LegendPlacement.BOTTOM)))
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + i)))
    return panel


def _variables(d: db.Dashboard) -> db.Dashboard:
    return (
        d.with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(db.QueryVariable("policy").label("Policy").datasource(DS)
                       .description("A ShadowPolicy, as namespace/name")
                       .query("label_values(shadowctl_rollout_phase, policy)")
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))
        .with_variable(db.QueryVariable("namespace").label("Namespace").datasource(DS)
                       .description("The policy's namespace, where its model servers and taps run")
                       .query(f"label_values(shadowctl_rollout_phase{{{POLICY}}}, policy)").regex("/^([^/]+)/.*/")
                       .hide(VariableHide.HIDE_VARIABLE).refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
        .with_variable(db.QueryVariable("metric").label("Metric").datasource(DS)
                       .description("The policy's metrics (spec.analysis.metrics)")
                       .query(f"label_values(shadowctl_metric_effect{{{POLICY}}}, metric)")
                       .multi(True).include_all(True).refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                       .sort(VariableSort.ALPHABETICAL_ASC))
    )


def _annotations(d: db.Dashboard) -> db.Dashboard:
    return (
        d.annotation(db.AnnotationQuery().name("Decisions").datasource(DS).enable(True).icon_color("purple")
                     .expr(f'sum by (outcome) (increase(shadowctl_decisions_total{{{POLICY}, outcome=~"pass|fail"}}'
                           f"[{RATE}])) > 0"))
        .annotation(db.AnnotationQuery().name("Phase changes").datasource(DS).enable(True).icon_color("orange")
                    .expr(f"max by (phase) (changes(shadowctl_rollout_phase{{{POLICY}}}[{RATE}]) > 0 "
                          f"and shadowctl_rollout_phase{{{POLICY}}} == 1)"))
    )


def _rollout(d: db.Dashboard) -> db.Dashboard:
    phase = (statetimeline.Panel().title("Phase").datasource(DS).span(24).height(5)
             .description("The rollout's phase over time (status.phase).")
             .with_target(_query(_leader(f"shadowctl_rollout_phase{{{POLICY}}} == 1"), "{{phase}}"))
             .show_value(common.VisibilityMode.NEVER).merge_values(True)
             .mappings([ValueMap(options={"1": ValueMappingResult(text="current")})]))
    traffic = _series("Candidate's traffic", "Live share routed to the candidate (canary weight) and the share of "
                      "requests mirrored to it (shadow).",
                      [(_leader(f"shadowctl_canary_weight_percent{{{POLICY}}}"), "live share"),
                       (_leader(f"shadowctl_mirror_percent{{{POLICY}}}"), "mirrored")], unit="percent")
    traffic = traffic.min(0).max(100)
    verdicts = (_series("Verdicts", "The judge's verdicts by outcome, one per look.",
                        [(f"sum by (outcome) (increase(shadowctl_decisions_total{{{POLICY}}}[{RATE}]))", "{{outcome}}")])
                .draw_style(common.GraphDrawStyle.BARS).fill_opacity(80))
    return (d.with_row(db.Row("Rollout")).with_panel(phase).with_panel(traffic).with_panel(verdicts))


def _evidence(d: db.Dashboard) -> db.Dashboard:
    values = _series("$metric: primary vs candidate", "The metric's statistic (e.g. p95 TTFT in seconds) for each "
                     "variant, as the last verdict saw it.",
                     [(_leader(f'shadowctl_metric_value{{{POLICY}, metric="$metric"}}'), "{{variant}}")])
    effect = (_series("$metric: effect, the judge's interval and the margin",
                      "The candidate's effect (ratio candidate/primary for a relative margin, difference for an "
                      "absolute one), the judge's interval (shaded), and the margin it is held against. The judge "
                      "passes the metric when the interval lies on the good side of the margin, fails it when "
                      "it lies beyond.",
                      [(_leader(f'shadowctl_metric_effect{{{POLICY}, metric="$metric"}}'), "effect"),
                       (_leader(f'shadowctl_metric_interval_upper{{{POLICY}, metric="$metric"}}'), "interval upper"),
                       (_leader(f'shadowctl_metric_interval_lower{{{POLICY}, metric="$metric"}}'), "interval lower"),
                       (_leader(f'shadowctl_metric_margin{{{POLICY}, metric="$metric"}}'), "margin ({{side}})")])
              .override_by_name("interval upper", [DynamicConfigValue("custom.fillBelowTo", "interval lower"),
                                                   DynamicConfigValue("custom.lineWidth", 0),
                                                   DynamicConfigValue("custom.fillOpacity", 20)])
              .override_by_name("interval lower", [DynamicConfigValue("custom.lineWidth", 0)])
              .override_by_regexp("margin.*", [DynamicConfigValue("custom.lineStyle",
                                                                  {"fill": "dash", "dash": [10, 10]}),
                                               DynamicConfigValue("color", {"mode": "fixed", "fixedColor": "red"})]))
    return d.with_row(db.Row("Evidence: $metric").repeat("metric")).with_panel(values).with_panel(effect)


def _outputs(d: db.Dashboard) -> db.Dashboard:
    agreement = (_series("Output agreement", "Share of output pairs each comparator found in agreement since the "
                         "phase started: candidate vs primary, and the noise baseline (primary vs primary).",
                         [(_leader(f"shadowctl_output_agreement_ratio{{{POLICY}}}"), "{{comparator}} {{variant}}")],
                         unit="percentunit")
                 .min(0).max(1))
    pairs = _series("Output pairs compared", "Pairs each comparator compared since the phase started.",
                    [(_leader(f"shadowctl_output_pairs{{{POLICY}}}"), "{{comparator}} {{variant}}")])
    return d.with_row(db.Row("Outputs")).with_panel(agreement).with_panel(pairs)


def _mean(metric: str, selector: str) -> str:
    return (f"sum by (pod) (rate({metric}_sum{{{selector}}}[{RATE}])) "
            f"/ sum by (pod) (rate({metric}_count{{{selector}}}[{RATE}]))")


def _taps(d: db.Dashboard) -> db.Dashboard:
    overhead = _series("Tap overhead", "Mean latency the tap adds, per pod: its end-to-end latency minus the "
                       "model server's (vLLM's histogram, in the same pod), over the same requests.",
                       [(f"{_mean('shadowctl_tap_e2e_request_latency_seconds', TAP)} - on (pod) "
                         f"{_mean('vllm:e2e_request_latency_seconds', TAP)}", "{{pod}}")], unit="s")
    events = _series("Output events", "Events the broker acknowledged, and those not published, by reason.",
                     [(f"sum by (pod) (rate(shadowctl_tap_events_published_total{{{TAP}}}[{RATE}]))",
                       "published {{pod}}"),
                      (f"sum by (reason) (rate(shadowctl_tap_events_dropped_total{{{TAP}}}[{RATE}]))",
                       "dropped: {{reason}}")], unit="ops", width=8)
    queue = _series("Event queue", "Events waiting for the broker, per tap, and whether it is connected.",
                    [(f"shadowctl_tap_event_queue_depth{{{TAP}}}", "queued {{pod}}"),
                     (f"shadowctl_tap_broker_connected{{{TAP}}}", "connected {{pod}}")], width=8)
    mirror = _series("Tap mirror copies", "Application-level mirror copies by outcome (shadow.mode: tap, or a "
                     "baseline replica).",
                     [(f"sum by (outcome) (rate(shadowctl_tap_mirror_requests_total{{{TAP}}}[{RATE}]))",
                       "{{outcome}}")], unit="ops", width=8)
    requests = _series("Requests through the taps", "Requests by variant and HTTP status code.",
                       [(f"sum by (variant, code) (rate(shadowctl_tap_requests_total{{{TAP}}}[{RATE}]))",
                         "{{variant}} {{code}}")], unit="reqps")
    return (d.with_row(db.Row("Taps")).with_panel(overhead).with_panel(requests).with_panel(events)
            .with_panel(queue).with_panel(mirror))


def _controller(d: db.Dashboard) -> db.Dashboard:
    ticks = _series("Tick duration (p99)", "How long one tick of one policy takes, all policies.",
                    [(f"histogram_quantile(0.99, sum by (le) (rate(shadowctl_reconcile_duration_seconds_bucket[{RATE}])))",
                      "p99")], unit="s", width=8)
    errors = _series("Errors", "Ticks that ended with an error, and metric source failures, for this policy.",
                     [(f"sum(increase(shadowctl_reconcile_errors_total{{{POLICY}}}[{RATE}]))", "tick errors"),
                      (f"sum(increase(shadowctl_source_errors_total{{{POLICY}}}[{RATE}]))", "source errors")],
                     width=8)
    leader = (stat.Panel().title("Leading replica").datasource(DS).span(8).height(8)
              .description("The replica that holds the Lease and runs the rollouts.")
              .with_target(_query("shadowctl_leader == 1", "{{pod}}"))
              .thresholds(db.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
                          .steps([Threshold(value=None, color="red"), Threshold(value=1, color="green")])))
    return d.with_row(db.Row("Controller")).with_panel(ticks).with_panel(errors).with_panel(leader)


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    d = (db.Dashboard("shadowctl rollouts").uid(UID).tags(["shadowctl", "llm", "canary"])
         .description("Shadow and canary rollouts of LLMs by shadowctl: phase, traffic, the judge's evidence, "
                      "output agreement, taps. Built by deploy/grafana/build.py.")
         .editable().tooltip(DashboardCursorSync.CROSSHAIR).time("now-1h", "now").refresh("30s"))
    for part in (_variables, _annotations, _rollout, _evidence, _outputs, _taps, _controller):
        d = part(d)
    model: dict[str, Any] = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    for i, panel in enumerate(model.get("panels", []), start=1):  # stable ids, in order
        panel["id"] = i
    return model


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed JSON is not what this builds")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is not what {Path(__file__).name} builds: run python {Path(__file__)}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
