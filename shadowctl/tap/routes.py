"""The tap's side of the tap-router channel: follow one policy's route setting, apply it, report it.

``shadowctl tap --route-policy NAMESPACE/NAME`` makes the tap a router: the controller publishes a
retained :class:`~shadowctl.compare.routing.RouteSetting` on ``shadowctl/route/<ns>/<policy>``; a
:class:`RouteFollower` in every worker process subscribes to it with its own MQTT connection (so each
process applies a new setting as the broker delivers it, well within a second, with no hand-over
between processes), keeps what it routes by in :attr:`RouteFollower.current` (read by the proxy on
every request), and reports it, retained, on ``shadowctl/route-applied/<ns>/<policy>/<tap-id>``:
at once after every change, again every :data:`REPORT_EVERY_S` seconds (the controller's liveness
signal), and through a will message (``state: gone``) that the broker publishes if the connection
dies; a tap that stops cleanly says ``gone`` itself.

The fallback rule is :func:`shadowctl.compare.routing.effective`: no setting, a setting whose
``issuedAt`` is older than 3 x its ``intervalSeconds`` (the controller stopped renewing it, or this tap
lost the broker), or a payload it does not understand, and the tap routes primary-only. The clock is
checked every :data:`CHECK_EVERY_S`, so a setting that goes stale while the broker is silent or
unreachable still falls back on time. What the tap does is also on ``/metrics``
(``shadowctl_tap_route_*``).

While the setting has a shadow budget or a resent baseline, the report also carries what this process's
copies did since it applied the setting's generation (:class:`CopyTally`: sent, failed, skipped by the budget
or the queue back-off, ...), so the controller can say in the verdict how many copies the budget let through
(summed over the taps: :func:`shadowctl.compare.routing.copies_of`). The counts start at 0 with every new
generation and with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable

import aiomqtt
import structlog

from shadowctl.aio import cancel_requested
from shadowctl.compare.routing import (
    PRIMARY_ONLY_NONE,
    AppliedReport,
    AppliedState,
    CopyCounts,
    CopyOutcomes,
    Effective,
    MalformedRouteMessage,
    RouteSetting,
    applied_topic,
    effective,
    parse_setting,
    reports_copies,
    rfc3339,
    route_topic,
)
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.publisher import BrokerSettings

log = structlog.get_logger(__name__)

REPORT_EVERY_S = 5.0
"""How often a tap republishes its report (the controller counts a tap alive for 3 analysis intervals)."""
CHECK_EVERY_S = 0.2
"""How often the staleness of the setting is checked."""


COPY_KINDS = ("mirror", "baseline")
COPY_OUTCOMES = tuple(CopyOutcomes.model_fields)
"""sent, failed, skipped_budget, skipped_queue, dropped_in_flight_cap, not_rewritable."""


class CopyTally:
    """This process's copies by kind (``mirror``, ``baseline``) and outcome since the generation it applies."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts = {kind: dict.fromkeys(COPY_OUTCOMES, 0) for kind in COPY_KINDS}

    def count(self, kind: str, outcome: str) -> None:
        """One copy of `kind` ended with `outcome` (an outcome the report does not carry is ignored)."""
        counts = self._counts[kind]
        if outcome in counts:
            counts[outcome] += 1

    def reset(self) -> None:
        for counts in self._counts.values():
            for outcome in counts:
                counts[outcome] = 0

    def snapshot(self) -> CopyCounts:
        return CopyCounts(mirror=CopyOutcomes(**self._counts["mirror"]),
                          baseline=CopyOutcomes(**self._counts["baseline"]))


