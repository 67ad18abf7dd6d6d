"""What each preset queries: PromQL templates, the labels that select a variant, how gauge parts combine.

The policy knows a preset only by name and kind (:data:`shadowctl.policy.model.PRESET_KINDS`); this
module implements exactly those names, and is the one place that knows their PromQL (see
docs/metrics.md, which shows every template).

Each preset is a PromQL template over the `{{ placeholder }}` names of
:mod:`shadowctl.policy.templates`. `{{ selector }}` is rendered by the metric
source from the variant's selector in the preset's *selector style*, because the
same variant carries different labels in different metric families:

- ``pod``: series scraped from the model-server pods (vLLM) carry ``namespace`` and
  ``pod``; the variant is ``pod=~<variants.X.pod>``, or else the pods of its
  Deployment (``<workload>-<hash>-<id>``) or of its Knative revision
  (``<revision>-deployment-<hash>-<id>``).

  The DCGM exporter is scraped from its own DaemonSet pod and names the GPU's pod in
  labels of its own, which reach Prometheus under one of three names depending on
  the setup (docs/metrics.md, "GPU metrics"): ``exported_namespace`` /
  ``exported_pod`` (the dcgm-exporter Helm chart: ``honorLabels: false`` renames the
  exporter's labels that clash with the target's), ``namespace`` / ``pod``
  (``honor_labels: true``) or ``pod_namespace`` / ``pod_name``
  (``--use-old-namespace``). :func:`_gpu` selects through all three and writes the
  GPU's pod back into ``namespace`` / ``pod``, so a DCGM preset is grouped, split and
  combined with vLLM's series like any ``pod`` preset. A physical series matches one
  form only (the ``namespace`` / ``pod`` form requires ``exported_pod=""``), so
  nothing is counted twice; the selector values for the other two forms are the
  same matchers under renamed labels (:data:`GPU_POD_LABELS`).
- ``istio``: Istio standard metrics, always ``reporter="destination"`` (mirrored
  requests are reported only by the destination side), matched by
  ``destination_workload_namespace`` and ``destination_workload`` (the Deployment,
  or ``<revision>-deployment`` for Knative), or else ``destination_version`` (the
  subset, assuming the DestinationRule subset selects the pods' ``version`` label)
  with ``destination_service_name`` of the destination host, because other services'
  pods may carry the same version label.

What the result of each kind means (the metric source relies on it):

- latency-histogram: one series per ``le``, the increase of the cumulative bucket
  counters over ``{{ window }}`` (counter resets are handled by ``increase``);
- ratio: ``query`` is the total, ``error_query`` the failures, both increases;
- counter: one series, an increase over ``{{ window }}``;
- gauge: one series, evaluated at every interval (``{{ window }}`` is then the
  analysis interval, at least 1m, for any ``rate`` inside).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from shadowctl.policy.model import PRESET_KINDS, MetricKind


class SelectorStyle(str, enum.Enum):
    """Which labels `{{ selector }}` matches on (see the module docstring)."""

    pod = "pod"
    istio = "istio"


class Combine(str, enum.Enum):
    """How a gauge's grouped parts make its value at one sample time (sums over the variant's series)."""

    total = "total"  # s
    mean = "mean"  # s / c
    cost = "cost"  # (n / 3600) / (d / 1000): GPUs per hour over thousands of tokens per second


@dataclass(frozen=True)
class GroupedTemplate:
    parts: tuple[tuple[str, str], ...]
    combine: Combine | None


@dataclass(frozen=True)
class Preset:
    """A named query: unit, PromQL template(s) and how the variant is selected; its kind is the policy's."""

    name: str
    unit: str
    description: str
    query: str
    error_query: str | None = None
    selector: SelectorStyle = SelectorStyle.pod
    price_scaled: bool = False
    """The value is multiplied by the policy's gpuPricePerHour (a cost preset)."""

    gauge_parts: tuple[tuple[str, str], ...] = ()
    """A gauge's grouped form: named queries aggregated by {{ by }}, combined per sample by ``combine``."""
    combine: Combine | None = None

    @property
    def kind(self) -> MetricKind:
        return PRESET_KINDS[self.name]

    @property
    def group_labels(self) -> tuple[str, ...]:
        """The labels that tell one variant's series from another's in this preset's metric family."""
        return GROUP_LABELS[self.selector]

    def grouped(self) -> GroupedTemplate:
        """This preset as one query for many rollouts: parts aggregated by :attr:`group_labels` as well,
        whose per-variant sums give back the preset's value (see the Prometheus source).

        Histograms, ratios and counters add ``by`` to every top-level ``sum`` (part ``v``; a ratio's
        failures are part ``f``, zero where the failure series does not exist yet). A gauge names its
        parts and how to combine their sums, because an ``avg`` or a quotient is not a sum of parts.
        """
        by = ", ".join(self.group_labels)
        if self.kind is MetricKind.gauge:
            assert self.combine is not None and self.gauge_parts
            return GroupedTemplate(tuple((n, q.replace("{{ by }}", by)) for n, q in self.gauge_parts), self.combine)
        value = _group(self.query, by)
        if self.error_query is None:
            return GroupedTemplate((("v", value),), None)
        return GroupedTemplate((("v", value), ("f", f"({_group(self.error_query, by)}) or (0 * ({value}))")), None)


