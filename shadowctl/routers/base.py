"""The Router port: the only code that changes where users' live traffic goes.

A router owns one traffic object (an Istio VirtualService route, a Knative
Service's ``spec.traffic``) for one rollout. The controller never edits those
objects itself: it asks a router for the :class:`RouteState` it wants, and the
router computes the new object purely, writes it only when it differs, with the
resourceVersion it was computed from, and reads it back.

What the routers may change, and how they undo it, is recorded in the object
itself (annotation :data:`MANAGED_ANNOTATION`), so that a restarted controller
or ``shadowctl rollback`` from a laptop restores exactly what was changed and
nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from shadowctl.compare.routing import TapCopies
from shadowctl.errors import ShadowctlError

MANAGED_ANNOTATION = "shadowctl.dev/managed"
"""Annotation holding, as JSON, what shadowctl changed in the object and what it replaced."""


# --------------------------------------------------------------------------- errors


class RouterError(ShadowctlError):
    """A router could not read or set the routes; the message says which object and what is wrong."""


class RouteNotFound(RouterError):
    """The VirtualService, its http route, or the Knative Service does not exist."""


class DestinationNotFound(RouterError):
    """A destination or revision the policy names is not in the object (the message lists those that are)."""


class UnmanagedTraffic(RouterError):
    """The route sends traffic to something that is neither primary nor candidate: refused rather than guessed."""


class WouldBeRejected(RouterError):
    """The object would fail the API server's or the mesh's validation (weights not 100, duplicate tags...)."""


class Unsupported(RouterError):
    """The router cannot do what was asked (e.g. mirroring on Knative alone)."""


class ConflictRetriesExhausted(RouterError):
    """Every write attempt met a newer resourceVersion (409); nothing was written."""


class VerifyFailed(RouterError):
    """The write succeeded but reading back shows other routes (a webhook or another writer changed them)."""


class RevisionsChanged(RouterError):
    """The revisions the target splits between are no longer those the rollout started with (KServe: a new
    revision became the latest ready one mid-rollout); refused rather than giving an unanalysed revision live
    traffic. The controller restarts the analysis for the new candidate."""


class ClusterError(RouterError):
    """The Kubernetes API failed (unreachable, 429/5xx after retries, forbidden); the KubeError is chained."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Capabilities:
    """What a router can do; callers branch on these flags, never on the router's type."""

    can_mirror: bool
    """Copy a share of requests to the candidate while users only see the primary (Knative alone: no)."""
    can_split: bool
    """Send a share of live traffic to the candidate."""
    weight_step: int = 1
    """Smallest weight change, in percent (Istio weights and Knative percents are integers)."""
    mirror_resolution: float | None = None
    """Smallest mirror percentage step, in percent (None: cannot mirror)."""
    has_promote: bool = False
    """``promote()`` does more than ``apply(0/100)`` (e.g. pins the candidate revision, drops the tag)."""


@dataclass(frozen=True)
class RouteState:
    """Where live traffic goes: integer weights that sum to 100, and the mirrored share (None: no mirror).

    ``resource_version`` and ``owned`` are filled by :meth:`Router.read` (what the
    object's version was, and shadowctl's ownership record); they are ignored by
    ``==``, so an observed state compares equal to a desired one with the same routes.
    """

    primary_weight: int
    candidate_weight: int
    mirror_percent: float | None = None
    resource_version: str | None = field(default=None, compare=False)
    owned: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("primary_weight", "candidate_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
                raise ValueError(f"{name} must be an integer from 0 to 100, got {value!r}")
        if self.primary_weight + self.candidate_weight != 100:
            raise ValueError(
                f"weights must sum to 100: primary {self.primary_weight} + candidate {self.candidate_weight}"
                f" = {self.primary_weight + self.candidate_weight}"
            )
        m = self.mirror_percent
        if m is not None and (isinstance(m, bool) or not isinstance(m, int | float) or math.isnan(m)
                              or not 0 < m <= 100):
            raise ValueError(f"mirror_percent must be above 0 and at most 100 (None: no mirror), got {m!r}")

    @classmethod
    def primary_only(cls) -> RouteState:
        """100% primary, no mirror: the state before a rollout and after a rollback."""
        return cls(100, 0, None)

    def describe(self) -> str:
        """``primary 90 / candidate 10, mirror 5%`` for logs and messages."""
        text = f"primary {self.primary_weight} / candidate {self.candidate_weight}"
        return text + (f", mirror {self.mirror_percent:g}%" if self.mirror_percent is not None else ", no mirror")


@dataclass(frozen=True)
class ApplyResult:
    """What :meth:`Router.apply` (or finalize/promote) did."""

    wrote: bool
    """False when the object already matched: no write was made."""
    state: RouteState
    """The state read back after the write (or read before, when nothing was written)."""
    written: dict[str, Any] | None = None
    """The object as the server stored it, when a write was made."""
    attempts: int = 1
    """Read-compute-write rounds (more than one after 409 conflicts)."""
    objects: tuple[str, ...] = ()
    """The objects written, as ``kind namespace/name``."""


# --------------------------------------------------------------------------- the port


@runtime_checkable
class Router(Protocol):
    """Reads and sets where one rollout's traffic goes. Implementations: Istio, Knative, Knative+Istio mirror."""

    @property
    def capabilities(self) -> Capabilities:
        """What this router can do. Fixed for the router's life; no I/O."""
        ...

    async def read(self) -> RouteState:
        """The current weights and mirror, with the object's resourceVersion and shadowctl's ownership record.

        Raises RouteNotFound / DestinationNotFound when the object or the policy's
        destinations are missing, UnmanagedTraffic when a third destination carries
        weight (no RouteState could describe it), ClusterError when the API fails.
        """
        ...

    async def apply(self, desired: RouteState) -> ApplyResult:
        """Make the object route as ``desired``; idempotent.

        Reads the object, computes the new one purely, and returns without writing
        when it is unchanged. Otherwise writes it with the resourceVersion it was
        computed from; on 409 re-reads and recomputes (bounded), then reads back and
        checks the routes. Raises Unsupported when ``desired`` mirrors on a router
        that cannot, WouldBeRejected before writing anything the server or mesh
        would refuse, ConflictRetriesExhausted, VerifyFailed, ClusterError.
        """
        ...

    async def finalize(self, keep_candidate: bool = False) -> ApplyResult:
        """Undo the rollout: 100% primary, shadowctl's mirror removed (a mirror it replaced put back).

        The candidate destination (Istio) or tag (Knative) is removed when
        shadowctl added it, unless ``keep_candidate`` (then it stays at 0%).
        Routes, mirrors and tags others own are left as they are. Idempotent.
        """
        ...

    async def promote(self) -> ApplyResult:
        """End the rollout with the candidate serving 100%, no mirror, and shadowctl's record removed.

        Istio: candidate weight 100 (the primary destination stays at 0).
        Knative: 100% pinned to the candidate revision by ``revisionName``, the
        candidate tag's traffic target removed. Idempotent.
        """
        ...


@runtime_checkable
class CountsCopies(Protocol):
    """A router whose mirror copies are made by taps that count them (the tap router, and a split router with the
    tap's mirror): what the verdict says the shadow budget allowed."""

    def copies(self) -> TapCopies | None:
        """The copies the counted taps reported at this router's last read or apply, summed over them, for the
        generation they apply (None: no tap reported counts; they do only under a budget or a resent baseline)."""
        ...
