"""Build the router a policy needs."""

from __future__ import annotations

from shadowctl.kube.client import KubeClient
from shadowctl.policy.model import ShadowMode, ShadowPolicy
from shadowctl.routers.base import Router
from shadowctl.routers.gateway import GatewayAPIRouter
from shadowctl.routers.istio import IstioRouter
from shadowctl.routers.knative import KnativeRouter, KnativeWithIstioMirror


def router_for(policy: ShadowPolicy, kube: KubeClient) -> Router:
    """The Istio router, the Gateway API router, the Knative router, or Knative plus an Istio mirror when the
    shadow phase mirrors."""
    namespace = policy.metadata.namespace
    target = policy.spec.target
    if target.istio is not None:
        return IstioRouter(kube, namespace, target.istio)
    if target.gateway_api is not None:
        return GatewayAPIRouter(kube, namespace, target.gateway_api)
    assert target.knative is not None  # Target's validator: exactly one of istio/knative/gatewayAPI
    knative = KnativeRouter(kube, namespace, target.knative)
    shadow = policy.spec.shadow
    if shadow is not None and shadow.mode is ShadowMode.istio and shadow.virtual_service is not None:
        return KnativeWithIstioMirror(knative, IstioRouter(kube, namespace, shadow.virtual_service))
    return knative
