"""Publishes output events to MQTT without ever holding up user traffic.

Requests only :meth:`EventPublisher.offer` an event: a non-blocking put into a
bounded queue, counted as dropped when full. One background task owns the
MQTT connection, publishes with QoS 1 (at least once: the pairer ignores
duplicates), and on any broker error disconnects, waits with capped,
jittered exponential backoff, and reconnects. A broker that accepts the TCP
connection but never answers is caught by the connect and publish timeouts.
An event whose publish failed is retried after the reconnect, up to
:data:`MAX_ATTEMPTS` times, so one poisoned message (say, larger than the
broker allows) cannot wedge the queue.

A broker that refuses the credentials (wrong password, unknown user, a client
certificate it does not trust) is logged once, at error level, and counted at
every attempt on ``shadowctl_tap_broker_refused_total``; the tap keeps serving
(events queue, then are dropped as ``queue_full``) and keeps retrying at the
longest backoff, so that fixed credentials (a restarted broker, a rotated
password file) apply without restarting the tap.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import uuid
from dataclasses import dataclass

import aiomqtt
import structlog

from shadowctl.aio import cancel_requested
from shadowctl.tap.metrics import TapMetrics

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 3
REFUSED_CODES = frozenset({4, 5, 134, 135})
"""MQTT v3.1.1 CONNACK codes and v5 reason codes that mean "bad user name or password" / "not authorized"."""


def refused(exc: aiomqtt.MqttError) -> bool:
    """Whether the broker refused the connection for its credentials (not a network fault)."""
    rc = getattr(exc, "rc", None)
    value = getattr(rc, "value", rc)
    return isinstance(value, int) and value in REFUSED_CODES


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where and how to connect."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    client_id: str | None = None
    timeout_s: float = 5.0
    keepalive_s: int = 30


class EventPublisher:
    """A bounded queue of (topic, payload) drained to the broker by :meth:`run`."""

    def __init__(
        self,
        broker: BrokerSettings,
        metrics: TapMetrics,
        *,
        queue_size: int = 10_000,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.broker = broker
        self.metrics = metrics
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=queue_size)
        self._client_id = broker.client_id or f"shadowctl-tap-{uuid.uuid4().hex[:12]}"
        self.connected = asyncio.Event()
        self._refusal_logged = False

    def offer(self, topic: str, payload: bytes) -> bool:
        """Queue an event without waiting; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait((topic, payload))
        except asyncio.QueueFull:
            self.metrics.events_dropped.labels("queue_full").inc()
            return False
        self.metrics.queue_depth.set(self._queue.qsize())
        return True

    @property
    def pending(self) -> int:
        """Events waiting in the queue."""
        return self._queue.qsize()

    async def run(self) -> None:
        """Publish forever (until cancelled), reconnecting with backoff."""
        backoff = self.backoff_initial_s
        item: tuple[str, bytes] | None = None
        attempts = 0
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    username=self.broker.username,
                    password=self.broker.password,
                    identifier=self._client_id,
                    tls_context=self.broker.tls,
                    timeout=self.broker.timeout_s,
                    keepalive=self.broker.keepalive_s,
                ) as client:
                    self.metrics.broker_connected.set(1)
                    self.connected.set()
                    backoff = self.backoff_initial_s
                    log.info("mqtt connected", host=self.broker.host, port=self.broker.port)
                    while True:
                        if item is None:
                            item = await self._queue.get()
                            self.metrics.queue_depth.set(self._queue.qsize())
                            attempts = 0
                        attempts += 1
                        await client.publish(item[0], item[1], qos=1, timeout=self.broker.timeout_s)
                        self.metrics.events_published.inc()
                        item = None
                        if cancel_requested():  # aiomqtt's wait_for returned instead of raising
                            raise asyncio.CancelledError
            except aiomqtt.MqttError as exc:
                if refused(exc):
                    self.metrics.broker_refused.inc()
                    if not self._refusal_logged:
                        self._refusal_logged = True
                        log.error("mqtt broker refused the credentials; requests are served, events are dropped "
                                  "until it accepts them (shadowctl_tap_broker_refused_total counts retries)",
                                  host=self.broker.host, port=self.broker.port, user=self.broker.username,
                                  error=str(exc))
                    backoff = self.backoff_max_s
                else:
                    log.warning("mqtt unavailable; retrying", error=str(exc), retry_in_s=round(backoff, 3))
            except OSError as exc:  # TLS and socket errors paho does not wrap
                log.warning("mqtt connection failed; retrying", error=str(exc), retry_in_s=round(backoff, 3))
            self.metrics.broker_connected.set(0)
            self.connected.clear()
            if item is not None and attempts >= MAX_ATTEMPTS:
                self.metrics.events_dropped.labels("publish_failed").inc()
                item = None
            if cancel_requested():
                raise asyncio.CancelledError
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(self.backoff_max_s, backoff * 2)

    def drop_remaining(self) -> int:
        """Count what is still queued as dropped at shutdown; return how many."""
        n = self._queue.qsize()
        if n:
            self.metrics.events_dropped.labels("shutdown").inc(n)
        while not self._queue.empty():
            self._queue.get_nowait()
        return n
