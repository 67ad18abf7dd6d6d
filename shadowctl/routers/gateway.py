"""The Gateway API router: one rule of an HTTPRoute (backendRef weights and a RequestMirror), through the kube adapter."""

from __future__ import annotations

from shadowctl.kube.client import KubeClient
from shadowctl.kube.refs import HTTP_ROUTE, ResourceRef
from shadowctl.policy.model import GatewayAPITarget
from shadowctl.routers import _io, gateway_build
from shadowctl.routers.base import ApplyResult, Capabilities, RouteState
from shadowctl.routers.record import JSON

GATEWAY_API_CAPABILITIES = Capabilities(
    can_mirror=True, can_split=True, weight_step=1, mirror_resolution=1e-7, has_promote=True
)
"""Steps are whole percents of the rule's total weight; a mirror's fraction has an int32 denominator, so
100 x 10^7 (a ten-millionth of a percent) is the finest exact step. ``promote`` differs from
``apply(0/100)``: the candidate takes the primary's weight and other backends keep theirs."""


class GatewayAPIRouter:
    """Routes one rule of an HTTPRoute between a primary and a candidate backendRef; mirrors with a filter."""

    def __init__(
        self, kube: KubeClient, namespace: str, target: GatewayAPITarget, *, attempts: int = _io.DEFAULT_ATTEMPTS
    ) -> None:
        self.kube = kube
        self.target = target
        self.ref = ResourceRef(HTTP_ROUTE, target.http_route, namespace)
        self.attempts = attempts

    @property
    def capabilities(self) -> Capabilities:
        return GATEWAY_API_CAPABILITIES

    def _state(self, obj: JSON) -> RouteState:
        return gateway_build.read_state(obj, self.target)

    async def read(self) -> RouteState:
        return self._state(await _io.get(self.kube, self.ref))

    async def apply(self, desired: RouteState) -> ApplyResult:
        return await _io.converge(
            self.kube, self.ref, lambda obj: gateway_build.build(obj, self.target, desired), self._state,
            attempts=self.attempts,
        )

    async def finalize(self, keep_candidate: bool = False) -> ApplyResult:
        return await _io.converge(
            self.kube, self.ref, lambda obj: gateway_build.finalize(obj, self.target, keep_candidate), self._state,
            attempts=self.attempts,
        )

    async def promote(self) -> ApplyResult:
        def state_of(obj: JSON) -> RouteState:  # the candidate serves what the primary did: the rollout's 100%
            return RouteState(0, 100, None, resource_version=(obj.get("metadata") or {}).get("resourceVersion"))

        return await _io.converge(
            self.kube, self.ref, lambda obj: gateway_build.promote(obj, self.target), state_of, attempts=self.attempts
        )
