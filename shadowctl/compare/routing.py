"""The tap-router channel's wire format and its pure rules (route settings v1, v2 and v3, reports v1).

The controller tells the taps in front of a primary how to route through one retained MQTT message
per policy (a :class:`RouteSetting` on :func:`route_topic`); each tap (each worker process of it)
answers with a retained :class:`AppliedReport` on :func:`applied_topic`. Both ends import this
module, so the topics, the payloads, which requests fall in a share (:func:`bucket`), when a tap
falls back to primary-only (:func:`effective`) and when the controller counts a setting as applied
by the taps (:func:`verify`) are stated once. Everything here is pure: time comes in as an argument
(Unix seconds, wall clock, since both ends compare against ``issuedAt`` / ``reportedAt``).

Parsed strictly, like the output events (:mod:`shadowctl.compare.events`): the channel crosses a
broker that anyone with credentials can write to, and a setting a tap does not fully understand
(a newer schema, a field it does not know) must make it fall back to primary-only, never be
half-applied.

Two versions of the setting: v1 (shares and the candidate's URL) and v2, which adds what a tap must
understand to route at all: a request rewrite (``rewrite.model``: the candidate is another served
model name, e.g. a LoRA adapter), a canary share chosen per user (``sticky``, ``userHeader``) and
``final`` (a promotion's end state, applied without expiry). The controller publishes v1 whenever a
setting needs none of these, so taps that know only v1 keep working for plain mirrors; a tap that
knows only v1 refuses a v2 setting (its schema is a literal) and falls back to primary-only, which
the controller sees in its report (``invalid``) and holds: never a rewrite half-applied as a plain
route.

v3 adds ``sampleFraction``: the share of requests whose output events the taps publish
(:mod:`shadowctl.tap.sampling`), so the controller can set and change it (the adaptive target of
``spec.analysis.outputs.sampling``) without restarting taps. It is a field a tap must understand: a tap
that ignored it would publish events at its own ``--sample`` while the others follow the setting, and
the controller would count the pairs against the wrong fraction. So the controller publishes v3 only
while a policy's sampling is not the default (every request), v1 or v2 otherwise; a v1 or v2 tap refuses
a v3 setting (its schema is a literal) and falls back to primary-only, which the controller sees
(``invalid``) and holds. A fraction is bound to its generation like the shares: a tap that reports the
generation applies its fraction, so verification needs no new field in the report.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shadowctl.compare.prompts import prompt_digest, prompt_problem
from shadowctl.errors import ShadowctlError
from shadowctl.policy.prompts import PromptApply

ROUTE_SCHEMA: Final = "shadowctl.dev/route/v1"
ROUTE_SCHEMA_V2: Final = "shadowctl.dev/route/v2"
ROUTE_SCHEMA_V3: Final = "shadowctl.dev/route/v3"
APPLIED_SCHEMA: Final = "shadowctl.dev/route-applied/v1"
STALE_INTERVALS: Final = 3
"""A setting older than this many of its ``intervalSeconds`` is stale (the tap falls back); a tap not
heard from for as long no longer counts for verification."""
BUCKETS: Final = 1_000_000
"""Request ids hash into this many buckets: shares have a resolution of 0.0001%."""


def route_topic(namespace: str, policy: str) -> str:
    """``shadowctl/route/<namespace>/<policy>``: the retained setting of one policy."""
    return f"shadowctl/route/{namespace}/{policy}"


def applied_topic(namespace: str, policy: str, tap: str) -> str:
    """``shadowctl/route-applied/<namespace>/<policy>/<tap>``: one tap's retained report."""
    return f"shadowctl/route-applied/{namespace}/{policy}/{tap}"


def applied_filter(namespace: str, policy: str) -> str:
    """The subscription that receives every tap's report for a policy."""
    return applied_topic(namespace, policy, "+")


def valid_topic_level(value: str) -> bool:
    """Whether `value` can be one MQTT topic level (no separators, wildcards or NUL; not empty)."""
    return bool(value) and not any(c in value for c in "/+#\x00") and len(value.encode()) <= 200


# --------------------------------------------------------------------------- which requests


