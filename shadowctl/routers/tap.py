"""The tap as a router: route settings to the taps over MQTT, and what they report back.

For a target without a mirror API (KServe; Knative without a VirtualService in front) the
``shadowctl tap`` in front of the primary mirrors, and can also send a share of live requests to
the candidate. The controller tells it how through one retained message per policy on
``shadowctl/route/<namespace>/<policy>`` and reads what each tap (each worker process) reports,
retained, on ``shadowctl/route-applied/<namespace>/<policy>/<tap>``; wire format and rules:
:mod:`shadowctl.compare.routing`.

Why a step counts as reached only once the taps say so: unlike an API object, a message published
is not a route applied. :meth:`TapRouter.apply` publishes the setting, then waits up to
``confirm_timeout_s`` until every tap that counts (reported within the last 3 analysis intervals
and not gone; at least one) reports that generation as applied. If one does not (it is down, cut
off, behind, or in fallback), apply raises :class:`NotConfirmed`: the reconciler records nothing new
and holds. A setting that gave the candidate more than the one it replaced (more mirror, or a larger
live share) is first put back, so the taps that did apply it do not keep routing beyond the step the
status records. A setting that gives the candidate less (a rollback, the end of the shadow phase)
stays published: less is always safe. Primary-only with no tap counted at all is confirmed: a tap
not heard from for 3 intervals has a setting at least that old, so it already routes primary-only
by its own fallback rule.

Generations grow with every change of the setting: the next one is above both the retained
setting's and every generation a tap reports, so a controller that restarted, or a broker that lost
its retained messages, never reuses one. :meth:`TapRouter.read` also renews the retained setting's
``issuedAt`` (the heartbeat that keeps taps from falling back); the controller reads every tick of
an analysed phase.

Each call opens its own short MQTT session (connect, subscribe, read the retained messages, act,
disconnect): no connection state outlives a tick, so a new leader or a restarted controller reads
exactly what the broker holds. The end of the retained messages is found with a barrier: after
subscribing, the session publishes a (non-retained) probe to its own ``.../sync/<id>`` topic under
the policy's route topic; the broker handles one client's packets in order, so the probe comes back
after the retained messages of the subscriptions made before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import aiomqtt
import structlog

from shadowctl.compare.routing import (
    ROUTE_SCHEMA,
    ROUTE_SCHEMA_V2,
    ROUTE_SCHEMA_V3,
    AppliedReport,
    Budget,
    MalformedRouteMessage,
    Rewrite,
    RouteSetting,
    TapCopies,
    Verification,
    applied_filter,
    copies_of,
    make_setting,
    parse_report,
    parse_setting,
    rfc3339,
    route_topic,
    verify,
)
from shadowctl.errors import ShadowctlError
from shadowctl.routers import _io
from shadowctl.routers.base import ApplyResult, Capabilities, Router, RouterError, RouteState, Unsupported

log = structlog.get_logger(__name__)

TAP_CAPABILITIES = Capabilities(can_mirror=True, can_split=True, weight_step=1, mirror_resolution=0.0001,
                                has_promote=True)
"""The tap mirrors and splits by a hash of the request id (or of the user): 1,000,000 buckets. Its promote
publishes a ``final`` setting (no expiry), which apply(0/100) does not."""

CONFIRM_TIMEOUT_S = 5.0
"""How long apply waits for the taps' reports (a tap applies a setting within a second)."""


class NotConfirmed(RouterError):
    """The taps did not all report the route setting as applied (a tap down, cut off, behind, or in fallback;
    or no tap at all): the rollout holds; nothing is counted as reached."""


class ChannelUnavailable(RouterError):
    """The broker of the tap-router channel cannot be reached, or refused the connection or a subscription."""


