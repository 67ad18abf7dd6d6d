"""The ShadowPolicy model: what a team commits to git to describe one rollout.

Pydantic v2, frozen, ``extra="forbid"``; YAML keys are camelCase (Kubernetes
style), Python attributes snake_case. Cross-field rules live in validators
here, so that the CLI, the CRD and the controller agree on one definition.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_serializer, model_validator
from pydantic.alias_generators import to_camel

from shadowctl.policy.duration import Duration
from shadowctl.policy.prompts import PromptApply
from shadowctl.policy.re2 import re2_problem
from shadowctl.policy.templates import check_template

API_VERSION = "shadowctl.dev/v1alpha1"
KIND = "ShadowPolicy"
GROUP = "shadowctl.dev"
VERSION = "v1alpha1"
PLURAL = "shadowpolicies"

_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        use_enum_values=False,
        str_strip_whitespace=True,
    )


def _dns_name(value: str, what: str = "name") -> str:
    if len(value) > 253 or not _DNS1123.match(value):
        raise ValueError(
            f"{value!r} is not a valid {what}: use lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return value


# --------------------------------------------------------------------------- metadata


class Metadata(_Model):
    """Kubernetes object metadata (the part shadowctl reads)."""

    name: str
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _dns_name(v)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if len(v) > 63 or not _LABEL.match(v):
            raise ValueError(f"{v!r} is not a valid namespace (lower-case letters, digits and '-', at most 63)")
        return v


# --------------------------------------------------------------------------- target


class Destination(_Model):
    """An Istio destination: a host, optionally a DestinationRule subset and a port."""

    host: str
    subset: str | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _dns_name(v, "host")

    def label(self) -> str:
        """`host/subset:port` as shown to people."""
        text = self.host + (f"/{self.subset}" if self.subset else "")
        return text + (f":{self.port}" if self.port else "")


class IstioTarget(_Model):
    """A VirtualService whose http route shadowctl manages."""

    virtual_service: str = Field(description="Name of the VirtualService, in the policy's namespace.")
    route: str | None = Field(
        default=None, description="The http[].name to manage; may be omitted when the VirtualService has one route."
    )
    primary: Destination
    candidate: Destination

    @model_validator(mode="after")
    def _distinct(self) -> IstioTarget:
        if (self.primary.host, self.primary.subset, self.primary.port) == (
            self.candidate.host,
            self.candidate.subset,
            self.candidate.port,
        ):
            raise ValueError("primary and candidate are the same destination; give them different subsets or hosts")
        return self


class KnativeTarget(_Model):
    """A Knative Service whose spec.traffic shadowctl manages."""

    service: str
    primary_revision: str | None = Field(
        default=None, description="Revision serving today; default: the revision that has 100% when the rollout starts."
    )
    candidate_revision: str | None = Field(
        default=None, description="Revision to roll out; default: the latest ready revision."
    )
    candidate_tag: str = Field(default="candidate", description="Tag given to the candidate's traffic target.")

    @field_validator("service", "primary_revision", "candidate_revision")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return v if v is None else _dns_name(v)

    @field_validator("candidate_tag")
    @classmethod
    def _tag(cls, v: str) -> str:
        if not _LABEL.match(v) or len(v) > 63:
            raise ValueError(f"{v!r} is not a valid Knative tag (lower-case letters, digits and '-')")
        return v


class BackendRef(_Model):
    """A Gateway API backendRef to a Kubernetes Service: its name, and its namespace and port where they matter."""

    name: str = Field(description="Name of the Service.")
    namespace: str | None = Field(default=None, description="Namespace of the Service; default: the HTTPRoute's.")
    port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        default=None,
        description="Service port; matches only the backendRef with this port. Default: any port, and the "
                    "primary's port where shadowctl writes a backendRef for the candidate.",
    )

    @field_validator("name", "namespace")
    @classmethod
    def _label(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 63 or not _LABEL.match(v)):
            raise ValueError(f"{v!r} is not a valid Service or namespace name (lower-case letters, digits and '-')")
        return v

    def label(self) -> str:
        """`namespace/name:port` as shown to people."""
        text = (f"{self.namespace}/" if self.namespace else "") + self.name
        return text + (f":{self.port}" if self.port else "")


class GatewayAPITarget(_Model):
    """A Gateway API HTTPRoute (gateway.networking.k8s.io/v1) whose rule shadowctl manages."""

    http_route: str = Field(description="Name of the HTTPRoute, in the policy's namespace.")
    rule: str | None = Field(
        default=None, description="The rules[].name to manage; may be omitted when the HTTPRoute has one rule."
    )
    primary: BackendRef
    candidate: BackendRef

    @field_validator("http_route", "rule")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return v if v is None else _dns_name(v)

    @model_validator(mode="after")
    def _distinct(self) -> GatewayAPITarget:
        p, c = self.primary, self.candidate
        if (p.name, p.namespace) == (c.name, c.namespace) and (p.port is None or c.port is None or p.port == c.port):
            raise ValueError("primary and candidate are the same backend; name different Services (or ports)")
        return self


class KServeComponent(str, enum.Enum):
    """The InferenceService component whose canary shadowctl steps."""

    predictor = "predictor"


class KServeTarget(_Model):
    """A KServe InferenceService (serving.kserve.io/v1beta1) whose spec.predictor.canaryTrafficPercent shadowctl steps."""

    inference_service: str = Field(description="Name of the InferenceService, in the policy's namespace.")
    component: KServeComponent = Field(
        default=KServeComponent.predictor,
        description="The component whose canaryTrafficPercent is stepped (only predictor for now).",
    )

    @field_validator("inference_service")
    @classmethod
    def _name(cls, v: str) -> str:
        return _dns_name(v, "InferenceService name")


def candidate_url_problem(url: str) -> str | None:
    """What is wrong with a tap target's candidate URL, or None: :func:`outbound_url_problem`'s rules, and no
    query or fragment (the taps append the request's path and query)."""
    return outbound_url_problem(
        url, credentials="the URL is published to every tap and stored in the policy",
        no_query="the taps append each request's own path and query")


class PromptSource(_Model):
    """Where a prompt version's text is: a ConfigMap key in the policy's namespace (versioned in git)."""

    config_map_ref: ConfigMapKeyRef = Field(description="The ConfigMap and key holding the text.")


class TapPrompt(_Model):
    """rewrite.prompt: the candidate is another version of the system prompt or of a prompt template."""

    apply: PromptApply = Field(description="replaceSystem or template (docs/prompts.md).")
    primary: PromptSource = Field(description="The version the application uses today (requests must carry it).")
    candidate: PromptSource = Field(description="The version to roll out.")


class TapParameters(_Model):
    """rewrite.parameters: sampling parameters set on the candidate's requests."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _some(self) -> TapParameters:
        if self.temperature is None and self.top_p is None and self.max_tokens is None:
            raise ValueError("parameters sets none of temperature, topP, maxTokens")
        return self


class TapRewrite(_Model):
    """The candidate as a rewrite of the primary's requests (issue 18): the taps change each candidate request.

    Any combination of ``model``, ``prompt`` and ``parameters``, at least one (docs/prompts.md)."""

    # The API server's own check (CEL in the CRD), the same rule as _some below.
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "has(self.model) || has(self.prompt) || has(self.parameters)",
        "message": "rewrite sets none of model, prompt, parameters",
    }]})

    model: str | None = Field(
        default=None, min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$",
        description="The served model name the candidate's requests ask for instead of the primary's (a LoRA "
                    "adapter or a quantised variant the server serves under that name).")
    prompt: TapPrompt | None = Field(default=None, description="Another version of the system prompt or template.")
    parameters: TapParameters | None = Field(default=None, description="temperature, topP, maxTokens to set.")

    @model_validator(mode="after")
    def _some(self) -> TapRewrite:
        if self.model is None and self.prompt is None and self.parameters is None:
            raise ValueError("rewrite sets none of model, prompt, parameters")
        return self


class TapTarget(_Model):
    """The taps in front of the primary are the only router: they mirror (shadow) and send the step's share of
    live requests (canary) to the candidate. For a primary with no routing API in front of it (a plain
    Deployment and Service), or a candidate that is a request rewrite on the same server."""

    service: str = Field(description="The primary's service name, as the taps know it (their --service): the "
                                     "outputs topics and metrics are named by it.")
    candidate_url: str | None = Field(
        default=None, alias="candidateURL",
        description="Where the taps send the candidate's requests: its in-cluster Service URL "
                    "(http://NAME.NAMESPACE.svc:PORT). Optional with a rewrite: then the taps' own upstream "
                    "(the same server, another served model name).")
    rewrite: TapRewrite | None = Field(default=None, description="The candidate is this rewrite of the request.")
    user_header: str | None = Field(
        default=None, alias="userHeader",
        description="The header naming the user, for a canary share sticky per user; default: the request "
                    "body's OpenAI `user` field; a request with neither is chosen by its x-request-id.")

    @field_validator("service")
    @classmethod
    def _service(cls, v: str) -> str:
        if len(v) > 63 or not _LABEL.match(v):
            raise ValueError(f"{v!r} is not a valid service name (lower-case letters, digits and '-')")
        return v

    @field_validator("candidate_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and (problem := candidate_url_problem(v)):
            raise ValueError(f"candidateURL {v!r}: {problem}")
        return v

    @field_validator("user_header")
    @classmethod
    def _header(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}", v):
            raise ValueError(f"userHeader {v!r} is not an HTTP header name")
        return v.lower() if v is not None else None

    @model_validator(mode="after")
    def _somewhere(self) -> TapTarget:
        if self.candidate_url is None and self.rewrite is None:
            raise ValueError("give candidateURL (where the candidate is), a rewrite (the candidate is the same "
                             "server asked differently), or both")
        return self


class Target(_Model):
    """Exactly one of `istio`, `knative`, `gatewayAPI`, `kserve` or `tap`."""

    istio: IstioTarget | None = None
    knative: KnativeTarget | None = None
    gateway_api: GatewayAPITarget | None = Field(default=None, alias="gatewayAPI")
    kserve: KServeTarget | None = None
    tap: TapTarget | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if [self.istio, self.knative, self.gateway_api, self.kserve, self.tap].count(None) != 4:
            raise ValueError("set exactly one of 'istio', 'knative', 'gatewayAPI', 'kserve' or 'tap'")
        return self


# --------------------------------------------------------------------------- phases


class MirrorVirtualService(_Model):
    """An Istio VirtualService in front of a Knative service, used to mirror in the shadow phase."""

    name: str
    route: str | None = None
    primary: Destination | None = Field(
        default=None, description="Destination that serves users (default: the route's only destination)."
    )
    candidate: Destination = Field(description="Where mirrored requests go, e.g. the candidate's tag host.")


class ShadowMode(str, enum.Enum):
    """Who copies requests to the candidate in the shadow phase."""

    istio = "istio"  # VirtualService mirror + mirrorPercentage
    tap = "tap"  # application-level mirroring by the `shadowctl tap` sidecar


class ShadowBudget(_Model):
    """shadow.budget: what the mirror may cost the candidate's GPUs, per tap process (docs/prompts.md)."""

    # The API server's own check (CEL in the CRD), the first rule of _sound below.
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "!has(self.tokensPerSecond) || has(self.maxTokens)",
        "message": "tokensPerSecond needs maxTokens (a copy's cost is estimated from its max_tokens)",
    }]})

    requests_per_second: float | None = Field(default=None, gt=0, le=100_000,
                                              description="Copies (mirrored and resent) per second at most.")
    tokens_per_second: float | None = Field(
        default=None, gt=0, le=100_000_000,
        description="Estimated tokens per second at most (each copy: its body's bytes / 4 plus its max_tokens); "
                    "needs maxTokens.")
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000,
                                   description="Each copy's max_tokens at most (set where the request has none).")
    max_queue: int | None = Field(
        default=None, ge=0, le=1_000_000,
        description="Back off (halve the share of copies sent, per second) while the candidate's "
                    "vllm:num_requests_waiting, read from its /metrics, is above this (or cannot be read).")

    @model_validator(mode="after")
    def _sound(self) -> ShadowBudget:
        if self.tokens_per_second is not None and self.max_tokens is None:
            raise ValueError("tokensPerSecond needs maxTokens (a copy's cost is estimated from its max_tokens)")
        if (self.requests_per_second, self.tokens_per_second, self.max_tokens, self.max_queue) == (None,) * 4:
            raise ValueError("budget sets none of requestsPerSecond, tokensPerSecond, maxTokens, maxQueue")
        return self


