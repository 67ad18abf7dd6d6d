"""The controller process: watch ShadowPolicies, run one worker task per policy, lead or stand by.

Looks end on interval boundaries: at each one the manager has the
:class:`~shadowctl.controller.analysis.LookScheduler` fetch and judge the look of
every rollout due then, at once; each worker then ticks at its own fixed offset
into the interval and reads its look from the board.
A watch event for a policy (a spec edit, a `shadowctl promote` annotation)
wakes its worker at once. The watch re-lists when its resourceVersion expires
(410) and resumes after a dropped stream.

With ``shard`` (``shadowctl run --shard I/N``) the manager runs only the policies of its shard
(:mod:`shadowctl.controller.shard`), and the API server filters for it: the manager lists and watches
the policies labelled with one of its buckets (``shadowctl.dev/shard-bucket in (...)``, with the namespace
and ``-l``), so a shard decodes only its own share. A second watch selects the policies without the label
(none, once every policy is labelled): the shard that owns one labels it, after which the first watch
delivers it. A label changed by hand to another bucket is put back by whichever shard's watch delivers it
(the value is a function of the name); a policy leaving this shard's selection that way is not treated as
deleted (its routes are not restored), only a real deletion is.

Only the leader runs workers. A replica that loses the Lease cancels them
between two API calls at worst; every status write is conditional on the
resourceVersion it was computed from, so a stale leader's write fails (409)
instead of double-applying a step.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import ValidationError

from shadowctl.aio import cancel_and_wait, cancel_requested
from shadowctl.controller.analysis import LookScheduler, look_end
from shadowctl.controller.clock import Clock
from shadowctl.controller.commands import COMMAND_ANNOTATION
from shadowctl.controller.reconciler import Reconciler
from shadowctl.controller.shard import ALL, BUCKET_LABEL, Shard, bucket_of, labelled_bucket
from shadowctl.controller.status import parse_policy, read_state
from shadowctl.kube import SHADOW_POLICY, KubeClient, KubeError, NotFound, ResourceRef, WatchExpired
from shadowctl.machine import ANALYSED, RolloutState
from shadowctl.policy.duration import parse_duration
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.status import Phase

log = structlog.get_logger(__name__)

DEFAULT_INTERVAL = 30.0


def next_tick(now: float, interval: float) -> float:
    """The next interval boundary strictly after `now`."""
    return (math.floor(now / interval) + 1) * interval


def _interval(obj: dict[str, Any]) -> float:
    raw = (((obj.get("spec") or {}).get("analysis")) or {}).get("interval", "30s")
    try:
        return max(1.0, parse_duration(raw).total_seconds())
    except ValueError:
        return DEFAULT_INTERVAL


def _wants_tick(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A change a person made (spec edit, command annotation, deletion), not our own status write: act now."""
    o, n = old.get("metadata") or {}, new.get("metadata") or {}
    return bool(
        o.get("generation") != n.get("generation")
        or (o.get("annotations") or {}).get(COMMAND_ANNOTATION) != (n.get("annotations") or {}).get(COMMAND_ANNOTATION)
        or bool(o.get("deletionTimestamp")) != bool(n.get("deletionTimestamp"))
    )


@dataclass
class _Worker:
    ref: ResourceRef
    interval: float
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    ticks: int = 0
    reread: bool = True


