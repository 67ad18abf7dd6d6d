"""The Istio router: one http route of a VirtualService (weights and mirror), through the kube adapter."""

from __future__ import annotations

from shadowctl.kube.client import KubeClient
from shadowctl.kube.refs import VIRTUAL_SERVICE, ResourceRef
from shadowctl.policy.model import IstioTarget, MirrorVirtualService
from shadowctl.routers import _io, istio_build
from shadowctl.routers.base import ApplyResult, Capabilities, RouteState
from shadowctl.routers.istio_build import IstioRouteSpec
from shadowctl.routers.record import JSON

ISTIO_CAPABILITIES = Capabilities(
    can_mirror=True, can_split=True, weight_step=1, mirror_resolution=0.0001, has_promote=False
)
"""Envoy keeps the mirror fraction per million, so 0.0001% is the finest step that means anything."""

MIRROR_ONLY_CAPABILITIES = Capabilities(can_mirror=True, can_split=False, mirror_resolution=0.0001)


class IstioRouter:
    """Routes one http route of a VirtualService; with a mirror-only spec it sets the mirror alone."""

    def __init__(
        self,
        kube: KubeClient,
        namespace: str,
        target: IstioTarget | MirrorVirtualService | IstioRouteSpec,
        *,
        attempts: int = _io.DEFAULT_ATTEMPTS,
    ) -> None:
        self.kube = kube
        self.spec = IstioRouteSpec.of(target)
        self.ref = ResourceRef(VIRTUAL_SERVICE, self.spec.virtual_service, namespace)
        self.attempts = attempts

    @property
    def capabilities(self) -> Capabilities:
        return ISTIO_CAPABILITIES if self.spec.manage_weights else MIRROR_ONLY_CAPABILITIES

    def _state(self, obj: JSON) -> RouteState:
        return istio_build.read_state(obj, self.spec)

    async def read(self) -> RouteState:
        return self._state(await _io.get(self.kube, self.ref))

    async def apply(self, desired: RouteState) -> ApplyResult:
        return await _io.converge(
            self.kube, self.ref, lambda obj: istio_build.build(obj, self.spec, desired), self._state,
            attempts=self.attempts,
        )

    async def finalize(self, keep_candidate: bool = False) -> ApplyResult:
        return await _io.converge(
            self.kube, self.ref, lambda obj: istio_build.finalize(obj, self.spec, keep_candidate), self._state,
            attempts=self.attempts,
        )

    async def promote(self) -> ApplyResult:
        return await _io.converge(
            self.kube, self.ref, lambda obj: istio_build.promote(obj, self.spec), self._state, attempts=self.attempts
        )