GROUP_LABELS: Mapping[SelectorStyle, tuple[str, ...]] = MappingProxyType({
    SelectorStyle.pod: ("namespace", "pod"),
    SelectorStyle.istio: ("destination_workload_namespace", "destination_workload", "destination_service_name",
                          "destination_version"),
})


def _group(template: str, by: str) -> str:
    """Add ``by`` to every top-level ``sum`` of a preset's template (they all aggregate with sum)."""
    out = template.replace("sum by (le) (", f"sum by (le, {by}) (").replace("sum(", f"sum by ({by}) (")
    if out.count("sum by (") != template.count("sum"):
        raise ValueError(f"cannot group {template!r}")  # pragma: no cover - checked for every preset by a test
    return out


GPU_POD_LABELS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "selector": ("namespace", "pod"),
    "exported_selector": ("exported_namespace", "exported_pod"),
    "pod_name_selector": ("pod_namespace", "pod_name"),
})
"""The placeholders of a ``pod``-style preset and the (namespace, pod) labels each renders the variant on."""


def _gpu(metric: str) -> str:
    """The DCGM series of the variant's GPUs, whichever labels name their pod, with it in ``namespace`` / ``pod``."""
    parts = []
    for placeholder, (ns_label, pod_label) in GPU_POD_LABELS.items():
        if (ns_label, pod_label) == ("namespace", "pod"):
            parts.append(f'{metric}{{ {{{{ {placeholder} }}}}, exported_pod="" }}')
            continue
        inner = f"{metric}{{ {{{{ {placeholder} }}}} }}"
        parts.append(
            f'label_replace(label_replace({inner}, "namespace", "$1", "{ns_label}", "(.*)"), "pod", "$1", "{pod_label}", "(.*)")'
        )
    return "(" + " or ".join(parts) + ")"


def _histogram(metric: str, *alternatives: str) -> str:
    """A histogram's bucket increases summed by ``le``; an alternative name is read for each series (one pod's
    ``le``) that has no series under the names before it, so a Deployment half upgraded to a vLLM that
    renamed the metric counts both halves, and a vLLM serving both names is counted once."""
    parts = [f"increase({m}_bucket{{ {{{{ selector }}}} }}[{{{{ window }}}}])" for m in (metric, *alternatives)]
    return f"sum by (le) ({' or '.join(parts)})"


_VLLM_TOTAL = "sum(increase(vllm:request_success_total{ {{ selector }} }[{{ window }}]))"
_ISTIO = 'reporter="destination", {{ selector }}'
_COMPLETIONS = 'handler=~"/v1/(chat/)?completions"'