@dataclass(frozen=True)
class ChannelSettings:
    """Where the controller's broker is and how to log in (the policy's outputs broker, same credentials)."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    password_provider: Callable[[], Awaitable[str]] | None = None
    """Read at every session (a rotated Secret applies); overrides ``password``."""
    tls: ssl.SSLContext | None = None
    tls_provider: Callable[[], Awaitable[ssl.SSLContext]] | None = None
    """Read at every session (a CA and client certificate from Secrets); overrides ``tls``."""
    timeout_s: float = 5.0


class _Session:
    """One connection: the policy's retained setting and the taps' reports, kept current as they arrive."""

    def __init__(self, client: aiomqtt.Client, namespace: str, policy: str, timeout_s: float) -> None:
        self.client = client
        self.topic = route_topic(namespace, policy)
        self.reports_filter = applied_filter(namespace, policy)
        self.sync_topic = f"{self.topic}/sync/{uuid.uuid4().hex[:12]}"
        self.timeout_s = timeout_s
        self.setting: RouteSetting | None = None
        self.setting_invalid: str | None = None
        self.reports: dict[str, AppliedReport] = {}
        self.changed = asyncio.Event()
        self._synced = asyncio.Event()

    async def start(self) -> None:
        for topic in (self.topic, self.reports_filter, self.sync_topic):
            await self.client.subscribe(topic, qos=1, timeout=self.timeout_s)

    async def pump(self) -> None:
        async for message in self.client.messages:
            topic = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if topic == self.sync_topic:
                self._synced.set()
            elif topic == self.topic:
                self._take_setting(payload)
            else:
                self._take_report(topic, payload)
            self.changed.set()

    def _take_setting(self, payload: bytes) -> None:
        if not payload:
            self.setting, self.setting_invalid = None, None
            return
        try:
            self.setting, self.setting_invalid = parse_setting(payload), None
        except MalformedRouteMessage as exc:
            self.setting, self.setting_invalid = None, str(exc)

    def _take_report(self, topic: str, payload: bytes) -> None:
        tap = topic.rpartition("/")[2]
        if not payload:
            self.reports.pop(tap, None)
            return
        try:
            report = parse_report(payload)
        except MalformedRouteMessage as exc:
            log.warning("tap_router.report_invalid", topic=topic, error=str(exc))
            self.reports.pop(tap, None)
            return
        self.reports[tap] = report

    async def sync(self) -> None:
        """Return once every retained message of the subscriptions has been received."""
        self._synced.clear()
        await self.client.publish(self.sync_topic, b"", qos=1, timeout=self.timeout_s)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._synced.wait()
        except TimeoutError as exc:
            raise ChannelUnavailable(f"the broker did not echo the probe on {self.sync_topic} within "
                                     f"{self.timeout_s:g}s") from exc

    async def publish(self, setting: RouteSetting) -> None:
        await self.client.publish(self.topic, setting.to_json(), qos=1, retain=True, timeout=self.timeout_s)

    async def until(self, check: Callable[[], Verification], timeout_s: float) -> Verification:
        """Wait until ``check()`` is ok, at most `timeout_s`; the last verification either way."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            self.changed.clear()
            result = check()
            left = deadline - loop.time()
            if result.ok or left <= 0:
                return result
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):  # also re-checks as reports age
                    await self.changed.wait()


class TapChannel:
    """Short MQTT sessions on one policy's route topics (see the module docstring)."""

    def __init__(self, settings: ChannelSettings, namespace: str, policy: str) -> None:
        self.settings = settings
        self.namespace = namespace
        self.policy = policy

    @property
    def where(self) -> str:
        return f"mqtt broker {self.settings.host}:{self.settings.port}"

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[_Session]:
        s = self.settings
        try:
            password = await s.password_provider() if s.password_provider is not None else s.password
            tls = await s.tls_provider() if s.tls_provider is not None else s.tls
        except (ShadowctlError, OSError, ssl.SSLError) as exc:  # a Secret that cannot be read, a bad certificate
            raise ChannelUnavailable(f"{self.where}: cannot read its credentials: {exc}") from exc
        pump: asyncio.Task[None] | None = None
        try:
            async with aiomqtt.Client(s.host, s.port, username=s.username, password=password, tls_context=tls,
                                      identifier=f"shadowctl-route-{uuid.uuid4().hex[:12]}",
                                      timeout=s.timeout_s, keepalive=30) as client:
                session = _Session(client, self.namespace, self.policy, s.timeout_s)
                pump = asyncio.create_task(session.pump())
                await session.start()
                await session.sync()
                try:
                    yield session
                finally:
                    pump.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await pump
        except (aiomqtt.MqttError, OSError) as exc:
            raise ChannelUnavailable(f"{self.where}: {exc}") from exc


CandidateURL = Callable[[], Awaitable[str | None]]
"""Where the candidate's requests go, found when a setting needs it (e.g. the Knative candidate tag's URL)."""


@runtime_checkable
class CandidateAddress(Protocol):
    """A split router that knows the candidate's URL (Knative: its tag's URL; KServe: the latest revision's)."""

    async def candidate_url(self) -> str | None:
        """The candidate's base URL, or None where it has none yet."""
        ...


