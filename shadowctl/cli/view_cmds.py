"""`shadowctl get`, `status` and `describe`: what the API server holds about rollouts, read and rendered.

Why ``status --watch`` polls once a second instead of holding a watch: the output is for a person,
a one-second delay is invisible, and a poll has no expiry (410), reconnect or bookmark logic to get
wrong; it keeps going through a short API outage and says so.

The kube client, the controller's and the machine's vocabulary, the policy model and rich's live
display are imported where a command runs, so that ``get --help`` loads none of them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from shadowctl.cli.common import (
    ContextOpt,
    KubeconfigOpt,
    NamespaceOpt,
    OutputFormat,
    OutputOpt,
    emit,
    err_console,
    fail,
    note,
    out,
)
from shadowctl.cli.connect import CliError, Conn, run_async, with_reader
from shadowctl.cli.objects import (
    JSON,
    KIND_LABEL,
    key_of,
    list_policies,
    meta_of,
    read_policy,
    status_of,
)

if TYPE_CHECKING:
    from datetime import timedelta

    from shadowctl.kube import KubeReader
    from shadowctl.policy.status import HistoryEntry, MetricEvidence, PolicyStatus

#: Seconds between reads while `status --watch` follows a policy (tests lower it).
POLL_SECONDS = 1.0


# --------------------------------------------------------------------------- formatting helpers


def parse_time(text: Any) -> float | None:
    """Epoch seconds of an RFC 3339 time as Kubernetes writes it; None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def human_age(seconds: float) -> str:
    """kubectl's compact age: 45s, 5m30s, 3h12m, 4d5h, 400d."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 3600:
        return f"{s // 60}m"
    if s < 8 * 3600:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    if s < 8 * 86400:
        d, h = divmod(s // 3600, 24)
        return f"{d}d{h}h" if h else f"{d}d"
    return f"{s // 86400}d"


def ago(ts: float | None, now: float) -> str:
    """`5m ago` (or `in 5s` for a clock ahead of ours; `unknown` without a time)."""
    if ts is None:
        return "unknown"
    delta = now - ts
    return f"in {human_age(-delta)}" if delta < -1 else f"{human_age(delta)} ago"


def stamp(ts: float | None) -> str:
    """The time as the controller writes times (UTC, ISO 8601); `-` without one."""
    from shadowctl.controller.clock import iso

    return iso(ts) if ts is not None else "-"


def pct(value: Any) -> str:
    """`25%`, `12.5%`, `-` for no value."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return f"{value:g}%"


def num(value: Any) -> str:
    """A measured number in 4 significant digits; `-` when absent."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1000:
        return f"{value:.1f}"
    if abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


def _effect_one(value: Any, scale: str) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "?"
    if scale == "ratio":
        return f"{(value - 1) * 100:+.1f}%"
    return f"{value:+.4g}"


def effect_text(metric: MetricEvidence) -> str:
    """The observed effect and its interval on the user's scale: `+12.0% [+3.1%, +20.4%]`."""
    scale = metric.effect_scale or "difference"
    effect = metric.effect
    interval = metric.interval
    text = _effect_one(effect, scale) if effect is not None else "-"
    if len(interval) == 2 and any(v is not None for v in interval):
        lo, hi = interval
        text += f" [{'-inf' if lo is None else _effect_one(lo, scale)}, {'+inf' if hi is None else _effect_one(hi, scale)}]"
    return text


def samples_text(metric: MetricEvidence) -> str:
    return f"{num(metric.samples.primary)} / {num(metric.samples.candidate)}"


def steps_of(obj: JSON) -> list[int]:
    canary = ((obj.get("spec") or {}).get("canary") or {})
    steps = canary.get("steps") if isinstance(canary, dict) else None
    return [int(s) for s in steps if isinstance(s, int | float)] if isinstance(steps, list) else []


def step_text(obj: JSON) -> str:
    """`2/4` during the canary, `shadow` while mirroring, `-` otherwise."""
    from shadowctl.policy.status import Phase

    status = status_of(obj)
    total = len(steps_of(obj))
    if status.step is not None and total:
        return f"{status.step}/{total}"
    if status.phase is Phase.shadowing:
        return "shadow"
    return "-"


