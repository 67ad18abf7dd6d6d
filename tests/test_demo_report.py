"""The demo report writer: markdown, chart and data from literal recorded runs (no mocks: it is pure)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from shadowctl.demo.report import (
    CHART_SIZE_PX,
    ReportError,
    build_figure,
    effect_text,
    load_record,
    main,
    render_markdown,
    write_report,
)
from shadowctl.policy.status import MetricEvidence

REPO = Path(__file__).resolve().parent.parent
POLICY_YAML = """apiVersion: shadowctl.io/v1alpha1
kind: ShadowPolicy
metadata:
  name: chat
  namespace: llm
spec:
  canary:
    steps: [10, 50]
"""


def _metric(name: str, statistic: str, outcome: str, scale: str, primary: float, candidate: float, effect: float,
            interval: list[float | None], threshold: float | None, sentence: str, n: tuple[int, int] = (812, 401),
            critical: bool = True) -> dict[str, Any]:
    return {
        "name": name, "outcome": outcome, "statistic": statistic, "direction": "increase",
        "margin": "15%" if scale == "ratio" else "0.005", "critical": critical,
        "samples": {"primary": n[0], "candidate": n[1]}, "primary": primary, "candidate": candidate,
        "effect": effect, "effectScale": scale, "interval": interval, "threshold": threshold,
        "crossed": None, "sentence": sentence,
    }


def _samples(until: int, shadow_at: float, canary_at: float, end_at: float, weight: int) -> list[dict[str, Any]]:
    out = []
    for t in range(until + 1):
        shadow = shadow_at <= t < canary_at
        live = canary_at <= t < end_at
        cand = 0.16 if t >= shadow_at and t < end_at else None
        out.append({
            "t": float(t),
            "phase": "Shadowing" if shadow else "Progressing" if live else "Pending",
            "primary_weight": 100 - (weight if live else 0),
            "candidate_weight": weight if live else 0,
            "mirror": 50.0 if shadow else None,
            "ttft_p50": {"primary": 0.12, "candidate": cand},
            # p99 needs more data: missing in the first seconds of each phase (a gap in the chart).
            "ttft_p99": {"primary": 0.25 if t % 10 > 2 else None, "candidate": 0.4 if cand and t % 10 > 2 else None},
            "rps": {"primary": 40.0, "candidate": 20.0 if cand else None},
        })
    return out


def rolled_back_run() -> dict[str, Any]:
    """bad-latency: shadow passes at t=30, the 10% canary fails on TTFT at t=61.4, routes restored at 63."""
    return {
        "scenario": "bad-latency",
        "description": "The candidate answers correctly but its first token comes about 30% later.",
        "expected": "RolledBack",
        "outcome": "RolledBack",
        "passed": True,
        "started_at": 1_800_000_000.0,
        "duration_s": 66.0,
        "policy": {"name": "llm/chat", "yaml": POLICY_YAML},
        "samples": _samples(66, shadow_at=2.0, canary_at=30.0, end_at=62.0, weight=10),
        "transitions": [
            # Deliberately out of order: the writer sorts by time.
            {"t": 30.0, "from": "Shadowing", "to": "Progressing", "reason": "shadow analysis passed; step 1 (10%)"},
            {"t": 2.0, "from": "Pending", "to": "Shadowing", "reason": "rollout of chat-v2 started"},
            {"t": 61.4, "from": "Progressing", "to": "RollingBack", "reason": "critical metric ttft-p50 failed | slower"},
            {"t": 63.0, "from": "RollingBack", "to": "RolledBack", "reason": "routes restored to primary"},
        ],
        "verdicts": [
            {"t": 29.0, "phase": "Shadowing", "outcome": "pass", "reason": "all metrics pass",
             "metrics": [
                 _metric("ttft-p50", "p50", "pass", "ratio", 0.121, 0.123, 1.016, [0.97, 1.08], 1.15,
                         "pass: ttft-p50 p50: not worse by 15%."),
             ]},
            {"t": 45.0, "phase": "Progressing", "outcome": "continue", "reason": "still collecting",
             "metrics": [
                 _metric("ttft-p50", "p50", "continue", "ratio", 0.12, 0.14, 1.17, [0.95, 1.42], None,
                         "continue: ttft-p50 p50: interval holds both."),
             ]},
            {"t": 61.0, "phase": "Progressing", "outcome": "fail", "reason": "critical metric ttft-p50 failed",
             "metrics": [
                 _metric("ttft-p50", "p50", "fail", "ratio", 0.121, 0.1585, 1.31, [1.24, 1.38], 1.0,
                         "fail: ttft-p50 p50: candidate 0.1585 vs primary 0.121, ratio 1.31; lower bound 1.24 > 1."),
                 _metric("error-rate", "rate", "continue", "difference", 0.002, 0.006, 0.004, [-0.001, 0.009], None,
                         "continue: error-rate rate: interval still holds both.", n=(5000, 500), critical=False),
             ]},
        ],
        "route_changes": [
            {"t": 2.0, "resource_version": "12", "primary": 100, "candidate": 0, "mirror": 50.0},
            {"t": 30.0, "resource_version": "19", "primary": 90, "candidate": 10, "mirror": None},
            {"t": 62.0, "resource_version": "27", "primary": 100, "candidate": 0, "mirror": None},
        ],
        "invariants": {"checked": 14, "violations": []},
        "load": {"sent": 5120, "status_counts": {"200": 5100, "500": 20}},
        "simulated": ["Istio data plane: mesh simulator", "GPU model servers: simulated"],
        "real": ["Kubernetes API (kube-apiserver v1.37.2, etcd 3.6.16): a local control plane",
                 "Prometheus (Debian package) scraping every second", "Mosquitto MQTT broker"],
    }


def promoted_run() -> dict[str, Any]:
    """good: shadow passes, canary passes, promoted; the deciding verdict is stamped 0.6 s after the transition."""
    return {
        "scenario": "good",
        "description": "The candidate is as fast and as correct as the primary.",
        "expected": "Succeeded",
        "outcome": "Succeeded",
        "passed": True,
        "started_at": 1_800_000_000.0,
        "duration_s": 50.0,
        "policy": {"name": "llm/chat", "yaml": POLICY_YAML},
        "samples": _samples(50, shadow_at=1.0, canary_at=20.0, end_at=100.0, weight=50),
        "transitions": [
            {"t": 1.0, "from": "Pending", "to": "Shadowing", "reason": "rollout of chat-v2 started"},
            {"t": 20.0, "from": "Shadowing", "to": "Progressing", "reason": "shadow analysis passed"},
            {"t": 40.2, "from": "Progressing", "to": "Promoting", "reason": "all steps passed"},
            {"t": 41.0, "from": "Promoting", "to": "Succeeded", "reason": "candidate serves 100%"},
        ],
        "verdicts": [
            {"t": 19.0, "phase": "Shadowing", "outcome": "pass", "reason": "all metrics pass",
             "metrics": [_metric("agreement", "agreement", "pass", "ratio", 0.93, 0.91, 0.978, [0.95, 1.01], 0.9,
                                 "pass: agreement within 10% of the noise baseline.")]},
            {"t": 40.8, "phase": "Progressing", "outcome": "pass", "reason": "all metrics pass",
             "metrics": [_metric("error-rate", "rate", "pass", "difference", 0.01, 0.0085, -0.0015,
                                 [-0.004, 0.0012], 0.005, "pass: error-rate not worse by 0.5pp.")]},
        ],
        "route_changes": [
            {"t": 1.0, "resource_version": 3, "primary": 100, "candidate": 0, "mirror": 50.0},
            {"t": 20.0, "resource_version": 7, "primary": 50, "candidate": 50, "mirror": None},
            {"t": 41.0, "resource_version": 9, "primary": 0, "candidate": 100, "mirror": None},
        ],
        "invariants": {"checked": 9, "violations": []},
        "load": {"sent": 2000, "status_counts": {"200": 2000}},
        "simulated": ["model servers: simulated"],
        "real": ["Prometheus"],
    }


def _md(data: dict[str, Any]) -> str:
    """The markdown alone (what write_report writes as report.md), without drawing the chart."""
    return render_markdown(load_record(data))


def _section(markdown: str, heading: str) -> str:
    """The text under one heading, up to the next heading of any level."""
    start = markdown.index(heading + "\n")
    rest = markdown[start + len(heading) + 1:]
    ends = [i for i in (rest.find("\n## "), rest.find("\n### ")) if i >= 0]
    return rest[: min(ends)] if ends else rest


def _table_rows(section: str) -> list[str]:
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| t (s)")]


# --------------------------------------------------------------------------- the markdown


def test_rolled_back_report_writes_three_files_with_pass_header(tmp_path: Path) -> None:
    paths = write_report(rolled_back_run(), tmp_path / "out")
    assert paths.markdown == tmp_path / "out" / "report.md"
    assert paths.chart.is_file() and paths.data.is_file() and paths.markdown.is_file()
    md = paths.markdown.read_text()
    assert md.splitlines()[0] == "# shadowctl demo: bad-latency: PASS (RolledBack, expected RolledBack)"
    assert "The candidate answers correctly but its first token comes about 30% later." in md
    assert "![chart](chart.png)" in md
    assert "started 2027-01-15 08:00:00 UTC" in md


def test_fail_header_when_the_outcome_is_not_the_expected_one() -> None:
    data = rolled_back_run()
    data["outcome"] = "Succeeded"
    data["passed"] = False
    md = _md(data)
    assert md.splitlines()[0] == "# shadowctl demo: bad-latency: FAIL (Succeeded, expected RolledBack)"


def test_without_passed_the_verdict_is_outcome_against_expected_and_invariants() -> None:
    data = rolled_back_run()
    del data["passed"]
    assert load_record(data).ok
    data["invariants"] = {"checked": 3, "violations": ["weights sum to 110"]}
    assert not load_record(data).ok
    data["invariants"] = None
    data["outcome"] = "timeout"
    assert not load_record(data).ok


def test_timeline_rows_in_time_order_with_reasons() -> None:
    md = _md(rolled_back_run())
    assert _table_rows(_section(md, "## Decision timeline")) == [
        "| 2.0 | Pending → Shadowing | rollout of chat-v2 started |",
        "| 30.0 | Shadowing → Progressing | shadow analysis passed; step 1 (10%) |",
        # A '|' in a reason is escaped, or it would split the table cell.
        "| 61.4 | Progressing → RollingBack | critical metric ttft-p50 failed \\| slower |",
        "| 63.0 | RollingBack → RolledBack | routes restored to primary |",
    ]


def test_numbers_behind_the_rollback_come_from_the_verdict_just_before_it() -> None:
    md = _md(rolled_back_run())
    rollback = _section(md, "### t=61.4 s: Progressing → RollingBack")
    assert "Verdict at t=61.0 s: **fail**: critical metric ttft-p50 failed" in rollback
    assert _table_rows(rollback)[1:] == [
        "| ttft-p50 (p50) | fail | 0.121 | 0.1585 | +31% [+24%, +38%] | 812 / 401 | +0% | yes |",
        "| error-rate (rate) | continue | 0.20% | 0.60% | +0.4 pp [-0.1 pp, +0.9 pp] | 5000 / 500 | - | no |",
    ]
    assert "- ttft-p50: fail: ttft-p50 p50: candidate 0.1585 vs primary 0.121, ratio 1.31; lower bound 1.24 > 1." \
        in rollback
    # The earlier 'continue' look of the same phase is not what decided.
    assert "+17%" not in rollback

    shadow = _section(md, "### t=30.0 s: Shadowing → Progressing")
    assert "| ttft-p50 (p50) | pass | 0.121 | 0.123 | +1.6% [-3%, +8%] | 812 / 401 | +15% | yes |" in shadow
    # The verdict that caused the rollback is not shown again for the step that only restored routes.
    done = _section(md, "### t=63.0 s: RollingBack → RolledBack")
    assert "No verdict was recorded" in done and "+31%" not in done
    assert "No verdict was recorded" in _section(md, "### t=2.0 s: Pending → Shadowing")


def test_a_verdict_stamped_just_after_its_transition_still_explains_it() -> None:
    md = _md(promoted_run())
    assert md.splitlines()[0] == "# shadowctl demo: good: PASS (Succeeded, expected Succeeded)"
    promoting = _section(md, "### t=40.2 s: Progressing → Promoting")
    assert "| error-rate (rate) | pass | 1.00% | 0.85% | -0.15 pp [-0.4 pp, +0.12 pp] | 812 / 401 | +0.5 pp | yes |" \
        in promoting
    assert "| agreement (agreement) | pass | 93.00% | 91.00% | -2.2% [-5%, +1%] | 812 / 401 | -10% | yes |" \
        in _section(md, "### t=20.0 s: Shadowing → Progressing")
    assert "No verdict was recorded" in _section(md, "### t=41.0 s: Promoting → Succeeded")
    assert "The last verdict" not in md


def test_verdicts_polled_late_and_labelled_with_the_new_phase_still_explain_their_transition() -> None:
    """The recorder polls the status once a second: a verdict's `t` may trail its transition by seconds."""
    data = rolled_back_run()
    fail = data["verdicts"][2]
    fail.update(t=63.9, phase="RollingBack")  # seen 2.5 s after the transition, in the phase it led to
    md = _md(data)
    rollback = _section(md, "### t=61.4 s: Progressing → RollingBack")
    assert "Verdict at t=63.9 s: **fail**" in rollback and "+31% [+24%, +38%]" in rollback
    assert "No verdict was recorded" in _section(md, "### t=63.0 s: RollingBack → RolledBack")

    # With the controller's own time (status.lastVerdict.at, whole seconds) the report shows that instead.
    fail["at"] = "2027-01-15T08:01:01Z"
    assert "Verdict at t=61.0 s: **fail**" in _section(_md(data), "### t=61.4 s: Progressing → RollingBack")
    fail["at"] = 1_800_000_061.0
    assert "Verdict at t=61.0 s: **fail**" in _section(_md(data), "### t=61.4 s: Progressing → RollingBack")
    fail["at"] = "yesterday"  # unreadable: falls back to the polled time
    assert "Verdict at t=63.9 s: **fail**" in _section(_md(data), "### t=61.4 s: Progressing → RollingBack")