class Shadow(_Model):
    """The shadow phase: the candidate gets mirrored copies; users never see its answers."""

    mirror_percent: float = Field(gt=0, le=100, description="Share of live requests mirrored to the candidate.")
    min_duration: Duration = timedelta(minutes=5)
    max_duration: Duration = timedelta(minutes=30)
    min_pairs: int = Field(default=100, ge=0, description="Paired primary/candidate answers needed before a pass.")
    mode: ShadowMode = ShadowMode.istio
    virtual_service: MirrorVirtualService | None = Field(
        default=None, description="For a Knative target: the Istio VirtualService that mirrors."
    )
    budget: ShadowBudget | None = Field(default=None, description="mode tap: the mirror's cap (per tap process).")

    @model_validator(mode="after")
    def _durations(self) -> Shadow:
        if self.max_duration < self.min_duration:
            raise ValueError("maxDuration must not be shorter than minDuration")
        return self


class Canary(_Model):
    """The canary phase: live traffic to the candidate in increasing steps."""

    steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        min_length=1,
        max_length=100,
        # The API server's own check (CEL in the CRD), the same rule as _increasing below.
        json_schema_extra={"x-kubernetes-validations": [{
            "rule": "self.isSorted() && self.all(x, self.filter(y, y == x).size() == 1)",
            "message": "steps must be strictly increasing",
        }]},
    )
    step_duration: Duration = Field(
        default=timedelta(minutes=10), description="How long each step holds at least before it can pass."
    )
    max_step_duration: Duration | None = Field(
        default=None,
        description="When a step without a decision is inconclusive (default: 3 x stepDuration).",
    )
    max_weight: int = Field(default=100, ge=1, le=100)

    @property
    def step_limit(self) -> timedelta:
        """The longest a step may run before its analysis is inconclusive."""
        return self.max_step_duration if self.max_step_duration is not None else self.step_duration * 3

    @field_validator("steps")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        for i in range(1, len(v)):
            if v[i] <= v[i - 1]:
                raise ValueError(f"steps must be strictly increasing: step {i} ({v[i]}) is not above {v[i - 1]}")
        return v

    @model_validator(mode="after")
    def _within_max(self) -> Canary:
        if self.max_step_duration is not None and self.max_step_duration < self.step_duration:
            raise ValueError("maxStepDuration must not be shorter than stepDuration")
        if self.steps[-1] > self.max_weight:
            raise ValueError(f"the last step ({self.steps[-1]}) is above maxWeight ({self.max_weight})")
        return self