def weights_text(obj: JSON) -> str:
    """`primary 75% / candidate 25%` as read back from the routes, else as the rollout intends."""
    status = status_of(obj)
    if status.routes is not None:
        return f"primary {pct(status.routes.primary_weight)} / candidate {pct(status.routes.candidate_weight)}"
    weight = status.canary_weight
    if weight is not None:
        return f"primary {pct(100 - weight)} / candidate {pct(weight)}"
    return "primary 100% / candidate 0%"


def mirror_text(obj: JSON) -> str:
    status = status_of(obj)
    value = status.routes.mirror_percent if status.routes is not None else None
    if value is None:
        value = status.mirror_percent
    return pct(value) if value is not None else "off"


def history_of(obj: JSON) -> list[HistoryEntry]:
    return status_of(obj).history


def decision_text(obj: JSON, now: float) -> str:
    """The last decision in a sentence: the status message and when its transition happened."""
    message = status_of(obj).message
    hist = history_of(obj)
    if hist:
        last = hist[-1]
        text = message or last.reason
        return f"{last.from_} -> {last.to} {ago(last.at, now)}: {text}"
    return message or "no decision yet"


# --------------------------------------------------------------------------- get


def table_rows(items: Iterable[JSON], now: float, all_namespaces: bool) -> list[list[str]]:
    head = ["NAME", "PHASE", "STEP", "WEIGHT", "MIRROR", "VERDICT", "AGE"]
    rows = [(["NAMESPACE"] if all_namespaces else []) + head]
    for obj in items:
        meta, status = meta_of(obj), status_of(obj)
        verdict = status.last_verdict.outcome if status.last_verdict is not None else None
        created = parse_time(meta.get("creationTimestamp"))
        row = [
            str(meta.get("name")),
            status.phase.value,
            step_text(obj),
            pct(status.canary_weight) if status.canary_weight is not None else "-",
            mirror_text(obj) if status.written else "-",
            str(verdict or "-"),
            human_age(now - created) if created is not None else "-",
        ]
        rows.append(([str(meta.get("namespace") or "")] if all_namespaces else []) + row)
    return rows


