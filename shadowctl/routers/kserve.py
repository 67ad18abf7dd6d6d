"""The KServe router: ``spec.predictor.canaryTrafficPercent`` of an InferenceService (see :mod:`.kserve_build`).

KServe cannot mirror; a KServe target's shadow phase goes through the tap
(``shadow.mode: tap``), composed with this router in :mod:`.factory`.
"""

from __future__ import annotations

from shadowctl.kube.client import KubeClient
from shadowctl.kube.refs import INFERENCE_SERVICE, ResourceRef
from shadowctl.policy.model import KServeTarget
from shadowctl.routers import _io, kserve_build
from shadowctl.routers.base import ApplyResult, Capabilities, RouteState, Unsupported
from shadowctl.routers.record import JSON

KSERVE_CAPABILITIES = Capabilities(can_mirror=False, can_split=True, weight_step=1, mirror_resolution=None,
                                   has_promote=True)
"""Whole percents, no mirror (kserve#2978). ``promote`` differs from ``apply(0/100)``: it removes
``canaryTrafficPercent`` so that KServe records the candidate as rolled out."""


class KServeRouter:
    """Steps the canary of an InferenceService's predictor between its rolled-out and latest ready revisions."""

    def __init__(
        self, kube: KubeClient, namespace: str, target: KServeTarget, *, attempts: int = _io.DEFAULT_ATTEMPTS
    ) -> None:
        self.kube = kube
        self.target = target
        self.ref = ResourceRef(INFERENCE_SERVICE, target.inference_service, namespace)
        self.attempts = attempts

    @property
    def capabilities(self) -> Capabilities:
        return KSERVE_CAPABILITIES

    def _state(self, obj: JSON) -> RouteState:
        return kserve_build.read_state(obj, self.target)

    async def candidate_url(self) -> str | None:
        """The URL KServe gives the candidate (its latest ready revision), for the taps that mirror to it in the
        shadow phase: see :func:`candidate_url_of`."""
        return candidate_url_of(await _io.get(self.kube, self.ref))

    async def read(self) -> RouteState:
        return self._state(await _io.get(self.kube, self.ref))

    async def apply(self, desired: RouteState) -> ApplyResult:
        if desired.mirror_percent is not None:
            raise Unsupported(
                f"InferenceService {self.ref.namespace}/{self.ref.name} cannot mirror requests (KServe has no "
                "mirroring, kserve#2978); set shadow.mode: tap"
            )
        return await _io.converge(
            self.kube, self.ref, lambda obj: kserve_build.build(obj, self.target, desired), self._state,
            attempts=self.attempts,
        )

    async def finalize(self, keep_candidate: bool = False) -> ApplyResult:
        return await _io.converge(
            self.kube, self.ref, lambda obj: kserve_build.finalize(obj, self.target, keep_candidate), self._state,
            attempts=self.attempts,
        )

    async def promote(self) -> ApplyResult:
        def state_of(obj: JSON) -> RouteState:  # KServe moves the rolled-out revision a moment later
            return RouteState(0, 100, None, resource_version=(obj.get("metadata") or {}).get("resourceVersion"))

        return await _io.converge(
            self.kube, self.ref, lambda obj: kserve_build.promote(obj, self.target), state_of, attempts=self.attempts
        )


def candidate_url_of(obj: JSON) -> str | None:
    """The URL of the predictor's latest ready revision (the candidate) from ``status.components.predictor.traffic``:
    KServe lists it there with a URL only under tag routing (annotation ``serving.kserve.io/enable-tag-routing:
    "true"``, tag ``latest``). None without one: the shadow phase's taps then need their own ``--mirror-to``
    (the tap router's setting carries no URL, and a tap with neither falls back to primary-only)."""
    status = kserve_build.component_status(obj)
    latest = status.get("latestReadyRevision")
    for target in status.get("traffic") or []:
        if (isinstance(target, dict) and target.get("url") and target.get("tag")
                and (target.get("revisionName") == latest or target.get("latestRevision") is True)):
            return str(target["url"])
    return None

