"""One tick of one ShadowPolicy: read, observe, judge, step, act, record.

Level-based: every tick starts from the cluster (the policy object and its
`.status`, the routing object) and recomputes; nothing is remembered in memory
that a restart would lose, except the output pairs in flight (whose counts are
written to `.status` every tick).

Order inside a tick, which is what makes a crash at any point safe:

1. read the policy (its resourceVersion is the precondition of every status write);
2. observe the candidate and the current routes; detect drift;
3. judge the current phase (only in analysed phases);
4. ``machine.step`` -> (next state, actions);
5. if the actions raise the candidate's live share above what the recorded state allows (a step up,
   a promotion, a canary-only start), record that intent first (``status.pendingRoute``: the routes
   and the state they lead to), conditional on the resourceVersion read in 1; a tick that finds an
   intent outstanding settles it before deciding anything (the routes hold it: adopted as reached;
   they do not: dropped, see :meth:`Reconciler._settle_intent`). So a controller killed between a
   raising route write and its status write never leaves live traffic the status does not allow.
   A start (from Pending or a finished rollout) is recorded that way too, whatever it sets: the recorded
   state has no deadline, perhaps no accepted spec, and a status that cannot undo routes of ours must never
   stand beside them. A write for a
   candidate or target other than the recorded rollout's is a raise from 0.
   Lowering the share (rollback, restart) and the mirror stay routes-first;
   then carry out route actions (each idempotent, verified by read-back), each write
   *fenced*: right before it, this replica must still hold the leader Lease and what
   the decision was computed from in the policy (spec generation, recorded rollout,
   pending command, deletion) must be unchanged (else nothing is written and the next
   tick decides again from a fresh read);
6. write `.status` (dropping the intent) conditional on the resourceVersion read in 1 (or the intent's write). A 409 after the
   routes moved is not left for the next tick (which would decide from the older
   status while the routes show the newer decision): the tick re-reads the policy and,
   if nobody recorded another decision meanwhile, records its own on the fresh version;
   otherwise (or if that keeps failing) it puts the routes back to what the recorded
   status says, so routes never run ahead of `.status`;
7. only then notify (Events, MQTT, webhooks), so that a tick that could not
   record its result does not announce it.

Deleting a policy restores the routes whenever the route's ownership record (the
router's annotation on the object) says shadowctl changed something, whatever the
recorded phase: the record is written in the same write as the change, so it is
never behind.

A spec the model refuses (:meth:`Reconciler._refused`) moves nothing forward; what the last
accepted spec recorded in `.status` (its deadline, the spec itself) lets the rollout in flight be
rolled back at that deadline, by a person, or on deletion (``machine.step_refused`` decides).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pydantic import ValidationError

from shadowctl.compare.comparators import AgreementTally
from shadowctl.controller.analysis import Analyzer, Look
from shadowctl.controller.clock import Clock, iso
from shadowctl.controller.commands import COMMAND_ANNOTATION, pending_command
from shadowctl.controller.status import (
    Accepted,
    accepted_of,
    accepted_policy,
    build_status,
    intended_routes,
    parse_policy,
    read_latency,
    read_state,
    read_tally,
    recorded_deadline,
    refused_error,
    status_patch,
)
from shadowctl.controller.tracing import DECISION_SPAN, decision_attributes, policy_attributes
from shadowctl.controller.writes import REFRESH_FLOOR, refresh_period, refresh_phase, worth_writing
from shadowctl.kube import (
    HTTP_ROUTE,
    INFERENCE_SERVICE,
    KNATIVE_SERVICE,
    SHADOW_POLICY,
    VIRTUAL_SERVICE,
    Conflict,
    KubeClient,
    KubeError,
    NotFound,
    ResourceRef,
)
from shadowctl.machine import (
    ANALYSED,
    REFUSED_SPEC_COMMANDS,
    Finalize,
    Notify,
    Observed,
    Promote,
    Refused,
    RolloutState,
    SetRoutes,
    StepResult,
    first_phase,
    step,
    step_refused,
)
from shadowctl.policy.model import ShadowPolicy, Target
from shadowctl.policy.status import Command, CommandRecord, PendingRoute, Phase, PolicyStatus
from shadowctl.routers import _io, kserve_build, tap_prompts
from shadowctl.routers.base import (
    ApplyResult,
    ClusterError,
    CountsCopies,
    RouteNotFound,
    Router,
    RouterError,
    RouteState,
)

log = structlog.get_logger(__name__)

class _Read:
    """The default of a status write's ``accepted``: the spec of the object it is written on, as read."""


READ = _Read()

STATUS_RETRIES = 3
"""Attempts to record a decision whose routes were already written, after its first status write met a 409."""

FINALIZER = "shadowctl.dev/restore-routes"
"""Held while a rollout may have live traffic or a mirror on the candidate: deleting the policy then
waits until the controller has restored the routes to the primary. Not held in a terminal phase, so
a finished policy is deleted at once, with or without a controller."""


class Notifier(Protocol):
    """Tells people what happened (Kubernetes Events, MQTT, webhooks); must not raise."""

    async def notify(self, obj: dict[str, Any], policy: ShadowPolicy, note: Notify, state: RolloutState) -> None: ...


class Gate(Protocol):
    """Confirm-promotion webhooks: True open, False closed or unreachable, None none configured."""

    async def check(self, policy: ShadowPolicy, state: RolloutState) -> bool | None: ...


class Metrics(Protocol):
    """The controller's own /metrics (see controller.metrics)."""

    def observe_tick(self, policy: str, state: RolloutState, look: Look | None, seconds: float, error: bool) -> None: ...

    def forget(self, policy: str) -> None:
        """Remove the series of a policy this controller no longer carries out (deleted, or out of its selector)."""


@dataclass
class TickResult:
    """What a tick did (for tests, logs and the benchmark)."""

    key: str
    phase: Phase | None = None
    state: RolloutState | None = None
    transitioned: bool = False
    route_writes: int = 0
    status_written: bool = False
    conflict: bool = False
    error: str | None = None
    gone: bool = False  # the policy no longer exists (then `error` says so): its worker stops
    actions: list[str] = field(default_factory=list)