def columns(rows: list[list[str]]) -> str:
    """Left-aligned columns three spaces apart, as kubectl prints them."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


AllNamespacesOpt = Annotated[
    bool, typer.Option("-A", "--all-namespaces", help="List the policies of every namespace.")
]


def _no_policies(namespace: str | None) -> None:
    where = "any namespace" if namespace is None else f"namespace {namespace}"
    err_console.print(f"No ShadowPolicies found in {escape(where)}.", highlight=False, soft_wrap=True)


def get(
    name: Annotated[str | None, typer.Argument(help="One policy's name; without it, list them.",
                                               show_default=False)] = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    all_namespaces: AllNamespacesOpt = False,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """List ShadowPolicies, or show one, with their phase, step, weight, mirror and last verdict.

    -o json or -o yaml prints the whole objects (a List when there are several).

    Example: shadowctl get -n llm
    """
    if name and all_namespaces:
        raise fail("a policy cannot be looked up by name across all namespaces; give -n instead of -A", 2)
    conn = Conn(kubeconfig, context, namespace)

    async def body(client: KubeReader, ns: str) -> tuple[list[JSON], bool, str | None]:
        if name:
            return [await read_policy(client, ns, name)], True, ns
        scope = None if all_namespaces else ns
        return await list_policies(client, scope), False, scope

    items, single, scope = run_async(lambda: with_reader(conn, body))
    if output is OutputFormat.table:
        if not items:
            _no_policies(scope)
            return
        out(columns(table_rows(items, time.time(), all_namespaces)))
    elif single:
        emit(items[0], output)
    else:
        emit({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items}, output)


# --------------------------------------------------------------------------- status


_OUTCOME_STYLE = {"pass": "green", "fail": "bold red", "inconclusive": "yellow", "nodata": "magenta",
                  "continue": "cyan"}


def render_status(obj: JSON, now: float) -> RenderableType:
    """One policy as a person wants to see it now: where it is, what was decided, and the evidence."""
    from shadowctl.controller.commands import pending_command

    status = status_of(obj)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    phase = status.phase.value
    steps = steps_of(obj)
    facts.add_row("Phase", phase + (f" (step {step_text(obj)})" if "/" in step_text(obj) else ""))
    if steps:
        facts.add_row("Steps", ", ".join(f"{s}%" for s in steps))
    facts.add_row("Weights", weights_text(obj))
    facts.add_row("Mirror", mirror_text(obj))
    facts.add_row("Decision", Text(decision_text(obj, now)))
    verdict = status.last_verdict
    if verdict is not None:
        outcome = verdict.outcome or "-"
        line = Text(outcome, style=_OUTCOME_STYLE.get(outcome, ""))
        line.append(f" ({ago(parse_time(verdict.at), now)}): {verdict.reason}", style="")
        facts.add_row("Verdict", line)
    pending = pending_command(obj)
    if pending is not None:
        facts.add_row("Pending", f"{pending.command.value} (id {pending.id}), waiting for the controller")
    for err in status.source_errors or []:
        facts.add_row("Source error", Text(err, style="yellow"))
    parts: list[RenderableType] = [Text(f"{KIND_LABEL} {key_of(obj)}", style="bold underline"), facts]
    metrics = verdict.metrics if verdict is not None else []
    if metrics:
        table = Table(show_edge=False, pad_edge=False, header_style="bold")
        for col in ("METRIC", "OUTCOME", "PRIMARY", "CANDIDATE", "EFFECT [INTERVAL]", "SAMPLES P/C"):
            table.add_column(col, no_wrap=True)
        for m in metrics:
            outcome = m.outcome or "-"
            table.add_row(m.name, Text(outcome, style=_OUTCOME_STYLE.get(outcome, "")),
                          num(m.primary), num(m.candidate), effect_text(m), samples_text(m))
        parts.append(table)
        sentences = Table.grid(padding=(0, 1))
        sentences.add_column(no_wrap=True)
        sentences.add_column()
        for m in metrics:
            if m.sentence:
                sentences.add_row(f"  {m.name}:", Text(m.sentence))
        parts.append(sentences)
    elif not status.written:
        parts.append(Text("no status yet: is the controller (shadowctl run) running?", style="yellow"))
    return Group(*parts, Text(""))


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


async def fetch_for_status(client: KubeReader, namespace: str | None, name: str | None) -> list[JSON]:
    if name:
        assert namespace is not None
        return [await read_policy(client, namespace, name)]
    return await list_policies(client, namespace)


def _signature(items: list[JSON]) -> tuple[tuple[str, str], ...]:
    return tuple((key_of(o), str(meta_of(o).get("resourceVersion"))) for o in items)


async def watch_status(
    client: KubeReader,
    namespace: str | None,
    name: str | None,
    show: Callable[[list[JSON]], None],
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    warn: Callable[[str], None] = note,
) -> None:
    """Poll every POLL_SECONDS and call ``show`` whenever something changed; runs until cancelled.

    Returns when the named policy is deleted. An unreachable API server is reported once per
    outage and polling goes on.
    """
    from shadowctl.kube import Unavailable

    last: tuple[tuple[str, str], ...] | None = None
    outage = False
    while True:
        try:
            items = await fetch_for_status(client, namespace, name)
        except CliError:
            if name and last is not None:
                warn(f"{KIND_LABEL} {namespace}/{name} was deleted")
                return
            raise
        except Unavailable as exc:
            if last is None:
                raise
            if not outage:
                warn(f"lost the API server, still trying: {exc.message}")
            outage = True
            await sleep(POLL_SECONDS)
            continue
        if outage:
            warn("the API server answers again")
            outage = False
        sig = _signature(items)
        if sig != last:
            show(items)
            last = sig
        await sleep(POLL_SECONDS)


def status(
    name: Annotated[str | None, typer.Argument(help="One policy's name; without it, every policy in the namespace.",
                                               show_default=False)] = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    all_namespaces: AllNamespacesOpt = False,
    watch: Annotated[bool, typer.Option("-w", "--watch", help="Keep showing the status as it changes (Ctrl-C ends).")]
    = False,
) -> None:
    """Show where rollouts stand: phase, step, weights, mirror, the last decision and each metric's evidence.

    For every metric: its outcome, the primary and candidate values, the observed effect with its
    interval (ratio metrics as a percentage change), and the samples behind it.

    Example: shadowctl status chat -n llm --watch
    """
    if name and all_namespaces:
        raise fail("a policy cannot be looked up by name across all namespaces; give -n instead of -A", 2)
    conn = Conn(kubeconfig, context, namespace)
    console = _console()

    def show(items: list[JSON]) -> RenderableType:
        if not items:
            return Text("No ShadowPolicies found.")
        now = time.time()
        return Group(*(render_status(o, now) for o in items))

    if not watch:
        async def once(client: KubeReader, ns: str) -> list[JSON]:
            return await fetch_for_status(client, None if all_namespaces else ns, name)

        items = run_async(lambda: with_reader(conn, once))
        if not items:
            _no_policies(None if all_namespaces else namespace)
            return
        console.print(show(items))
        return

    async def follow(client: KubeReader, ns: str) -> None:
        scope = None if all_namespaces else ns
        if console.is_terminal:
            from rich.live import Live

            with Live(console=console, auto_refresh=False, transient=False) as live:
                await watch_status(client, scope, name, lambda items: live.update(show(items), refresh=True))
        else:
            def printed(items: list[JSON]) -> None:
                console.print(Text(f"--- {stamp(time.time())}", style="dim"))
                console.print(show(items))
            await watch_status(client, scope, name, printed)

    run_async(lambda: with_reader(conn, follow), interrupt_code=0)


# --------------------------------------------------------------------------- describe


def _spec_lines(obj: JSON) -> list[str]:
    """A summary of the spec, from the validated model (raw keys when the spec no longer validates)."""
    from pydantic import ValidationError

    from shadowctl.policy import ShadowPolicy

    spec = obj.get("spec") or {}
    try:
        policy = ShadowPolicy.model_validate({
            "apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "spec": spec,
            "metadata": {"name": meta_of(obj).get("name"), "namespace": meta_of(obj).get("namespace") or "default"},
        })
    except ValidationError as exc:
        return [f"(the spec does not validate: {exc.error_count()} problem(s); run shadowctl validate)",
                f"keys: {', '.join(sorted(spec))}"]
    s = policy.spec
    lines: list[str] = []
    if s.target.istio is not None:
        t = s.target.istio
        lines.append(f"Target:       Istio VirtualService {t.virtual_service}"
                     + (f" route {t.route}" if t.route else "")
                     + f": primary {t.primary.label()}, candidate {t.candidate.label()}")
    elif s.target.knative is not None:
        k = s.target.knative
        lines.append(f"Target:       Knative Service {k.service}: primary {k.primary_revision or '(latest ready)'}, "
                     f"candidate {k.candidate_revision or '(latest created)'} tagged {k.candidate_tag}")
    elif s.target.tap is not None:
        tp = s.target.tap
        lines.append(f"Target:       the taps of {tp.service}: candidate {tp.candidate_url or '(the same server)'}"
                     + (f", model rewritten to {tp.rewrite.model}" if tp.rewrite is not None else "")
                     + f", canary sticky per user ({tp.user_header or 'the body user field'})")
    if s.shadow is not None:
        lines.append(f"Shadow:       mirror {s.shadow.mirror_percent:g}% for {_dur(s.shadow.min_duration)} to "
                     f"{_dur(s.shadow.max_duration)}, at least {s.shadow.min_pairs} pairs ({s.shadow.mode.value})")
    if s.canary is not None:
        lines.append(f"Canary:       steps {', '.join(f'{w}%' for w in s.canary.steps)}, each "
                     f"{_dur(s.canary.step_duration)} (at most {_dur(s.canary.step_limit)})")
    a = s.analysis
    lines.append(f"Analysis:     {a.method.value}, every {_dur(a.interval)}, alpha {a.alpha:g}, beta {a.beta:g}")
    for m in a.metrics:
        lines.append(f"  metric      {m.name}: {m.statistic.value} {m.kind.value}, {m.direction.value} at most "
                     f"{m.margin}{' (critical)' if m.critical else ''}, min {m.min_samples} samples")
    if a.outputs is not None:
        comps = ", ".join(f"{c.name.value}>={c.threshold:g}" for c in a.outputs.comparators)
        lines.append(f"  outputs     {comps}; agreement at least {a.outputs.min_relative_agreement:g} of the "
                     f"{a.outputs.baseline.mode.value} baseline, min {a.outputs.min_pairs} pairs")
    lines.append(f"Rules:        trigger {s.trigger.value}, promotion {s.promotion.value}, on inconclusive "
                 f"{s.on_inconclusive.value}, on drift {s.on_drift.value}, deadline {_dur(s.progress_deadline)}")
    return lines


def _dur(value: timedelta) -> str:
    from shadowctl.policy.duration import format_duration

    return format_duration(value)


def _outputs_lines(status: PolicyStatus) -> list[str]:
    outputs = status.outputs
    if outputs is None:
        return []
    lines = []
    for name, row in sorted(outputs.comparators.items()):
        cp, ca = row.candidate_pairs, row.candidate_agree
        bp, ba = row.baseline_pairs, row.baseline_agree
        cand = f"{ca}/{cp} agree ({ca / cp:.1%})" if cp else "no pairs yet"
        base = f"{ba}/{bp} ({ba / bp:.1%})" if bp else "no baseline pairs yet"
        relative = f", relative {(ca / cp) / (ba / bp):.2f}" if cp and bp and ba else ""
        lines.append(f"  {name}: candidate {cand}; baseline {base}{relative}")
    skipped = outputs.skipped_primary_failed
    if skipped:
        lines.append(f"  skipped (the primary failed): {skipped}")
    if outputs.disagreements:
        lines.append("  last disagreeing pairs (oldest first):")
        for d in outputs.disagreements:
            trace = f"trace {d.trace_id}" if d.trace_id else "no trace (the request had no traceparent)"
            lines.append(f"    request {d.request_id}: {', '.join(d.comparators)}; {trace}")
    return lines


def _paired_lines(status: PolicyStatus) -> list[str]:
    """The shadow phase's paired latencies as `.status` keeps them (what a restarted controller continues)."""
    record = status.paired_latency
    if record is None or not record.quantities():
        return []
    lines = [f"Paired latency (shadow phase from {stamp(record.phase_started_at)}):"]
    for quantity, c in record.quantities().items():
        n = c.pairs
        left = []
        if c.dropped:
            left.append(f"{c.dropped} without the quantity")
        if c.errored:
            left.append(f"{c.errored} with a failed side")
        left_out = f"; left out: {', '.join(left)}" if left else ""
        if not n:
            lines.append(f"  {quantity}: no pairs yet{left_out}")
            continue
        slower = f", {n - c.counts[c.le.index(0.0)]} slower on the candidate" if 0.0 in c.le else ""
        lines.append(f"  {quantity}: {n} pairs, geometric-mean ratio candidate/primary {math.exp(c.sum / n):.3f} "
                     f"(geometric means {num(math.exp(c.sum_log_candidate / n))} vs "
                     f"{num(math.exp(c.sum_log_primary / n))}){slower}{left_out}")
    return lines


