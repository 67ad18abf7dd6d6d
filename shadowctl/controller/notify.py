"""Telling people: Kubernetes Events, the MQTT events topic, webhooks; and the confirm-promotion gate.

Notifications never fail a tick: each channel has a timeout and bounded
retries, and a channel that still fails is logged and counted. The gate is the
opposite: a confirm-promotion webhook that fails, times out or answers
anything but 2xx *closes* the gate (a promotion waits; it never passes by
default).

MQTT event schema (topic ``spec.notifications.mqtt.topic``, default
``shadowctl/events/<namespace>/<name>``), one JSON object per transition::

    {"schema": "shadowctl.dev/event/v1", "policy": "ns/name", "reason": "Progressing",
     "message": "...", "type": "Normal" | "Warning", "phase": "...", "step": 1,
     "weight": 10, "mirrorPercent": null, "candidate": "...", "at": "RFC 3339"}

Webhook payloads are the same object, POSTed as JSON.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from shadowctl.controller.clock import Clock, iso
from shadowctl.kube import KubeClient, KubeError
from shadowctl.machine import Notify, RolloutState
from shadowctl.policy.model import ShadowPolicy, Webhook, WebhookType

log = structlog.get_logger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]
"""Publish a payload to an MQTT topic (the adapter wraps aiomqtt; it must not raise)."""

EVENT_SCHEMA = "shadowctl.dev/event/v1"


def event_payload(policy: ShadowPolicy, note: Notify, state: RolloutState, now: float) -> dict[str, Any]:
    return {
        "schema": EVENT_SCHEMA,
        "policy": policy.key,
        "reason": note.reason,
        "message": note.message,
        "type": "Warning" if note.warning else "Normal",
        "phase": state.phase.value,
        "step": None if state.step is None else state.step + 1,
        "weight": state.weight,
        "mirrorPercent": state.mirror_percent,
        "candidate": state.candidate,
        "at": iso(now),
    }


def events_topic(policy: ShadowPolicy) -> str | None:
    mqtt = policy.spec.notifications.mqtt
    if mqtt is None:
        return None
    return mqtt.topic.replace("{namespace}", policy.metadata.namespace).replace("{name}", policy.metadata.name)


class WebhookPort(Protocol):
    """POST a payload to a webhook (the adapter: :class:`shadowctl.webhooks.HttpWebhooks`)."""

    async def post(self, hook: Webhook, payload: dict[str, Any], *, namespace: str | None = None) -> int | None:
        """The status code of the answer after the hook's retries (below 500), None if none came; never raises.

        ``namespace``: the policy's, where the hook's ``signingSecret`` is read."""
        ...


class ClusterNotifier:
    """Kubernetes Events, MQTT events and event webhooks for every transition."""

    def __init__(self, kube: KubeClient | None, clock: Clock, webhooks: WebhookPort | None = None,
                 publish: Publish | None = None) -> None:
        self.kube = kube
        self.clock = clock
        self.webhooks = webhooks
        self.publish = publish
        self.failures = 0

    async def notify(self, obj: dict[str, Any], policy: ShadowPolicy, note: Notify, state: RolloutState) -> None:
        payload = event_payload(policy, note, state, self.clock.now())
        tasks: list[Awaitable[None]] = []
        if self.kube is not None:
            tasks.append(self._event(obj, note))
        topic = events_topic(policy)
        if topic is not None and self.publish is not None:
            tasks.append(self.publish(topic, json.dumps(payload).encode()))
        if self.webhooks is not None:
            for hook in policy.spec.notifications.webhooks:
                if hook.type is WebhookType.event:
                    tasks.append(self._hook(hook, payload, policy.metadata.namespace))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                self.failures += 1
                log.warning("notify.failed", policy=policy.key, error=str(r))

    async def _event(self, obj: dict[str, Any], note: Notify) -> None:
        assert self.kube is not None
        try:
            await self.kube.create_event(obj, reason=note.reason, message=note.message,
                                         type="Warning" if note.warning else "Normal")
        except KubeError as exc:
            self.failures += 1
            log.warning("event.failed", reason=note.reason, error=str(exc))

    async def _hook(self, hook: Webhook, payload: dict[str, Any], namespace: str) -> None:
        assert self.webhooks is not None
        if await self.webhooks.post(hook, payload, namespace=namespace) is None:
            self.failures += 1


class WebhookGate:
    """Confirm-promotion webhooks: every one must answer 2xx; any failure holds the promotion."""

    def __init__(self, webhooks: WebhookPort, clock: Clock) -> None:
        self.webhooks = webhooks
        self.clock = clock

    async def check(self, policy: ShadowPolicy, state: RolloutState) -> bool | None:
        hooks = [h for h in policy.spec.notifications.webhooks if h.type is WebhookType.confirm_promotion]
        if not hooks:
            return None
        payload = event_payload(policy, Notify("ConfirmPromotion", "may the candidate be promoted?"), state,
                                self.clock.now())
        for hook in hooks:
            status = await self.webhooks.post(hook, payload, namespace=policy.metadata.namespace)
            if status is None or not 200 <= status < 300:
                log.info("gate.closed", policy=policy.key, webhook=hook.name, status=status)
                return False
        return True