def test_the_first_look_of_the_next_phase_is_not_taken_for_the_reason() -> None:
    data = promoted_run()
    data["verdicts"].insert(1, {"t": 24.5, "phase": "Progressing", "outcome": "continue", "reason": "first look",
                                "metrics": []})
    shadow = _section(_md(data), "### t=20.0 s: Shadowing → Progressing")
    assert "Verdict at t=19.0 s: **pass**" in shadow and "first look" not in shadow


def test_routes_invariants_load_and_policy_sections() -> None:
    md = _md(rolled_back_run())
    routes = _section(md, "## Routes")
    assert "3 route writes observed:" in routes
    assert _table_rows(routes) == [
        "| 2.0 | 12 | 100% | 0% | 50% |",
        "| 30.0 | 19 | 90% | 10% | off |",
        "| 62.0 | 27 | 100% | 0% | off |",
    ]
    assert _section(md, "## Invariants").strip() == "14 checks, no violations."
    assert _section(md, "## Load").strip() == "5120 requests sent; responses by status: 200: 5100, 500: 20; 0.39% not 2xx."
    assert f"```yaml\n{POLICY_YAML}```" in _section(md, "## Policy")
    real = _section(md, "## What is real, what is simulated")
    assert real.strip().splitlines() == [
        "- real: Kubernetes API (kube-apiserver v1.37.2, etcd 3.6.16): a local control plane",
        "- real: Prometheus (Debian package) scraping every second",
        "- real: Mosquitto MQTT broker",
        "- simulated: Istio data plane: mesh simulator",
        "- simulated: GPU model servers: simulated",
    ]


