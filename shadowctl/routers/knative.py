"""The Knative router (``spec.traffic`` of a Service) and its composition with an Istio mirror.

Knative has no mirroring; a Knative target's shadow phase needs an Istio
VirtualService in front of the service (``shadow.virtualService``).
:class:`KnativeWithIstioMirror` puts the two together: percents on the Knative
Service, the mirror on the VirtualService, so that the controller sees one
router that can do both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from shadowctl.kube.client import KubeClient
from shadowctl.kube.errors import KubeError, NotFound
from shadowctl.kube.refs import KNATIVE_REVISION, KNATIVE_SERVICE, ResourceRef
from shadowctl.policy.model import KnativeTarget
from shadowctl.routers import _io, knative_build
from shadowctl.routers.base import ApplyResult, Capabilities, ClusterError, RouteState, Unsupported
from shadowctl.routers.istio import IstioRouter
from shadowctl.routers.record import JSON, Build

KNATIVE_CAPABILITIES = Capabilities(can_mirror=False, can_split=True, weight_step=1, mirror_resolution=None,
                                    has_promote=True)
"""Knative routes by integer percents and cannot copy requests: no mirror."""

KNATIVE_WITH_MIRROR_CAPABILITIES = dataclasses.replace(KNATIVE_CAPABILITIES, can_mirror=True,
                                                       mirror_resolution=0.0001)


class KnativeRouter:
    """Routes a Knative Service's traffic between a pinned primary revision and a tagged candidate revision."""

    def __init__(
        self, kube: KubeClient, namespace: str, target: KnativeTarget, *, attempts: int = _io.DEFAULT_ATTEMPTS
    ) -> None:
        self.kube = kube
        self.target = target
        self.ref = ResourceRef(KNATIVE_SERVICE, target.service, namespace)
        self.attempts = attempts

    @property
    def capabilities(self) -> Capabilities:
        return KNATIVE_CAPABILITIES

    async def known_revisions(self) -> Collection[str] | None:
        """Names of the service's Revisions (None when Revisions cannot be listed: not checked then)."""
        try:
            listed = await self.kube.list(
                KNATIVE_REVISION, self.ref.namespace, label_selector=f"serving.knative.dev/service={self.ref.name}"
            )
        except NotFound:
            return None
        except KubeError as exc:
            raise ClusterError(f"listing the Revisions of {self.ref}: {exc.message}") from exc
        return {str((r.get("metadata") or {}).get("name")) for r in listed.items}

    async def candidate_url(self) -> str | None:
        """The URL Knative gives the candidate's tag (``status.traffic[].url``), for a tap that mirrors to it."""
        status = (await _io.get(self.kube, self.ref)).get("status") or {}
        for target in status.get("traffic") or []:
            if isinstance(target, dict) and target.get("tag") == self.target.candidate_tag and target.get("url"):
                return str(target["url"])
        return None

    async def read(self) -> RouteState:
        known = await self.known_revisions()
        return knative_build.read_state(await _io.get(self.kube, self.ref), self.target, known)

    async def apply(self, desired: RouteState) -> ApplyResult:
        if desired.mirror_percent is not None:
            raise Unsupported(
                f"Knative Service {self.ref.namespace}/{self.ref.name} cannot mirror requests; "
                "set shadow.virtualService or shadow.mode: tap"
            )
        known = await self.known_revisions()
        return await _io.converge(
            self.kube, self.ref, lambda obj: knative_build.build(obj, self.target, desired, known),
            lambda obj: knative_build.read_state(obj, self.target, known), attempts=self.attempts,
        )

    async def finalize(self, keep_candidate: bool = False) -> ApplyResult:
        known = await self.known_revisions()
        return await _io.converge(
            self.kube, self.ref, lambda obj: knative_build.finalize(obj, self.target, keep_candidate, known),
            lambda obj: knative_build.read_state(obj, self.target, known), attempts=self.attempts,
        )

    async def promote(self) -> ApplyResult:
        known = await self.known_revisions()
        candidates: list[str] = []

        def compute(obj: JSON) -> Build:
            result = knative_build.promote(obj, self.target, known)
            candidates.append(knative_build.promoted_revision(result.obj, self.target.candidate_tag) or "")
            return result

        def check(after: JSON) -> str | None:
            held = knative_build.promoted_revision(after, self.target.candidate_tag)
            return None if held and held == candidates[-1] else f"{candidates[-1]} is not pinned in the main target"

        def state_of(obj: JSON) -> RouteState:
            return RouteState(0, 100, None, resource_version=(obj.get("metadata") or {}).get("resourceVersion"))

        return await _io.converge(self.kube, self.ref, compute, state_of, check=check, attempts=self.attempts)


class KnativeWithIstioMirror:
    """A Knative router for percents plus a mirror-only Istio router on the VirtualService in front of it."""

    def __init__(self, knative: KnativeRouter, mirror: IstioRouter) -> None:
        if mirror.spec.manage_weights:
            raise ValueError("the Istio router of a Knative target must be mirror-only (a MirrorVirtualService)")
        self.knative = knative
        self.mirror = mirror

    @property
    def capabilities(self) -> Capabilities:
        return KNATIVE_WITH_MIRROR_CAPABILITIES

    async def read(self) -> RouteState:
        k = await self.knative.read()
        m = await self.mirror.read()
        return RouteState(k.primary_weight, k.candidate_weight, m.mirror_percent, resource_version=k.resource_version,
                          owned={"service": k.owned, "virtualService": m.owned})

    async def apply(self, desired: RouteState) -> ApplyResult:
        # The Knative side first: the candidate tag gives the host the mirror points at.
        k = await self.knative.apply(dataclasses.replace(desired, mirror_percent=None))
        m = await self.mirror.apply(RouteState(100, 0, desired.mirror_percent))
        return _combine(k, m)

    async def finalize(self, keep_candidate: bool = False) -> ApplyResult:
        # The mirror first: a mirror left behind keeps the candidate's GPUs busy.
        m = await self.mirror.finalize()
        k = await self.knative.finalize(keep_candidate)
        return _combine(k, m)

    async def promote(self) -> ApplyResult:
        m = await self.mirror.finalize()
        k = await self.knative.promote()
        return _combine(k, m)


def _combine(k: ApplyResult, m: ApplyResult) -> ApplyResult:
    state = dataclasses.replace(k.state, mirror_percent=m.state.mirror_percent)
    return ApplyResult(k.wrote or m.wrote, state, k.written or m.written, max(k.attempts, m.attempts),
                       k.objects + m.objects)