def desired_routes(router: Router, policy: ShadowPolicy, weight: int, mirror: float | None) -> RouteState:
    """The RouteState for (weight, mirror); no mirror where the router cannot mirror (``shadow.mode: tap`` gives a
    router that can: the target's own for the live share, the tap router for the mirror)."""
    if mirror is not None and not router.capabilities.can_mirror:
        mirror = None
    return RouteState(100 - weight, weight, mirror)


def owns(owned: Any) -> bool:
    """Whether a router's ownership record (``RouteState.owned``) says shadowctl changed something; a
    composite record (Knative + its VirtualService: ``{"service": ..., "virtualService": ...}``) owns
    something when one of its parts does."""
    if not owned:
        return False
    if isinstance(owned, dict) and all(v is None or isinstance(v, dict) for v in owned.values()):
        return any(owns(v) for v in owned.values())
    return True


def decision_inputs(obj: dict[str, Any]) -> tuple[Any, ...]:
    """What a tick's decision depends on in the policy object: its identity, the spec's generation, the
    recorded rollout and route intent, the pending command and whether it is being deleted. A change to anything else (a
    label, another tool's annotation, the finalizer list) does not make a decision stale."""
    meta = obj.get("metadata") or {}
    status = obj.get("status")
    rollout = status.get("rollout") if isinstance(status, dict) else None
    intent = status.get("pendingRoute") if isinstance(status, dict) else None
    return (meta.get("uid"), meta.get("generation"), bool(meta.get("deletionTimestamp")),
            (meta.get("annotations") or {}).get(COMMAND_ANNOTATION), json.dumps(rollout, sort_keys=True),
            json.dumps(intent, sort_keys=True))


@dataclass
class _Fence:
    """What a route write must still hold right before it is sent (see :func:`shadowctl.routers._io.fenced`).

    ``ref``/``inputs``: the policy and its :func:`decision_inputs` as the tick decided from them (``ref``
    None: the policy is gone, only leadership is checked); ``leading``: this replica may still act as the
    leader (None: no election)."""

    kube: KubeClient
    ref: ResourceRef | None
    inputs: tuple[Any, ...] = ()
    leading: Callable[[], bool] | None = None
    intent: str | None = None
    """The id of the intent this tick recorded: its write is refused on an object marked as having dropped it."""

    async def __call__(self, what: str, current: dict[str, Any] | None = None) -> None:
        if self.ref is not None:
            try:
                fresh = await self.kube.get(self.ref)
            except NotFound as exc:
                raise _io.Superseded(f"not writing {what}: the policy is gone") from exc
            except KubeError as exc:
                raise ClusterError(f"cannot check the policy before writing {what}: {exc}") from exc
            if decision_inputs(fresh) != self.inputs:
                rv = (fresh.get("metadata") or {}).get("resourceVersion")
                raise _io.Superseded(f"not writing {what}: the policy changed since this tick read it (its spec, "
                                     f"recorded rollout, command or deletion; now at resourceVersion {rv}); "
                                     "deciding again")
        if self.intent is not None and current is not None and _dropped_intent(current) == self.intent:
            # atomic with the write, which is conditional on the version `current` was read at
            raise _io.Superseded(f"not writing {what}: another replica found this tick's route intent unapplied "
                                 "and dropped it (the route object is marked so)")
        if self.leading is not None and not self.leading():  # last: no await between it and the write
            raise _io.Superseded(f"not writing {what}: this replica no longer holds the leader Lease")


def raised_routes(router: Router, policy: ShadowPolicy, state: RolloutState, stepped: StepResult,
                  same_rollout: bool = True, starting: bool = False) -> RouteState | None:
    """The routes a step's route actions end at when they give the candidate more live traffic than the
    recorded `state` allows (its weight); None when they do not (no route action, the same share or less:
    those are written routes-first, since the recorded state already allows what they set).

    `same_rollout` False: the routes are written for another candidate or target than the recorded rollout's
    (a restart after the policy named a new one), which the recorded state allows no live share at all.

    `starting`: the recorded state holds no rollout in flight (Pending, or a finished one), so it records no
    deadline, and perhaps no accepted spec: a start's route write is recorded first whatever it sets (the intent
    write records the spec and the deadline the start leads to), so that routes of ours never stand beside a
    status that cannot undo them, whatever happens to the status write after them (bench/faults r-00027: a 409
    and an edit into a refused spec; an API error would do the same)."""
    final: RouteState | None = None
    for action in stepped.actions:
        if isinstance(action, SetRoutes):
            final = desired_routes(router, policy, action.weight, action.mirror_percent)
        elif isinstance(action, Promote):
            final = RouteState(0, 100, None)
        elif isinstance(action, Finalize):
            final = RouteState.primary_only()
    if final is None:
        return None
    if starting and any(isinstance(a, SetRoutes | Promote) for a in stepped.actions):
        return final
    if final.candidate_weight <= (state.weight if same_rollout else 0):
        return None
    return final


DROPPED_INTENT_ANNOTATION = "shadowctl.dev/dropped-intent"
"""Set on the route object by a replica that drops another's route intent as unapplied (the intent's id):
the intent's own route write, still in flight or retried, is then refused (see :class:`_Fence`)."""


def intent_id(intent: PendingRoute) -> str:
    """An intent's identity (its random id; for one recorded without: when, and what it raises the share to)."""
    return intent.id or f"{intent.at}/{intent.candidate_weight}/{intent.rollout.phase.value}/{intent.rollout.step}"


def _dropped_intent(obj: dict[str, Any]) -> str | None:
    meta = obj.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    value = annotations.get(DROPPED_INTENT_ANNOTATION) if isinstance(annotations, dict) else None
    return value if isinstance(value, str) else None


def route_object(policy: ShadowPolicy, target: dict[str, Any] | None) -> ResourceRef | None:
    """The object that carries the candidate's live share for the target (`target`: as recorded, else the
    spec's); None for a target this does not know (then an intent is dropped without marking it)."""
    try:
        spec = Target.model_validate(target) if target else policy.spec.target
    except ValidationError:
        return None
    ns = policy.metadata.namespace
    if spec.istio is not None:
        return ResourceRef(VIRTUAL_SERVICE, spec.istio.virtual_service, ns)
    if spec.gateway_api is not None:
        return ResourceRef(HTTP_ROUTE, spec.gateway_api.http_route, ns)
    if spec.knative is not None:
        return ResourceRef(KNATIVE_SERVICE, spec.knative.service, ns)
    return None