def test_invariant_violations_are_listed() -> None:
    data = rolled_back_run()
    data["invariants"] = {"checked": 14, "violations": ["t=31.0: weights sum to 110", {"rule": 2, "t": 40}]}
    md = _md(data)
    inv = _section(md, "## Invariants")
    assert "14 checks, **2 violations**:" in inv
    assert '- t=31.0: weights sum to 110\n- {"rule": 2, "t": 40}' in inv


def test_a_timeout_shows_the_last_verdict_that_no_transition_followed() -> None:
    data = rolled_back_run()
    data["outcome"] = "timeout"
    data["passed"] = False
    data["transitions"] = data["transitions"][:2]  # stuck in the canary
    md = _md(data)
    last = _section(md, "### The last verdict (no transition followed it)")
    assert "Verdict at t=61.0 s" in last and "+31% [+24%, +38%]" in last


def test_final_message_and_controller_log_are_shown_when_recorded() -> None:
    data = rolled_back_run()
    data["final_message"] = "critical metric ttft-p50 failed"
    data["controller_log_tail"] = "warning  source unreachable\n```odd```\n"
    md = _md(data)
    assert "Last status message: critical metric ttft-p50 failed" in md
    # A log that contains a code fence gets a longer fence, so it cannot end the block early.
    assert _section(md, "## Controller log (tail)").strip() == "````\nwarning  source unreachable\n```odd```\n````"
    assert "## Controller log" not in _md(rolled_back_run())