def bucket(request_id: str) -> int:
    """The request id's bucket in ``[0, BUCKETS)``: the same on every tap replica and worker, and for
    a retried request (same ``x-request-id``). Mirroring, the candidate's share and sampling all
    choose requests by this one hash."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big") % BUCKETS


def user_bucket_key(policy: str, user: str) -> str:
    """What a sticky share hashes for a user: the policy and the user, so that every tap replica puts a user
    on the same side, and two policies do not always pick the same users for their canaries."""
    return f"{policy}\n{user}"


def in_share(request_id: str, percent: float | None) -> bool:
    """Whether a request (or any key: a sticky share passes :func:`user_bucket_key`) falls in the first
    `percent` % of buckets (None or 0: none; 100: all)."""
    if percent is None or percent <= 0:
        return False
    if percent >= 100:
        return True
    return bucket(request_id) < percent * (BUCKETS // 100)


# --------------------------------------------------------------------------- payloads


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)


def _rfc3339(value: str, field: str) -> float:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{field} {value!r} is not an RFC 3339 time") from exc
    if parsed.tzinfo is None:
        raise ValueError(f"{field} {value!r} has no time zone")
    return parsed.timestamp()


def rfc3339(unix: float) -> str:
    """Unix seconds as RFC 3339 in UTC with milliseconds (``2025-01-02T03:04:05.678Z``)."""
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PromptRewrite(_Strict):
    """A prompt version as the candidate (route setting v2, ``rewrite.prompt``): both texts, read by the controller
    from the policy's ConfigMaps, and how to apply them (:mod:`shadowctl.compare.prompts`). Each text is at most
    :data:`~shadowctl.compare.prompts.MAX_PROMPT_BYTES` bytes of UTF-8; ``digest`` is
    :func:`~shadowctl.compare.prompts.prompt_digest` of the three, checked on arrival, so a tap never routes by
    texts that are not the ones the controller named (and the controller's candidate identity is that digest)."""

    apply: PromptApply
    primary: str = Field(description="The primary's system prompt or template (the guard: requests must carry it).")
    candidate: str = Field(description="The candidate's system prompt or template.")
    digest: str = Field(pattern=r"^[0-9a-f]{16}$", description="prompt_digest(apply, primary, candidate).")

    @model_validator(mode="after")
    def _texts(self) -> PromptRewrite:
        for which, text in (("primary", self.primary), ("candidate", self.candidate)):
            problem = prompt_problem(text, self.apply, primary=which == "primary")
            if problem:
                raise ValueError(f"prompt.{which}: {problem}")
        if prompt_digest(self.apply, self.primary, self.candidate) != self.digest:
            raise ValueError("prompt.digest does not match the texts")
        return self


class Parameters(_Strict):
    """Sampling parameters set on the candidate's requests (route setting v2, ``rewrite.parameters``)."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1, alias="topP")
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000, alias="maxTokens")

    @model_validator(mode="after")
    def _some(self) -> Parameters:
        if self.temperature is None and self.top_p is None and self.max_tokens is None:
            raise ValueError("parameters sets none of temperature, topP, maxTokens")
        return self


class Rewrite(_Strict):
    """How the candidate differs from the primary when it is a rewrite of the request (route setting v2).

    ``model``: the JSON body's ``model`` is replaced (the candidate is another served model name on the
    same server or a named backend: a LoRA adapter, a quantised variant). ``prompt``: the system prompt or a
    template around the user's input is replaced by another version. ``parameters``: temperature, top_p and
    max_tokens are set. Any combination, at least one; each a field an older v2 tap refuses (``extra: forbid``),
    so a rewrite is never half-applied."""

    model: str | None = Field(default=None, min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$",
                              description="The served model name the candidate's requests ask for.")
    prompt: PromptRewrite | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _some(self) -> Rewrite:
        if self.model is None and self.prompt is None and self.parameters is None:
            raise ValueError("rewrite sets none of model, prompt, parameters")
        return self


class Budget(_Strict):
    """The shadow GPU budget of one tap process (route setting v2): what its mirror may send the candidate."""

    requests_per_second: float | None = Field(default=None, gt=0, alias="requestsPerSecond")
    tokens_per_second: float | None = Field(default=None, gt=0, alias="tokensPerSecond")
    max_tokens: int | None = Field(default=None, ge=1, alias="maxTokens",
                                   description="Cap on each copy's max_tokens (set where the request has none).")
    max_queue: int | None = Field(default=None, ge=0, alias="maxQueue",
                                  description="Back off while the candidate's vllm:num_requests_waiting is above.")


V2_FIELDS: Final = ("rewrite", "sticky", "user_header", "final", "baseline_percent", "budget")
"""The setting's fields only v2 (and v3) carry."""
V3_FIELDS: Final = ("sample_fraction",)
"""The setting's fields only v3 carries."""


