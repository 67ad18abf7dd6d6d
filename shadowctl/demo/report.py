"""The demo report: ``report.md``, ``chart.png`` and ``data.json`` from one recorded run.

:func:`write_report` is a pure function of the recorded data: no network and no
clock (times in the report come from the data), so a report can be re-rendered
later from its ``data.json`` alone::

    python -m shadowctl.demo.report FOLDER/data.json

Shape of the input (a plain JSON-able mapping; only ``scenario`` and ``outcome``
are required, every other part may be missing or ``null``; unknown keys are
ignored by the writer but kept in ``data.json``)::

    scenario      str    "good" | "bad-latency" | "bad-output" | "tail" | ...
    description   str    one sentence: what the candidate does in this scenario
    expected      str    the phase the run should end in ("Succeeded" | "RolledBack")
    outcome       str    where it ended ("Succeeded", "RolledBack", "Failed", "timeout", ...)
    passed        bool   the recorder's verdict on the run; if absent: outcome == expected
                         and no invariant violation
    started_at    float  epoch seconds of t = 0
    duration_s    float
    policy        {name: str, yaml: str}
    samples       [{t, phase, primary_weight, candidate_weight, mirror,
                    ttft_p50: {primary, candidate}, ttft_p99: {...}, rps: {...}}]   values may be null
    transitions   [{t, from, to, reason}]
    verdicts      [{t, at, phase, outcome, reason, metrics: [status.lastVerdict.metrics[i]]}]
                         at (optional): status.lastVerdict.at, RFC 3339 text or epoch seconds
    route_changes [{t, resource_version, primary, candidate, mirror}]
    invariants    {checked: int, violations: [str | object]}
    load          {sent: int, status_counts: {"200": int, ...}}
    simulated     [str]   which parts were simulated, one line each
    real          [str]   which parts were real, one line each
    final_message str     the controller's last status message
    controller_log_tail str  the end of the controller's log (recorded when the run did not finish)

All ``t`` are seconds since ``started_at``.

Which verdict explains a transition: the controller writes the transition and
``status.lastVerdict`` in the same tick, but the two times differ. A verdict's
``at`` is in whole seconds, so it reads up to a second *before* its
transition; a verdict's ``t`` is when the recorder polled the status, so it
reads up to a few seconds *after* (a 1 s poll plus the Prometheus queries of
that poll). The report therefore uses ``at`` when the record has it (and
``started_at``), else ``t``, and takes the latest verdict after the previous
transition (and after the verdict that explained it) and no later than 1 s
(with ``at``) or 3 s (with ``t``) after this transition. A verdict that
caused an earlier transition is never shown again as the reason for a later
one; 3 s stays below the controller's shortest analysis interval in the demo,
so the first look of the next phase is not taken for the reason.

Effects are shown on the user's scale (the scale the margin was written in):
a ratio as a signed percentage (``1.31`` -> ``+31%``), a difference of
fractions (error ``rate``, ``agreement``) in percentage points (``0.004`` ->
``+0.4 pp``). An absolute margin on a latency statistic (``p50``, ``mean``) is
a difference in the metric's own unit, so it is printed as a plain signed
number rather than as percentage points.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from matplotlib.figure import Figure  # the object API: no pyplot state and no backend switch (Agg renders PNG)
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from shadowctl.errors import ShadowctlError
from shadowctl.policy.status import DisagreementRecord, MetricEvidence, Phase

__all__ = [
    "ReportError",
    "ReportPaths",
    "RunRecord",
    "build_figure",
    "load_record",
    "main",
    "render_markdown",
    "rerender",
    "verdict_time",
    "verdicts_for_transitions",
    "write_report",
]

CHART_SIZE_PX = (1400, 900)
_DPI = 100
_SLACK_AT_S = 1.0
_SLACK_POLLED_S = 3.0
_DECISION_PHASES = frozenset(p.value for p in Phase if p.terminal or p in (Phase.promoting, Phase.rolling_back))
"""The phases a decision moves a rollout to: the first transition into one is the run's decision."""
_FRACTION_STATISTICS = ("rate", "agreement")


