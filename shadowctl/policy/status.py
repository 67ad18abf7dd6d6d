"""What a ShadowPolicy's `.status` holds: one typed model, written by the controller, read by everyone.

The controller writes `.status` through :class:`PolicyStatus` (``controller/status.py``) and the CLI,
the demo and the tests read it back through the same model; the CRD's status schema is generated
from it (``policy/crd.py``), so the API server refuses a status of another shape. The domain types
convert to and from their part: :class:`shadowctl.machine.RolloutState` to :class:`RolloutRecord`,
the judge's ``Verdict`` to :class:`Evidence`, ``AgreementTally`` to :class:`OutputTally`, the judge's
``Paired`` (one latency quantity's pairs) to :class:`PairedCounts` in :class:`PairedLatencyRecord`.

Why reading is lenient: the object comes from a cluster, where an older controller, a CRD without
this schema or a person with kubectl may have written it. A field that does not validate reads as
its default (a rollout block that cannot be read is a fresh Pending rollout, as before a first
tick), so a reader never fails on another writer's status; :meth:`PolicyStatus.read` never raises.

Why :class:`Phase` and :class:`Command` live here and not in the machine: they are the words the
status is written in, and the CRD (printer columns, schema enum) and the simulator, which may not
import the machine, need them too. The machine uses them as its vocabulary.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

__all__ = [
    "Command",
    "CommandRecord",
    "ComparatorCounts",
    "Condition",
    "Evidence",
    "HistoryEntry",
    "MetricEvidence",
    "OutputTally",
    "PairedCounts",
    "PairedLatencyRecord",
    "PendingRoute",
    "Phase",
    "PolicyStatus",
    "RolloutRecord",
    "RouteRecord",
    "SampleCounts",
    "merge_patch",
]


class Phase(enum.StrEnum):
    """Where a rollout is."""

    pending = "Pending"
    shadowing = "Shadowing"
    progressing = "Progressing"
    waiting_promotion = "WaitingPromotion"
    promoting = "Promoting"
    succeeded = "Succeeded"
    rolling_back = "RollingBack"
    rolled_back = "RolledBack"
    paused = "Paused"
    failed = "Failed"

    @property
    def terminal(self) -> bool:
        """A finished rollout (the only place the terminal phases are listed)."""
        return self in (Phase.succeeded, Phase.rolled_back, Phase.failed)


class Command(enum.StrEnum):
    """What a person asked for (`shadowctl promote|rollback|pause|resume|retry`)."""

    promote = "promote"
    promote_full = "promote-full"
    rollback = "rollback"
    pause = "pause"
    resume = "resume"
    retry = "retry"


Count = Annotated[int, Field(ge=0)]
Percent = Annotated[int, Field(ge=0, le=100)]
Share = Annotated[float, Field(ge=0, le=100)]
Finite = Annotated[float, Field(allow_inf_nan=False)]

PAIRED_BOUNDS_MAX = 64
"""At most this many bounds per latency quantity in ``.status.pairedLatency`` (see :class:`PairedCounts`)."""


class _Part(BaseModel):
    """A part of `.status`: camelCase on the wire, frozen, and lenient on read (see the module docstring)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, alias_generator=to_camel, extra="ignore")

    @field_validator("*", mode="wrap")
    @classmethod
    def _lenient(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        try:
            return handler(value)
        except ValidationError:
            name = info.field_name
            field = cls.model_fields[name] if name else None
            if field is None or field.is_required():
                raise
            return field.get_default(call_default_factory=True)

    def to_json(self) -> dict[str, Any]:
        """The part as stored: camelCase, absent fields left out (a merge patch deletes null keys)."""
        out: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return out


class HistoryEntry(_Part):
    """One phase transition: when (epoch seconds), from and to which phase, and why."""

    at: float
    from_: str = Field(alias="from")
    to: str
    reason: str = ""


class RolloutRecord(_Part):
    """The machine's memory between ticks (:class:`shadowctl.machine.RolloutState` on the wire)."""

    phase: Phase
    step: int | None = None
    canary_weight: Percent = 0
    mirror_percent: Share | None = None
    candidate: str | None = None
    rollout_generation: int = 0
    rollout_started_at: float | None = None
    phase_started_at: float | None = None
    paused_from: Phase | None = None
    paused_step: int | None = None
    message: str = ""
    history: list[HistoryEntry] = Field(default_factory=list)


class SampleCounts(_Part):
    """How many observations each arm had (requests, or series samples for a gauge)."""

    primary: float | None = None
    candidate: float | None = None


class MetricEvidence(_Part):
    """The judge's conclusion for one metric, with the numbers behind it (``MetricResult`` on the wire).

    ``effect`` and ``interval`` are on the user's scale (``effectScale``): the ratio candidate/primary
    for a relative margin, the difference candidate - primary for an absolute one. Numbers JSON cannot
    hold (NaN, infinities) are None.
    """

    name: str = "?"
    outcome: str | None = None
    statistic: str | None = None
    direction: str | None = None
    margin: str | None = None
    critical: bool = False
    method: str | None = None
    samples: SampleCounts = Field(default_factory=SampleCounts)
    primary: float | None = None
    candidate: float | None = None
    effect: float | None = None
    effect_scale: str | None = None
    interval: list[float | None] = Field(default_factory=list)
    alpha: float | None = None
    beta: float | None = None
    crossed: str | None = None
    threshold: float | None = None
    sentence: str = ""
    extra: dict[str, Any] | None = None


class Evidence(_Part):
    """The last verdict (``status.lastVerdict``): the overall outcome, why, and each metric's evidence."""

    outcome: str | None = None
    method: str | None = None
    reason: str = ""
    metrics: list[MetricEvidence] = Field(default_factory=list)
    score: float | None = None
    at: str | None = None


class ComparatorCounts(_Part):
    """Pairs compared by one comparator, and how many agreed, for the candidate and the baseline."""

    candidate_pairs: Count = 0
    candidate_agree: Count = 0
    baseline_pairs: Count = 0
    baseline_agree: Count = 0
    redacted_pairs: Count = Field(
        default=0, description="Candidate pairs this comparator could not score: redaction removed what it reads.")


class DisagreementRecord(_Part):
    """One of the last candidate answers that disagreed with the primary's: where to look for it."""

    request_id: str
    comparators: list[str] = Field(default_factory=list, description="The comparators under which it disagreed.")
    trace_id: str | None = Field(default=None, description="The user's trace (W3C trace id from the request's "
                                                            "traceparent, as the tap recorded it).")


class OutputTally(_Part):
    """Output agreement counted since ``phaseStartedAt`` (``AgreementTally`` on the wire)."""

    comparators: dict[str, ComparatorCounts] = Field(default_factory=dict)
    skipped_primary_failed: Count = 0
    phase_started_at: float | None = None
    disagreements: list[DisagreementRecord] = Field(
        default_factory=list, description="The last few disagreeing candidate pairs, oldest first (at most 5).")


class PairedCounts(_Part):
    """One latency quantity's pairs, reduced to what the paired judge needs (``Paired`` on the wire).

    Per pair ``d = log(candidate/primary)``: ``pairs`` counted, exact ``sum`` and ``sumSq`` of ``d`` (the
    mean's test), ``sumLogPrimary``/``sumLogCandidate`` (geometric means), ``dropped``/``errored`` pairs
    left out, and ``counts[i]``: pairs with ``d <= le[i]``, at 0, at -0.005, at each margin (the median's
    sign test) and at a coarse grid (its estimate and interval). At most 64 bounds; no per-pair data.
    """

    pairs: Count = 0
    sum: Finite = 0.0
    sum_sq: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    sum_log_primary: Finite = 0.0
    sum_log_candidate: Finite = 0.0
    dropped: Count = 0
    errored: Count = 0
    le: list[Finite] = Field(default_factory=list, max_length=PAIRED_BOUNDS_MAX)
    counts: list[Count] = Field(default_factory=list, max_length=PAIRED_BOUNDS_MAX)

    @model_validator(mode="after")
    def _cumulative(self) -> Self:
        if len(self.le) != len(self.counts):
            raise ValueError(f"{len(self.le)} bounds but {len(self.counts)} counts")
        if any(b <= a for a, b in zip(self.le, self.le[1:], strict=False)):
            raise ValueError("le must be strictly ascending")
        if any(b < a for a, b in zip(self.counts, self.counts[1:], strict=False)) or any(
            c > self.pairs for c in self.counts
        ):
            raise ValueError("counts must be cumulative (never decreasing, at most pairs)")
        return self


class PairedLatencyRecord(_Part):
    """The candidate's paired latencies collected since ``phaseStartedAt`` (shadow phase), per quantity:
    what a restarted controller, or a new leader, continues the paired-latency tests from."""

    ttft: PairedCounts | None = None
    tpot: PairedCounts | None = None
    e2e: PairedCounts | None = None
    phase_started_at: float | None = None

    def quantities(self) -> dict[str, PairedCounts]:
        """The quantities recorded, by name (ttft, tpot, e2e)."""
        return {q: c for q in ("ttft", "tpot", "e2e") if (c := getattr(self, q)) is not None}


class CommandRecord(_Part):
    """The last command carried out: the annotation's id, what, when and by whom, and the phase it led to."""

    id: str
    command: str
    at: str = ""
    by: str = ""
    handled_at: str | None = None
    result: str | None = None


class RouteRecord(_Part):
    """The routes as read back after the tick's writes."""

    primary_weight: Percent
    candidate_weight: Percent
    mirror_percent: Share | None = None


class PendingRoute(_Part):
    """A route change that raises the candidate's live share, recorded before it is written
    (``status.pendingRoute``): the intent.

    Routes are written before the status that records them, so a controller killed between the two
    leaves routes the status does not know of. For a change that *lowers* the candidate's share (a
    rollback, a restart) that is safe: the recorded state allows more than is live. For a change that
    *raises* it, it is not: the next leader would decide from a status that never allowed the live
    share. So a raise is recorded here first (with the rollout state it leads to), then the routes are
    written, then the status records the new state and drops this record. A tick that finds it
    outstanding settles it before anything else: the routes hold it (``primaryWeight``,
    ``candidateWeight``, ``mirrorPercent``), so it was applied and ``rollout`` is adopted as reached;
    or they do not, so it was never applied (or someone else has changed the routes since, which the
    next tick treats as drift from the recorded state) and it is dropped."""

    id: str = Field(default="", description="unique per intent: marks the route object when it is dropped")
    rollout: RolloutRecord
    primary_weight: Percent
    candidate_weight: Percent
    mirror_percent: Share | None = None
    generation: int = Field(default=0, description="the policy's metadata.generation the decision was made from")
    target: dict[str, Any] | None = Field(default=None, description="spec.target the routes are written on")
    at: str | None = Field(default=None, description="when the intent was recorded")


class Condition(_Part):
    """A Kubernetes-style condition (Ready, Progressing, Promoted)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class PolicyStatus(_Part):
    """All of `.status`. The top-level copies of phase, weight, mirror and step are what
    ``kubectl get`` and ``shadowctl get`` show; ``rollout`` is what the controller steps from."""

    observed_generation: int | None = None
    phase: Phase = Phase.pending
    canary_weight: Percent | None = None
    mirror_percent: Share | None = None
    step: int | None = Field(default=None, description="the canary step, counted from 1")
    message: str = ""
    rollout: RolloutRecord | None = None
    last_tick: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    source_errors: list[str] | None = None
    last_verdict: Evidence | None = None
    routes: RouteRecord | None = None
    outputs: OutputTally | None = None
    paired_latency: PairedLatencyRecord | None = None
    last_command: CommandRecord | None = None
    rollout_target: dict[str, Any] | None = Field(
        default=None,
        description="spec.target as it was when the routes were last set (read with the spec's model when used)",
    )
    pending_route: PendingRoute | None = Field(
        default=None, description="a raise of the candidate's live share recorded before its route write")
    deadline_at: str | None = Field(
        default=None,
        description="when the progress deadline rolls back the rollout in flight: rolloutStartedAt plus the last "
                    "accepted spec's progressDeadline (rounded up to the second); kept while a later spec is refused")
    accepted_generation: int | None = Field(
        default=None, description="the last metadata.generation whose spec the model accepted")
    accepted_spec: dict[str, Any] | None = Field(
        default=None,
        description="that spec, as written: what the routes are restored with while a later spec is refused "
                    "(read with the spec's model when used)",
    )

    @classmethod
    def read(cls, value: Any) -> Self:
        """The status in ``value`` (an object's ``.status``); anything unreadable reads as its default."""
        if not isinstance(value, dict):
            return cls()
        try:
            return cls.model_validate(value)
        except ValidationError:  # a required part of a nested record is missing: the lenient validators
            return cls()  # drop that record; only a malformed top level itself ends here

    @classmethod
    def of(cls, obj: Any) -> Self:
        """The status of a ShadowPolicy object as the API returns it."""
        return cls.read(obj.get("status") if isinstance(obj, dict) else None)

    @property
    def written(self) -> bool:
        """Whether a controller has written anything yet."""
        return bool(self.model_fields_set)

    @property
    def history(self) -> list[HistoryEntry]:
        """The rollout's phase transitions, oldest first (none before a first transition)."""
        return list(self.rollout.history) if self.rollout is not None else []

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)

    def comparable(self) -> dict[str, Any]:
        """The status without what changes on every tick (the tick's time, the verdict's time, the
        conditions' transition times), to skip a write that changes nothing."""
        out = self.model_dump(mode="json", by_alias=True, exclude_none=True,
                              exclude={"last_tick": True, "last_verdict": {"at"},
                                       "conditions": {"__all__": {"last_transition_time"}}})
        return dict(out)


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``: keys that went are null.

    Objects are patched key by key, anything else (lists included) is replaced whole.
    """
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value) if isinstance(value, dict) else value
    return patch