class RouteSetting(_Strict):
    """What the controller wants the taps in front of the primary to do, for one policy."""

    schema_: Literal["shadowctl.dev/route/v1", "shadowctl.dev/route/v2", "shadowctl.dev/route/v3"] = Field(
        default=ROUTE_SCHEMA, alias="schema")
    policy: str = Field(description="namespace/name of the ShadowPolicy.")
    generation: int = Field(ge=1, description="Grows with every change of the setting; same on a heartbeat.")
    mirror_percent: float | None = Field(
        default=None, gt=0, le=100, alias="mirrorPercent",
        description="Share of requests copied to the candidate (answers discarded); null: no mirror.")
    candidate_percent: int = Field(
        default=0, ge=0, le=100, alias="candidatePercent",
        description="Share of live requests answered by the candidate.")
    candidate_url: str | None = Field(
        default=None, alias="candidateURL", pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="Where the candidate's requests go (a tap's --mirror-to, when given, overrides it); a tap "
                    "with neither cannot apply a setting that routes to the candidate and falls back (invalid). "
                    "With a rewrite, none means the tap's own upstream (the same server).")
    issued_at: str = Field(alias="issuedAt", description="RFC 3339: when the controller last (re)published it.")
    interval_seconds: float = Field(gt=0, alias="intervalSeconds", description="The policy's analysis interval.")
    rewrite: Rewrite | None = Field(default=None, description="v2: the candidate is this rewrite of the request.")
    sticky: bool = Field(default=False, description="v2: the live share is chosen per user, not per request.")
    user_header: str | None = Field(
        default=None, alias="userHeader", pattern=r"^[!#$%&'*+.^_`|~0-9a-z-]{1,128}$",
        description="v2, sticky: the header naming the user (lower case); else the body's OpenAI `user` field; "
                    "a request with neither is chosen by its request id.")
    final: bool = Field(default=False, description="v2: a promotion's end state: applied without expiry (no "
                                                   "staleness fallback) until replaced or cleared.")
    baseline_percent: float | None = Field(
        default=None, gt=0, le=100, alias="baselinePercent",
        description="v2: share of requests the tap sends once more, unchanged, to its own upstream, recorded as "
                    "variant baseline (the noise floor, baseline.mode resend).")
    budget: Budget | None = Field(default=None, description="v2: the shadow GPU budget of each tap process.")
    sample_fraction: float | None = Field(
        default=None, gt=0, le=1, alias="sampleFraction",
        description="v3: the share of requests whose output events the taps publish (chosen by the request id's "
                    "hash, as the shares are); overrides a tap's --sample. Null: the tap's own --sample.")

    @model_validator(mode="after")
    def _check(self) -> RouteSetting:
        _rfc3339(self.issued_at, "issuedAt")
        if self.mirror_percent is not None and math.isnan(self.mirror_percent):
            raise ValueError("mirrorPercent is NaN")
        if self.schema_ == ROUTE_SCHEMA and self.needs_v2:
            raise ValueError("rewrite, sticky, userHeader, final, baselinePercent and budget need schema "
                             "shadowctl.dev/route/v2")
        if self.schema_ != ROUTE_SCHEMA_V3 and self.needs_v3:
            raise ValueError("sampleFraction needs schema shadowctl.dev/route/v3")
        return self

    @property
    def needs_v3(self) -> bool:
        """Whether it uses what only a v3 tap understands (a sampling fraction)."""
        return self.sample_fraction is not None

    @property
    def needs_v2(self) -> bool:
        """Whether it uses what only a v2 tap understands."""
        return self.rewrite is not None or self.sticky or self.user_header is not None or self.final \
            or self.baseline_percent is not None or self.budget is not None

    @property
    def routes_to_candidate(self) -> bool:
        """Whether it mirrors or sends live requests to the candidate (then a tap needs the candidate's URL)."""
        return self.mirror_percent is not None or self.candidate_percent > 0

    @property
    def issued(self) -> float:
        """``issuedAt`` as Unix seconds."""
        return _rfc3339(self.issued_at, "issuedAt")

    def same_routes(self, other: RouteSetting | None) -> bool:
        """Whether `other` routes the same way (generation and issue time aside)."""
        def key(s: RouteSetting) -> tuple[object, ...]:
            return (s.mirror_percent, s.candidate_percent, s.candidate_url, s.rewrite, s.sticky, s.user_header,
                    s.final, s.baseline_percent, s.budget, s.sample_fraction)
        return other is not None and key(self) == key(other)

    def to_json(self) -> bytes:
        """v1 without the v2 keys (a v1 tap forbids unknown ones), v2 with them; the fields added to v2 after its
        first release (baselinePercent, budget, rewrite.prompt, rewrite.parameters) only where set, so a tap of
        that release still reads a setting that does not use them; v3 keys only in v3."""
        if self.schema_ == ROUTE_SCHEMA:
            return self.model_dump_json(by_alias=True, exclude={*V2_FIELDS, *V3_FIELDS}).encode()
        exclude: dict[str, Any] = {k: True for k in ("baseline_percent", "budget") if getattr(self, k) is None}
        if self.schema_ == ROUTE_SCHEMA_V2:
            exclude.update(dict.fromkeys(V3_FIELDS, True))
        if self.rewrite is not None:
            exclude["rewrite"] = {k for k in ("model", "prompt", "parameters") if getattr(self.rewrite, k) is None}
        data = self.model_dump(mode="json", by_alias=True, exclude=exclude)
        if self.budget is not None:
            data["budget"] = self.budget.model_dump(mode="json", by_alias=True, exclude_none=True)
        if self.rewrite is not None and self.rewrite.parameters is not None:
            data["rewrite"]["parameters"] = self.rewrite.parameters.model_dump(mode="json", by_alias=True,
                                                                              exclude_none=True)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def make_setting(**fields: object) -> RouteSetting:
    """A :class:`RouteSetting` of the lowest schema that carries `fields` (v1 unless a v2 field is set, v3 where a
    v3 field is)."""
    v2 = any(fields.get(k) not in (None, False) for k in V2_FIELDS)
    v3 = any(fields.get(k) is not None for k in V3_FIELDS)
    schema = ROUTE_SCHEMA_V3 if v3 else ROUTE_SCHEMA_V2 if v2 else ROUTE_SCHEMA
    return RouteSetting.model_validate({**fields, "schema_": schema}, strict=False)


