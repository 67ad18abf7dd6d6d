"""`shadowctl query`: run a policy's metric queries now and show what each variant did."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from shadowctl.cli.common import OutputFormat, OutputOpt, console, emit, fail
from shadowctl.cli.policy_files import load_policies
from shadowctl.cli.prom_opts import (
    URL_ENV,
    BasicAuthFileOpt,
    CaFileOpt,
    InsecureOpt,
    TimeoutOpt,
    TokenFileOpt,
    connection_options,
)
from shadowctl.policy import PolicyError
from shadowctl.policy.duration import format_duration, parse_duration
from shadowctl.policy.model import Metric, ShadowPolicy
from shadowctl.sources.base import (
    CounterWindow,
    CountWindow,
    GaugeWindow,
    HistogramWindow,
    MetricKey,
    NoData,
    SourceConfigError,
    SourceUnavailable,
    Variant,
    VariantPair,
    Window,
    WindowRequest,
    WindowResult,
)
from shadowctl.sources.prometheus import PrometheusMetricSource
from shadowctl.sources.prometheus.promql import build_requests


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}


def describe_window(window: Window) -> dict[str, Any]:
    """Plain numbers for one variant's window (what the table and JSON show).

    A histogram's quantiles are the judge's own estimates (:func:`shadowctl.judge.estimators.quantile_binned`:
    linear in the median's bucket, a power law in the tails), so what this prints is what a look would
    judge. One in the +Inf bucket is only known to be at least the highest finite bound: it is listed
    under ``at_least``.
    """
    if isinstance(window, HistogramWindow):
        import numpy as np  # numpy and the judge only where a histogram is shown

        from shadowctl.judge.estimators import quantile_binned

        out: dict[str, Any] = {"samples": window.total}
        at_least = []
        for name, q in QUANTILES.items():
            estimate = quantile_binned(np.asarray([window.counts]), np.asarray(window.le), q)
            out[name] = _number(float(estimate.value[0])) if window.total > 0 else None
            if window.total > 0 and bool(estimate.open_hi[0]) and np.isinf(estimate.hi_value[0]):
                at_least.append(name)
        if at_least:
            out["at_least"] = at_least
        return out
    if isinstance(window, CountWindow):
        return {"samples": window.total, "failures": window.failures, "rate": window.rate}
    if isinstance(window, CounterWindow):
        return {"increase": window.increase, "per_second": window.rate}
    assert isinstance(window, GaugeWindow)
    return {"samples": len(window.samples), "mean": window.mean, "dropped": window.dropped}


def _row(policy: ShadowPolicy, metric: Metric, result: WindowResult | SourceConfigError, unit: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "policy": policy.key, "metric": metric.name, "preset": metric.preset,
        "kind": metric.kind.value, "unit": unit,
    }
    if isinstance(result, VariantPair):
        row["status"] = "ok"
        row["variants"] = {v.value: describe_window(result[v]) for v in Variant}
    elif isinstance(result, NoData):
        row |= {"status": "no-data", "variant": result.variant.value if result.variant else None,
                "reason": result.reason, "query": result.query}
    elif isinstance(result, SourceUnavailable):
        row |= {"status": "unavailable", "cause": result.cause.value, "reason": result.reason, "query": result.query}
    else:
        row |= {"status": "error", "reason": str(result)}
    return row


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _table(rows: list[dict[str, Any]], since: timedelta) -> Table:
    table = Table(title=f"what each variant did in the last {format_duration(since)}")
    for col in ("policy", "metric", "variant", "samples", "value"):
        table.add_column(col, overflow="fold")
    for row in rows:
        if row["status"] != "ok":
            who = row.get("variant") or "both"
            table.add_row(row["policy"], row["metric"], who, "-", f"[yellow]{row['status']}[/]: {row['reason']}")
            continue
        for variant, nums in row["variants"].items():
            unit = f" {row['unit']}" if row["unit"] else ""
            if "p50" in nums:
                value = " ".join(f"{q}={'>=' if q in nums.get('at_least', ()) else ''}{_fmt(nums[q])}{unit}"
                                 for q in QUANTILES)
            elif "rate" in nums:
                value = f"rate={_fmt(nums['rate'])} ({_fmt(nums['failures'])} failed)"
            elif "per_second" in nums:
                value = f"increase={_fmt(nums['increase'])}{unit} ({_fmt(nums['per_second'])}/s)"
            else:
                value = f"mean={_fmt(nums['mean'])}{unit}"
            table.add_row(row["policy"], row["metric"], variant, _fmt(nums.get("samples")), value)
    return table


async def _run(
    work: dict[str, list[tuple[ShadowPolicy, Metric, WindowRequest]]], options: dict[str, Any]
) -> dict[MetricKey, WindowResult]:
    results: dict[MetricKey, WindowResult] = {}
    for url, items in work.items():
        source = PrometheusMetricSource(url, **options)
        try:
            results |= await source.fetch_many([req for _, _, req in items])
        finally:
            await source.aclose()
    return results


def _parse_at(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise fail(f"--at {text!r} is neither a unix time nor an ISO 8601 time", 2) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def query(
    policy_file: Annotated[Path, typer.Argument(metavar="POLICY", help="A ShadowPolicy YAML file.", show_default=False)],
    metric: Annotated[
        list[str] | None, typer.Option("--metric", "-m", help="Only this metric (repeatable).", show_default=False)
    ] = None,
    since: Annotated[str, typer.Option("--since", help="The window: from this long ago until now.")] = "5m",
    at: Annotated[
        str | None, typer.Option("--at", help="Evaluate at this time (unix seconds or ISO 8601) instead of now.")
    ] = None,
    prometheus: Annotated[
        str | None,
        typer.Option("--prometheus", envvar=URL_ENV, show_default=False,
                     help=f"Prometheus (or Thanos/Mimir) URL; default: the policy's, then ${URL_ENV}."),
    ] = None,
    token_file: TokenFileOpt = None,
    basic_auth_file: BasicAuthFileOpt = None,
    ca_file: CaFileOpt = None,
    insecure: InsecureOpt = False,
    timeout: TimeoutOpt = 10.0,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Run a policy's metric queries and print what primary and candidate did.

    Exit code 0 when every query ran (no data is a valid answer), 1 when Prometheus
    could not answer or a metric cannot be queried, 2 on usage errors.

    Example: shadowctl query policies/chat-istio.yaml --since 15m -m ttft-p95
    """
    try:
        window = parse_duration(since)
    except ValueError as exc:
        raise fail(f"--since: {exc}", 2) from None
    if window.total_seconds() <= 0:
        raise fail("--since must be longer than 0s", 2)
    end = _parse_at(at)
    try:
        policies = load_policies(policy_file)
    except PolicyError as exc:
        raise fail(str(exc)) from None
    options = connection_options(token_file, basic_auth_file, ca_file, insecure, timeout)

    known = {m.name for p in policies for m in p.spec.analysis.metrics}
    unknown = sorted(set(metric or []) - known)
    if unknown:
        raise fail(f"no metric named {', '.join(unknown)} in {policy_file}; known: {', '.join(sorted(known))}", 2)

    rows_order: list[tuple[ShadowPolicy, Metric, WindowRequest | SourceConfigError]] = []
    work: dict[str, list[tuple[ShadowPolicy, Metric, WindowRequest]]] = {}
    for pol in policies:
        url = prometheus or (pol.spec.analysis.prometheus.url if pol.spec.analysis.prometheus else None)
        if url is None:
            raise fail(
                f"{pol.key}: no Prometheus URL; give --prometheus, set ${URL_ENV} or spec.analysis.prometheus.url", 2
            )
        for m, req in build_requests(pol, start=end - window, end=end, metrics=metric):
            rows_order.append((pol, m, req))
            if isinstance(req, WindowRequest):
                work.setdefault(url, []).append((pol, m, req))
    try:
        results = asyncio.run(_run(work, options))
    except SourceConfigError as exc:
        raise fail(str(exc), 2) from None
    rows = []
    for pol, m, req in rows_order:
        result: WindowResult | SourceConfigError = results[req.key] if isinstance(req, WindowRequest) else req
        rows.append(_row(pol, m, result, req.unit if isinstance(req, WindowRequest) else ""))
    if output is OutputFormat.table:
        console.print(_table(rows, window))
    else:
        emit(rows, output)
    if any(r["status"] in ("unavailable", "error") for r in rows):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("query")(query)
