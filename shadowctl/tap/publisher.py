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
password file) apply without restarting the tap. Why a certificate refusal needs
paho's own log: under TLS 1.3 the client's handshake is done before the broker
checks the client certificate, so a broker that wants one (Mosquitto's
``require_certificate true``) answers with a TLS alert on the first read, which
paho only logs, and aiomqtt reports as a connect timeout; each connection's
paho log is read for that alert (:class:`_PahoLog`). The reason of the last
failure is kept as a value, :attr:`EventPublisher.last_error`.

The password may come from a provider called at every connect
(:attr:`BrokerSettings.password_provider`, e.g. :func:`file_password`: a
mounted Secret the kubelet updates), so a rotated password applies at the
next reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import structlog

from shadowctl.aio import cancel_requested
from shadowctl.errors import ShadowctlError
from shadowctl.tap.metrics import TapMetrics

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 3
REFUSED_CODES = frozenset({4, 5, 134, 135})
"""MQTT v3.1.1 CONNACK codes and v5 reason codes that mean "bad user name or password" / "not authorized"."""


_TLS_REFUSAL = re.compile(r"ALERT_(CERTIFICATE_REQUIRED|BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_UNKNOWN|"
                         r"CERTIFICATE_EXPIRED|CERTIFICATE_REVOKED|ACCESS_DENIED|HANDSHAKE_FAILURE)", re.IGNORECASE)
"""The TLS alerts by which a broker refuses a client certificate (missing, untrusted, expired, revoked)."""


class PublisherError(ShadowctlError):
    """Events cannot be published now (held as :attr:`EventPublisher.last_error`; the publisher retries)."""


class PublisherRefused(PublisherError):
    """The broker refused the publisher's user name and password, or its client certificate (or the lack of one)."""


def refused(exc: aiomqtt.MqttError) -> bool:
    """Whether the broker refused the connection for its credentials (not a network fault)."""
    rc = getattr(exc, "rc", None)
    value = getattr(rc, "value", rc)
    return isinstance(value, int) and value in REFUSED_CODES


def tls_refusal(text: str) -> str | None:
    """The TLS alert in ``text`` by which a broker refused the client certificate, if any (e.g. CERTIFICATE_REQUIRED)."""
    found = _TLS_REFUSAL.search(text)
    return found.group(1).upper() if found else None


def client_tls(ca_file: str | None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """A client TLS context trusting ``ca_file`` (the system's CAs without one) and presenting ``cert_file`` with
    ``key_file`` (mutual TLS) when given; OSError or ssl.SSLError when a file does not load."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def file_password(path: str, option: str) -> Callable[[], Awaitable[str]]:
    """A password provider reading ``path`` at every connect (surrounding whitespace removed; a mounted Secret
    that the kubelet updates applies at the next reconnect); PublisherError naming ``option`` when unreadable."""

    async def read() -> str:
        try:
            text = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise PublisherError(f"{option} {path}: cannot read the password: {reason}") from None
        return text.strip()

    return read


class _PahoLog(logging.Handler):
    """paho's log lines of one connection: the last error (a TLS alert shows only there), everything passed on
    to the ``mqtt`` logger as before."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last_error: str | None = None
        self.logger = logging.Logger(f"mqtt.{uuid.uuid4().hex[:8]}")  # not registered: one per connection
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.last_error = record.getMessage()
        logging.getLogger("mqtt").handle(record)


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
    password_provider: Callable[[], Awaitable[str]] | None = None
    """Called at every connect; overrides ``password`` (raises PublisherError when it has none)."""


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
        self.last_error: PublisherError | None = None
        """Why the last connection failed or was refused (None once connected); never holds a password."""

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
        where = f"mqtt broker {self.broker.host}:{self.broker.port}"
        while True:
            paho = _PahoLog()
            try:
                password = self.broker.password
                if self.broker.password_provider is not None:
                    password = await self.broker.password_provider()
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    username=self.broker.username,
                    password=password,
                    identifier=self._client_id,
                    tls_context=self.broker.tls,
                    timeout=self.broker.timeout_s,
                    keepalive=self.broker.keepalive_s,
                    logger=paho.logger,
                ) as client:
                    self.metrics.broker_connected.set(1)
                    self.connected.set()
                    self.last_error = None
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
            except PublisherError as exc:  # the password provider has none
                self.last_error = exc
                log.warning("mqtt publisher has no password; retrying", error=str(exc), retry_in_s=round(backoff, 3))
            except (aiomqtt.MqttError, OSError) as exc:  # OSError: TLS and socket errors paho does not wrap
                alert = tls_refusal(f"{exc} {paho.last_error or ''}")
                if isinstance(exc, aiomqtt.MqttError) and refused(exc):
                    self._refused(PublisherRefused(
                        f"{where} refused the credentials of user {self.broker.username!r}: {exc}"))
                    backoff = self.backoff_max_s
                elif alert is not None:
                    self._refused(PublisherRefused(
                        f"{where} refused the TLS client certificate (TLS alert {alert}): it needs one signed by a "
                        "CA it trusts (the tap's --mqtt-cert and --mqtt-key)"))
                    backoff = self.backoff_max_s
                else:
                    reason = f"{exc}" + (f" ({paho.last_error})" if paho.last_error else "")
                    self.last_error = PublisherError(f"{where}: {reason}")
                    log.warning("mqtt unavailable; retrying", error=reason, retry_in_s=round(backoff, 3))
            self.metrics.broker_connected.set(0)
            self.connected.clear()
            if item is not None and attempts >= MAX_ATTEMPTS:
                self.metrics.events_dropped.labels("publish_failed").inc()
                item = None
            if cancel_requested():
                raise asyncio.CancelledError
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(self.backoff_max_s, backoff * 2)

    def _refused(self, error: PublisherRefused) -> None:
        """Count a refusal at every attempt; log the first one (error level)."""
        self.last_error = error
        self.metrics.broker_refused.inc()
        if not self._refusal_logged:
            self._refusal_logged = True
            log.error("mqtt broker refused the credentials; requests are served, events are dropped "
                      "until it accepts them (shadowctl_tap_broker_refused_total counts retries)",
                      host=self.broker.host, port=self.broker.port, user=self.broker.username, error=str(error))

    def drop_remaining(self) -> int:
        """Count what is still queued as dropped at shutdown; return how many."""
        n = self._queue.qsize()
        if n:
            self.metrics.events_dropped.labels("shutdown").inc(n)
        while not self._queue.empty():
            self._queue.get_nowait()
        return n