def expected_routes(router: Router, policy: ShadowPolicy, state: RolloutState) -> RouteState | None:
    """What the routes must look like in `state` (None where the controller does not hold them)."""
    if state.phase in ANALYSED:
        return desired_routes(router, policy, state.weight, state.mirror_percent)
    return None


class Reconciler:
    """Carries out ticks for policies; stateless between ticks except caches that a restart can lose."""

    def __init__(
        self,
        kube: KubeClient,
        router_for: Callable[[ShadowPolicy, KubeClient], Router],
        analyzer: Analyzer,
        clock: Clock,
        notifier: Notifier | None = None,
        gate: Gate | None = None,
        metrics: Metrics | None = None,
        identity: str = "shadowctl",
        leading: Callable[[], bool] | None = None,
        status_refresh: float = REFRESH_FLOOR,
    ) -> None:
        """`leading`: whether this replica may act as the leader right now (``LeaderElector.holds``);
        checked right before every route write, with the policy's decision inputs. None: no election.

        `status_refresh`: a status write that would change only progress figures (sample counts, estimates,
        the output tally's counts) is made at most once per ``max(status_refresh, 3 x interval)`` seconds
        (:func:`~shadowctl.controller.writes.worth_writing`); a changed decision is written at once. 0: every
        change is written at once."""
        self.kube = kube
        self.router_for = router_for
        self.analyzer = analyzer
        self.clock = clock
        self.notifier = notifier
        self.gate = gate
        self.metrics = metrics
        self.identity = identity
        self.leading = leading
        self.status_refresh = status_refresh

    async def tick(self, ref: ResourceRef, cached: dict[str, Any] | None = None) -> TickResult:
        """One tick. `cached`: the policy as the watch last delivered it (saves a GET); a stale copy only
        costs a 409 on the status write, after which the caller should tick again without it."""
        key = f"{ref.namespace}/{ref.name}"
        result = TickResult(key)
        started = self.clock.now()
        try:
            obj = cached if cached is not None else await self.kube.get(ref)
        except NotFound:
            result.gone = True
            result.error = "the policy is gone"
            if self.metrics is not None:
                self.metrics.forget(key)
            return result
        except KubeError as exc:
            result.error = f"cannot read the policy: {exc}"
            log.warning("tick.read_failed", policy=key, error=str(exc))
            return result
        look: Look | None = None
        fence = _Fence(self.kube, ref, leading=self.leading)
        try:  # the decision's span (the look's is its child); the tracer is the analyzer's (controller.tracing)
            with self.analyzer.tracer.span(DECISION_SPAN, policy_attributes(ref.namespace or "", ref.name)) as span, \
                    _io.fenced(fence):
                look = await self._tick(obj, result, fence)
                if span.recording:
                    span.set(decision_attributes(read_state(obj), result.state, look, result.actions, result.error))
        finally:
            if self.metrics is not None and result.state is not None:
                self.metrics.observe_tick(key, result.state, look, self.clock.now() - started,
                                          result.error is not None)
        return result

    async def _tick(self, obj: dict[str, Any], result: TickResult, fence: _Fence) -> Look | None:
        now = self.clock.now()
        meta = obj.get("metadata") or {}
        rv = str(meta.get("resourceVersion") or "")
        fence.inputs = decision_inputs(obj)
        generation = int(meta.get("generation") or 1)
        ref = ResourceRef(SHADOW_POLICY, str(meta["name"]), str(meta.get("namespace") or "default"))
        stored = PolicyStatus.of(obj)
        state = RolloutState.from_record(stored.rollout)
        result.phase = state.phase
        result.state = state

        # The spec is validated by the same model as `shadowctl validate`. A refused spec starts and moves
        # nothing; what the last accepted one recorded ends a rollout in flight at its deadline (_refused).
        try:
            policy = parse_policy(obj)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            await self._refused(ref, obj, rv, stored, state, now, generation, result, fence,
                                f"invalid spec: {problems}")
            return None

        # Deletion and the finalizer come before anything else.
        finalizers = [str(f) for f in meta.get("finalizers") or []]
        if meta.get("deletionTimestamp"):
            if FINALIZER in finalizers:
                await self._release(ref, obj, rv, state, policy, finalizers, result)
            return None
        held = await self._hold_finalizer(ref, obj, rv, state, finalizers, result)
        if held is None:
            return None
        obj = held
        meta = obj.get("metadata") or {}
        rv = str(meta.get("resourceVersion") or "")

        # A raise of the candidate's share recorded before its route write is settled before anything else;
        # the tick then goes on from the settled status.
        if stored.pending_route is not None:
            fresh = await self._settle_intent(ref, obj, rv, state, stored.pending_route, policy, now, generation,
                                              result)
            if fresh is None:
                return None
            obj, stored = fresh, PolicyStatus.of(fresh)
            rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            state = RolloutState.from_record(stored.rollout)
            fence.inputs = decision_inputs(obj)

        router = self.router_for(policy, self.kube)
        pending = pending_command(obj)
        command = pending.command if pending else None
        target_now = policy.spec.target.model_dump(mode="json", by_alias=True, exclude_none=True)
        stored_target = stored.rollout_target
        # The routes were set for another target (the policy was edited mid-rollout): undo with that one.
        previous_router = None
        if stored_target and stored_target != target_now:
            previous_router = self._router_for_target(policy, stored_target)
        try:
            candidate = await self._observe_candidate(policy, state.phase)
            watched = state.phase in ANALYSED or state.phase is Phase.paused
            # Pending with a candidate: about to start; the routes may hold an earlier start whose status never
            # landed (killed, or its status write failed), perhaps for another candidate: it is undone first.
            current = await router.read() if watched and previous_router is None else None
            if state.phase is Phase.pending and candidate is not None:
                with contextlib.suppress(RouterError):  # unreadable: the start itself says why, as before
                    current = await router.read()
        except (RouterError, KubeError) as exc:
            await self._fail_safe(ref, obj, rv, state, policy, router, now, generation, result,
                                  f"cannot read the routes: {exc}", command)
            return None
        expected = expected_routes(router, policy, state)
        drift = expected is not None and current is not None and current != expected

        look: Look | None = None
        verdict = None
        if state.phase in ANALYSED:
            copies = router.copies() if isinstance(router, CountsCopies) else None
            look = await self.analyzer.look(policy, state, now, read_tally(stored, state), read_latency(stored, state),
                                            copies)
            verdict = look.verdict
        gate = None
        if state.phase is Phase.waiting_promotion and self.gate is not None:
            gate = await self.gate.check(policy, state)

        stepped = step(state, verdict, command, now, policy,
                       Observed(candidate=candidate, generation=generation, gate=gate, drift=drift,
                                leftover=self._leftover(router, policy, state, current)))
        result.transitioned = stepped.state.phase is not state.phase or stepped.state.step != state.step
        result.phase = stepped.state.phase
        result.state = stepped.state

        tally = look.tally if look is not None else None
        errors = look.source_errors if look is not None else ()
        acted = any(isinstance(a, SetRoutes | Promote | Finalize) for a in stepped.actions)
        target_for_status = target_now if acted or not stored_target else stored_target

        # 5a. A raise of the candidate's live share is recorded (the intent) before its route write.
        raised = raised_routes(router, policy, state, stepped,
                               same_rollout=candidate == state.candidate and previous_router is None,
                               starting=await self._routable_start(router, state, stepped, current))
        if raised is not None:
            intent = PendingRoute(id=uuid.uuid4().hex[:16], rollout=stepped.state.to_record(), primary_weight=raised.primary_weight,
                                  candidate_weight=raised.candidate_weight, mirror_percent=raised.mirror_percent,
                                  generation=generation, target=target_now, at=iso(now))
            recorded = await self._patch_status(ref, obj, rv, state, now, generation, look, current, tally, None,
                                                result, source_errors=errors, intent=intent)
            if recorded is None:  # a 409 or an API error: nothing was written; the next tick decides again
                return look
            obj = recorded
            rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            stored = PolicyStatus.of(obj)
            fence.inputs = decision_inputs(obj)
            fence.intent = intent_id(intent)
            result.actions.append("Intent")

        # 5b. Routes first.
        routes_after: RouteState | None = current
        try:
            routes_after = await self._act(router, policy, stepped, result, previous_router,
                                           held=state.phase in ANALYSED or state.phase is Phase.paused) or current
        except _io.Superseded as exc:
            # The decision's inputs changed (or this replica lost the Lease) before a route write: nothing
            # more is written, not even the status; the worker reads the policy again and decides anew.
            result.conflict = True
            result.error = str(exc)
            log.info("tick.superseded", policy=policy.key, reason=str(exc))
            return look
        except RouterError as exc:
            msg = f"cannot set the routes: {exc}"
            if any(isinstance(a, Finalize) for a in stepped.actions):
                # A rollback that cannot restore the routes is not recorded as done; retried next tick.
                result.error = msg
                await self._write_status(ref, obj, rv, state, now, generation, look, current, None, None, result,
                                         error=msg)
                return look
            await self._fail_safe(ref, obj, rv, state, policy, router, now, generation, result, msg, command)
            return look

        # 6. Then status.
        cmd_record = None
        if pending is not None:
            cmd_record = CommandRecord(id=pending.id, command=pending.command.value, at=pending.at, by=pending.by,
                                       handled_at=iso(now), result=stepped.state.phase.value)
        written = await self._write_status(ref, obj, rv, stepped.state, now, generation, look, routes_after, tally,
                                           cmd_record, result, source_errors=errors, target=target_for_status,
                                           settled=True)
        if not written and result.conflict and result.route_writes:
            written = await self._record_after_conflict(
                ref, stored, stepped.state, now, generation, look, routes_after, tally, cmd_record, result,
                errors, target_for_status, policy, fence, accepted_of(obj))
        if stepped.state.phase is not Phase.shadowing and policy.spec.analysis.outputs is not None:
            await self.analyzer.idle(policy.key)
        # 7. Then tell people.
        if written and self.notifier is not None:
            for action in stepped.actions:
                if isinstance(action, Notify):
                    await self.notifier.notify(obj, policy, action, stepped.state)
        if written and stepped.state.phase is not state.phase:
            log.info("rollout.transition", policy=policy.key, **{"from": state.phase.value},
                     to=stepped.state.phase.value, step=stepped.state.step, weight=stepped.state.weight,
                     reason=stepped.state.message)
        return look

    async def _hold_finalizer(self, ref: ResourceRef, obj: dict[str, Any], rv: str, state: RolloutState,
                              finalizers: list[str], result: TickResult) -> dict[str, Any] | None:
        """Hold the finalizer while a rollout is not finished, and only then: the object as it is after (None:
        the patch failed; ``result`` says why, and the next tick sees the object as it is then)."""
        wanted = not state.phase.terminal
        if wanted == (FINALIZER in finalizers):
            return obj
        keep = [f for f in finalizers if f != FINALIZER] + ([FINALIZER] if wanted else [])
        try:
            patched: dict[str, Any] = await self.kube.patch_merge(ref, {"metadata": {"finalizers": keep}},
                                                                  resource_version=rv)
        except KubeError as exc:  # a 409 means someone wrote first: the next tick sees their object
            result.error = f"cannot {'add' if wanted else 'remove'} the finalizer: {exc}"
            return None
        return patched

    async def _refused(self, ref: ResourceRef, obj: dict[str, Any], rv: str, stored: PolicyStatus,
                       state: RolloutState, now: float, generation: int, result: TickResult, fence: _Fence,
                       error: str) -> None:
        """A tick whose spec the model refused (``error``: where and what). The rollout in flight holds: no step
        up, no promotion. What ends it is what the last accepted spec recorded (``status.acceptedSpec``,
        ``status.deadlineAt``): its progress deadline, a person's rollback, or the policy's deletion, each
        restoring the routes through the router that spec builds for the target the routes were set on
        (``status.rolloutTarget``). The decision is :func:`~shadowctl.machine.step_refused`'s; the Ready
        condition says what is wrong where, and what happens meanwhile (:func:`refused_error`). Commands other
        than rollback stay pending until the spec is fixed."""
        meta = obj.get("metadata") or {}
        accepted = accepted_policy(obj, stored)
        result.error = refused_error(error, state, stored)
        finalizers = [str(f) for f in meta.get("finalizers") or []]
        if meta.get("deletionTimestamp"):
            if FINALIZER not in finalizers:
                return
            if accepted is not None:
                await self._release(ref, obj, rv, state, accepted, finalizers, result)
            elif state.phase is Phase.pending or state.phase.terminal:  # nothing in flight to restore
                with contextlib.suppress(NotFound):
                    await self.kube.patch_merge(ref, {"metadata": {"finalizers": [
                        f for f in finalizers if f != FINALIZER]}}, resource_version=rv)
            else:
                result.error += "; deleted, but the routes cannot be restored without an accepted spec: fix it"
            return
        held = await self._hold_finalizer(ref, obj, rv, state, finalizers, result)
        if held is None:
            return
        obj = held
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if stored.pending_route is not None and accepted is not None:
            fresh = await self._settle_intent(ref, obj, rv, state, stored.pending_route, accepted, now, generation,
                                              result)
            if fresh is None:
                return
            obj, stored = fresh, PolicyStatus.of(fresh)
            rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            state = RolloutState.from_record(stored.rollout)
            fence.inputs = decision_inputs(obj)
            result.error = refused_error(error, state, stored)
        pending = pending_command(obj)
        if pending is not None and pending.command not in REFUSED_SPEC_COMMANDS:
            pending = None  # waits for a spec that says what it would do
        stepped = step_refused(state, pending.command if pending is not None else None, now, Refused(
            why=error, recorded=accepted is not None, deadline_at=recorded_deadline(stored),
            keep_candidate=accepted.spec.rollback.keep_candidate_tag if accepted is not None else False))
        result.transitioned = stepped.state.phase is not state.phase or stepped.state.step != state.step
        result.phase, result.state = stepped.state.phase, stepped.state
        routes_after: RouteState | None = None
        if accepted is not None and any(isinstance(a, SetRoutes | Promote | Finalize) for a in stepped.actions):
            try:  # lowering the share (or finishing a promotion the routes hold): routes first, as ever
                routes_after = await self._act(self._recorded_router(accepted, stored), accepted, stepped, result)
            except _io.Superseded as exc:
                result.conflict = True
                result.error = str(exc)
                return
            except RouterError as exc:  # not recorded as done: retried next tick
                result.error = f"{result.error}; cannot restore the routes yet: {exc}"
                await self._write_status(ref, obj, rv, state, now, generation, None, None, None, None, result,
                                         error=result.error)
                return
        cmd_record = None
        if pending is not None:
            cmd_record = CommandRecord(id=pending.id, command=pending.command.value, at=pending.at, by=pending.by,
                                       handled_at=iso(now), result=stepped.state.phase.value)
        written = await self._write_status(ref, obj, rv, stepped.state, now, generation, None, routes_after, None,
                                           cmd_record, result, error=refused_error(error, stepped.state, stored))
        if accepted is None or not written:
            return
        if stepped.state.phase is not Phase.shadowing and accepted.spec.analysis.outputs is not None:
            await self.analyzer.idle(accepted.key)
        if self.notifier is not None:
            for action in stepped.actions:
                if isinstance(action, Notify):
                    await self.notifier.notify(obj, accepted, action, stepped.state)
        if stepped.state.phase is not state.phase:
            log.warning("rollout.transition", policy=accepted.key, **{"from": state.phase.value},
                        to=stepped.state.phase.value, reason=stepped.state.message, spec="refused")

    @staticmethod
    async def _routable_start(router: Router, state: RolloutState, stepped: StepResult,
                              current: RouteState | None) -> bool:
        """Whether this tick may start a rollout (the recorded state holds none in flight) on routes that can
        be read: only then is a start recorded as an intent first (see :func:`raised_routes`). Routes that
        cannot be read will not take the start's write either, and an intent per tick for a target that is
        missing would only add two status writes to every tick of it (the intent, then its drop)."""
        if not (state.phase is Phase.pending or state.phase.terminal) or not any(
                isinstance(a, SetRoutes | Promote) for a in stepped.actions):
            return False
        if current is not None:
            return True
        try:
            await router.read()
        except RouterError:
            return False
        return True

    @staticmethod
    def _leftover(router: Router, policy: ShadowPolicy, state: RolloutState, current: RouteState | None) -> bool:
        """Pending, and the routes carry shadowctl's changes that a start would not write as they are: an
        earlier start whose status never landed, for a candidate the policy no longer names (the same start
        again finds its routes right and writes nothing)."""
        if state.phase is not Phase.pending or current is None or not owns(current.owned):
            return False
        _, _, weight, mirror = first_phase(policy)
        return current != desired_routes(router, policy, weight, mirror)

    async def _settle_intent(self, ref: ResourceRef, obj: dict[str, Any], rv: str, state: RolloutState,
                             intent: PendingRoute, policy: ShadowPolicy, now: float, generation: int,
                             result: TickResult) -> dict[str, Any] | None:
        """A recorded raise of the candidate's share is outstanding: the tick that recorded it stopped (killed,
        superseded, its route or status write failed) before recording how it ended. The routes say how.

        They hold the intent: it was applied, and the state it leads to is adopted as reached (recorded, the
        intent dropped). They do not: it was never applied, and it is dropped; the recorded state stands. If
        they hold neither the intent nor the recorded state, someone else changed them (GitOps drift): this
        tick sees that against the recorded state, as any drift. Routes that cannot be read (the API failed)
        settle nothing: the intent stays and the tick ends (None). Otherwise the answer is the policy as
        stored with the intent settled, which the tick goes on from: every decision is made from a status
        with no intent outstanding. The transition adopted is not announced (the tick that made it did not
        record it; Events say what was recorded)."""
        key = policy.key
        router = (self._router_for_target(policy, intent.target) if intent.target else None) \
            or self.router_for(policy, self.kube)
        try:
            current: RouteState | None = await router.read()
        except ClusterError as exc:
            result.error = f"cannot read the routes to settle the recorded route intent: {exc}"
            log.warning("tick.intent_unsettled", policy=key, error=str(exc))
            await self._write_status(ref, obj, rv, state, now, generation, None, None, None, None, result,
                                     error=result.error)
            return None
        except RouterError as exc:  # gone, or no longer routes as the policy describes: it does not hold the intent
            log.info("tick.intent_routes_unreadable", policy=key, error=str(exc))
            current = None
        wanted = intended_routes(intent)
        if current is not None and current != wanted:
            # Mark the route object before dropping: a write of this intent still in flight (its replica paused
            # or slowed after its fence) is conditional on the version read, so it either landed before the
            # mark (which then meets a 409, and the routes are read again: they hold it) or is refused after.
            marked, why = await self._mark_dropped(policy, intent, current)
            if marked is None:
                result.error = f"cannot mark the route object before dropping an unapplied route intent: {why}"
                return None
            current = marked
        if current == wanted:
            settled, target, what = RolloutState.from_record(intent.rollout), intent.target, "AdoptIntent"
        else:
            settled, target, what = state, None, "DropIntent"
        expected = expected_routes(router, policy, state)
        result.actions.append(what)
        result.state, result.phase = settled, settled.phase
        result.transitioned = settled.phase is not state.phase or settled.step != state.step
        fresh = await self._patch_status(ref, obj, rv, settled, now, generation, None, current, None, None, result,
                                         target=target, settled=True)
        if fresh is not None:
            log.info("tick.intent_settled", policy=key, outcome=what, phase=settled.phase.value,
                     intended=wanted.describe(), routes=current.describe() if current is not None else None,
                     drift=what == "DropIntent" and current is not None and expected is not None
                     and current != expected)
        return fresh

    async def _mark_dropped(self, policy: ShadowPolicy, intent: PendingRoute,
                            current: RouteState) -> tuple[RouteState | None, str]:
        """Mark the route object with the intent's id, conditional on the version the routes were read at;
        the routes as they are then (None: the mark could not be written, try again next tick; then why).

        The mark is a whole-object update of the version read (``update`` is the verb deploy/rbac.yaml grants
        on route objects, as the routers write them; a merge patch would need ``patch`` too)."""
        ref = route_object(policy, intent.target)
        if ref is None or current.resource_version is None:
            log.warning("tick.intent_unmarked", policy=policy.key, reason="no route object known for the target")
            return current, ""
        router = (self._router_for_target(policy, intent.target) if intent.target else None) \
            or self.router_for(policy, self.kube)
        version: str | None = current.resource_version
        why = "the routes kept changing"
        for _ in range(STATUS_RETRIES):
            try:
                obj = await self.kube.get(ref)
                meta = obj.setdefault("metadata", {})
                if str(meta.get("resourceVersion")) != version:
                    raise Conflict(f"{ref.name} is at resourceVersion {meta.get('resourceVersion')}, read at {version}")
                annotations = meta.get("annotations")
                if not isinstance(annotations, dict):
                    annotations = meta["annotations"] = {}
                annotations[DROPPED_INTENT_ANNOTATION] = intent_id(intent)
                await self.kube.replace(ref.gvr, obj)
                return current, ""
            except Conflict:  # the routes changed since they were read: perhaps the intent's write landed
                try:
                    current = await router.read()
                except RouterError as exc:
                    return None, str(exc)
                if current == intended_routes(intent):
                    return current, ""
                version = current.resource_version
            except KubeError as exc:
                log.warning("tick.intent_mark_failed", policy=policy.key, error=str(exc))
                return None, str(exc)
        return None, why

    async def _release(self, ref: ResourceRef, obj: dict[str, Any], rv: str, state: RolloutState,
                       policy: ShadowPolicy, finalizers: list[str], result: TickResult) -> None:
        """The policy is being deleted: restore the routes (a rollout in flight), then let it go.

        Routes first, as in a rollback; if they cannot be restored the finalizer stays and the next
        tick tries again, so no mirror or candidate weight is left behind by a deletion. In a phase
        that should hold nothing (Pending, or terminal) the route's ownership record decides: a first
        tick whose status never landed, or a late write, leaves the record beside what it changed.
        """
        try:
            applied = await self._restore_if_ours(policy, obj, state)
        except RouterError as exc:
            result.conflict = isinstance(exc, _io.Superseded)
            result.error = f"deleted mid-rollout; cannot restore the routes yet: {exc}"
            log.warning("rollout.delete_blocked", policy=policy.key, phase=state.phase.value, error=str(exc))
            return
        if applied is not None:
            result.actions.append("Finalize")
            result.route_writes += int(applied.wrote)
        keep = [f for f in finalizers if f != FINALIZER]
        try:
            await self.kube.patch_merge(ref, {"metadata": {"finalizers": keep}}, resource_version=rv)
        except NotFound:
            pass
        except KubeError as exc:
            result.error = f"cannot remove the finalizer: {exc}"

    async def abandon(self, obj: dict[str, Any]) -> None:
        """The policy was deleted: a rollout in flight must not leave live traffic or a mirror behind."""
        meta = obj.get("metadata") or {}
        if self.metrics is not None:
            self.metrics.forget(f"{meta.get('namespace', 'default')}/{meta.get('name')}")
        state = read_state(obj)
        try:
            try:
                policy = parse_policy(obj)
            except ValidationError:  # refused: the routes are restored as the last accepted spec set them
                policy = accepted_policy(obj, PolicyStatus.of(obj)) or parse_policy(obj)
            with _io.fenced(_Fence(self.kube, None, leading=self.leading)):  # the policy is gone: the Lease alone
                await self._restore_if_ours(policy, obj, state)
        except (ValidationError, KeyError, RouterError, KubeError) as exc:
            log.error("rollout.abandon_failed", policy=f"{meta.get('namespace')}/{meta.get('name')}", error=str(exc))

    async def _restore_if_ours(self, policy: ShadowPolicy, obj: dict[str, Any],
                               state: RolloutState) -> ApplyResult | None:
        """All traffic back to the primary and our mirror removed, on the target the rollout was started
        on (``status.rolloutTarget``; the spec may have been edited since), when a rollout is in flight
        or the route's ownership record says shadowctl changed something (None: nothing to restore).

        A route object that is gone holds nothing of ours; one that cannot be read as the policy
        describes it (another writer's destinations) cannot be restored by us and is left as it is."""
        router = self._recorded_router(policy, PolicyStatus.of(obj))
        if state.phase.terminal or state.phase is Phase.pending:
            try:
                current = await router.read()
            except ClusterError:
                raise  # the API failed: try again next tick
            except RouteNotFound:
                return None
            except RouterError as exc:
                log.warning("rollout.delete_unreadable_routes", policy=policy.key, error=str(exc))
                return None
            if not owns(current.owned):
                return None
        try:
            applied = await router.finalize(policy.spec.rollback.keep_candidate_tag)
        except RouteNotFound:
            return None
        log.warning("rollout.deleted", policy=policy.key, phase=state.phase.value,
                    message="policy deleted; routes restored to the primary")
        return applied

    def _recorded_router(self, policy: ShadowPolicy, status: PolicyStatus) -> Router:
        """The router of the target the recorded rollout runs on (the spec's when none is recorded)."""
        stored = status.rollout_target
        return (self._router_for_target(policy, stored) if stored else None) or self.router_for(policy, self.kube)

    def _router_for_target(self, policy: ShadowPolicy, target: dict[str, Any]) -> Router | None:
        try:
            spec = policy.spec.model_copy(update={"target": Target.model_validate(target)})
        except ValidationError:
            return None
        return self.router_for(policy.model_copy(update={"spec": spec}), self.kube)

    async def _act(self, router: Router, policy: ShadowPolicy, stepped: StepResult, result: TickResult,
                   previous: Router | None = None, held: bool = False) -> RouteState | None:
        """Carry out the step's route actions in order; a Finalize goes through `previous` (the router of the
        target the routes were set on, when the policy names another now). `held`: the routes hold a rollout in
        flight (analysed or Paused), so with `previous` they must be undone before any share is written."""
        after: RouteState | None = None
        for action in stepped.actions:
            if previous is not None and held and isinstance(action, SetRoutes | Promote):
                # The routes hold a rollout in flight set on another target (or for another candidate): writing
                # this one's share before undoing that one would leave the old candidate's traffic behind.
                raise RouterError("the routes were set for the target recorded in status.rolloutTarget, not the "
                                  "one the policy names now; they must be restored there before routing the new "
                                  "one (not writing)")
            if isinstance(action, SetRoutes):
                applied = await router.apply(desired_routes(router, policy, action.weight, action.mirror_percent))
            elif isinstance(action, Promote):
                applied = await router.promote()
            elif isinstance(action, Finalize):
                applied = await (previous or router).finalize(action.keep_candidate)
                previous = None
            else:
                continue
            result.actions.append(type(action).__name__)
            result.route_writes += int(applied.wrote)
            after = applied.state
        return after

    async def _record_after_conflict(
        self, ref: ResourceRef, stored: PolicyStatus, state: RolloutState, now: float, generation: int,
        look: Look | None, routes: RouteState | None, tally: AgreementTally | None, command: CommandRecord | None,
        result: TickResult, errors: tuple[str, ...], target: dict[str, Any], policy: ShadowPolicy, fence: _Fence,
        accepted: Accepted | None,
    ) -> bool:
        """The routes moved this tick, but the status write met a newer version (409): a person's command or
        edit, or another writer, came in between. Left alone, the next tick would decide from the older status
        while the routes show this tick's decision (Paused from Shadowing with live traffic on the candidate).

        Re-read: if the recorded rollout is still the one this tick decided from, record the decision on the
        fresh version (what came in, a command or a spec edit, is acted on by the next tick, from the state
        the routes are in). If another decision was recorded meanwhile, or recording keeps failing, put the
        routes back to what the recorded status says; either way routes and status agree again.

        `accepted`: the spec the routes were written from. It is what the decision is recorded with (and the
        deadline it sets), not the re-read one: an edit that came in between may be one the model refuses, and a
        status recorded from it would hold no accepted spec to end the rollout with (bench/faults r-00027)."""
        key = f"{ref.namespace}/{ref.name}"
        fresh: dict[str, Any] | None = None
        for _ in range(STATUS_RETRIES):
            try:
                fresh = await self.kube.get(ref)
            except NotFound:
                return False  # deleted and gone: the manager's abandon restores the routes
            except KubeError as exc:
                result.error = f"routes set, status refused, and the policy cannot be read again: {exc}"
                return False
            if PolicyStatus.of(fresh).rollout != stored.rollout:
                break  # another decision was recorded: this one is superseded
            result.conflict = False
            fresh_rv = str((fresh.get("metadata") or {}).get("resourceVersion") or "")
            if await self._write_status(ref, fresh, fresh_rv, state, now, generation, look, routes, tally, command,
                                        result, source_errors=errors, target=target, settled=True,
                                        accepted=accepted):
                log.info("tick.status_recorded_after_conflict", policy=key, phase=state.phase.value)
                return True
            if not result.conflict:
                break  # not a 409: the error is in result
        if fresh is None:  # pragma: no cover - the loop runs at least once
            return False
        recorded = PolicyStatus.of(fresh)
        back = RolloutState.from_record(recorded.rollout)
        fence.inputs = decision_inputs(fresh)  # putting back what the fresh status records
        try:
            applied = await self._settle(self._recorded_router(policy, recorded), policy, back)
        except RouterError as exc:
            result.error = f"routes set but the status could not be recorded, nor the routes put back: {exc}"
            log.warning("tick.unrecorded_routes", policy=key, error=str(exc))
        else:
            result.route_writes += int(applied.wrote)
            result.actions.append("Undo")
            log.info("tick.routes_put_back", policy=key, phase=back.phase.value, routes=applied.state.describe())
        result.conflict = True
        return False

    async def _settle(self, router: Router, policy: ShadowPolicy, state: RolloutState) -> ApplyResult:
        """Make the routes what a recorded `state` holds them at."""
        if state.phase in ANALYSED or state.phase is Phase.paused:
            return await router.apply(desired_routes(router, policy, state.weight, state.mirror_percent))
        if state.phase in (Phase.promoting, Phase.succeeded) and state.weight == 100:
            return await router.promote()
        return await router.finalize(policy.spec.rollback.keep_candidate_tag)

    async def _fail_safe(
        self, ref: ResourceRef, obj: dict[str, Any], rv: str, state: RolloutState, policy: ShadowPolicy,
        router: Router, now: float, generation: int, result: TickResult, msg: str, command: Command | None,
    ) -> None:
        """The target cannot be read or routed: record why (condition Ready=False) and retry next tick.

        Nothing moves while the routes are unknown; a person's rollback is still attempted, and the
        progress deadline ends a rollout that stays stuck (its rollback is retried until it succeeds).
        """
        result.error = msg
        log.warning("tick.route_error", policy=policy.key, error=msg)
        if command is Command.rollback:
            with contextlib.suppress(RouterError, KubeError):
                await router.finalize(policy.spec.rollback.keep_candidate_tag)
        await self._write_status(ref, obj, rv, state, now, generation, None, None, None, None, result, error=msg)

    async def _observe_candidate(self, policy: ShadowPolicy, phase: Phase) -> str | None:
        """Identity of the candidate to roll out; None when there is none (it already is the primary)."""
        target = policy.spec.target
        if target.istio is not None:
            c = target.istio.candidate
            return f"{c.host}/{c.subset or ''}:{c.port or ''}"
        if target.gateway_api is not None:
            b = target.gateway_api.candidate
            return f"{b.namespace or policy.metadata.namespace}/{b.name}:{b.port or ''}"
        if target.tap is not None:  # the policy names the candidate: its URL and its rewrite (a prompt's texts by
            # their digest: a ConfigMap edited mid-rollout is a new candidate, and the analysis restarts)
            rewrite = target.tap.rewrite
            routed = await tap_prompts.route_rewrite(self.kube, policy.metadata.namespace, rewrite) \
                if rewrite is not None else None
            return tap_prompts.candidate_identity(target.tap.candidate_url, routed)
        if target.kserve is not None:
            isvc = await self.kube.get(ResourceRef(INFERENCE_SERVICE, target.kserve.inference_service,
                                                   policy.metadata.namespace))
            return kserve_build.candidate_of(isvc, settled=phase is Phase.pending or phase.terminal)
        assert target.knative is not None
        ksvc = await self.kube.get(ResourceRef(KNATIVE_SERVICE, target.knative.service, policy.metadata.namespace))
        status = ksvc.get("status") or {}
        candidate = target.knative.candidate_revision or status.get("latestReadyRevisionName")
        if not candidate:
            return None
        serving_all = any(
            t.get("revisionName") == candidate and int(t.get("percent") or 0) == 100
            for t in status.get("traffic") or []
        )
        primary = target.knative.primary_revision
        if candidate == primary or (serving_all and (phase is Phase.pending or phase.terminal)):
            return None
        return str(candidate)

    async def _write_status(
        self, ref: ResourceRef, obj: dict[str, Any], rv: str, state: RolloutState, now: float, generation: int,
        look: Look | None, routes: RouteState | None, tally: AgreementTally | None, command: CommandRecord | None,
        result: TickResult, *, error: str | None = None, source_errors: tuple[str, ...] = (),
        target: dict[str, Any] | None = None, settled: bool = False, accepted: Accepted | _Read | None = READ,
    ) -> bool:
        """Record `state` (see :func:`build_status`); False when the write failed (``result`` says why)."""
        return await self._patch_status(ref, obj, rv, state, now, generation, look, routes, tally, command, result,
                                        error=error, source_errors=source_errors, target=target,
                                        settled=settled, accepted=accepted) is not None

    async def _patch_status(
        self, ref: ResourceRef, obj: dict[str, Any], rv: str, state: RolloutState, now: float, generation: int,
        look: Look | None, routes: RouteState | None, tally: AgreementTally | None, command: CommandRecord | None,
        result: TickResult, *, error: str | None = None, source_errors: tuple[str, ...] = (),
        target: dict[str, Any] | None = None, intent: PendingRoute | None = None, settled: bool = False,
        accepted: Accepted | _Read | None = READ,
    ) -> dict[str, Any] | None:
        """:meth:`_write_status`, answering with the object as stored (``obj`` itself when nothing changed).
        `accepted`: the spec to record as the last accepted one (default: ``obj``'s, when the model accepts it)."""
        old = PolicyStatus.of(obj)
        status = build_status(old, state, now=now, generation=generation,
                              evidence=look.evidence if look is not None else None, routes=routes,
                              tally=tally, command=command, error=error, source_errors=source_errors, target=target,
                              paired=look.paired if look is not None else None,
                              since=look.since if look is not None else None, intent=intent, settled=settled,
                              accepted=accepted_of(obj) if isinstance(accepted, _Read) else accepted)
        period = refresh_period(obj, self.status_refresh)
        if command is None and intent is None and not worth_writing(old, status, now, period,
                                                                  refresh_phase(obj, period)):
            return obj  # nothing changed, or only progress figures refreshed less than a period ago: no write
        try:
            stored = await self.kube.patch_status(ref, {"status": status_patch(obj.get("status"), status)},
                                                  resource_version=rv)
        except Conflict:
            result.conflict = True
            log.info("tick.status_conflict", policy=f"{ref.namespace}/{ref.name}")
            return None
        except KubeError as exc:
            result.error = f"cannot write the status: {exc}"
            log.warning("tick.status_failed", policy=f"{ref.namespace}/{ref.name}", error=str(exc))
            return None
        result.status_written = True
        return stored


__all__ = ["COMMAND_ANNOTATION", "Gate", "Notifier", "Reconciler", "TickResult", "desired_routes"]