class AppliedState(str, enum.Enum):
    """What a tap does now."""

    applied = "applied"  # it routes by the setting of `generation`
    fallback = "fallback"  # primary-only: no setting, a stale one, or one it could not read (`reason`)
    gone = "gone"  # it stopped (its last words, or the broker's will message for it)


class FallbackReason(str, enum.Enum):
    """Why a tap routes primary-only (the ``reason`` label of ``shadowctl_tap_route_fallback``)."""

    none = "none"  # no setting received (yet)
    stale = "stale"  # issuedAt older than 3 x intervalSeconds: the controller stopped renewing it
    invalid = "invalid"  # the payload is not a setting this tap understands, or it has no candidate URL to use


class CopyOutcomes(_Strict):
    """Copies of one kind (mirrored to the candidate, or resent as the baseline) that one tap process made, by
    outcome (the ``outcome`` label of ``shadowctl_tap_mirror_requests_total`` / ``..._baseline_requests_total``)."""

    sent: int = Field(default=0, ge=0, description="Sent and answered.")
    failed: int = Field(default=0, ge=0, description="Sent, but the target did not answer.")
    skipped_budget: int = Field(default=0, ge=0, alias="skippedBudget",
                                description="Not sent: over the shadow budget's rate or tokens.")
    skipped_queue: int = Field(default=0, ge=0, alias="skippedQueue",
                               description="Not sent: cut by the back-off on the candidate's queue.")
    dropped_in_flight_cap: int = Field(default=0, ge=0, alias="droppedInFlightCap",
                                       description="Not sent: too many copies in flight.")
    not_rewritable: int = Field(default=0, ge=0, alias="notRewritable",
                                description="Not sent: the body could not be rewritten.")

    def __add__(self, other: CopyOutcomes) -> CopyOutcomes:
        return CopyOutcomes.model_validate({k: getattr(self, k) + getattr(other, k) for k in type(self).model_fields})

    @property
    def skipped(self) -> int:
        """Not sent because of the shadow budget (its rate, tokens or queue back-off)."""
        return self.skipped_budget + self.skipped_queue