class RouteFollower:
    """Follows one policy's route setting over MQTT for this process; ``current`` is what to route by."""

    def __init__(self, broker: BrokerSettings, namespace: str, policy: str, tap_id: str, metrics: TapMetrics, *,
                 own_candidate_url: bool = False, clock: Callable[[], float] = time.time,
                 report_every_s: float = REPORT_EVERY_S,
                 backoff_initial_s: float = 0.1, backoff_max_s: float = 5.0) -> None:
        self.broker = broker
        self.namespace = namespace
        self.policy = policy
        self.tap_id = tap_id
        self.own_candidate_url = own_candidate_url
        """The tap has its own candidate URL (--mirror-to): a setting without one can still be applied."""
        self.metrics = metrics
        self.clock = clock
        self.report_every_s = report_every_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.topic = route_topic(namespace, policy)
        self.report_topic = applied_topic(namespace, policy, tap_id)
        self.current: Effective = PRIMARY_ONLY_NONE
        self.applied_at: float | None = None
        self.copies = CopyTally()
        """What this process's copies did since it applied the current generation (counted by the proxy)."""
        self._setting: RouteSetting | None = None
        self._invalid = False
        self._client: aiomqtt.Client | None = None
        self._reported: Effective | None = None
        self._client_id = f"shadowctl-tap-route-{uuid.uuid4().hex[:12]}"
        self.connected = asyncio.Event()
        self._show(self.current)

    # ------------------------------------------------------------------ the rule

    def refresh(self) -> bool:
        """Recompute ``current`` from the setting held and the clock; True when it changed."""
        new = effective(self._setting, self.clock(), invalid=self._invalid)
        if new == self.current:
            return False
        old, self.current = self.current, new
        self.applied_at = self.clock()
        if new.generation != old.generation or new.state is not old.state:
            self.copies.reset()
        self._show(new)
        log.info("tap.route_applied" if new.state is AppliedState.applied else "tap.route_fallback",
                 policy=f"{self.namespace}/{self.policy}", tap=self.tap_id, generation=new.generation,
                 mirror_percent=new.mirror_percent, candidate_percent=new.candidate_percent,
                 reason=new.reason.value if new.reason else None,
                 was=old.generation if old.state is AppliedState.applied else (old.reason.value if old.reason else None))
        return True

    def receive(self, payload: bytes) -> bool:
        """A message on the route topic (retained or live); True when what the tap routes by changed."""
        if not payload:  # the retained setting was cleared
            self._setting, self._invalid = None, False
        else:
            try:
                setting = parse_setting(payload)
                if setting.routes_to_candidate and setting.candidate_url is None and not self.own_candidate_url \
                        and setting.rewrite is None:  # a rewrite without a URL: this tap's own upstream
                    raise MalformedRouteMessage("the setting routes to the candidate but gives no candidateURL, "
                                                "and this tap has no --mirror-to")
                self._setting, self._invalid = setting, False
            except MalformedRouteMessage as exc:
                log.warning("tap.route_setting_invalid", topic=self.topic, error=str(exc))
                self._setting, self._invalid = None, True
        return self.refresh()

    def report(self, state: AppliedState | None = None) -> AppliedReport:
        """The report of what this tap does (``state``: override, e.g. ``gone``)."""
        cur = self.current
        now = self.clock()
        if state is AppliedState.gone:
            return AppliedReport(tap=self.tap_id, state=AppliedState.gone, reported_at=rfc3339(now))
        return AppliedReport(
            tap=self.tap_id, state=cur.state, generation=cur.generation, mirror_percent=cur.mirror_percent,
            candidate_percent=cur.candidate_percent, reason=cur.reason,
            applied_at=rfc3339(self.applied_at) if self.applied_at is not None else None, reported_at=rfc3339(now),
            copies=self.copies.snapshot() if reports_copies(cur) else None)

    def _show(self, cur: Effective) -> None:
        m = self.metrics
        m.route_generation.set(cur.generation or 0)
        m.route_mirror_percent.set(cur.mirror_percent or 0.0)
        m.route_candidate_percent.set(cur.candidate_percent)
        for reason in m.route_fallback_reasons:
            m.route_fallback.labels(reason).set(1 if cur.reason is not None and cur.reason.value == reason else 0)

    # ------------------------------------------------------------------ I/O

    async def run(self) -> None:
        """Follow and report forever (until cancelled), reconnecting with backoff."""
        backoff = self.backoff_initial_s
        checker = asyncio.create_task(self._check_periodically())
        try:
            while True:
                gone = self.report(AppliedState.gone).to_json()
                try:
                    async with aiomqtt.Client(
                        self.broker.host, self.broker.port, username=self.broker.username,
                        password=self.broker.password, identifier=self._client_id, tls_context=self.broker.tls,
                        timeout=self.broker.timeout_s, keepalive=self.broker.keepalive_s,
                        will=aiomqtt.Will(self.report_topic, gone, qos=1, retain=True),
                    ) as client:
                        self._client = client
                        self._reported = None
                        await client.subscribe(self.topic, qos=1)
                        self.connected.set()
                        self.metrics.route_broker_connected.set(1)
                        backoff = self.backoff_initial_s
                        log.info("tap.route_subscribed", topic=self.topic, tap=self.tap_id)
                        await self._publish_report()
                        reporter = asyncio.create_task(self._report_periodically())
                        try:
                            async for message in client.messages:
                                payload = message.payload if isinstance(message.payload, bytes) else b""
                                if self.receive(payload):
                                    await self._publish_report()
                                if cancel_requested():
                                    raise asyncio.CancelledError
                        finally:
                            reporter.cancel()
                            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                                await reporter
                except (aiomqtt.MqttError, OSError) as exc:
                    log.warning("tap.route_broker_unavailable", error=str(exc), retry_in_s=round(backoff, 3))
                finally:
                    self._client = None
                    self.connected.clear()
                    self.metrics.route_broker_connected.set(0)
                if cancel_requested():
                    raise asyncio.CancelledError
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(self.backoff_max_s, backoff * 2)
        finally:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker

    async def say_gone(self, timeout_s: float = 2.0) -> None:
        """Publish ``state: gone`` (retained) before a clean stop: a clean disconnect sends no will."""
        client = self._client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                await client.publish(self.report_topic, self.report(AppliedState.gone).to_json(), qos=1, retain=True)

    async def _publish_report(self) -> None:
        client = self._client
        if client is None:
            return
        await client.publish(self.report_topic, self.report().to_json(), qos=1, retain=True,
                             timeout=self.broker.timeout_s)
        self._reported = self.current

    async def _report_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.report_every_s)
            await self._publish_report()

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            if self.refresh() or (self._reported is not None and self._reported != self.current):
                with contextlib.suppress(aiomqtt.MqttError, OSError):
                    await self._publish_report()