# --------------------------------------------------------------------------- analysis


class Method(str, enum.Enum):
    sequential = "sequential"
    fixed = "fixed"


class MetricKind(str, enum.Enum):
    latency_histogram = "latency-histogram"
    ratio = "ratio"  # failures / total from two counters
    counter = "counter"
    gauge = "gauge"
    paired_latency = "paired-latency"  # per-pair latency ratios from the output events (needs analysis.outputs)


class LatencyQuantity(str, enum.Enum):
    """What a paired-latency metric compares, per request, from the taps' output events."""

    ttft = "ttft"  # time to first token (streamed answers)
    tpot = "tpot"  # time per output token after the first: (e2e - ttft) / (output tokens - 1)
    e2e = "e2e"  # end-to-end time


PRESET_KINDS: Mapping[str, MetricKind] = MappingProxyType({
    "vllm-ttft": MetricKind.latency_histogram,
    "vllm-tpot": MetricKind.latency_histogram,
    "vllm-request-tpot": MetricKind.latency_histogram,
    "vllm-e2e": MetricKind.latency_histogram,
    "vllm-queue-time": MetricKind.latency_histogram,
    "vllm-errors": MetricKind.ratio,
    "vllm-http-errors": MetricKind.ratio,
    "vllm-generation-tokens": MetricKind.counter,
    "istio-errors": MetricKind.ratio,
    "istio-latency": MetricKind.latency_histogram,
    "dcgm-gpu-util": MetricKind.gauge,
    "dcgm-fb-used": MetricKind.gauge,
    "dcgm-power": MetricKind.gauge,
    "gpu-cost-per-1k-tokens": MetricKind.gauge,
})
"""The presets a metric may name, and the kind of each: all a policy needs to check one. What each
queries is the metric source's business (:mod:`shadowctl.sources.prometheus.presets`, which implements
exactly these)."""


def check_preset(name: str, kind: MetricKind) -> None:
    """Raise ValueError if `name` is no preset (listing the known ones), or `kind` is not its kind."""
    known = PRESET_KINDS.get(name)
    if known is None:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESET_KINDS))}")
    if kind is not known:
        raise ValueError(f"preset {name!r} is of kind {known.value!r}; set kind: {known.value}")


class Statistic(str, enum.Enum):
    p50 = "p50"
    p90 = "p90"
    p95 = "p95"
    p99 = "p99"
    mean = "mean"
    rate = "rate"
    median = "median"  # kind paired-latency only: the median per-pair ratio


class Direction(str, enum.Enum):
    """Which change of the statistic is a regression."""

    increase = "increase"
    decrease = "decrease"
    either = "either"


_MARGIN = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*(%|pp)?\s*$")


class Margin(_Model):
    """How much worse the candidate may be: relative (`10%`) or absolute (`0.005`, `0.5pp`)."""

    value: float = Field(ge=0)
    relative: bool

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        if isinstance(data, bool):
            raise ValueError("expected a margin such as '10%', '0.5pp' or 0.005")
        if isinstance(data, int | float):
            return {"value": abs(float(data)), "relative": False}
        if isinstance(data, str):
            m = _MARGIN.match(data)
            if not m:
                raise ValueError(f"{data!r} is not a margin; write '10%' (relative), '0.5pp' or 0.005 (absolute)")
            number = abs(float(m.group(1)))
            if m.group(2) == "%":
                return {"value": number / 100.0, "relative": True}
            if m.group(2) == "pp":
                return {"value": number / 100.0, "relative": False}
            return {"value": number, "relative": False}
        return data

    @model_serializer(mode="plain")
    def _dump(self) -> str | float:
        return f"{self.value * 100:g}%" if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


MarginField = Annotated[
    Margin,
    WithJsonSchema(
        {
            "description": "Relative ('10%'), or absolute in percentage points ('0.5pp') or units (0.005).",
            "anyOf": [{"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(%|pp)?\s*$"}, {"type": "number", "minimum": 0}],
        }
    ),
]


class EffectMeasure(str, enum.Enum):
    """Kayenta's effect size measures: the ratio of means, or the common-language effect size."""

    mean_ratio = "meanRatio"
    cles = "cles"


class NanStrategy(str, enum.Enum):
    remove = "remove"
    to_zero = "replace"  # NaN becomes 0 (the member is not named replace: str.replace)


class OutlierStrategy(str, enum.Enum):
    keep = "keep"
    remove = "remove"


class EffectSize(_Model):
    """Kayenta's effectSize: thresholds for High/Low (allowed*) and critical failures (critical*)."""

    # High needs the effect size >= allowedIncrease, Low <= allowedDecrease; a critical metric's
    # High/Low fails the canary only at criticalIncrease/criticalDecrease. Unset: neutral, 1 or 0.5.

    measure: EffectMeasure = EffectMeasure.mean_ratio
    allowed_increase: float | None = Field(default=None, ge=0, le=1e6)
    allowed_decrease: float | None = Field(default=None, ge=0, le=1e6)
    critical_increase: float | None = Field(default=None, ge=0, le=1e6)
    critical_decrease: float | None = Field(default=None, ge=0, le=1e6)

    @model_validator(mode="after")
    def _cles_is_a_probability(self) -> EffectSize:
        if self.measure is EffectMeasure.cles:
            for name in ("allowed_increase", "allowed_decrease", "critical_increase", "critical_decrease"):
                v = getattr(self, name)
                if v is not None and v > 1:
                    raise ValueError(f"{to_camel(name)} is a probability with measure cles (0..1), not {v:g}")
        return self


class Outliers(_Model):
    """Kayenta's outliers: remove values outside quartiles -+ outlierFactor x IQR, widened to the 1st/99th percentiles."""

    strategy: OutlierStrategy = OutlierStrategy.keep
    outlier_factor: float = Field(default=3.0, gt=0, le=100)


class MetricFixed(_Model):
    """This metric's Kayenta options for method fixed; a block left unset comes from spec.analysis.fixed."""

    effect_size: EffectSize | None = None
    nan_strategy: NanStrategy | None = None
    outliers: Outliers | None = None
    must_have_data: bool | None = Field(
        default=None, description="No data scores as a failing metric (Kayenta's NodataFailMetric) unless critical."
    )
    muted: bool | None = Field(default=None, description="Classified and shown, left out of the score.")