class CopyCounts(_Strict):
    """What a tap's mirror and resent baseline did since it applied the setting's generation (one process)."""

    mirror: CopyOutcomes = Field(default_factory=CopyOutcomes)
    baseline: CopyOutcomes = Field(default_factory=CopyOutcomes)

    def __add__(self, other: CopyCounts) -> CopyCounts:
        return CopyCounts(mirror=self.mirror + other.mirror, baseline=self.baseline + other.baseline)


def reports_copies(setting: Effective) -> bool:
    """Whether a tap's report carries its :class:`CopyCounts`: while it applies a setting with a shadow budget or
    a resent baseline. Only a controller that sends those reads the field, so a report to an older controller
    (which refuses a key it does not know) stays as it was."""
    return setting.state is AppliedState.applied and (setting.budget is not None or setting.baseline_percent is not None)


class AppliedReport(_Strict):
    """What one tap (one worker process) applies for one policy."""

    schema_: Literal["shadowctl.dev/route-applied/v1"] = Field(default=APPLIED_SCHEMA, alias="schema")
    tap: str = Field(description="The tap's id (--tap-id; one per worker process).")
    state: AppliedState
    generation: int | None = Field(default=None, ge=1, description="The setting applied; null in fallback.")
    mirror_percent: float | None = Field(default=None, alias="mirrorPercent")
    candidate_percent: int = Field(default=0, ge=0, le=100, alias="candidatePercent")
    reason: FallbackReason | None = Field(default=None, description="Why it falls back (state fallback).")
    applied_at: str | None = Field(default=None, alias="appliedAt", description="RFC 3339: when it took effect.")
    reported_at: str = Field(alias="reportedAt", description="RFC 3339: when this report was sent.")
    copies: CopyCounts | None = Field(
        default=None, description="The copies this process made since it applied `generation` (only while the "
                                  "setting has a budget or a resent baseline: :func:`reports_copies`).")

    @property
    def reported(self) -> float:
        return _rfc3339(self.reported_at, "reportedAt")

    def to_json(self) -> bytes:
        """Without ``copies`` where there are none (a controller that predates it refuses the key)."""
        return self.model_dump_json(by_alias=True, exclude={"copies"} if self.copies is None else None).encode()


class MalformedRouteMessage(ShadowctlError, ValueError):
    """An MQTT payload on the tap-router channel that is not a valid setting (v1, v2) or report (v1)."""


_M = TypeVar("_M", bound=BaseModel)