def test_disagreeing_answers_are_listed_with_their_traces() -> None:
    data = rolled_back_run()
    data["disagreements"] = [
        {"requestId": "r-7", "comparators": ["token-f1", "rouge-l"], "traceId": "4bf92f3577b34da6a3ce929d0e0e4736"},
        {"requestId": "r-9", "comparators": ["exact"]},
    ]
    section = _section(_md(data), "## Answers that disagreed")
    assert "| r-7 | token-f1, rouge-l | 4bf92f3577b34da6a3ce929d0e0e4736 |" in section
    assert "| r-9 | exact | - |" in section
    assert "## Answers that disagreed" not in _md(rolled_back_run())


@pytest.mark.parametrize(
    ("scale", "statistic", "effect", "interval", "text"),
    [
        ("ratio", "p50", 1.31, [1.24, 1.38], "+31% [+24%, +38%]"),
        ("ratio", "p99", 0.76, [0.5, 0.999], "-24% [-50%, -0.1%]"),
        ("ratio", "p50", 1.0, [None, 1.05], "+0% [-inf, +5%]"),
        ("ratio", "p50", 1.0996, [], "+10%"),
        ("difference", "rate", 0.004, [-0.001, 0.009], "+0.4 pp [-0.1 pp, +0.9 pp]"),
        ("difference", "rate", 0.0123, [0.1, None], "+1.2 pp [+10 pp, +inf]"),
        # An absolute margin on a latency statistic is in seconds, not percentage points.
        ("difference", "p50", 0.0123, [0.004, 0.02], "+0.0123 [+0.004, +0.02]"),
        ("ratio", "p50", None, [None, None], "-"),
    ],
)
def test_effect_formatting(scale: str, statistic: str, effect: float | None, interval: list[float | None],
                           text: str) -> None:
    metric = MetricEvidence.model_validate(
        {"name": "m", "statistic": statistic, "effectScale": scale, "effect": effect, "interval": interval})
    assert effect_text(metric) == text