class Metric(_Model):
    """One metric compared between primary and candidate."""

    name: str
    preset: str | None = Field(default=None, description="A built-in query, e.g. vllm-ttft; see docs/metrics.md.")
    query: str | None = Field(default=None, description="A PromQL template with {{ placeholders }}.")
    error_query: str | None = Field(default=None, description="For kind ratio with a custom query: the failures.")
    kind: MetricKind = MetricKind.latency_histogram
    statistic: Statistic = Statistic.p95
    quantity: LatencyQuantity | None = Field(
        default=None, description="Kind paired-latency: ttft, tpot or e2e of each request, candidate against primary."
    )
    direction: Direction = Direction.increase
    margin: MarginField = Field(default_factory=lambda: Margin(value=0.10, relative=True))
    critical: bool = False
    min_samples: int = Field(default=50, ge=1)
    group: str | None = Field(default=None, description="Group for weighted scoring in the fixed method.")
    groups: list[str] | None = Field(
        default=None, min_length=1, description="Several groups for the fixed method's score (instead of group)."
    )
    fixed: MetricFixed | None = Field(default=None, description="Kayenta options of this metric (method fixed).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9_.-]*$", v):
            raise ValueError(f"{v!r} is not a metric name (letters, digits, '_', '-', '.'; start with a letter)")
        return v

    @field_validator("query", "error_query")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            check_template(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _paired_default(cls, data: Any) -> Any:
        """A paired-latency metric is judged on the median ratio unless it says otherwise."""
        if isinstance(data, dict) and data.get("kind") in ("paired-latency", MetricKind.paired_latency) \
                and "statistic" not in data:
            return {**data, "statistic": "median"}
        return data

    @model_validator(mode="after")
    def _source(self) -> Metric:
        if self.kind is MetricKind.paired_latency:
            return self._paired()
        if self.quantity is not None:
            raise ValueError("'quantity' is for kind paired-latency (latency per request pair from the output events)")
        if self.statistic is Statistic.median:
            raise ValueError("statistic 'median' is for kind paired-latency; a latency histogram's median is 'p50'")
        if (self.preset is None) == (self.query is None):
            raise ValueError("set exactly one of 'preset' or 'query'")
        if self.preset is not None:
            check_preset(self.preset, self.kind)
        if self.kind is MetricKind.ratio and self.statistic is not Statistic.rate:
            raise ValueError(f"a ratio metric is judged by statistic 'rate', not {self.statistic.value!r}")
        if self.statistic is Statistic.rate and self.kind not in (MetricKind.ratio, MetricKind.counter):
            raise ValueError("statistic 'rate' needs kind 'ratio' or 'counter'")
        if self.group is not None and self.groups is not None:
            raise ValueError("set 'group' or 'groups', not both")
        return self

    def _paired(self) -> Metric:
        """The rules of kind paired-latency: per-pair ratios of the output events, no Prometheus query."""
        given = [name for name in ("preset", "query", "error_query") if getattr(self, name) is not None]
        if given:
            raise ValueError(f"kind paired-latency takes its data from the output events (spec.analysis.outputs), "
                             f"not from Prometheus: remove {', '.join(to_camel(g) for g in given)}")
        if self.quantity is None:
            raise ValueError("kind paired-latency needs 'quantity': ttft, tpot or e2e")
        if self.statistic not in (Statistic.median, Statistic.mean):
            raise ValueError(f"kind paired-latency is judged on the per-pair ratio's 'median' or 'mean' (of its log), "
                             f"not {self.statistic.value!r}; p95/p99 of each side stay Prometheus latency metrics")
        if not self.margin.relative or not 0 < self.margin.value < 1:
            raise ValueError(f"kind paired-latency needs a relative margin below 100% ('10%': the candidate at most "
                             f"10% slower), not {self.margin}")
        return self

    @property
    def score_groups(self) -> tuple[str, ...]:
        """The groups this metric scores in (method fixed); 'default' when none is named."""
        if self.groups is not None:
            return tuple(self.groups)
        return (self.group,) if self.group is not None else ("default",)


class ComparatorName(str, enum.Enum):
    exact = "exact"
    normalized_exact = "normalized-exact"
    token_f1 = "token-f1"
    rouge_l = "rouge-l"
    length_ratio = "length-ratio"
    json_valid = "json-valid"
    json_structure = "json-structure"
    refusal = "refusal"
    tool_calls = "tool-calls"
    semantic = "semantic"
    llm_judge = "llm-judge"


MAX_JUDGE_PROMPT_CHARS = 16_384
"""The longest judge prompt template (inline or from a ConfigMap key) the controller takes."""


class ConfigMapKeyRef(_Model):
    """A key of a ConfigMap in the policy's namespace."""

    name: str = Field(description="The ConfigMap's name (kustomize's configMapGenerator adds a hash: a version).")
    key: str = Field(description="The key holding the text.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _dns_name(v, "ConfigMap name")

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if not re.match(r"^[-._a-zA-Z0-9]{1,253}$", v):
            raise ValueError(f"{v!r} is not a ConfigMap key (letters, digits, '-', '_', '.')")
        return v


class JudgePrompt(_Model):
    """The judge's prompt template: from a ConfigMap key (versioned in git) or inline; exactly one."""

    config_map_ref: ConfigMapKeyRef | None = None
    text: str | None = Field(default=None, max_length=MAX_JUDGE_PROMPT_CHARS,
                             description="The template itself (tests, small setups).")

    @model_validator(mode="after")
    def _one(self) -> JudgePrompt:
        if (self.config_map_ref is None) == (self.text is None):
            raise ValueError("give exactly one of configMapRef and text")
        return self


class JudgeRate(_Model):
    """What the judge may cost: requests per second, and pairs judged per analysis interval."""

    requests_per_second: float = Field(default=2.0, gt=0, le=1000,
                                       description="Judge requests per second at most (each pair takes two).")
    max_pairs_per_interval: int = Field(default=50, ge=1, le=100_000,
                                        description="Pairs judged per analysis interval at most; the rest are "
                                                    "not judged (counted as unjudged).")


class LlmJudge(_Model):
    """Comparator llm-judge: a judge model behind an OpenAI-compatible endpoint (docs/prompts.md)."""

    url: str = Field(description="The endpoint's base URL, e.g. http://judge.llm:8000/v1 (POST URL/chat/completions).")
    model: str = Field(min_length=1, max_length=256, description="The judge's model name.")
    api_key_secret: str | None = Field(
        default=None, description="Secret name/key holding the bearer token; key apiKey if omitted.")
    prompt: JudgePrompt = Field(description="The judge prompt template: {question}, {answer_a}, {answer_b}.")
    min_win_or_tie: float = Field(
        default=0.45, gt=0, lt=0.5,
        description="Pass when the candidate wins or ties at least this share of judged pairs; fail when it "
                    "loses more than half (an even match wins or ties at least half).")
    rate: JudgeRate = Field(default_factory=JudgeRate)
    timeout: Duration = Field(default=timedelta(seconds=30), description="Per judge request; a timeout is no data.")
    concurrency: int = Field(default=4, ge=1, le=64, description="Judge requests in flight at most.")
    max_answer_chars: int = Field(default=4000, ge=100, le=100_000,
                                  description="Characters of each answer (and the question) put in the prompt.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        problem = outbound_url_problem(v, credentials="the key comes from apiKeySecret",
                                       no_query="the controller appends /chat/completions")
        if problem is not None:
            raise ValueError(f"{v!r} is not an allowed judge URL: {problem}")
        return v.rstrip("/")

    @field_validator("api_key_secret")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        return _secret_ref(v)


class Comparator(_Model):
    """An output comparator: a pair agrees when its score is at least `threshold`."""

    name: ComparatorName
    threshold: float = Field(default=0.5, ge=0, le=1)
    critical: bool = True
    judge: LlmJudge | None = Field(default=None, description="Comparator llm-judge only: the judge model.")

    @model_validator(mode="after")
    def _judge_for_llm_judge(self) -> Comparator:
        if self.name is ComparatorName.llm_judge and self.judge is None:
            raise ValueError("comparator 'llm-judge' needs 'judge' (url, model, prompt)")
        if self.name is not ComparatorName.llm_judge and self.judge is not None:
            raise ValueError(f"'judge' belongs to comparator 'llm-judge', not {self.name.value!r}")
        return self


class BaselineMode(str, enum.Enum):
    primary_replica = "primary-replica"  # a second primary (variant 'baseline') answers the mirrored requests too
    fixed = "fixed"  # a fixed expected agreement rate, measured beforehand
    resend = "resend"  # the primary's taps send a share of requests once more to the primary (variant 'baseline')


class Baseline(_Model):
    """The noise floor: how often the primary agrees with itself."""

    mode: BaselineMode = BaselineMode.primary_replica
    agreement: float | None = Field(
        default=None, ge=0, le=1, description="With mode fixed: the primary's self-agreement rate."
    )
    percent: float | None = Field(
        default=None, gt=0, le=100,
        description="With mode resend: share of requests the taps send once more, unchanged, to the primary "
                    "(default: shadow.mirrorPercent; chosen by the same hash, so at or below it every resent "
                    "request is also mirrored).")

    @model_validator(mode="after")
    def _fixed_needs_value(self) -> Baseline:
        if self.mode is BaselineMode.fixed and self.agreement is None:
            raise ValueError("mode 'fixed' needs 'agreement' (the primary's measured self-agreement, 0..1)")
        if self.mode is not BaselineMode.resend and self.percent is not None:
            raise ValueError("'percent' belongs to mode 'resend'")
        return self


class TlsSecrets(_Model):
    """TLS to a server (MQTT broker, Prometheus) with material from Secrets in the policy's namespace."""

    ca_secret: str | None = Field(
        default=None,
        description="Secret name/key holding the CA bundle (PEM) that signed the server's certificate; key ca.crt "
                    "if omitted. Without it the system's CAs are trusted.")
    cert_secret: str | None = Field(
        default=None,
        description="Name of a kubernetes.io/tls Secret (keys tls.crt, tls.key): the client certificate for "
                    "mutual TLS.")

    @field_validator("ca_secret")
    @classmethod
    def _ca(cls, v: str | None) -> str | None:
        return _secret_ref(v)

    @field_validator("cert_secret")
    @classmethod
    def _cert(cls, v: str | None) -> str | None:
        return None if v is None else _dns_name(v, "Secret name")


def _secret_ref(v: str | None) -> str | None:
    if v is not None:
        name, _, key = v.partition("/")
        _dns_name(name, "Secret name")
        if "/" in key:
            raise ValueError(f"{v!r}: write NAME or NAME/KEY")
    return v


class Mqtt(_Model):
    """Where output events are published."""

    # The API server's own check (CEL in the CRD), the same rule as _partitions_need_a_last_level below.
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "!has(self.partitions) || self.partitions <= 1 || !has(self.topic) || !self.topic.endsWith('#')",
        "message": "partitions > 1 needs a topic that does not end in '#': the partition is one more topic level",
    }]})

    broker: str = Field(description="mqtt://host:port or mqtts://host:port")
    topic: str = "shadowctl/outputs/{namespace}/{service}/+"
    username: str | None = None
    password_secret: str | None = Field(default=None, description="Secret name/key holding the password.")
    tls: TlsSecrets | None = Field(default=None, description="CA and client certificate for mqtts:// (Secrets).")
    partitions: int = Field(
        default=1, ge=1, le=256,
        description="The taps publish each request's events on one of this many partitions, a last topic level "
                    "0..P-1 chosen by a hash of x-request-id (the same on every tap, so both events of a pair share "
                    "a partition); the controller's pairing workers each subscribe to their partitions. Start the "
                    "taps with the same --partitions. 1: no partition level (docs/scaling.md).")

    @field_validator("broker")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^mqtts?://[^/:\s]+(:\d{1,5})?/?$", v):
            raise ValueError(f"{v!r} is not a broker URL; write mqtt://host:1883 or mqtts://host:8883")
        return v

    @field_validator("password_secret")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        return _secret_ref(v)

    @model_validator(mode="after")
    def _tls_needs_mqtts(self) -> Mqtt:
        if self.tls is not None and not self.broker.startswith("mqtts://"):
            raise ValueError(f"tls is set but broker {self.broker!r} is not mqtts://")
        return self

    @model_validator(mode="after")
    def _partitions_need_a_last_level(self) -> Mqtt:
        if self.partitions > 1 and self.topic.endswith("#"):
            raise ValueError(f"partitions {self.partitions} needs a topic that does not end in '#' "
                             f"({self.topic!r}): the partition is one more topic level after it")
        return self