@dataclass(frozen=True)
class CandidateShape:
    """What a policy's settings say besides the shares (route setting v2): the candidate as a rewrite of the
    request, the live share chosen per user, and, while mirroring, the noise baseline's resent share, the
    shadow budget and the sampling fraction (v3). The default (nothing) gives v1 settings."""

    rewrite: Rewrite | None = None
    sticky: bool = False
    user_header: str | None = None
    baseline_percent: float | None = None
    budget: Budget | None = None
    sample_fraction: float | None = None
    """The share of requests whose output events the taps publish (route setting v3); None: their own --sample."""


ShapeSource = Callable[[], Awaitable[CandidateShape]]
"""Finds the shape when a setting is computed (a prompt rewrite's texts are read from ConfigMaps then);
raises RouterError saying why it cannot."""


def setting_for(desired: RouteState, *, policy: str, generation: int, candidate_url: str | None, issued_at: float,
                interval_seconds: float, shape: CandidateShape = CandidateShape(),
                final: bool = False) -> RouteSetting:
    """The route setting for `desired` (pure): v1 unless `shape` or `final` need v2. The rewrite and the
    stickiness are carried only while the setting routes to the candidate (primary-only is plain v1, which
    every tap understands, so a rollback is never refused for its form); the baseline and the budget only
    while it mirrors (they are about copies), and so the sampling fraction (pairs exist only while it mirrors: a
    canary step's setting stays v1/v2 and needs no v3 tap)."""
    needs_url = desired.mirror_percent is not None or desired.candidate_weight > 0
    mirrors = desired.mirror_percent is not None
    return make_setting(policy=policy, generation=generation, mirror_percent=desired.mirror_percent,
                        candidate_percent=desired.candidate_weight,
                        candidate_url=candidate_url if needs_url else None,
                        issued_at=rfc3339(issued_at), interval_seconds=interval_seconds,
                        rewrite=shape.rewrite if needs_url else None, sticky=shape.sticky and needs_url,
                        user_header=shape.user_header if needs_url and shape.sticky else None,
                        final=final and needs_url, baseline_percent=shape.baseline_percent if mirrors else None,
                        budget=shape.budget if mirrors else None,
                        sample_fraction=shape.sample_fraction if mirrors else None)


def _shape_of(setting: RouteSetting) -> CandidateShape:
    """The shape a published setting carries (to put it back as it was)."""
    return CandidateShape(rewrite=setting.rewrite, sticky=setting.sticky, user_header=setting.user_header,
                          baseline_percent=setting.baseline_percent, budget=setting.budget,
                          sample_fraction=setting.sample_fraction)


def next_generation(previous: RouteSetting | None, reports: dict[str, AppliedReport]) -> int:
    """Above the retained setting's and every generation a tap reports (pure)."""
    seen = [r.generation for r in reports.values() if r.generation is not None]
    if previous is not None:
        seen.append(previous.generation)
    return max(seen, default=0) + 1


def gives_more(new: RouteSetting, old: RouteSetting | None) -> bool:
    """Whether `new` sends the candidate more than `old` does (more mirror or a larger live share)."""
    old_mirror = old.mirror_percent if old is not None else None
    old_share = old.candidate_percent if old is not None else 0
    return new.candidate_percent > old_share or (new.mirror_percent or 0.0) > (old_mirror or 0.0)


def state_of(setting: RouteSetting | None) -> RouteState:
    """The RouteState a setting stands for (no setting: primary-only, the taps' fallback)."""
    if setting is None:
        return RouteState.primary_only()
    owned = {"generation": setting.generation} if setting.mirror_percent is not None or setting.candidate_percent \
        else None
    return RouteState(100 - setting.candidate_percent, setting.candidate_percent, setting.mirror_percent,
                      resource_version=str(setting.generation), owned=owned)