class ReportError(ShadowctlError):
    """The recorded data cannot be read or the report cannot be written."""


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` put the three files."""

    markdown: Path
    chart: Path
    data: Path


# --------------------------------------------------------------------------- input model


def _none_to_empty_list(value: Any) -> Any:
    return [] if value is None else value


def _none_to_empty_dict(value: Any) -> Any:
    return {} if value is None else value


def _none_to_empty_str(value: Any) -> Any:
    return "" if value is None else value


Num = float | None
PerVariant = Annotated[dict[str, Num], BeforeValidator(_none_to_empty_dict)]
Text = Annotated[str, BeforeValidator(_none_to_empty_str)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class Sample(_Model):
    t: float
    phase: str | None = None
    primary_weight: Num = None
    candidate_weight: Num = None
    mirror: Num = None
    ttft_p50: PerVariant = Field(default_factory=dict)
    ttft_p99: PerVariant = Field(default_factory=dict)
    rps: PerVariant = Field(default_factory=dict)


class TransitionRecord(_Model):
    t: float
    from_: str = Field(alias="from")
    to: str
    reason: Text = ""


class VerdictRecord(_Model):
    t: float
    at: str | float | None = None
    phase: str | None = None
    outcome: str | None = None
    reason: Text = ""
    metrics: Annotated[list[MetricEvidence], BeforeValidator(_none_to_empty_list)] = Field(default_factory=list)


class RouteChange(_Model):
    t: float
    resource_version: str | int | None = None
    primary: Num = None
    candidate: Num = None
    mirror: Num = None


class Invariants(_Model):
    checked: int | None = None
    violations: Annotated[list[Any], BeforeValidator(_none_to_empty_list)] = Field(default_factory=list)


class Load(_Model):
    sent: int | None = None
    status_counts: Annotated[dict[str, int], BeforeValidator(_none_to_empty_dict)] = Field(default_factory=dict)


class PolicyRecord(_Model):
    name: str | None = None
    yaml: str | None = None


class RunRecord(_Model):
    """One recorded demo run, validated (see the module docstring for the shape)."""

    scenario: str
    outcome: str
    description: Text = ""
    expected: str | None = None
    passed: bool | None = None
    started_at: Num = None
    duration_s: Num = None
    policy: PolicyRecord | None = None
    samples: Annotated[list[Sample], BeforeValidator(_none_to_empty_list)] = Field(default_factory=list)
    transitions: Annotated[list[TransitionRecord], BeforeValidator(_none_to_empty_list)] = Field(default_factory=list)
    verdicts: Annotated[list[VerdictRecord], BeforeValidator(_none_to_empty_list)] = Field(default_factory=list)
    route_changes: Annotated[list[RouteChange], BeforeValidator(_none_to_empty_list)] = Field(default_factory=list)
    invariants: Invariants | None = None
    load: Load | None = None
    simulated: Annotated[list[str], BeforeValidator(_none_to_empty_list)] = Field(default_factory=list)
    real: Annotated[list[str], BeforeValidator(_none_to_empty_list)] = Field(default_factory=list)
    final_message: Text = ""
    controller_log_tail: Text = ""
    disagreements: Annotated[list[DisagreementRecord], BeforeValidator(_none_to_empty_list)] = Field(
        default_factory=list)
    """Candidate answers that disagreed with the primary's, as the status listed them during the run."""

    @property
    def ok(self) -> bool:
        """PASS or FAIL: the recorder's ``passed``, else outcome == expected with no invariant violation."""
        if self.passed is not None:
            return self.passed
        violations = self.invariants.violations if self.invariants else []
        return self.expected is not None and self.outcome == self.expected and not violations

    def sorted_transitions(self) -> list[TransitionRecord]:
        return sorted(self.transitions, key=lambda tr: tr.t)


def _where(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def load_record(data: Mapping[str, Any], *, source: str = "data") -> RunRecord:
    """Validate recorded data; a bad part raises :class:`ReportError` naming where and what."""
    if not isinstance(data, Mapping):
        raise ReportError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}")
    try:
        return RunRecord.model_validate(dict(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        more = exc.error_count() - 1
        extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ReportError(f"{source}: {_where(first['loc'])}: {first['msg']}{extra}") from exc


# --------------------------------------------------------------------------- number formatting


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _signed(x: float) -> str:
    """``+31``, ``-3``, ``+1.6``, ``+0.4``: fewer decimals for larger numbers, no trailing zeros."""
    a = abs(x)
    decimals = 0 if round(a, 1) >= 10 else 1 if round(a, 2) >= 1 else 2
    text = f"{x:+.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "+0" if text in ("+0", "-0") else text


def _effect_unit(metric: MetricEvidence) -> str:
    """``ratio``, ``pp`` (a difference of fractions) or ``plain`` (a difference in the metric's unit)."""
    if metric.effect_scale == "ratio":
        return "ratio"
    if metric.statistic is not None and metric.statistic not in _FRACTION_STATISTICS:
        return "plain"
    return "pp"


def _on_scale(x: float | None, unit: str) -> str:
    if not _finite(x):
        return "-"
    assert x is not None
    if unit == "ratio":
        return f"{_signed((x - 1.0) * 100.0)}%"
    if unit == "pp":
        return f"{_signed(x * 100.0)} pp"
    return f"{x:+.4g}"


def effect_text(metric: MetricEvidence) -> str:
    """The effect and its interval: ``+31% [+24%, +38%]``, ``+0.4 pp [-0.1 pp, +0.9 pp]``."""
    unit = _effect_unit(metric)
    text = _on_scale(metric.effect, unit)
    if len(metric.interval) == 2 and any(_finite(v) for v in metric.interval):
        lo, hi = metric.interval
        lo_text = _on_scale(lo, unit) if _finite(lo) else "-inf"
        hi_text = _on_scale(hi, unit) if _finite(hi) else "+inf"
        text += f" [{lo_text}, {hi_text}]"
    return text


def _value(x: float | None, statistic: str | None) -> str:
    if not _finite(x):
        return "-"
    assert x is not None
    if statistic in _FRACTION_STATISTICS:
        return f"{x * 100:.2f}%"
    return f"{x:.4g}"


def _count(x: float | None) -> str:
    if not _finite(x):
        return "-"
    assert x is not None
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _seconds(t: float) -> str:
    return f"{t:.1f}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|") or " "


def _percent(x: float | None) -> str:
    return "-" if not _finite(x) else f"{x:g}%"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------- markdown


def verdict_time(record: RunRecord, verdict: VerdictRecord) -> tuple[float, bool]:
    """Seconds since start at which the controller judged: from ``at`` if usable (True), else the polled ``t``."""
    at = verdict.at
    if at is None or not _finite(record.started_at):
        return verdict.t, False
    assert record.started_at is not None
    if isinstance(at, float):
        epoch = at
    else:
        try:
            epoch = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return verdict.t, False
    return (epoch - record.started_at, True) if math.isfinite(epoch) else (verdict.t, False)


def verdicts_for_transitions(record: RunRecord) -> list[VerdictRecord | None]:
    """For each of the sorted transitions, the verdict that explains it, or None (see the module docstring)."""
    timed = sorted(((*verdict_time(record, v), v) for v in record.verdicts), key=lambda x: x[0])
    out: list[VerdictRecord | None] = []
    after = -math.inf  # the previous transition's time, or the verdict that explained it if that was later
    for tr in record.sorted_transitions():
        chosen: tuple[float, VerdictRecord] | None = None
        for when, exact, v in timed:
            if after < when <= tr.t + (_SLACK_AT_S if exact else _SLACK_POLLED_S):
                chosen = (when, v)
        out.append(chosen[1] if chosen else None)
        after = max(tr.t, chosen[0]) if chosen is not None else max(after, tr.t)
    return out


def _metrics_table(verdict: VerdictRecord) -> list[str]:
    lines = [
        "| metric | outcome | primary | candidate | effect [interval] | samples (primary / candidate) | threshold | critical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in verdict.metrics:
        name = m.name if not m.statistic else f"{m.name} ({m.statistic})"
        lines.append(
            "| " + " | ".join(_cell(c) for c in (
                name,
                m.outcome or "-",
                _value(m.primary, m.statistic),
                _value(m.candidate, m.statistic),
                effect_text(m),
                f"{_count(m.samples.primary)} / {_count(m.samples.candidate)}",
                _on_scale(m.threshold, _effect_unit(m)),
                "yes" if m.critical else "no",
            )) + " |"
        )
    lines.append("")
    lines.extend(f"- {m.name}: {' '.join(m.sentence.split())}" for m in verdict.metrics if m.sentence.strip())
    return lines


def _verdict_block(record: RunRecord, verdict: VerdictRecord, *, with_phase: bool) -> list[str]:
    # Under a transition the heading names the phase; a recorder that polls the status may label the
    # verdict with the phase it moved to, so the label is shown only where nothing else says it.
    phase = f", {verdict.phase}" if with_phase and verdict.phase else ""
    reason = " ".join(verdict.reason.split())
    when, _ = verdict_time(record, verdict)
    head = f"Verdict at t={_seconds(when)} s{phase}: **{verdict.outcome or 'unknown'}**"
    lines = [head + (f": {reason}" if reason else ""), ""]
    if verdict.metrics:
        lines.extend(_metrics_table(verdict))
    else:
        lines.append("(the verdict carries no per-metric numbers)")
    return lines


def _fence(text: str) -> str:
    longest = 0
    run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def render_markdown(record: RunRecord, chart_name: str = "chart.png") -> str:
    """The text of ``report.md`` for a validated record."""
    verdict_word = "PASS" if record.ok else "FAIL"
    expected = record.expected or "unspecified"
    out: list[str] = [
        f"# shadowctl demo: {record.scenario}: {verdict_word} ({record.outcome}, expected {expected})",
        "",
    ]
    if record.description.strip():
        out += [" ".join(record.description.split()), ""]
    facts = []
    if record.policy and record.policy.name:
        facts.append(f"policy `{record.policy.name}`")
    if _finite(record.started_at):
        assert record.started_at is not None
        facts.append(f"started {_iso(record.started_at)}")
    if _finite(record.duration_s):
        facts.append(f"ran {record.duration_s:.1f} s")
    facts.append(f"{len(record.transitions)} transitions, {len(record.verdicts)} verdicts recorded")
    out += ["Run: " + "; ".join(facts) + ".", ""]
    if record.final_message.strip():
        out += [f"Last status message: {' '.join(record.final_message.split())}", ""]
    out += [f"![chart]({chart_name})", ""]

    out += ["## What is real, what is simulated", ""]
    if record.real or record.simulated:
        out += [f"- real: {' '.join(line.split())}" for line in record.real]
        out += [f"- simulated: {' '.join(line.split())}" for line in record.simulated]
    else:
        out.append("(not recorded)")
    out.append("")

    transitions = record.sorted_transitions()
    out += ["## Decision timeline", ""]
    if transitions:
        out += ["| t (s) | from → to | reason |", "|---:|---|---|"]
        out += [f"| {_seconds(tr.t)} | {_cell(tr.from_)} → {_cell(tr.to)} | {_cell(tr.reason)} |" for tr in transitions]
    else:
        out.append("(no transitions recorded)")
    out.append("")

    out += ["## The numbers behind each decision", ""]
    shown: set[int] = set()
    if not transitions:
        out += ["(no transitions recorded)", ""]
    for tr, verdict in zip(transitions, verdicts_for_transitions(record), strict=True):
        out += [f"### t={_seconds(tr.t)} s: {tr.from_} → {tr.to}", ""]
        if verdict is None:
            out += ["No verdict was recorded for this transition (a start, a step of the machine, or a command).", ""]
            continue
        shown.add(id(verdict))
        out += [*_verdict_block(record, verdict, with_phase=False), ""]
    last = max(record.verdicts, key=lambda v: verdict_time(record, v)[0]) if record.verdicts else None
    if last is not None and id(last) not in shown:
        out += ["### The last verdict (no transition followed it)", "",
                *_verdict_block(record, last, with_phase=True), ""]

    if record.disagreements:
        out += ["## Answers that disagreed", "",
                "The last candidate answers that disagreed with the primary's, with the user's trace where the "
                "request carried a `traceparent` (look the trace id up in your tracing backend):", "",
                "| request | comparators | trace |", "|---|---|---|"]
        out += [f"| {_cell(d.request_id)} | {_cell(', '.join(d.comparators))} | {_cell(d.trace_id or '-')} |"
                for d in record.disagreements]
        out.append("")

    out += ["## Routes", ""]
    changes = sorted(record.route_changes, key=lambda c: c.t)
    if changes:
        out += [f"{len(changes)} route write{'s' if len(changes) != 1 else ''} observed:", "",
                "| t (s) | resourceVersion | primary | candidate | mirror |", "|---:|---|---:|---:|---:|"]
        out += [
            f"| {_seconds(c.t)} | {_cell(str(c.resource_version) if c.resource_version is not None else '-')} "
            f"| {_percent(c.primary)} | {_percent(c.candidate)} | {_percent(c.mirror) if _finite(c.mirror) else 'off'} |"
            for c in changes
        ]
    else:
        out.append("(no route changes recorded)")
    out.append("")

    out += ["## Invariants", ""]
    inv = record.invariants
    if inv is None:
        out.append("(not checked)")
    else:
        checked = f"{inv.checked} checks" if inv.checked is not None else "checks"
        if inv.violations:
            out.append(f"{checked}, **{len(inv.violations)} violation{'s' if len(inv.violations) != 1 else ''}**:")
            out.append("")
            for v in inv.violations:
                text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
                out.append(f"- {' '.join(text.split())}")
        else:
            out.append(f"{checked}, no violations.")
    out.append("")

    out += ["## Load", ""]
    load = record.load
    if load is None:
        out.append("(not recorded)")
    else:
        sent = f"{load.sent} requests sent" if load.sent is not None else "requests sent: unknown"
        total = sum(load.status_counts.values())
        parts = [f"{code}: {n}" for code, n in sorted(load.status_counts.items())]
        line = sent + (f"; responses by status: {', '.join(parts)}" if parts else "")
        bad = sum(n for code, n in load.status_counts.items() if not code.startswith("2"))
        if total:
            line += f"; {bad / total * 100:.2f}% not 2xx"
        out.append(line + ".")
    out.append("")

    out += ["## Policy", ""]
    if record.policy and record.policy.yaml:
        fence = _fence(record.policy.yaml)
        out += [f"{fence}yaml", record.policy.yaml.rstrip("\n"), fence]
    else:
        out.append("(not recorded)")
    out.append("")
    if record.controller_log_tail.strip():
        fence = _fence(record.controller_log_tail)
        out += ["## Controller log (tail)", "", fence, record.controller_log_tail.rstrip("\n"), fence, ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- chart


def _or(x: float | None, default: float) -> float:
    return x if x is not None and math.isfinite(x) else default


def _series(samples: Sequence[Sample], field: str, variant: str) -> tuple[list[float], list[float]]:
    """Times and values of one latency line. A sample without the field was not measured at that tick
    (the recorder may query Prometheus less often than it samples routes) and is skipped; a null value
    was measured and had no data, and becomes a gap (NaN)."""
    ts: list[float] = []
    ys: list[float] = []
    for s in samples:
        if field in s.model_fields_set:
            ts.append(s.t)
            ys.append(_or(getattr(s, field).get(variant), math.nan))
    return ts, ys


def _decision(record: RunRecord) -> TransitionRecord | None:
    return next((tr for tr in record.sorted_transitions() if tr.to in _DECISION_PHASES), None)


def draw_chart(record: RunRecord, path: Path) -> None:
    """Write ``chart.png`` (1400x900 px) drawn by :func:`build_figure`."""
    build_figure(record).savefig(path, format="png", dpi=_DPI)


def build_figure(record: RunRecord) -> Figure:
    """The chart: TTFT p50/p99 per variant on top; candidate weight and mirror % below; transitions marked."""

    samples = sorted(record.samples, key=lambda s: s.t)
    transitions = record.sorted_transitions()
    fig = Figure(figsize=(CHART_SIZE_PX[0] / _DPI, CHART_SIZE_PX[1] / _DPI), dpi=_DPI)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    # Legends sit right of the plots, so that they never hide data or the transition labels.
    fig.subplots_adjust(left=0.07, right=0.81, top=0.9, bottom=0.08, hspace=0.12)
    legend = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 9, "borderaxespad": 0.0}
    word = "PASS" if record.ok else "FAIL"
    fig.suptitle(f"shadowctl demo: {record.scenario}: {record.outcome} "
                 f"(expected {record.expected or 'unspecified'}): {word}", fontsize=14)

    ts = [s.t for s in samples]
    colours = {"primary": "tab:blue", "candidate": "tab:orange"}
    highest = 0.0
    for variant, colour in colours.items():
        for field, style, label in (("ttft_p50", "-", "p50"), ("ttft_p99", "--", "p99")):
            xs, ys = _series(samples, field, variant)
            finite = [y for y in ys if not math.isnan(y)]
            if finite:
                top.plot(xs, ys, linestyle=style, color=colour, linewidth=1.6, label=f"{variant} TTFT {label}")
                highest = max(highest, *finite)
    top.set_ylabel("time to first token (s)")
    top.set_title("latency per variant (gaps: no data)", fontsize=11)
    top.grid(True, alpha=0.3)
    if highest > 0:
        top.set_ylim(0, highest * 1.3)  # head room for the transition labels
        top.legend(**legend)
    else:
        top.text(0.5, 0.5, "no latency samples recorded", transform=top.transAxes, ha="center", va="center")

    if samples:
        wt = ts
        weight = [_or(s.candidate_weight, math.nan) for s in samples]
        mirror = [_or(s.mirror, 0.0) for s in samples]
    else:
        changes = sorted(record.route_changes, key=lambda c: c.t)
        wt = [c.t for c in changes]
        weight = [_or(c.candidate, math.nan) for c in changes]
        mirror = [_or(c.mirror, 0.0) for c in changes]
    if wt:
        bottom.step(wt, weight, where="post", color="tab:orange", linewidth=2, label="candidate live weight")
        bottom.step(wt, mirror, where="post", color="tab:green", linestyle="--", linewidth=1.6,
                    label="mirrored to candidate (shadow)")
        bottom.legend(**legend)
    else:
        bottom.text(0.5, 0.5, "no routing samples recorded", transform=bottom.transAxes, ha="center", va="center")
    bottom.set_ylim(-5, 105)
    bottom.set_ylabel("share of traffic (%)")
    bottom.set_xlabel("seconds since start")
    bottom.grid(True, alpha=0.3)

    end = record.duration_s if _finite(record.duration_s) else None
    times = ts + wt + [tr.t for tr in transitions]
    right = max([*times, end or 0.0, 1.0])
    bottom.set_xlim(0, right)

    last_x = -math.inf
    level = 0
    for tr in transitions:
        for ax in (top, bottom):
            ax.axvline(tr.t, color="grey", linestyle=":", linewidth=1)
        # Stagger labels that would overlap their neighbour.
        level = level + 1 if tr.t - last_x < right * 0.08 else 0
        last_x = tr.t
        near_end = tr.t > right * 0.9  # label left of the line, so it stays inside the plot
        top.text(tr.t, 0.98 - 0.06 * (level % 3), f"{tr.to} " if near_end else f" {tr.to}",
                 transform=top.get_xaxis_transform(), ha="right" if near_end else "left", va="top", fontsize=8,
                 color="dimgrey")

    decision = _decision(record)
    if decision is not None:
        y = _weight_at(wt, weight, decision.t)
        bottom.plot([decision.t], [y], marker="*", markersize=16, color="crimson", linestyle="none",
                    label=f"decision: {decision.to}", zorder=5)
        left_side = decision.t > right / 2
        bottom.annotate(f"decision: {decision.to} (t={decision.t:.1f} s)", (decision.t, y),
                        xytext=(-10 if left_side else 10, 12), textcoords="offset points",
                        ha="right" if left_side else "left", fontsize=9, color="crimson")
        bottom.legend(**legend)
    return fig


def _weight_at(ts: Sequence[float], values: Sequence[float], t: float) -> float:
    """The step value in force at ``t`` (0 before the first sample or without data)."""
    value = 0.0
    for x, v in zip(ts, values, strict=True):
        if x > t:
            break
        if not math.isnan(v):
            value = v
    return value


# --------------------------------------------------------------------------- files


def _json_safe(value: Any) -> Any:
    """JSON without NaN/Infinity tokens (which other tools cannot read): those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _render(record: RunRecord, folder: Path) -> tuple[Path, Path]:
    markdown = folder / "report.md"
    chart = folder / "chart.png"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        draw_chart(record, chart)
        markdown.write_text(render_markdown(record, chart.name), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write the report into {folder}: {exc.strerror or exc}") from exc
    return markdown, chart


def write_report(data: Mapping[str, Any], folder: Path) -> ReportPaths:
    """Write ``report.md``, ``chart.png`` and ``data.json`` into ``folder`` (created if needed)."""
    record = load_record(data)
    try:
        text = json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ReportError(f"data: not JSON-able: {exc}") from exc
    markdown, chart = _render(record, folder)
    path = folder / "data.json"
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return ReportPaths(markdown=markdown, chart=chart, data=path)


def rerender(data_json: Path) -> ReportPaths:
    """Re-render ``report.md`` and ``chart.png`` next to an existing ``data.json`` (which is left as is)."""
    try:
        text = data_json.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ReportError(f"{data_json}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{data_json}: cannot read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{data_json}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from exc
    record = load_record(data, source=str(data_json))
    markdown, chart = _render(record, data_json.parent)
    return ReportPaths(markdown=markdown, chart=chart, data=data_json)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shadowctl.demo.report FOLDER/data.json``: 0 done, 1 bad input, 2 usage."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m shadowctl.demo.report FOLDER/data.json", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        paths = rerender(Path(args[0]))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {paths.markdown} and {paths.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