class RedactionMode(str, enum.Enum):
    """What the taps keep of the texts (prompt, answer, tool-call arguments) in an output event.

    Ordered from the least to the most private; lengths and token counts are kept in every mode.
    Which comparators can still run under each: :data:`shadowctl.compare.redaction.RUNS_UNDER`.
    """

    none = "none"  # the texts as they are
    truncate = "truncate"  # the first maxChars characters; the answer's hash; tool-call arguments hashed
    hash = "hash"  # no text: the answer's SHA-256, tool-call arguments hashed
    drop = "drop"  # no text and no hash: lengths and token counts only


class Redaction(_Model):
    """spec.analysis.outputs.redaction: what of the texts the output events may carry (docs/outputs.md)."""

    mode: RedactionMode = Field(
        default=RedactionMode.none,
        description="none, truncate, hash or drop; comparators that need what a mode removes report no data.")
    max_chars: int = Field(default=500, ge=1, le=1_000_000,
                           description="Mode truncate: characters kept of each text.")


class Sampling(_Model):
    """spec.analysis.outputs.sampling: the taps publish the events of a fraction of requests (docs/scaling.md)."""

    fraction: float = Field(
        default=1.0, gt=0, le=1,
        description="Share of requests whose output events the taps publish (start every tap of the policy with "
                    "--sample at this value), chosen by a hash of x-request-id so that no pair is broken; the "
                    "verdict says how many requests the pairs stand for (pairs / fraction).")
    target_pairs_per_second: float | None = Field(
        default=None, gt=0, le=1_000_000,
        description="Adaptive sampling: while pairs arrive faster than this (per second, measured over at least two "
                    "intervals), the controller lowers the fraction (never above `fraction`, never below "
                    "`minFraction`), and raises it again when they arrive much slower. Needs taps driven by the "
                    "route channel (shadow.mode tap or a tap target): the fraction travels in the route setting.")
    min_fraction: float = Field(
        default=0.001, gt=0, le=1,
        description="Adaptive sampling: the floor of the fraction (the verdict's pairs then stand for at most "
                    "1 / minFraction requests each).")

    @model_validator(mode="after")
    def _floor(self) -> Sampling:
        if self.target_pairs_per_second is not None and self.min_fraction > self.fraction:
            raise ValueError(f"minFraction {self.min_fraction:g} is above fraction {self.fraction:g}")
        return self

    @property
    def carried(self) -> bool:
        """Whether the route setting carries the fraction (it is not the default, every request, or it adapts)."""
        return self.fraction < 1.0 or self.target_pairs_per_second is not None