def describe_text(obj: JSON, events: list[JSON], now: float) -> str:
    """Everything about why a policy is where it is, as plain text (kubectl describe style)."""
    from shadowctl.controller.commands import pending_command

    meta, status = meta_of(obj), status_of(obj)
    created = parse_time(meta.get("creationTimestamp"))
    out = [
        f"Name:         {meta.get('name')}",
        f"Namespace:    {meta.get('namespace')}",
        f"Created:      {stamp(created)} ({ago(created, now)})",
        f"Generation:   {meta.get('generation', '-')} (observed by the controller: "
        f"{status.observed_generation if status.observed_generation is not None else '-'})",
        "Spec:",
        *("  " + line for line in _spec_lines(obj)),
        "Status:",
        f"  Phase:      {status.phase.value}" + (f", step {step_text(obj)}" if "/" in step_text(obj) else ""),
        f"  Weights:    {weights_text(obj)}",
        f"  Mirror:     {mirror_text(obj)}",
        f"  Message:    {status.message or '-'}",
        f"  Last tick:  {status.last_tick or '-'}",
    ]
    if status.rollout is not None and status.rollout.candidate:
        out.append(f"  Candidate:  {status.rollout.candidate}")
    for err in status.source_errors or []:
        out.append(f"  Source error: {err}")
    verdict = status.last_verdict
    if verdict is not None:
        out.append(f"Last verdict: {verdict.outcome} ({verdict.method or '-'}, {ago(parse_time(verdict.at), now)})")
        out.append(f"  {verdict.reason}")
        for m in verdict.metrics:
            out.append(f"  {m.name} [{m.outcome}]: primary {num(m.primary)}, candidate {num(m.candidate)}, "
                       f"effect {effect_text(m)}, threshold {num(m.threshold)}, samples {samples_text(m)}")
            if m.sentence:
                out.append(f"    {m.sentence}")
    else:
        out.append("Last verdict: none yet")
    outputs = _outputs_lines(status)
    out.append("Output agreement:" if outputs else "Output agreement: none recorded")
    out.extend(outputs)
    out.extend(_paired_lines(status))
    hist = history_of(obj)
    out.append("History:" if hist else "History: none")
    for h in hist:
        out.append(f"  {stamp(h.at)} ({ago(h.at, now)})  {h.from_} -> {h.to}: {h.reason}")
    conds = status.conditions
    out.append("Conditions:" if conds else "Conditions: none")
    if conds:
        rows = [["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"]]
        for c in conds:
            since = parse_time(c.last_transition_time)
            rows.append([c.type, c.status, c.reason, ago(since, now) if since is not None else "-", c.message])
        out.extend("  " + line for line in columns(rows).splitlines())
    last = status.last_command
    if last is not None:
        out.append(f"Last command: {last.command} (id {last.id}) by {last.by or '?'} at "
                   f"{last.at or '?'}, handled {last.handled_at or '?'}, result {last.result}")
    else:
        out.append("Last command: none")
    pending = pending_command(obj)
    if pending is not None:
        out.append(f"Pending command: {pending.command.value} (id {pending.id}) by {pending.by or '?'} at "
                   f"{pending.at or '?'}, not carried out yet")
    out.append("Events:" if events else "Events: none")
    if events:
        rows = [["TYPE", "REASON", "AGE", "FROM", "MESSAGE"]]
        for e in events:
            when = _event_time(e)
            count = e.get("count")
            age = ago(when, now) if when is not None else "-"
            if isinstance(count, int) and count > 1:
                age += f" (x{count})"
            source = (e.get("source") or {}).get("component") or e.get("reportingComponent") or ""
            rows.append([str(e.get("type") or ""), str(e.get("reason") or ""), age, str(source),
                         " ".join(str(e.get("message") or "").split())])
        out.extend("  " + line for line in columns(rows).splitlines())
    return "\n".join(out)