_ALL: tuple[Preset, ...] = (
    Preset(
        "vllm-ttft", "s",
        "vLLM time to first token.",
        _histogram("vllm:time_to_first_token_seconds"),
    ),
    Preset(
        "vllm-tpot", "s",
        "vLLM time per output token: every gap between two output tokens (vllm:inter_token_latency_seconds;"
        " vLLM 0.12 and older also had it as vllm:time_per_output_token_seconds, read for each pod that has no"
        " series under the new name).",
        _histogram("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    ),
    Preset(
        "vllm-request-tpot", "s",
        "vLLM time per output token of each request (its decode time over its output tokens less one): one"
        " observation per request, so a few slow requests weigh as much as their share of requests, not of"
        " tokens.",
        _histogram("vllm:request_time_per_output_token_seconds"),
    ),
    Preset(
        "vllm-e2e", "s",
        "vLLM end-to-end request latency.",
        _histogram("vllm:e2e_request_latency_seconds"),
    ),
    Preset(
        "vllm-queue-time", "s",
        "vLLM time a request waits in the scheduler queue.",
        _histogram("vllm:request_queue_time_seconds"),
    ),
    Preset(
        "vllm-errors", "requests",
        "Share of the requests vLLM's engine finished that finished with an error (finished_reason=\"error\","
        " answered 500). vLLM never counts here a client that disconnected, a request refused before the engine"
        " (4xx validation, admission: vllm:admission_rejections) or a failure outside the engine; see"
        " vllm-http-errors and istio-errors.",
        _VLLM_TOTAL,
        'sum(increase(vllm:request_success_total{ {{ selector }}, finished_reason="error" }[{{ window }}]))',
    ),
    Preset(
        "vllm-http-errors", "requests",
        "Share of completion requests vLLM's HTTP server answered 5xx, among all it answered (http_requests_total"
        " of its /metrics, any status: 4xx count in the total, not as failures).",
        f"sum(increase(http_requests_total{{ {{{{ selector }}}}, {_COMPLETIONS} }}[{{{{ window }}}}]))",
        f'sum(increase(http_requests_total{{ {{{{ selector }}}}, {_COMPLETIONS}, status="5xx" }}[{{{{ window }}}}]))',
    ),
    Preset(
        "vllm-generation-tokens", "tokens",
        "Output tokens generated by vLLM.",
        "sum(increase(vllm:generation_tokens_total{ {{ selector }} }[{{ window }}]))",
    ),
    Preset(
        "istio-errors", "requests",
        "Share of requests answered 5xx, as the destination's sidecar reports them (mirrored traffic included).",
        f"sum(increase(istio_requests_total{{ {_ISTIO} }}[{{{{ window }}}}]))",
        f'sum(increase(istio_requests_total{{ {_ISTIO}, response_code=~"5.." }}[{{{{ window }}}}]))',
        selector=SelectorStyle.istio,
    ),
    Preset(
        "istio-latency", "ms",
        "Request duration as the destination's sidecar reports it (mirrored traffic included).",
        f"sum by (le) (increase(istio_request_duration_milliseconds_bucket{{ {_ISTIO} }}[{{{{ window }}}}]))",
        selector=SelectorStyle.istio,
    ),
    Preset(
        "dcgm-gpu-util", "%",
        "Mean GPU utilisation of the variant's GPUs (DCGM exporter).",
        "avg(" + _gpu("DCGM_FI_DEV_GPU_UTIL") + ")",
        gauge_parts=(("s", "sum by ({{ by }}) (" + _gpu("DCGM_FI_DEV_GPU_UTIL") + ")"),
                     ("c", "count by ({{ by }}) (" + _gpu("DCGM_FI_DEV_GPU_UTIL") + ")")),
        combine=Combine.mean,
    ),
    Preset(
        "dcgm-fb-used", "MiB",
        "GPU frame-buffer memory used by the variant, summed over its GPUs (DCGM exporter).",
        "sum(" + _gpu("DCGM_FI_DEV_FB_USED") + ")",
        gauge_parts=(("s", "sum by ({{ by }}) (" + _gpu("DCGM_FI_DEV_FB_USED") + ")"),),
        combine=Combine.total,
    ),
    Preset(
        "dcgm-power", "W",
        "Power drawn by the variant's GPUs, summed (DCGM exporter).",
        "sum(" + _gpu("DCGM_FI_DEV_POWER_USAGE") + ")",
        gauge_parts=(("s", "sum by ({{ by }}) (" + _gpu("DCGM_FI_DEV_POWER_USAGE") + ")"),),
        combine=Combine.total,
    ),
    Preset(
        "gpu-cost-per-1k-tokens", "$/1k tokens",
        "GPU cost of 1,000 output tokens: GPUs x gpuPricePerHour / 3600 / (output tokens per second / 1000).",
        "(count(" + _gpu("DCGM_FI_DEV_GPU_UTIL") + ") / 3600)"
        " / (sum(rate(vllm:generation_tokens_total{ {{ selector }} }[{{ window }}])) / 1000)",
        price_scaled=True,
        gauge_parts=(("n", "count by ({{ by }}) (" + _gpu("DCGM_FI_DEV_GPU_UTIL") + ")"),
                     ("d", "sum by ({{ by }}) (rate(vllm:generation_tokens_total{ {{ selector }} }[{{ window }}]))")),
        combine=Combine.cost,
    ),
)

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _ALL})
if set(PRESETS) != set(PRESET_KINDS):
    raise ImportError("the Prometheus presets do not implement exactly shadowctl.policy.model.PRESET_KINDS")


def combine_parts(rule: Combine, parts: Mapping[str, float | None]) -> float | None:
    """A gauge's value at one sample time from its parts' sums (see :class:`Combine`); None where a part has
    no series then (as PromQL's aggregation of nothing), +Inf or NaN where PromQL would divide by zero."""
    if any(x is None for x in parts.values()):
        return None
    x = {k: float(v) for k, v in parts.items() if v is not None}
    try:
        if rule is Combine.total:
            return x["s"]
        if rule is Combine.mean:
            return x["s"] / x["c"]
        return (x["n"] / 3600.0) / (x["d"] / 1000.0)
    except ZeroDivisionError:
        return math.nan
    except KeyError:
        return None


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