class Outputs(_Model):
    """Compare what the candidate answers with what the primary answers."""

    mqtt: Mqtt
    comparators: list[Comparator] = Field(
        default_factory=list,
        description="At least one with a shadow phase; none for a tap target without one (outputs.mqtt is then only "
                    "the taps' route channel).")
    baseline: Baseline = Baseline()
    min_relative_agreement: float = Field(
        default=0.9, gt=0, le=1, description="Candidate agreement must reach this share of the baseline agreement."
    )
    pair_ttl: Duration = Field(default=timedelta(seconds=60), alias="pairTTL")
    min_pairs: int = Field(default=100, ge=1)
    redaction: Redaction = Field(
        default_factory=Redaction,
        description="What of the prompts and answers the events carry (start the taps with the same --redact).")
    sampling: Sampling = Field(
        default_factory=Sampling,
        description="Which share of requests the taps publish events for (start the taps with the same --sample).")

    @field_validator("comparators")
    @classmethod
    def _unique(cls, v: list[Comparator]) -> list[Comparator]:
        seen: set[ComparatorName] = set()
        for c in v:
            if c.name in seen:
                raise ValueError(f"comparator {c.name.value!r} is listed twice")
            seen.add(c.name)
        return v


class PrometheusSource(_Model):
    """Override the controller's Prometheus for this policy."""

    url: str
    bearer_token_secret: str | None = Field(
        default=None, description="Secret name/key holding a bearer token for this server; key token if omitted.")
    tls: TlsSecrets | None = Field(default=None, description="CA and client certificate for https:// (Secrets).")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://\S+$", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v

    @field_validator("bearer_token_secret")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        return _secret_ref(v)

    @model_validator(mode="after")
    def _tls_needs_https(self) -> PrometheusSource:
        if self.tls is not None and not self.url.startswith("https://"):
            raise ValueError(f"tls is set but url {self.url!r} is not https://")
        return self


class VariantSelector(_Model):
    """How to find one variant in Prometheus (fills the query placeholders)."""

    workload: str | None = None
    revision: str | None = None
    pod: str | None = Field(default=None, description="A regular expression over pod names.")
    subset: str | None = None

    @field_validator("workload", "revision", "pod", "subset")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        # Any other text is fine: it is escaped into PromQL string literals (sources.prometheus.promql).
        if v == "":
            raise ValueError("an empty name selects nothing; leave the field out")
        return v

    @field_validator("pod")
    @classmethod
    def _re2(cls, v: str | None) -> str | None:
        problem = None if v is None else re2_problem(v)
        if problem is not None:
            raise ValueError(f"{v!r} is not a regular expression Prometheus (RE2) can use: {problem}")
        return v


class Variants(_Model):
    primary: VariantSelector = VariantSelector()
    candidate: VariantSelector = VariantSelector()


class Fixed(_Model):
    """Method fixed: the options of Kayenta's NetflixACAJudge (docs/judge.md, "Kayenta parity")."""

    # effectSize, nanStrategy, outliers and mustHaveData are every metric's defaults; a metric's own
    # fixed block replaces them block by block.

    confidence: float = Field(
        default=0.98, ge=0.5, le=0.9999,
        description="Confidence level of the Mann-Whitney interval; NetflixACAJudge uses 0.98.",
    )
    tolerance: float = Field(
        default=0.25, ge=0, le=100,
        description="High/Low need the interval beyond tolerance x |Hodges-Lehmann shift| (Kayenta: 0.25).",
    )
    pass_score: float = Field(default=95, ge=0, le=100, description="Score needed to pass.")
    marginal_score: float = Field(default=75, ge=0, le=100, description="Score below which it fails.")
    group_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Percent per metric group; groups without a weight share what is left of 100.",
    )
    effect_size: EffectSize = EffectSize()
    nan_strategy: NanStrategy = NanStrategy.remove
    outliers: Outliers = Outliers()
    must_have_data: bool = False

    @model_validator(mode="after")
    def _scores(self) -> Fixed:
        if self.marginal_score > self.pass_score:
            raise ValueError("marginalScore must not be above passScore")
        for name, w in self.group_weights.items():
            if not 0 <= w <= 100:
                raise ValueError(f"groupWeights.{name} must be between 0 and 100 (percent), not {w:g}")
        if sum(self.group_weights.values()) > 100:
            raise ValueError(f"groupWeights add up to {sum(self.group_weights.values()):g}; at most 100 (percent)")
        return self


_MOVED = {"passScore": "passScore", "pass_score": "passScore", "marginalScore": "marginalScore",
          "marginal_score": "marginalScore"}


class Analysis(_Model):
    """How primary and candidate are compared, at every interval."""

    interval: Duration = timedelta(seconds=30)
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="Family-wise probability of a false fail.")
    beta: float = Field(default=0.05, gt=0, lt=0.5, description="Probability of a false pass at the margin.")
    method: Method = Method.sequential
    prometheus: PrometheusSource | None = None
    variants: Variants = Variants()
    gpu_price_per_hour: float | None = Field(default=None, gt=0, description="For the GPU cost presets.")
    metrics: list[Metric] = Field(default_factory=list)
    outputs: Outputs | None = None
    fixed: Fixed = Field(default_factory=Fixed, description="Method fixed: Kayenta's options.")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, new in _MOVED.items():
                if key in data:
                    raise ValueError(f"'{key}' moved to spec.analysis.fixed.{new}; write it there")
        return data

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: timedelta) -> timedelta:
        if v.total_seconds() < 1:
            raise ValueError("interval must be at least 1s")
        return v

    @field_validator("metrics")
    @classmethod
    def _unique(cls, v: list[Metric]) -> list[Metric]:
        seen: set[str] = set()
        for m in v:
            if m.name in seen:
                raise ValueError(f"metric name {m.name!r} is used twice; names must be unique")
            seen.add(m.name)
        return v

    @model_validator(mode="after")
    def _something(self) -> Analysis:
        if not self.metrics and self.outputs is None:
            raise ValueError("give at least one metric or an outputs comparison; nothing would be judged")
        if self.method is not Method.fixed:
            if "fixed" in self.model_fields_set:
                raise ValueError("'fixed' sets the options of method fixed; set method: fixed, or remove it")
            named = [m.name for m in self.metrics if m.fixed is not None]
            if named:
                raise ValueError(f"metric {named[0]!r} has a 'fixed' block, which only method fixed uses")
        paired = [m.name for m in self.metrics if m.kind is MetricKind.paired_latency]
        if paired and self.outputs is None:
            raise ValueError(f"metric {paired[0]!r} (kind paired-latency) pairs the primary's and the candidate's "
                             "answers to the same request: set spec.analysis.outputs (the taps' MQTT output events)")
        if paired and self.method is Method.fixed:
            raise ValueError(f"metric {paired[0]!r} (kind paired-latency) is judged by method sequential only")
        used = {g for m in self.metrics for g in m.score_groups}
        unknown = sorted(set(self.fixed.group_weights) - used)
        if unknown:
            raise ValueError(f"fixed.groupWeights names group(s) no metric is in: {', '.join(unknown)} "
                             f"(groups: {', '.join(sorted(used)) or 'none'})")
        return self