def _event_time(event: JSON) -> float | None:
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        ts = parse_time(event.get(key))
        if ts is not None:
            return ts
    return parse_time(meta_of(event).get("creationTimestamp"))


EVENT_LIMIT = 20


def _rv_number(obj: JSON) -> int:
    """The resourceVersion as a number where it is one: orders events created within one second."""
    rv = str(meta_of(obj).get("resourceVersion") or "")
    return int(rv) if rv.isdigit() else 0


async def events_for(client: KubeReader, obj: JSON) -> list[JSON]:
    """The object's recent core/v1 Events (oldest first, at most EVENT_LIMIT).

    Asks the server to filter by involvedObject; a server that cannot (400) gets a plain list of the
    namespace, filtered here. Both are filtered by kind and name here as well.
    """
    from shadowctl.kube import EVENT, SHADOW_POLICY, BadRequest

    meta = meta_of(obj)
    ns, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
    selector = f"involvedObject.name={name},involvedObject.kind={SHADOW_POLICY.kind}"
    try:
        items = (await client.list(EVENT, ns, field_selector=selector)).items
    except BadRequest:
        items = (await client.list(EVENT, ns)).items
    mine = [e for e in items
            if (e.get("involvedObject") or {}).get("name") == name
            and (e.get("involvedObject") or {}).get("kind") in (None, SHADOW_POLICY.kind)]
    mine.sort(key=lambda e: (_event_time(e) or 0.0, _rv_number(e)))
    return mine[-EVENT_LIMIT:]


def describe(
    name: Annotated[str, typer.Argument(help="The policy's name.", show_default=False)],
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Explain why a rollout is where it is: spec, verdict numbers, history, events.

    Shows the spec in short, every metric's numbers and sentence behind the last verdict, output
    agreement counts, the history of transitions with times, conditions, the last command and the
    policy's recent Kubernetes Events.

    Example: shadowctl describe chat -n llm
    """
    conn = Conn(kubeconfig, context, namespace)

    async def body(client: KubeReader, ns: str) -> tuple[JSON, list[JSON]]:
        from shadowctl.kube import Forbidden

        obj = await read_policy(client, ns, name)
        try:
            events = await events_for(client, obj)
        except Forbidden:
            note("note: not allowed to list events in this namespace; events are left out")
            events = []
        return obj, events

    obj, events = run_async(lambda: with_reader(conn, body))
    out(describe_text(obj, events, time.time()))



def register(app: typer.Typer) -> None:
    app.command("get")(get)
    app.command("status")(status)
    app.command("describe")(describe)