class TapRouter:
    """Routes one policy's traffic through the taps in front of its primary (see the module docstring)."""

    def __init__(self, channel: TapChannel | None, namespace: str, policy: str, interval_seconds: float,
                 candidate_url: CandidateURL | None = None, *, confirm_timeout_s: float = CONFIRM_TIMEOUT_S,
                 clock: Callable[[], float] = time.time, missing: str = "",
                 shape: CandidateShape = CandidateShape(), shape_of: ShapeSource | None = None,
                 sampling: Callable[[], float | None] | None = None) -> None:
        """`channel` None: the controller has no broker for this policy; every call raises Unsupported
        saying `missing`. `shape`: a rewrite and per-user stickiness (``spec.target.tap``), carried by every
        setting that routes to the candidate; `shape_of`: found anew for every setting computed instead (a
        prompt rewrite: the ConfigMaps are read then). `sampling`: the sampling fraction wanted now (the adaptive
        target's, controller.sampling), overriding the shape's; :meth:`read` publishes a new generation when
        it differs from the retained setting's while that mirrors."""
        self.channel = channel
        self.namespace = namespace
        self.policy = policy
        self.key = f"{namespace}/{policy}"
        self.interval_seconds = interval_seconds
        self.candidate_url = candidate_url
        self.confirm_timeout_s = confirm_timeout_s
        self.clock = clock
        self.missing = missing
        self.shape = shape
        self.shape_of = shape_of
        self.sampling = sampling
        self.what = f"route setting {route_topic(namespace, policy)}"
        self._copies: TapCopies | None = None

    @property
    def capabilities(self) -> Capabilities:
        return TAP_CAPABILITIES

    def copies(self) -> TapCopies | None:
        """What the counted taps' copies did under the setting of the last read or apply (summed; see
        :func:`~shadowctl.compare.routing.copies_of`)."""
        return self._copies

    def _channel(self) -> TapChannel:
        if self.channel is None:
            raise Unsupported(self.missing or f"{self.key}: the controller has no MQTT channel to the taps")
        return self.channel

    def _verify(self, session: _Session, setting: RouteSetting) -> Verification:
        """:func:`~shadowctl.compare.routing.verify`, except that primary-only with no tap counted is
        confirmed (a tap not heard from for 3 intervals falls back to primary-only by itself)."""
        result = verify(setting, session.reports, self.clock())
        if not result.ok and not result.counted and setting.mirror_percent is None and not setting.candidate_percent:
            return Verification(ok=True)
        return result

    async def read(self) -> RouteState:
        """What the taps apply, once every counted tap reports the retained setting (else NotConfirmed); renews
        the setting's ``issuedAt``. No setting at all: primary-only (what every tap then does)."""
        async with self._channel().session() as session:
            setting = session.setting
            if setting is None:
                if session.setting_invalid:
                    raise NotConfirmed(f"{self.what} holds a payload the taps cannot read "
                                       f"({session.setting_invalid}); they route primary-only")
                return RouteState.primary_only()
            try:
                await _io.check_fence(self.what)
            except _io.Superseded as exc:
                log.info("tap_router.heartbeat_skipped", policy=self.key, reason=str(exc))
            else:
                setting = self._resampled(setting, session) or setting.model_copy(
                    update={"issued_at": rfc3339(self.clock())})
                await session.publish(setting)
            result = await session.until(lambda: self._verify(session, setting), self.confirm_timeout_s)
            if not result.ok:
                raise NotConfirmed(result.problem or "not applied")
            self._copies = copies_of(setting, session.reports, self.clock())
            return state_of(setting)

    def _sample_fraction(self, shape: CandidateShape) -> CandidateShape:
        if self.sampling is None:
            return shape
        return dataclasses.replace(shape, sample_fraction=self.sampling())

    def _resampled(self, setting: RouteSetting, session: _Session) -> RouteSetting | None:
        """The retained setting with the sampling fraction wanted now, as a new generation (None: unchanged, or
        the setting does not mirror: there are no pairs to sample)."""
        if setting.mirror_percent is None:
            return None
        wanted = self.sampling() if self.sampling is not None else self.shape.sample_fraction
        if wanted == setting.sample_fraction:
            return None
        schema = ROUTE_SCHEMA_V3 if wanted is not None else ROUTE_SCHEMA_V2 if setting.needs_v2 else ROUTE_SCHEMA
        new = RouteSetting.model_validate({**setting.model_dump(), "schema_": schema, "sample_fraction": wanted,
                                           "generation": next_generation(setting, session.reports),
                                           "issued_at": rfc3339(self.clock())}, strict=False)
        log.info("tap_router.sampling", policy=self.key, generation=new.generation,
                 fraction=wanted, was=setting.sample_fraction)
        return new

    async def apply(self, desired: RouteState) -> ApplyResult:
        async with self._channel().session() as session:
            return await self._apply(session, desired)

    async def finalize(self, keep_candidate: bool = False) -> ApplyResult:
        """Primary-only (mirror none, candidate 0), confirmed by the taps like any setting."""
        return await self.apply(RouteState.primary_only())

    async def promote(self) -> ApplyResult:
        """The candidate answers every live request (a target the tap alone routes), as a ``final`` setting:
        the taps keep applying it after the controller stops renewing it (a Succeeded policy is not ticked),
        until the policy's deletion puts them back on the primary (finalize) or a new rollout replaces it."""
        async with self._channel().session() as session:
            return await self._apply(session, RouteState(0, 100, None), final=True)

    async def _apply(self, session: _Session, desired: RouteState, *, final: bool = False) -> ApplyResult:
        previous = session.setting
        shape = self.shape
        if self.shape_of is not None and (desired.mirror_percent is not None or desired.candidate_weight > 0):
            shape = await self.shape_of()  # primary-only needs no shape: a rollback never waits for a ConfigMap
        shape = self._sample_fraction(shape)
        url = None
        if (desired.mirror_percent is not None or desired.candidate_weight > 0) and self.candidate_url is not None:
            url = await self.candidate_url()  # None: the taps need their own (--mirror-to), else they fall back
        now = self.clock()
        same = previous is not None and previous.same_routes(
            setting_for(desired, policy=self.key, generation=1, candidate_url=url, issued_at=now,
                        interval_seconds=self.interval_seconds, shape=shape, final=final))
        generation = previous.generation if same and previous is not None \
            else next_generation(previous, session.reports)
        setting = setting_for(desired, policy=self.key, generation=generation, candidate_url=url, issued_at=now,
                              interval_seconds=self.interval_seconds, shape=shape, final=final)
        await _io.check_fence(self.what)
        await session.publish(setting)
        result = await session.until(lambda: self._verify(session, setting), self.confirm_timeout_s)
        if not result.ok:
            if gives_more(setting, previous):
                back = state_of(previous)
                undo = setting_for(back, policy=self.key, generation=generation + 1,
                                   candidate_url=previous.candidate_url if previous is not None else None,
                                   issued_at=self.clock(), interval_seconds=self.interval_seconds,
                                   shape=_shape_of(previous) if previous is not None else shape,
                                   final=previous.final if previous is not None else False)
                await session.publish(undo)
                log.warning("tap_router.put_back", policy=self.key, generation=undo.generation,
                            routes=back.describe(), reason=result.problem)
            raise NotConfirmed(f"{result.problem}; holding (within {self.confirm_timeout_s:g}s)")
        self._copies = copies_of(setting, session.reports, self.clock())
        state = dataclasses.replace(state_of(setting), resource_version=str(setting.generation))
        if not same:
            log.info("tap_router.applied", policy=self.key, generation=setting.generation, routes=state.describe(),
                     taps=list(result.counted))
        return ApplyResult(not same, state, None, 1, (self.what,) if not same else ())