# --------------------------------------------------------------------------- missing parts and bad input


@pytest.mark.parametrize(
    "data",
    [
        {"scenario": "tail", "outcome": "timeout"},
        {"scenario": "tail", "outcome": "timeout", "expected": "RolledBack", "samples": None, "verdicts": None,
         "transitions": [], "policy": None, "load": None, "invariants": None, "route_changes": None},
        {**promoted_run(), "samples": [], "verdicts": []},
    ],
    ids=["only-required", "nulls", "no-samples-no-verdicts"],
)
def test_missing_optional_parts_still_write_a_report(tmp_path: Path, data: dict[str, Any]) -> None:
    paths = write_report(data, tmp_path)
    md = paths.markdown.read_text()
    assert md.startswith(f"# shadowctl demo: {data['scenario']}: ")
    assert "## Decision timeline" in md and "## Policy" in md
    assert matplotlib.image.imread(paths.chart).shape[:2] == (CHART_SIZE_PX[1], CHART_SIZE_PX[0])
    if not data.get("verdicts") and data.get("transitions"):
        assert md.count("No verdict was recorded") == len(data["transitions"])


def test_bad_input_names_where_and_what(tmp_path: Path) -> None:
    data = rolled_back_run()
    data["samples"][3]["t"] = "soon"
    with pytest.raises(ReportError, match=r"^data: samples\[3\]\.t: Input should be a valid number"):
        write_report(data, tmp_path)
    with pytest.raises(ReportError, match=r"^data: outcome: Field required"):
        write_report({"scenario": "good"}, tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_nan_in_the_data_becomes_null_in_data_json(tmp_path: Path) -> None:
    data = rolled_back_run()
    data["samples"][5]["ttft_p50"]["candidate"] = math.nan
    written = json.loads(write_report(data, tmp_path).data.read_text())
    assert written["samples"][5]["ttft_p50"]["candidate"] is None


# --------------------------------------------------------------------------- the chart


def test_chart_is_a_png_of_the_expected_size(tmp_path: Path) -> None:
    chart = write_report(rolled_back_run(), tmp_path).chart
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(chart)
    assert image.shape[:2] == (CHART_SIZE_PX[1], CHART_SIZE_PX[0])
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_chart_content() -> None:
    fig = build_figure(load_record(rolled_back_run()))
    top, bottom = fig.axes
    assert bottom.get_shared_x_axes().joined(top, bottom)
    lines = {line.get_label(): line for line in top.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"primary TTFT p50", "primary TTFT p99", "candidate TTFT p50", "candidate TTFT p99"}
    assert lines["primary TTFT p50"].get_linestyle() == "-" and lines["primary TTFT p99"].get_linestyle() == "--"
    assert lines["primary TTFT p50"].get_color() != lines["candidate TTFT p50"].get_color()
    # Null values are gaps (NaN), not zeros.
    cand = [float(y) for y in lines["candidate TTFT p50"].get_ydata()]
    assert math.isnan(cand[0]) and cand[10] == pytest.approx(0.16) and math.isnan(cand[65])
    assert 0.0 not in cand

    steps = {line.get_label(): line for line in bottom.get_lines() if not line.get_label().startswith("_")}
    weight = steps["candidate live weight"]
    assert weight.get_drawstyle() == "steps-post"
    assert max(float(y) for y in weight.get_ydata()) == 10
    assert max(float(y) for y in steps["mirrored to candidate (shadow)"].get_ydata()) == 50
    star = steps["decision: RollingBack"]
    assert list(star.get_xdata()) == [61.4] and list(star.get_ydata()) == [10]

    vlines = sorted(float(line.get_xdata()[0]) for line in top.get_lines() if line.get_label().startswith("_")
                    and line.get_linestyle() == ":")
    assert vlines == [2.0, 30.0, 61.4, 63.0]
    labels = [text.get_text().strip() for text in top.texts]
    assert labels == ["Shadowing", "Progressing", "RollingBack", "RolledBack"]
    assert "bad-latency: RolledBack (expected RolledBack): PASS" in fig.get_suptitle()
    assert top.get_ylabel() and bottom.get_ylabel() and bottom.get_xlabel() == "seconds since start"


def test_latency_lines_skip_samples_that_were_not_measured() -> None:
    """A sample without ttft keys was not measured at that tick: no gap; an explicit null is a gap."""
    data = promoted_run()
    for sample in data["samples"][1::2]:
        del sample["ttft_p50"], sample["ttft_p99"], sample["rps"]
    data["samples"][10]["ttft_p50"] = None
    fig = build_figure(load_record(data))
    line = next(line for line in fig.axes[0].get_lines() if line.get_label() == "candidate TTFT p50")
    xs = [float(x) for x in line.get_xdata()]
    ys = [float(y) for y in line.get_ydata()]
    assert xs == [float(t) for t in range(0, 51, 2)]
    assert [x for x, y in zip(xs, ys, strict=True) if math.isnan(y)] == [0.0, 10.0]


# --------------------------------------------------------------------------- python -m shadowctl.demo.report


def test_main_re_renders_from_data_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = rolled_back_run()
    original = copy.deepcopy(data)
    paths = write_report(data, tmp_path)
    assert data == original  # the input is not changed
    assert json.loads(paths.data.read_text()) == original
    first = paths.markdown.read_text()
    paths.markdown.unlink()
    paths.chart.unlink()
    assert main([str(paths.data)]) == 0
    assert paths.markdown.read_text() == first
    assert matplotlib.image.imread(paths.chart).shape[:2] == (CHART_SIZE_PX[1], CHART_SIZE_PX[0])
    assert "report.md" in capsys.readouterr().out


def test_main_reports_bad_files_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing" / "data.json"
    assert main([str(missing)]) == 1
    assert capsys.readouterr().err == f"error: {missing}: no such file\n"

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"scenario": "good", "outcome": "Succeeded", "transitions": [{"t": 1}]}))
    assert main([str(schema)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {schema}: transitions[0].from: Field required")

    assert main([]) == 2


def test_python_m_entry_point_rejects_malformed_json_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "data.json"
    bad.write_text('{"scenario": "good",\n  "outcome": }\n')
    proc = subprocess.run([sys.executable, "-m", "shadowctl.demo.report", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"error: {bad}:2:14: not valid JSON: Expecting value\n"
    assert proc.stdout == ""
    assert not (tmp_path / "report.md").exists()
