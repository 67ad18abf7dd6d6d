"""Render a policy's metric into PromQL for each variant, with every value escaped.

Values come from policy files and cluster object names, so they are untrusted
text placed inside PromQL string literals. `quote` writes a complete
double-quoted literal that PromQL's parser (Go string syntax) reads back as the
exact value: backslash, quote and every control character are escaped, so a
value can never close the literal (`"}`) and append its own expression. U+FFFD is escaped as well: the
lexer reads a raw one as a byte that is not UTF-8 and refuses the query. Names
used with `=~` (a workload or revision turned into a pod pattern) are first
regex-escaped, because `.` or `+` in a name would otherwise match other pods;
`variants.X.pod` is a regular expression by contract and is only quoted.

Placeholders sitting inside quotes in a template (`version="{{ subset }}"`)
receive the escaped body without the surrounding quotes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from shadowctl.policy.model import Metric, MetricKind, ShadowPolicy, VariantSelector
from shadowctl.policy.templates import render
from shadowctl.sources.base import (
    MetricKey,
    Planned,
    ServerRef,
    SourceConfigError,
    Variant,
    VariantQuery,
    WindowRequest,
)
from shadowctl.sources.prometheus.presets import GPU_POD_LABELS, Combine, Preset, SelectorStyle, get_preset


@dataclass(frozen=True)
class SeriesMatch:
    """Which series of a grouped answer belong to one variant: labels equal to values, and one label
    matching a regular expression (PromQL's anchored RE2, which Python's ``re.fullmatch`` reads the same
    way for the patterns shadowctl writes)."""

    equals: tuple[tuple[str, str], ...]
    regex: tuple[str, str] | None = None


@dataclass(frozen=True)
class GroupedForm:
    """The same metric as one query for many rollouts: the template aggregated ``by`` the labels that
    tell variants apart, the label that scopes it (a namespace label) and how to find each variant.

    The parts keep the ``{{ selector }}`` and ``{{ window }}`` placeholders: the source fills them for
    the whole batch (the namespaces and pods of the batch; one window length).
    """

    @property
    def scope_label(self) -> str:
        return self.labels[0]

    parts: tuple[tuple[str, str], ...]
    """Named queries (see :meth:`shadowctl.sources.prometheus.presets.Preset.grouped`)."""
    combine: Combine | None
    """For gauges: how the parts' sums make the value at one sample time."""
    labels: tuple[str, ...]
    """The labels the query is aggregated by; the first scopes it (a namespace label)."""
    namespace: str
    primary: SeriesMatch
    candidate: SeriesMatch

    def __getitem__(self, variant: Variant) -> SeriesMatch:
        return self.primary if variant is Variant.primary else self.candidate


@dataclass(frozen=True)
class PrometheusRequest(WindowRequest):
    """A :class:`WindowRequest` this source made, with the grouped form of a preset (None: a custom query,
    or a variant the grouped answer cannot be split for; then it is answered per rollout)."""

    grouped: GroupedForm | None = None


_REGEX_SPECIAL = frozenset("\\.+*?()|[]{}^$")
MIN_GAUGE_WINDOW = timedelta(minutes=1)


@functools.lru_cache(maxsize=4096)
def escape_string(value: str) -> str:
    """The body of a PromQL double-quoted string literal that reads back as `value` (cached: the same
    names are escaped at every look of every rollout)."""
    out: list[str] = []
    for ch in value:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0 or ch in "\u2028\u2029\ufffd":
            # U+FFFD too: Prometheus's lexer takes it for a byte that is not UTF-8 and refuses the whole query
            # ("invalid UTF-8 rune"); escaped, it reads back as itself (found by the atheris census).
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def quote(value: str) -> str:
    """`value` as a complete PromQL string literal."""
    return '"' + escape_string(value) + '"'


def escape_regex(value: str) -> str:
    """A RE2 pattern that matches exactly the literal `value` (PromQL anchors it)."""
    return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in value)