class SplitWithTapMirror:
    """A target's own split router (Knative, KServe) for live shares plus the tap for the mirror.

    Order of the two writes, so that the candidate never gets more than the step allows in between:
    a state with a mirror sets the split first (Knative's candidate tag gives the URL the taps mirror
    to; the live share does not grow in the shadow phase), then the mirror; a state without one
    removes the mirror first, then sets the split. Finalize and promote take the mirror away first.
    """

    def __init__(self, split: Router, tap: TapRouter) -> None:
        self.split = split
        self.tap = tap

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.split.capabilities, can_mirror=True,
                                   mirror_resolution=TAP_CAPABILITIES.mirror_resolution)

    def copies(self) -> TapCopies | None:
        """The tap's mirror copies (:meth:`TapRouter.copies`)."""
        return self.tap.copies()

    async def read(self) -> RouteState:
        k = await self.split.read()
        m = await self.tap.read()
        return RouteState(k.primary_weight, k.candidate_weight, m.mirror_percent, resource_version=k.resource_version,
                          owned={"split": k.owned, "tap": m.owned})

    async def apply(self, desired: RouteState) -> ApplyResult:
        live = dataclasses.replace(desired, mirror_percent=None)
        mirror = RouteState(100, 0, desired.mirror_percent)
        if desired.mirror_percent is not None:
            k = await self.split.apply(live)
            m = await self.tap.apply(mirror)
        else:
            m = await self.tap.apply(mirror)
            k = await self.split.apply(live)
        return _combine(k, m)

    async def finalize(self, keep_candidate: bool = False) -> ApplyResult:
        m = await self.tap.finalize()
        k = await self.split.finalize(keep_candidate)
        return _combine(k, m)

    async def promote(self) -> ApplyResult:
        m = await self.tap.finalize()
        k = await self.split.promote()
        return _combine(k, m)


def _combine(k: ApplyResult, m: ApplyResult) -> ApplyResult:
    state = dataclasses.replace(k.state, mirror_percent=m.state.mirror_percent)
    return ApplyResult(k.wrote or m.wrote, state, k.written or m.written, max(k.attempts, m.attempts),
                       k.objects + m.objects)

