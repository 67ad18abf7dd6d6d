"""Build the router a policy needs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from shadowctl.compare.routing import Budget
from shadowctl.kube.client import KubeClient
from shadowctl.policy.model import BaselineMode, ShadowMode, ShadowPolicy
from shadowctl.routers.base import Router, RouterError
from shadowctl.routers.gateway import GatewayAPIRouter
from shadowctl.routers.istio import IstioRouter
from shadowctl.routers.knative import KnativeRouter, KnativeWithIstioMirror
from shadowctl.routers.kserve import KServeRouter
from shadowctl.routers.tap import CandidateAddress, CandidateShape, SplitWithTapMirror, TapChannel, TapRouter
from shadowctl.routers.tap_prompts import route_rewrite

SamplingFraction = Callable[[ShadowPolicy], float | None]
"""The sampling fraction a policy's route settings carry now (the controller's adaptive target:
controller.sampling.SamplingTuner.fraction); None: none (the taps' own --sample)."""

TapChannelFactory = Callable[[ShadowPolicy], TapChannel]
"""Builds the controller's MQTT channel to a policy's taps (the policy's outputs broker and credentials);
raises RouterError saying why it cannot."""


def tap_router(policy: ShadowPolicy, tap_channel: TapChannelFactory | None, split: Router | None = None,
               kube: KubeClient | None = None, sampling: SamplingFraction | None = None) -> TapRouter:
    """The tap router of a policy (``shadow.mode: tap``); the candidate's URL from the split router when it knows
    one (Knative's candidate tag); `kube` reads a prompt rewrite's ConfigMaps; `sampling`: the fraction the
    settings carry (default: the policy's ``outputs.sampling.fraction`` where it is not 1)."""
    namespace, name = policy.metadata.namespace, policy.metadata.name
    channel, missing = None, ""
    if tap_channel is None:
        missing = f"{policy.key}: shadow.mode: tap needs the controller's MQTT channel to the taps"
    else:
        try:
            channel = tap_channel(policy)
        except RouterError as exc:
            missing = str(exc)
    url = split.candidate_url if isinstance(split, CandidateAddress) else None
    shape = shadow_shape(policy)
    shape_of = None
    target = policy.spec.target.tap
    if target is not None:  # the tap is the only router: the candidate's URL and shape are the policy's
        fixed = target.candidate_url

        async def url_of_target() -> str | None:
            return fixed

        url = url_of_target
        shape = dataclasses.replace(shape, sticky=True, user_header=target.user_header)
        rewrite = target.rewrite
        if rewrite is not None:
            base = shape

            async def shape_of_target() -> CandidateShape:
                return dataclasses.replace(base, rewrite=await route_rewrite(kube, namespace, rewrite))

            shape_of = shape_of_target
    wanted = (lambda: sampling(policy)) if sampling is not None else None
    return TapRouter(channel, namespace, name, policy.spec.analysis.interval.total_seconds(), url, missing=missing,
                     shape=shape, shape_of=shape_of, sampling=wanted)


def shadow_shape(policy: ShadowPolicy) -> CandidateShape:
    """The shadow phase's part of the settings: the resent noise baseline's share (``baseline.mode: resend``;
    default the shadow's mirrorPercent), the shadow budget, and the sampling fraction where it is not every
    request (route setting v3 only then)."""
    shadow = policy.spec.shadow
    outputs = policy.spec.analysis.outputs
    baseline = None
    if outputs is not None and outputs.baseline.mode is BaselineMode.resend:
        baseline = outputs.baseline.percent or (shadow.mirror_percent if shadow is not None else None)
    budget = None
    if shadow is not None and shadow.budget is not None:
        b = shadow.budget
        budget = Budget(requests_per_second=b.requests_per_second, tokens_per_second=b.tokens_per_second,
                        max_tokens=b.max_tokens, max_queue=b.max_queue)
    fraction = outputs.sampling.fraction if outputs is not None and outputs.sampling.carried else None
    return CandidateShape(baseline_percent=baseline, budget=budget, sample_fraction=fraction)


def router_for(policy: ShadowPolicy, kube: KubeClient, *, tap_channel: TapChannelFactory | None = None,
               sampling: SamplingFraction | None = None) -> Router:
    """The target's router: Istio, Gateway API, KServe or Knative; Knative plus an Istio mirror when the shadow
    phase mirrors through a VirtualService; with ``shadow.mode: tap``, the target's router for the live
    shares composed with the tap router for the mirror (:class:`SplitWithTapMirror`); and for a tap target
    (``spec.target.tap``), the tap router alone, for both."""
    if policy.spec.target.tap is not None:
        return tap_router(policy, tap_channel, kube=kube, sampling=sampling)
    split = _split_router(policy, kube)
    shadow = policy.spec.shadow
    if shadow is not None and shadow.mode is ShadowMode.tap:
        return SplitWithTapMirror(split, tap_router(policy, tap_channel, split, kube, sampling))
    return split


def _split_router(policy: ShadowPolicy, kube: KubeClient) -> Router:
    namespace = policy.metadata.namespace
    target = policy.spec.target
    if target.istio is not None:
        return IstioRouter(kube, namespace, target.istio)
    if target.gateway_api is not None:
        return GatewayAPIRouter(kube, namespace, target.gateway_api)
    if target.kserve is not None:  # cannot mirror: the shadow phase goes through the tap (shadow.mode: tap)
        return KServeRouter(kube, namespace, target.kserve)
    assert target.knative is not None  # Target's validator: exactly one of istio/knative/gatewayAPI/kserve
    knative = KnativeRouter(kube, namespace, target.knative)
    shadow = policy.spec.shadow
    if shadow is not None and shadow.mode is ShadowMode.istio and shadow.virtual_service is not None:
        return KnativeWithIstioMirror(knative, IstioRouter(kube, namespace, shadow.virtual_service))
    return knative