def format_window(span: timedelta) -> str:
    """A PromQL range duration in whole milliseconds (at least 1ms)."""
    return f"{max(1, round(span.total_seconds() * 1000))}ms"


def _pod_pattern(sel: VariantSelector) -> str | None:
    if sel.pod:
        return sel.pod
    # A Deployment's pods are <name>-<template hash>-<id>; a Knative revision's are
    # <revision>-deployment-<hash>-<id>. Hash segments have no '-', so workload `chat`
    # does not match the pods of `chat-v2`.
    if sel.workload:
        return escape_regex(sel.workload) + "-[a-z0-9]+-[a-z0-9]+"
    if sel.revision:
        return escape_regex(sel.revision) + "-deployment-[a-z0-9]+-[a-z0-9]+"
    return None


def service_name(host: str, namespace: str) -> str:
    """Istio's ``destination_service_name`` of a destination host: a Kubernetes Service's name for ``chat``,
    ``chat.<namespace>`` or ``chat.<ns>.svc[.<cluster domain>]`` (the first label), any other host as it is
    (Istio names a ServiceEntry's service by its host)."""
    labels = host.lower().rstrip(".").split(".")
    if len(labels) == 1 or (len(labels) == 2 and labels[1] == namespace) or (len(labels) > 2 and labels[2] == "svc"):
        return labels[0]
    return host


def variant_match(
    style: SelectorStyle, namespace: str, sel: VariantSelector, host: str | None = None
) -> SeriesMatch | None:
    """Which series are one variant's, or None when the selector names nothing usable for ``style``.

    A subset is a version label that other services' pods in the namespace may share (Istio's bookinfo:
    reviews and ratings both have ``version: v1``), so it is matched with the destination host's
    service name when the target names one.
    """
    if style is SelectorStyle.pod:
        pattern = _pod_pattern(sel)
        return SeriesMatch((("namespace", namespace),), ("pod", pattern)) if pattern is not None else None
    ns = ("destination_workload_namespace", namespace)
    if sel.workload:
        return SeriesMatch((ns, ("destination_workload", sel.workload)))
    if sel.revision:
        return SeriesMatch((ns, ("destination_workload", sel.revision + "-deployment")))
    if sel.subset:
        service = (("destination_service_name", service_name(host, namespace)),) if host else ()
        return SeriesMatch((ns, *service, ("destination_version", sel.subset)))
    return None


Matcher = tuple[str, str, str]
"""One PromQL label matcher: (label, ``=`` or ``=~``, value)."""


def _matchers(match: SeriesMatch) -> list[Matcher]:
    out = [(label, "=", value) for label, value in match.equals]
    if match.regex is not None:
        out.append((match.regex[0], "=~", match.regex[1]))
    return out


def selector_values(matchers: list[Matcher]) -> dict[str, str]:
    """The matchers as ``{{ selector }}``, and under the renamed pod labels of every other placeholder of
    :data:`~shadowctl.sources.prometheus.presets.GPU_POD_LABELS` (labels other than namespace and pod keep their name)."""
    out: dict[str, str] = {}
    for placeholder, (ns_label, pod_label) in GPU_POD_LABELS.items():
        rename = {"namespace": ns_label, "pod": pod_label}
        out[placeholder] = ", ".join(f"{rename.get(label, label)}{op}{quote(value)}" for label, op, value in matchers)
    return out


def selector(style: SelectorStyle, namespace: str, sel: VariantSelector, host: str | None = None) -> str | None:
    """The label matchers selecting one variant's series, or None when the selector names nothing usable."""
    match = variant_match(style, namespace, sel, host)
    if match is None:
        return None
    return selector_values(_matchers(match))["selector"]