class Manager:
    """Runs workers for the policies one namespace (or all), one label selector and one shard select."""

    def __init__(
        self,
        kube: KubeClient,
        reconciler: Reconciler,
        clock: Clock,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        min_interval: float = 0.0,
        spread: float = 0.9,
        lead: float = 0.1,
        shard: Shard = ALL,
    ) -> None:
        """`spread`, `lead`: each policy ticks at a fixed offset in [lead, spread) x interval after the
        boundary, so that the ticks of many policies do not contend; their looks still end at the boundary.

        At each boundary the manager runs the look of every rollout due then (:meth:`due`) through its
        :class:`LookScheduler`; the `lead` leaves that look the start of the interval, so that no tick
        waits for it."""
        self.kube = kube
        self.reconciler = reconciler
        self.clock = clock
        self.namespace = namespace
        self.label_selector = label_selector
        self.shard = shard
        self.selector = shard.selector(label_selector)
        self._buckets = frozenset(str(b) for b in shard.buckets()) if shard.count > 1 else frozenset()
        self.labelled = 0
        """Policies this manager gave their bucket label (for the benchmark and logs)."""
        self.min_interval = min_interval
        self.spread = spread
        self.lead = min(lead, spread)
        self.workers: dict[str, _Worker] = {}
        self.ready = asyncio.Event()
        self.last_objects: dict[str, dict[str, Any]] = {}
        self.scheduler = LookScheduler(reconciler.analyzer)

    # ----------------------------------------------------------------- watch

    async def run(self) -> None:
        """Watch and run workers until cancelled (then every worker is cancelled too)."""
        looks = asyncio.create_task(self._run_looks(), name="looks")
        labeller = asyncio.create_task(self._run_labeller(), name="labeller") if self.shard.count > 1 else None
        try:
            backoff = 0.5
            while True:
                try:
                    rv = await self._relist()
                    self.ready.set()
                    backoff = 0.5
                    while True:
                        rv = await self._watch(rv)
                except WatchExpired:
                    log.info("watch.expired; listing again")
                except KubeError as exc:
                    if cancel_requested():  # a library turned our cancellation into an error
                        raise asyncio.CancelledError from exc
                    log.warning("watch.failed", error=str(exc), retry_in_s=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(10.0, backoff * 2)
        finally:
            await cancel_and_wait(looks, labeller)
            self.ready.clear()
            await self.stop_workers()

    async def _run_looks(self) -> None:
        """At each interval boundary, run the look of every rollout due then (before their ticks)."""
        while True:
            intervals = {w.interval for w in self.workers.values()} or {DEFAULT_INTERVAL}
            now = self.clock.now()
            boundary = min(next_tick(now, i) for i in intervals)
            await self.clock.sleep(boundary - now)
            if self.clock.now() < boundary or not self.workers:
                continue
            await self.scheduler.run(boundary, self.due(boundary))

    async def _relist(self) -> str:
        listed = await self.kube.list(SHADOW_POLICY, self.namespace, label_selector=self.selector)
        seen = set()
        for obj in listed.items:
            if self._mislabelled(obj):
                await self.label(obj)
            if self._owns(obj):
                seen.add(self._upsert(obj))
        for key in list(self.workers):
            if key not in seen:
                last = self.last_objects.get(key)
                if self.shard.count > 1 and last is not None and await self._still_there(last):
                    continue
                await self._remove(key)
        return listed.resource_version

    async def _watch(self, rv: str) -> str:
        async for event in self.kube.watch(SHADOW_POLICY, self.namespace, rv, label_selector=self.selector,
                                           timeout_seconds=300):
            rv = event.resource_version or rv
            if event.type == "DELETED" and self.shard.count > 1 and await self._still_there(event.object):
                continue  # it left this shard's selection by a label change; not deleted (see _still_there)
            if self._mislabelled(event.object):  # labelled by hand with another of this shard's buckets
                await self.label(event.object)
            if not self._owns(event.object):
                continue
            if event.type in ("ADDED", "MODIFIED"):
                self._upsert(event.object)
            elif event.type == "DELETED":
                key = self._key(event.object)
                await self._remove(key)
        return rv

    async def _run_labeller(self) -> None:
        """Label the policies that no shard selects yet (no bucket label) and that this shard owns, listing them
        first and then watching for new ones, until cancelled."""
        backoff = 0.5
        unlabelled = self.shard.unlabelled(self.label_selector)
        while True:
            try:
                listed = await self.kube.list(SHADOW_POLICY, self.namespace, label_selector=unlabelled)
                for obj in listed.items:
                    if self._owns(obj):
                        await self.label(obj)
                rv = listed.resource_version
                backoff = 0.5
                while True:
                    async for event in self.kube.watch(SHADOW_POLICY, self.namespace, rv, label_selector=unlabelled,
                                                       timeout_seconds=300):
                        rv = event.resource_version or rv
                        if event.type in ("ADDED", "MODIFIED") and self._owns(event.object):
                            await self.label(event.object)
            except WatchExpired:
                log.info("labeller.watch_expired; listing again")
            except KubeError as exc:
                if cancel_requested():
                    raise asyncio.CancelledError from exc
                log.warning("labeller.failed", error=str(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(10.0, backoff * 2)

    async def _still_there(self, obj: dict[str, Any]) -> bool:
        """Whether a policy a sharded watch or list no longer delivers still exists (the same object): its bucket
        label was changed or removed by hand. The API server tells a policy leaving a label selector as
        DELETED, with the object as it was before, so only a read tells it from a deletion. Still there: the
        label is put back when this shard owns it (the watch then delivers it again) and its worker carries
        on; an API error counts as still there (the worker's own read finds a deleted policy gone)."""
        meta = obj.get("metadata") or {}
        ref = ResourceRef(SHADOW_POLICY, str(meta.get("name")), str(meta.get("namespace", "default")))
        try:
            fresh = await self.kube.get(ref)
        except NotFound:
            return False
        except KubeError as exc:
            if cancel_requested():
                raise asyncio.CancelledError from exc
            log.warning("shard.unknown_if_deleted", policy=f"{ref.namespace}/{ref.name}", error=str(exc))
            return True
        if (fresh.get("metadata") or {}).get("uid") != meta.get("uid"):
            return False  # deleted, and another policy of the same name created since
        if self._owns(fresh) and labelled_bucket(fresh) not in self._buckets:
            await self.label(fresh)
        return True

    def _mislabelled(self, obj: dict[str, Any]) -> bool:
        """Sharded, and the policy's bucket label is not its bucket (absent: not mislabelled, only new)."""
        if self.shard.count == 1:
            return False
        value = labelled_bucket(obj)
        meta = obj.get("metadata") or {}
        return value is not None and value != str(bucket_of(str(meta.get("namespace", "default")),
                                                            str(meta.get("name"))))

    async def label(self, obj: dict[str, Any]) -> None:
        """Give the policy its bucket label (``shadowctl.dev/shard-bucket``); a policy gone meanwhile is left,
        an API error is logged (the label is written again on the policy's next event or list)."""
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace", "default")), str(meta.get("name"))
        bucket = str(bucket_of(namespace, name))
        try:
            await self.kube.patch_merge(ResourceRef(SHADOW_POLICY, name, namespace),
                                        {"metadata": {"labels": {BUCKET_LABEL: bucket}}})
        except NotFound:
            return
        except KubeError as exc:
            if cancel_requested():
                raise asyncio.CancelledError from exc
            log.warning("shard.label_failed", policy=f"{namespace}/{name}", error=str(exc))
            return
        self.labelled += 1
        log.info("shard.labelled", policy=f"{namespace}/{name}", bucket=bucket, shard=str(self.shard))

    @staticmethod
    def _key(obj: dict[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace', 'default')}/{meta.get('name')}"

    def _owns(self, obj: dict[str, Any]) -> bool:
        """Whether this manager's shard runs the policy `obj` (a namespace and name never change)."""
        meta = obj.get("metadata") or {}
        return self.shard.owns(str(meta.get("namespace", "default")), str(meta.get("name")))

    def _upsert(self, obj: dict[str, Any]) -> str:
        key = self._key(obj)
        meta = obj.get("metadata") or {}
        previous = self.last_objects.get(key)
        self.last_objects[key] = obj
        interval = max(self.min_interval, _interval(obj))
        worker = self.workers.get(key)
        if worker is None:
            worker = _Worker(ResourceRef(SHADOW_POLICY, str(meta["name"]), str(meta.get("namespace", "default"))),
                             interval)
            worker.task = asyncio.create_task(self._loop(worker), name=f"policy {key}")
            self.workers[key] = worker
        else:
            worker.interval = interval
            if previous is None or _wants_tick(previous, obj):
                worker.wake.set()
        return key

    async def _remove(self, key: str) -> None:
        worker = self.workers.pop(key, None)
        obj = self.last_objects.pop(key, None)
        if worker is not None:
            await cancel_and_wait(worker.task)
        if obj is not None:
            await self.reconciler.abandon(obj)

    async def stop_workers(self) -> None:
        workers = list(self.workers.values())
        self.workers.clear()
        await cancel_and_wait(*(w.task for w in workers))

    # ----------------------------------------------------------------- workers

    async def _loop(self, worker: _Worker) -> None:
        while True:
            worker.wake.clear()
            key = f"{worker.ref.namespace}/{worker.ref.name}"
            cached = None if worker.reread else self.last_objects.get(key)
            try:
                result = await self.reconciler.tick(worker.ref, cached)
            except Exception:  # a bug in one policy's tick must not stop the others
                if cancel_requested():  # a library turned our cancellation into an error
                    raise asyncio.CancelledError from None
                log.exception("tick.crashed", policy=str(worker.ref))
                result = None
            worker.ticks += 1
            if cancel_requested():  # a tick that lost our cancellation returned as if nothing happened
                raise asyncio.CancelledError
            if result is not None and result.gone:
                return
            # A conflict means our copy was stale: read it fresh next time, and soon.
            worker.reread = result is None or result.conflict
            if worker.reread:
                await self._sleep_until(worker, self.clock.now() + min(1.0, worker.interval))
                continue
            # After a transition, look again soon: finishing phases (Promoting, RollingBack) takes one tick.
            fast = (result is not None and result.transitioned and result.phase is not None
                    and result.phase not in ANALYSED and not result.phase.terminal and result.phase is not Phase.paused)
            now = self.clock.now()
            if fast:
                deadline = now + min(1.0, worker.interval)
            else:
                offset = self.offset(key, worker.interval)
                deadline = next_tick(now - offset, worker.interval) + offset
            await self._sleep_until(worker, deadline)

    def offset(self, key: str, interval: float) -> float:
        """This policy's fixed tick offset after each interval boundary (a hash of its key, uniform in
        [lead, spread) x interval; crc32 of similar names such as p0001, p0002 clusters)."""
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return interval * (self.lead + (self.spread - self.lead) * int.from_bytes(digest, "big") / 2.0**64)

    def due(self, end: float) -> list[tuple[ShadowPolicy, RolloutState]]:
        """Every rollout this manager runs (as the watch cache has it) whose look ends at `end`."""
        out: list[tuple[ShadowPolicy, RolloutState]] = []
        for obj in list(self.last_objects.values()):
            state = read_state(obj)
            since = state.phase_started_at
            if state.phase not in ANALYSED or since is None or end - since < 1.0:  # a phase that just began
                continue
            policy = self._policy(obj)
            if policy is None:
                continue
            if look_end(end, since, policy.spec.analysis.interval.total_seconds()) == end:
                out.append((policy, state))
        return out

    @staticmethod
    def _policy(obj: dict[str, Any]) -> ShadowPolicy | None:
        try:
            return parse_policy(obj)  # cached by generation there
        except ValidationError:
            return None

    async def _sleep_until(self, worker: _Worker, deadline: float) -> None:
        sleeper = asyncio.ensure_future(self.clock.sleep(max(0.0, deadline - self.clock.now())))
        waker = asyncio.ensure_future(worker.wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(sleeper, waker)