# --------------------------------------------------------------------------- rest of spec


class Trigger(str, enum.Enum):
    manual = "manual"
    auto = "auto"


class Promotion(str, enum.Enum):
    auto = "auto"
    manual = "manual"


class OnInconclusive(str, enum.Enum):
    rollback = "rollback"
    hold = "hold"


class OnDrift(str, enum.Enum):
    """What to do when someone else changes the routes shadowctl manages mid-rollout."""

    reassert = "reassert"
    pause = "pause"


class WebhookType(str, enum.Enum):
    confirm_promotion = "confirm-promotion"
    event = "event"


METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.azure.internal",
                            "instance-data", "instance-data.ec2.internal"})
"""Names of cloud instance-metadata services (which hold the node's credentials): never a webhook."""
_METADATA_ADDRESSES = frozenset({ipaddress.ip_address("fd00:ec2::254")})  # AWS IMDS over IPv6 (not link-local)


def forbidden_address(address: str) -> str | None:
    """Why the controller must not send to this IP address (link-local, metadata, unspecified), or None.

    Link-local holds 169.254.169.254, the instance-metadata address of AWS, GCP and Azure, and the
    node-local addresses no webhook lives on. Private and loopback addresses are allowed: webhooks
    usually are Services in the cluster. Also applied by the adapter to every address a name resolves to.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in _METADATA_ADDRESSES:
        return "an instance-metadata address"
    if ip.is_link_local:
        return "a link-local address (169.254.0.0/16, fe80::/10: instance metadata lives there)"
    if ip.is_unspecified or ip.is_multicast:
        return "not a unicast address"
    return None


def outbound_url_problem(url: str, *, credentials: str, no_query: str | None = None) -> str | None:
    """What is wrong with a URL the controller or a tap will call, or None: http(s) only, a host, a real
    port, no credentials (``credentials`` says why), no instance-metadata or link-local address, and no
    query or fragment where ``no_query`` says why not."""
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return "it contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"it is not a URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return "only http:// and https:// URLs are allowed"
    if "@" in parts.netloc:
        return f"credentials in the URL are not allowed: {credentials}"
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        return "the host is missing"
    if port == 0:
        return "port 0 is not a port"
    if no_query is not None and (parts.query or parts.fragment or url.endswith(("?", "#"))):
        return f"a query or fragment is not allowed ({no_query})"
    if host in METADATA_HOSTS:
        return f"{host!r} is an instance-metadata service"
    why = forbidden_address(host)
    return f"{host} is {why}" if why else None


def webhook_url_problem(url: str) -> str | None:
    """What is wrong with a webhook URL, or None: :func:`outbound_url_problem`'s rules (docs/controller.md,
    "Webhooks")."""
    return outbound_url_problem(
        url, credentials="they would be logged and stored in the policy; the controller signs each request "
                         "instead (signingSecret)")


class Webhook(_Model):
    """A webhook the controller POSTs to: event notifications, or a confirm-promotion gate."""

    name: str
    url: str
    type: WebhookType = WebhookType.event
    timeout: Duration = timedelta(seconds=10)
    retries: int = Field(default=2, ge=0, le=10)
    signing_secret: str | None = Field(
        default=None,
        description="Secret name/key (key 'key' if omitted) whose value signs every request: header "
                    "X-Shadowctl-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of '<t>.<body>'>.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        problem = webhook_url_problem(v)
        if problem is not None:
            raise ValueError(f"{v!r} is not an allowed webhook URL: {problem}")
        return v

    @field_validator("signing_secret")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        if v is not None:
            name, _, key = v.partition("/")
            _dns_name(name, "Secret name")
            if "/" in key:
                raise ValueError(f"{v!r}: write NAME or NAME/KEY")
        return v


class MqttNotifications(_Model):
    broker: str | None = Field(default=None, description="Default: the outputs broker.")
    topic: str = "shadowctl/events/{namespace}/{name}"


class Notifications(_Model):
    mqtt: MqttNotifications | None = None
    webhooks: list[Webhook] = Field(default_factory=list)


class RollbackOptions(_Model):
    keep_candidate_tag: bool = Field(
        default=False, description="Knative: keep the candidate's tag (at 0%) after rollback, for debugging."
    )


KSERVE_SHADOW_MESSAGE = ("a KServe target cannot mirror (KServe has no mirroring, kserve#2978): its shadow phase "
                         "goes through the tap: set shadow.mode: tap (and no shadow.virtualService)")
TAP_TARGET_SHADOW_MESSAGE = ("a tap target mirrors through the taps: set shadow.mode: tap (and no "
                             "shadow.virtualService)")
TAP_TARGET_CHANNEL_MESSAGE = ("a tap target needs spec.analysis.outputs.mqtt: the controller sends the taps their "
                              "route setting over that MQTT broker, and reads their reports there")
TAP_ONLY_MESSAGE = ("shadow.budget needs the taps to route (shadow.mode: tap): the route setting tells them what the "
                    "mirror may cost")
RESEND_PERCENT_MESSAGE = ("analysis.outputs.baseline.percent travels to the taps in the route setting (shadow.mode: "
                          "tap); taps that a VirtualService or an HTTPRoute mirrors for resend the percent of their "
                          "--baseline-resend: leave percent out")
NO_COMPARATOR_MESSAGE = "analysis.outputs.comparators: give at least one; the shadow phase compares the answers"
CANARY_ONLY_OUTPUTS_MESSAGE = ("analysis.outputs compares mirrored answers and needs a shadow phase (a tap target "
                               "without one uses only outputs.mqtt, the taps' route channel: leave out "
                               "baseline.mode resend)")
TAP_CHANNEL_MESSAGE = ("shadow.mode: tap needs spec.analysis.outputs.mqtt: the controller sends the taps their route "
                       "setting (what to mirror, where) over that MQTT broker, and reads their reports there")


class Spec(_Model):
    # What _cross checks across fields, said again in CEL so that the API server refuses it too.
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {
            "rule": "!has(self.target.knative) || !has(self.shadow) || has(self.shadow.virtualService)"
                    " || (has(self.shadow.mode) && self.shadow.mode == 'tap')",
            "message": "a Knative target cannot mirror by itself: set shadow.virtualService (an Istio "
                       "VirtualService in front of the service) or shadow.mode: tap",
            "fieldPath": ".shadow",
        },
        {
            "rule": "!has(self.target.istio) || !has(self.shadow) || !has(self.shadow.virtualService)",
            "message": "shadow.virtualService is only for Knative targets; the Istio target mirrors itself",
            "fieldPath": ".shadow.virtualService",
        },
        {
            "rule": "!has(self.target.kserve) || !has(self.shadow) || (has(self.shadow.mode) && self.shadow.mode == 'tap'"
                    " && !has(self.shadow.virtualService))",
            "message": KSERVE_SHADOW_MESSAGE,
            "fieldPath": ".shadow",
        },
        {
            "rule": "!has(self.shadow) || !has(self.shadow.mode) || self.shadow.mode != 'tap'"
                    " || (has(self.analysis.outputs) && has(self.analysis.outputs.mqtt))",
            "message": TAP_CHANNEL_MESSAGE,
            "fieldPath": ".analysis.outputs",
        },
        {
            "rule": "!has(self.target.tap) || !has(self.shadow) || (has(self.shadow.mode) && self.shadow.mode == 'tap'"
                    " && !has(self.shadow.virtualService))",
            "message": TAP_TARGET_SHADOW_MESSAGE,
            "fieldPath": ".shadow",
        },
        {
            "rule": "!has(self.target.tap) || (has(self.analysis.outputs) && has(self.analysis.outputs.mqtt))",
            "message": TAP_TARGET_CHANNEL_MESSAGE,
            "fieldPath": ".analysis.outputs",
        },
        {
            "rule": "!has(self.shadow) || !has(self.shadow.budget) || (has(self.shadow.mode) && self.shadow.mode == 'tap')",
            "message": TAP_ONLY_MESSAGE,
            "fieldPath": ".shadow",
        },
        {
            "rule": "!has(self.analysis.outputs) || !has(self.analysis.outputs.baseline)"
                    " || !has(self.analysis.outputs.baseline.percent)"
                    " || (has(self.shadow) && has(self.shadow.mode) && self.shadow.mode == 'tap')",
            "message": RESEND_PERCENT_MESSAGE,
            "fieldPath": ".analysis.outputs.baseline.percent",
        },
        {
            "rule": "!has(self.shadow) || !has(self.analysis.outputs)"
                    " || (has(self.analysis.outputs.comparators) && size(self.analysis.outputs.comparators) > 0)",
            "message": NO_COMPARATOR_MESSAGE,
            "fieldPath": ".analysis.outputs.comparators",
        },
        {
            "rule": "has(self.shadow) || !has(self.analysis.outputs) || (has(self.target.tap)"
                    " && (!has(self.analysis.outputs.baseline) || !has(self.analysis.outputs.baseline.mode)"
                    " || self.analysis.outputs.baseline.mode != 'resend'))",
            "message": CANARY_ONLY_OUTPUTS_MESSAGE,
            "fieldPath": ".analysis.outputs",
        },
        {
            "rule": "!has(self.target.gatewayAPI) || !has(self.shadow) || !has(self.shadow.virtualService)",
            "message": "shadow.virtualService is only for Knative targets; the HTTPRoute mirrors itself "
                       "(a RequestMirror filter)",
            "fieldPath": ".shadow.virtualService",
        },
    ]})

    target: Target
    trigger: Trigger = Trigger.manual
    shadow: Shadow | None = None
    canary: Canary | None = None
    analysis: Analysis
    on_inconclusive: OnInconclusive = OnInconclusive.rollback
    on_drift: OnDrift = OnDrift.reassert
    progress_deadline: Duration = timedelta(hours=2)
    promotion: Promotion = Promotion.auto
    rollback: RollbackOptions = RollbackOptions()
    notifications: Notifications = Notifications()

    @model_validator(mode="after")
    def _cross(self) -> Spec:
        if self.shadow is None and self.canary is None:
            raise ValueError("give a 'shadow' phase, a 'canary' phase, or both; there is nothing to roll out")
        if (
            self.shadow is not None
            and self.target.knative is not None
            and self.shadow.mode is ShadowMode.istio
            and self.shadow.virtual_service is None
        ):
            raise ValueError(
                "a Knative target cannot mirror by itself: set shadow.virtualService (an Istio "
                "VirtualService in front of the service) or shadow.mode: tap"
            )
        if self.shadow is not None and self.target.istio is not None and self.shadow.virtual_service is not None:
            raise ValueError("shadow.virtualService is only for Knative targets; the Istio target mirrors itself")
        if self.shadow is not None and self.target.gateway_api is not None and self.shadow.virtual_service is not None:
            raise ValueError("shadow.virtualService is only for Knative targets; the HTTPRoute mirrors itself "
                             "(a RequestMirror filter)")
        if self.shadow is not None and self.target.kserve is not None and (
            self.shadow.mode is not ShadowMode.tap or self.shadow.virtual_service is not None
        ):
            raise ValueError(KSERVE_SHADOW_MESSAGE)
        if self.shadow is not None and self.shadow.mode is ShadowMode.tap and self.analysis.outputs is None:
            raise ValueError(TAP_CHANNEL_MESSAGE)
        outputs = self.analysis.outputs
        tap_routes = self.shadow is not None and self.shadow.mode is ShadowMode.tap
        if self.shadow is not None and self.shadow.budget is not None and not tap_routes:
            raise ValueError(TAP_ONLY_MESSAGE)
        if outputs is not None and outputs.baseline.percent is not None and not tap_routes:
            raise ValueError(RESEND_PERCENT_MESSAGE)
        if outputs is not None and outputs.sampling.target_pairs_per_second is not None \
                and (self.shadow is None or self.shadow.mode is not ShadowMode.tap):
            raise ValueError("analysis.outputs.sampling.targetPairsPerSecond needs shadow.mode: tap: the controller "
                             "changes the fraction through the taps' route setting, which only taps that route "
                             "follow (other taps publish at their own --sample)")
        if self.target.tap is not None:
            if self.shadow is not None and (self.shadow.mode is not ShadowMode.tap
                                            or self.shadow.virtual_service is not None):
                raise ValueError(TAP_TARGET_SHADOW_MESSAGE)
            if self.analysis.outputs is None:
                raise ValueError(TAP_TARGET_CHANNEL_MESSAGE)
        phases = (self.shadow.min_duration if self.shadow else timedelta(0)) + (
            self.canary.step_duration * len(self.canary.steps) if self.canary else timedelta(0)
        )
        if self.progress_deadline < phases:
            raise ValueError(
                f"progressDeadline ({self.progress_deadline}) is shorter than the phases need at least ({phases})"
            )
        # A canary judged on metrics alone is legitimate (5% -> 50% of users to a new adapter, on errors and
        # latency). A tap target needs outputs.mqtt even then: it is the taps' route channel.
        if outputs is not None and self.shadow is not None and not outputs.comparators:
            raise ValueError(NO_COMPARATOR_MESSAGE)
        if outputs is not None and self.shadow is None and (
                self.target.tap is None or outputs.baseline.mode is BaselineMode.resend):
            raise ValueError(CANARY_ONLY_OUTPUTS_MESSAGE)
        if self.shadow is None:
            paired = [m.name for m in self.analysis.metrics if m.kind is MetricKind.paired_latency]
            if paired:
                raise ValueError(f"metric {paired[0]!r} (kind paired-latency) pairs mirrored answers, which only a "
                                 "shadow phase has")
            if not self.analysis.metrics:
                raise ValueError("a policy without a shadow phase is judged on metrics alone: give at least one "
                                 "metric")
        return self


class ShadowPolicy(_Model):
    """A ShadowPolicy object as committed to git."""

    api_version: Literal["shadowctl.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["ShadowPolicy"]
    metadata: Metadata
    spec: Spec

    @property
    def key(self) -> str:
        """`namespace/name`."""
        return f"{self.metadata.namespace}/{self.metadata.name}"