@functools.lru_cache(maxsize=8192)
def _python_reads(pattern: str) -> bool:
    """Whether Python's re compiles the pattern (cached: a look asks for every rollout's patterns)."""
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def series_match(
    style: SelectorStyle, namespace: str, sel: VariantSelector, host: str | None = None
) -> SeriesMatch | None:
    """:func:`variant_match` where the grouped answer can be split in Python: a pod pattern in RE2 syntax
    Python does not read is answered per rollout instead."""
    match = variant_match(style, namespace, sel, host)
    if match is not None and match.regex is not None and not _python_reads(match.regex[1]):
        return None
    return match


def aligned_start(start: datetime, end: datetime, step: timedelta) -> datetime:
    """The window's start moved up to the first interval boundary, when the window ends on one.

    The controller ends every look on an interval boundary; starting the window on one too makes it a
    whole number of intervals, which lets the source answer all rollouts with one query (their phases
    started at different times). Up to one interval at the phase's start is left out: the traffic
    shift that began the phase is still settling there. A window that would become empty is kept.
    """
    seconds = step.total_seconds()
    if seconds <= 0:
        return start
    e = end.timestamp()
    if abs(e / seconds - round(e / seconds)) > 1e-6:
        return start
    first = math.ceil(start.timestamp() / seconds - 1e-9) * seconds
    return datetime.fromtimestamp(first, UTC) if first < e else start


_NEEDS = {
    SelectorStyle.pod: "pod, workload or revision",
    SelectorStyle.istio: "workload, revision or subset",
}


def _variant_fields(policy: ShadowPolicy, variant: Variant) -> tuple[VariantSelector, str | None, str | None]:
    """The variant's selector with defaults from the target filled in, its host, and the service."""
    sel = getattr(policy.spec.analysis.variants, variant.value)
    target = policy.spec.target
    host: str | None = None
    service: str | None = None
    if target.istio is not None:
        dest = getattr(target.istio, variant.value)
        host, service = dest.host, target.istio.primary.host
        if sel.subset is None and dest.subset is not None:
            sel = sel.model_copy(update={"subset": dest.subset})
    elif target.gateway_api is not None:
        # Each variant is a Service of its own (its backendRef), so host and service are the variant's.
        ref = getattr(target.gateway_api, variant.value)
        host = f"{ref.name}.{ref.namespace or policy.metadata.namespace}.svc.cluster.local"
        service = ref.name
    elif target.tap is not None:  # one Service for both (the taps route); selectors tell the variants apart
        service = target.tap.service
    elif target.knative is not None:
        service = target.knative.service
        rev = target.knative.primary_revision if variant is Variant.primary else target.knative.candidate_revision
        if sel.revision is None and rev is not None:
            sel = sel.model_copy(update={"revision": rev})
    return sel, host, service


def _values(
    policy: ShadowPolicy, variant: Variant, style: SelectorStyle, window: timedelta
) -> dict[str, str]:
    sel, host, service = _variant_fields(policy, variant)
    ns = policy.metadata.namespace
    values = {"namespace": escape_string(ns), "variant": variant.value, "window": format_window(window)}
    for name, raw in (
        ("workload", sel.workload), ("revision", sel.revision), ("pod", sel.pod), ("subset", sel.subset),
        ("host", host), ("service", service),
    ):
        if raw is not None:
            values[name] = escape_string(raw)
    match = variant_match(style, ns, sel, host)
    if match is not None:
        values.update(selector_values(_matchers(match)))
    return values


def _wrap(kind: MetricKind, expr: str) -> str:
    """Aggregate a custom query to one series (one per `le` for a histogram)."""
    if kind is MetricKind.latency_histogram:
        return f"sum by (le) ({expr})"
    if kind is MetricKind.gauge:
        return f"avg({expr})"
    return f"sum({expr})"


