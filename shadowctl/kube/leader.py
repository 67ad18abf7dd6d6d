"""Lease-based leader election (``coordination.k8s.io/v1``) on :class:`KubeClient`.

Why not ``kubernetes.aio.leaderelection``: it reads ``time.time()`` and calls
``asyncio.sleep`` directly (no injectable clock), refuses durations under one
second, never releases the lease when stopped, talks through its own typed API
(bypassing this adapter's errors and retries) and logs tracebacks on every lost
race. The semantics here are the same as client-go's and that module's:

* a candidate takes the Lease when it does not exist, has no holder, or its
  record (holder, renewTime, ...) has not changed for ``lease_duration``
  measured on the candidate's own monotonic clock since it first saw that record
  (clocks of different machines are never compared);
* the leader renews every ``retry_period``; if it cannot renew within
  ``renew_deadline`` it stops leading;
* every write carries the resourceVersion it was read at, so of two candidates
  racing for the same Lease exactly one wins (the other gets 409);
* on a clean stop the leader releases the Lease (empty holder) so that a
  successor need not wait for the lease to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from shadowctl.aio import cancel_and_wait
from shadowctl.kube.client import KubeClient, Sleep
from shadowctl.kube.errors import AlreadyExists, Conflict, KubeError, NotFound
from shadowctl.kube.refs import LEASE, ResourceRef

log = structlog.get_logger(__name__)


def _micro_time(stamp: datetime) -> str:
    return stamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """One candidate for the Lease ``namespace/name``.

    ``run(on_started, on_stopped)`` blocks: it acquires the Lease, runs
    ``on_started()`` as a task while leading, and returns after leadership is
    lost (that task cancelled, ``on_stopped()`` awaited). Cancel ``run`` to stop;
    the Lease is then released when ``release_on_cancel`` is true.
    """

    def __init__(
        self,
        client: KubeClient,
        *,
        name: str,
        namespace: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        release_on_cancel: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_duration")
        self._client = client
        self.ref = ResourceRef(LEASE, name, namespace)
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.release_on_cancel = release_on_cancel
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep
        self._observed_spec: dict[str, Any] | None = None
        self._observed_at = 0.0
        self._lease: dict[str, Any] | None = None
        self._renew_started: float | None = None
        self.is_leader = False

    def holds(self) -> bool:
        """Whether this replica may still act as the leader *now*: it leads, and its last successful
        renewal was sent less than ``renew_deadline`` ago on its own monotonic clock.

        ``is_leader`` alone is not enough after the process was paused (SIGSTOP, a long GC, a frozen
        VM): it is only cleared once the renew loop runs again, while another replica may have taken
        the Lease ``lease_duration`` after it last saw it change. Writers check this right before a
        write (the controller's route fence); no I/O, so there is no await between it and the write.
        """
        started = self._renew_started
        return self.is_leader and started is not None and self._clock() < started + self.renew_deadline

    @property
    def observed_holder(self) -> str | None:
        """The holder this candidate last saw in the Lease (None before the first read)."""
        if self._observed_spec is None:
            return None
        return str(self._observed_spec.get("holderIdentity") or "") or None

    async def run(
        self,
        on_started: Callable[[], Awaitable[None]],
        on_stopped: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Acquire, lead (``on_started`` runs as a task), and return once leadership is lost."""
        task: asyncio.Task[None] | None = None
        try:
            while not await self.try_acquire_or_renew():
                await self._sleep(self.retry_period)
            log.info("leader.acquired", lease=str(self.ref), identity=self.identity)

            async def _started() -> None:
                await on_started()

            task = asyncio.create_task(_started())
            await self._renew_loop()
            log.warning("leader.lost", lease=str(self.ref), identity=self.identity)
        except asyncio.CancelledError:
            if self.is_leader and self.release_on_cancel:
                with contextlib.suppress(KubeError):
                    await asyncio.shield(self.release())
            raise
        finally:
            self.is_leader = False
            await cancel_and_wait(task)
        if on_stopped is not None:
            await on_stopped()

    async def _renew_loop(self) -> None:
        while True:
            await self._sleep(self.retry_period)
            deadline = self._clock() + self.renew_deadline
            while True:
                if await self.try_acquire_or_renew():
                    break
                if self._clock() >= deadline:
                    return
                await self._sleep(self.retry_period)

    async def try_acquire_or_renew(self) -> bool:
        """One round: read the Lease, then create, take over or renew it. True when this candidate leads."""
        now = _micro_time(self._wall())
        started = self._clock()  # before the read: others measure the lease from no earlier than this
        try:
            lease = await self._client.get(self.ref)
        except NotFound:
            return await self._create(now, started)
        except KubeError as exc:
            log.info("leader.read_failed", lease=str(self.ref), error=str(exc))
            return False
        spec = dict(lease.get("spec") or {})
        if spec != self._observed_spec:
            self._observed_spec = spec
            self._observed_at = self._clock()
        holder = spec.get("holderIdentity") or ""
        expired = self._clock() >= self._observed_at + self.lease_duration
        if holder and holder != self.identity and not expired:
            self.is_leader = False
            return False
        new_spec = dict(spec)
        new_spec["holderIdentity"] = self.identity
        new_spec["leaseDurationSeconds"] = max(1, round(self.lease_duration))
        new_spec["renewTime"] = now
        if holder != self.identity:
            new_spec["acquireTime"] = now
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
        lease["spec"] = new_spec
        try:
            written = await self._client.replace(LEASE, lease)
        except Conflict:
            self.is_leader = False
            return False
        except KubeError as exc:
            log.info("leader.write_failed", lease=str(self.ref), error=str(exc))
            return False
        self._remember(written, started)
        return True

    async def release(self) -> None:
        """Give the Lease up (empty holder) if this candidate holds it."""
        if self._lease is None:
            return
        lease = dict(self._lease)
        spec = dict(lease.get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            return
        spec["holderIdentity"] = ""
        spec["leaseDurationSeconds"] = 1
        spec["renewTime"] = _micro_time(self._wall())
        lease["spec"] = spec
        try:
            await self._client.replace(LEASE, lease)
            log.info("leader.released", lease=str(self.ref), identity=self.identity)
        except (Conflict, NotFound):
            pass
        finally:
            self.is_leader = False

    async def _create(self, now: str, started: float) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.ref.name, "namespace": self.ref.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.lease_duration)),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
        try:
            written = await self._client.create(LEASE, body)
        except AlreadyExists:
            return False
        except KubeError as exc:
            log.info("leader.create_failed", lease=str(self.ref), error=str(exc))
            return False
        self._remember(written, started)
        return True

    def _remember(self, lease: dict[str, Any], started: float) -> None:
        self._renew_started = started
        self._lease = lease
        self._observed_spec = dict(lease.get("spec") or {})
        self._observed_at = self._clock()
        self.is_leader = True