def _parse(model: type[_M], payload: bytes | str) -> _M:
    try:
        return model.model_validate_json(payload, strict=True, by_alias=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<message>"
        raise MalformedRouteMessage(f"{where}: {first['msg']}") from exc


def parse_setting(payload: bytes | str) -> RouteSetting:
    """Parse a route setting strictly; :class:`MalformedRouteMessage` saying what is wrong."""
    return _parse(RouteSetting, payload)


def parse_report(payload: bytes | str) -> AppliedReport:
    """Parse an applied report strictly; :class:`MalformedRouteMessage` saying what is wrong."""
    return _parse(AppliedReport, payload)


# --------------------------------------------------------------------------- the tap's rule


class Effective(BaseModel):
    """What a tap routes by right now: the setting, or primary-only and why."""

    model_config = ConfigDict(frozen=True)

    state: AppliedState
    generation: int | None = None
    mirror_percent: float | None = None
    candidate_percent: int = 0
    candidate_url: str | None = None
    reason: FallbackReason | None = None
    policy: str = ""
    rewrite: Rewrite | None = None
    sticky: bool = False
    user_header: str | None = None
    final: bool = False
    baseline_percent: float | None = None
    budget: Budget | None = None
    sample_fraction: float | None = None
    """The setting's sampling fraction (v3); None: the tap's own --sample."""

    @property
    def routes_to_candidate(self) -> bool:
        return self.mirror_percent is not None or self.candidate_percent > 0


PRIMARY_ONLY_NONE = Effective(state=AppliedState.fallback, reason=FallbackReason.none)


def effective(setting: RouteSetting | None, now: float, *, invalid: bool = False) -> Effective:
    """Apply the setting, unless there is none, it is stale (a ``final`` one never is), or the last payload
    was not understood (`invalid`): then primary-only, no mirror, with the reason."""
    if invalid:
        return Effective(state=AppliedState.fallback, reason=FallbackReason.invalid)
    if setting is None:
        return PRIMARY_ONLY_NONE
    if not setting.final and now - setting.issued > STALE_INTERVALS * setting.interval_seconds:
        return Effective(state=AppliedState.fallback, reason=FallbackReason.stale)
    return Effective(state=AppliedState.applied, generation=setting.generation, mirror_percent=setting.mirror_percent,
                     candidate_percent=setting.candidate_percent, candidate_url=setting.candidate_url,
                     policy=setting.policy, rewrite=setting.rewrite, sticky=setting.sticky,
                     user_header=setting.user_header, final=setting.final,
                     baseline_percent=setting.baseline_percent, budget=setting.budget,
                     sample_fraction=setting.sample_fraction)


# --------------------------------------------------------------------------- the controller's rule


class Verification(BaseModel):
    """Whether the taps apply a setting: ``ok``, or ``problem`` saying which tap does what."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    problem: str | None = None
    counted: tuple[str, ...] = ()
    """The taps whose reports counted (alive within 3 intervals, not gone)."""


@dataclass(frozen=True)
class TapCopies:
    """The copies the counted taps made under one setting (summed over them): what the verdict says the budget
    allowed. A tap that restarted counts from its restart; a tap no longer counted is left out."""

    generation: int
    taps: int
    """How many taps' counts are in the sum."""
    counts: CopyCounts


def copies_of(setting: RouteSetting, reports: dict[str, AppliedReport], now: float) -> TapCopies | None:
    """The sum of the copy counts of the counted taps that apply `setting`'s generation (None: none reports
    counts, e.g. the setting has neither a budget nor a resent baseline)."""
    counted = counted_taps(reports, now, setting.interval_seconds)
    mine = [r.copies for r in counted.values()
            if r.copies is not None and r.state is AppliedState.applied and r.generation == setting.generation]
    if not mine:
        return None
    total = CopyCounts()
    for c in mine:
        total = total + c
    return TapCopies(setting.generation, len(mine), total)


def counted_taps(reports: dict[str, AppliedReport], now: float, interval_seconds: float) -> dict[str, AppliedReport]:
    """The taps that count: not gone, and reported within the last 3 intervals."""
    window = STALE_INTERVALS * interval_seconds
    return {tap: r for tap, r in reports.items()
            if r.state is not AppliedState.gone and now - r.reported <= window}


def verify(setting: RouteSetting, reports: dict[str, AppliedReport], now: float) -> Verification:
    """The setting counts as applied when at least one tap counts and every counted tap reports it
    (``state: applied`` and the setting's generation). A tap in fallback, on an older or a newer
    generation, or none at all, holds the rollout."""
    counted = counted_taps(reports, now, setting.interval_seconds)
    names = tuple(sorted(counted))
    if not counted:
        heard = ", ".join(sorted(reports)) or "none"
        return Verification(ok=False, problem=(
            f"no tap has reported for {setting.policy} in the last {STALE_INTERVALS} intervals "
            f"({STALE_INTERVALS * setting.interval_seconds:g}s; taps ever heard: {heard})"))
    behind = []
    for tap in names:
        r = counted[tap]
        if r.state is AppliedState.fallback:
            behind.append(f"{tap} is in fallback ({r.reason.value if r.reason else 'unknown'})")
        elif r.generation != setting.generation:
            behind.append(f"{tap} applies generation {r.generation}")
    if behind:
        return Verification(ok=False, counted=names, problem=(
            f"generation {setting.generation} of {setting.policy} is not applied by every tap: "
            + "; ".join(behind)))
    return Verification(ok=True, counted=names)