def build_request(policy: ShadowPolicy, metric: Metric, *, start: datetime, end: datetime) -> PrometheusRequest:
    """Render `metric` of `policy` for both variants over [start, end] (gauges: sampled every interval).

    Raises SourceConfigError naming the policy, metric and what is missing.
    """
    key = MetricKey(policy.key, metric.name)
    analysis = policy.spec.analysis
    preset: Preset | None = get_preset(metric.preset) if metric.preset is not None else None
    if preset is not None:
        template, failures, style, kind = preset.query, preset.error_query, preset.selector, preset.kind
    else:
        assert metric.query is not None  # the model guarantees preset XOR query
        kind, style = metric.kind, SelectorStyle.pod
        template = _wrap(kind, metric.query)
        failures = _wrap(kind, metric.error_query) if metric.error_query is not None else None
        if kind is MetricKind.ratio and failures is None:
            raise SourceConfigError(f"{key}: a ratio metric with a custom query needs errorQuery (the failures)")
    scale = 1.0
    if preset is not None and preset.price_scaled:
        if analysis.gpu_price_per_hour is None:
            raise SourceConfigError(f"{key}: preset {preset.name!r} needs spec.analysis.gpuPricePerHour")
        scale = analysis.gpu_price_per_hour
    step = analysis.interval
    if kind is not MetricKind.gauge:
        start = aligned_start(start, end, step)
    window = max(step, MIN_GAUGE_WINDOW) if kind is MetricKind.gauge else end - start
    queries: dict[Variant, VariantQuery] = {}
    for variant in Variant:
        values = _values(policy, variant, style, window)
        try:
            expr = render(template, values)
            fail = render(failures, values) if failures is not None and kind is MetricKind.ratio else None
        except KeyError as exc:
            missing = exc.args[0]
            hint = f" (set spec.analysis.variants.{variant.value}.{_NEEDS[style]})" if "selector" in missing else ""
            raise SourceConfigError(
                f"{key}: cannot select the {variant.value}: no value for {{{{ {missing} }}}}{hint}"
            ) from None
        queries[variant] = VariantQuery(expr, fail)
    if queries[Variant.primary] == queries[Variant.candidate]:
        raise SourceConfigError(
            f"{key}: primary and candidate render to the same query; their selectors must differ"
        )
    return PrometheusRequest(
        key=key, kind=kind, template=preset.name if preset else template + "\x00" + (failures or ""),
        start=start, end=end, primary=queries[Variant.primary], candidate=queries[Variant.candidate],
        step=step, scale=scale, unit=preset.unit if preset else "",
        grouped=_grouped_form(policy, preset) if preset is not None else None,
        server=_server(policy),
    )


def _server(policy: ShadowPolicy) -> ServerRef | None:
    own = policy.spec.analysis.prometheus
    if own is None:
        return None
    ns = policy.metadata.namespace
    name, _, key = (own.bearer_token_secret or "").partition("/")
    tls = own.tls
    return ServerRef(own.url, (ns, name) if name else None, key or "token", ns,
                     tls.ca_secret if tls else None, tls.cert_secret if tls else None)


def _grouped_form(policy: ShadowPolicy, preset: Preset) -> GroupedForm | None:
    form = preset.grouped()
    ns = policy.metadata.namespace
    matches = {v: series_match(preset.selector, ns, *_variant_fields(policy, v)[:2]) for v in Variant}
    p, c = matches[Variant.primary], matches[Variant.candidate]
    if p is None or c is None:
        return None
    return GroupedForm(form.parts, form.combine, preset.group_labels, ns, p, c)


def build_requests(
    policy: ShadowPolicy, *, start: datetime, end: datetime, metrics: Sequence[str] | None = None
) -> Planned:
    """Every (or the named) metric of a policy, each rendered or with the reason it cannot be
    (:meth:`shadowctl.sources.base.MetricSource.plan` of the Prometheus sources); paired-latency
    metrics are left out (their data are the output events)."""
    out: Planned = []
    for metric in policy.spec.analysis.metrics:
        if metrics is not None and metric.name not in metrics:
            continue
        if metric.kind is MetricKind.paired_latency:  # from the output events, not from Prometheus
            continue
        try:
            out.append((metric, build_request(policy, metric, start=start, end=end)))
        except SourceConfigError as exc:
            out.append((metric, exc))
    return out
