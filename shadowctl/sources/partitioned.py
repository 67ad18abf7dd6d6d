"""Pairing a policy's output events in several worker processes, one set of partitions each.

One :class:`~shadowctl.sources.outputs.MqttOutputSource` pairs and scores every event of a policy on one
core (about 10,000 events per CPU second through the broker, docs/scaling.md). Where the taps publish on
P partitions (``spec.analysis.outputs.mqtt.partitions``), :class:`PartitionedOutputSource` starts W
worker processes, each running an ``MqttOutputSource`` subscribed to its own partitions
(:func:`shadowctl.compare.partitions.assignment`), and answers the controller with the sum of their
counts. It is an output source like the other (``run``, ``snapshot``, ``reset``: the controller's
``OutputSourcePort``), so the controller does not know the work is spread.

How the processes talk: each worker sends its snapshot (agreement tally, paired latencies, pairing
counters) over a pipe every ``report_s``, tagged with the generation of the last reset it applied; the
parent keeps each worker's latest snapshot of the current generation, so after :meth:`reset` the sum
counts only what the workers counted after they reset (a snapshot in flight from before is dropped).
A reset is asynchronous: a worker applies it as soon as its pipe is readable (milliseconds), and pairs
it completes in between are counted in neither phase; until every worker has reported after the reset,
``snapshot().connected`` is false.
A worker that dies is started again (its partitions' pairs pending at that moment are lost, and what it
counted in this phase too; the controller's tally from `.status` keeps the larger of the stored and the
fresh count, so a restart never lowers what the judge sees). Processes start with ``spawn`` (a fork of
an event loop with threads is not safe).

Limits, said where they bite: the workers connect with the password read (``password_provider``) when
each was started (a rotated Secret applies when it is started again), without client TLS material built from
Secrets (a ``tls_provider`` cannot cross a process boundary) and without the ``semantic`` comparator
(its model would load in every worker); :func:`partitioned_source` refuses those cases with a clear
message rather than running without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.comparators import MAX_DISAGREEMENTS, AgreementTally
from shadowctl.compare.partitions import assignment
from shadowctl.judge.model import Paired
from shadowctl.policy.model import ComparatorName, ShadowPolicy
from shadowctl.policy.status import ComparatorCounts
from shadowctl.sources.base import SourceConfigError

log = structlog.get_logger(__name__)


def add_tallies(tallies: Iterable[AgreementTally]) -> AgreementTally:
    """The tally of disjoint sets of pairs: counts added per comparator, the last disagreements kept."""
    rows: dict[str, list[int]] = {}
    skipped = 0
    last: list[Any] = []
    for tally in tallies:
        skipped += tally.skipped_primary_failed
        last.extend(tally.disagreements)
        for name, c in tally.counts.items():
            row = rows.setdefault(name, [0, 0, 0, 0, 0])
            for i, v in enumerate((c.candidate_pairs, c.candidate_agree, c.baseline_pairs, c.baseline_agree,
                                   c.redacted_pairs)):
                row[i] += v
    counts = {name: ComparatorCounts(candidate_pairs=r[0], candidate_agree=r[1], baseline_pairs=r[2],
                                     baseline_agree=r[3], redacted_pairs=r[4]) for name, r in rows.items()}
    return AgreementTally(counts=counts, skipped_primary_failed=skipped,
                          disagreements=tuple(last[-MAX_DISAGREEMENTS:]))


def add_latency(parts: Iterable[Mapping[str, Paired]]) -> dict[str, Paired]:
    """Paired latencies of disjoint sets of pairs, added per quantity."""
    out: dict[str, Paired] = {}
    for part in parts:
        for quantity, paired in part.items():
            before = out.get(quantity)
            out[quantity] = paired if before is None else before + paired
    return out


@dataclass(frozen=True)
class WorkerReport:
    """What one worker process sends the parent (pickled over its pipe)."""

    worker: int
    generation: int
    tally: AgreementTally
    latency: dict[str, Paired]
    pairing: dict[str, object]
    pending: int
    malformed: int
    connected: bool
    last_error: str | None


@dataclass(frozen=True)
class PartitionedSnapshot:
    """The sum over the workers (the shape of :class:`~shadowctl.sources.outputs.OutputSnapshot`)."""

    tally: AgreementTally
    latency: dict[str, Paired]
    pending: int
    malformed: int
    connected: bool
    """Every worker has reported since the last reset and is connected to the broker."""
    last_error: str | None
    workers: dict[int, WorkerReport] = field(default_factory=dict)


def _worker_main(policy: ShadowPolicy, password: str | None, worker: int, workers: int,
                 share_group: str | None, report_s: float, conn: mpc.Connection) -> None:
    """A worker process: pair this worker's partitions and report until the parent says stop or goes away."""
    from shadowctl.sources.outputs import MqttOutputSource  # in the child only

    async def main() -> None:
        partitions = policy.spec.analysis.outputs.mqtt.partitions if policy.spec.analysis.outputs else 1
        mine = assignment(worker, workers, partitions)
        source = MqttOutputSource.from_policy(policy, password=password, mine=mine, share_group=share_group)
        generation = 0
        stop = asyncio.Event()

        def commands() -> None:  # as soon as the parent writes: a reset applies within milliseconds
            nonlocal generation
            try:
                while conn.poll():
                    command, value = conn.recv()
                    if command == "reset":
                        source.reset()
                        generation = value
                        report()  # the parent counts this worker again from its first report after the reset
                    elif command == "stop":
                        stop.set()
            except (EOFError, OSError):  # the parent is gone
                stop.set()

        def report() -> None:
            snap = source.snapshot()
            conn.send(WorkerReport(worker, generation, snap.tally, dict(snap.latency), snap.pairing,
                                   snap.pending, snap.malformed, snap.connected, snap.last_error))

        loop = asyncio.get_running_loop()
        loop.add_reader(conn.fileno(), commands)
        task = asyncio.create_task(source.run())
        try:
            while not task.done() and not stop.is_set():
                report()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(report_s):
                        await stop.wait()
            if task.done():
                task.result()  # a BrokerRejected ends the worker with its error (the parent logs the exit)
        finally:
            loop.remove_reader(conn.fileno())
            await cancel_and_wait(task)

    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError, EOFError):
        asyncio.run(main())


@dataclass
class _Worker:
    index: int
    process: mp.process.BaseProcess
    conn: mpc.Connection
    started: float


class PartitionedOutputSource:
    """Pairs one policy's partitions in ``workers`` processes and answers the sum of their counts."""

    def __init__(self, policy: ShadowPolicy, *, workers: int, password: str | None = None,
                 password_provider: Callable[[], Awaitable[str]] | None = None, share_group: str | None = None,
                 report_s: float = 0.2, restart_backoff_s: float = 1.0) -> None:
        """``workers``: processes (each takes partitions w, w+W, ...); ``password``: the broker password the
        workers connect with, or ``password_provider`` read before each worker starts (a Secret); ``share_group``: subscribe as members of this MQTT 5 shared-subscription group;
        ``report_s``: how often each worker reports its counts."""
        outputs = policy.spec.analysis.outputs
        if outputs is None:
            raise SourceConfigError(f"{policy.key}: spec.analysis.outputs is not set; nothing to compare")
        if workers < 1:
            raise SourceConfigError(f"{policy.key}: pairing workers must be at least 1, not {workers}")
        self.policy = policy
        self.workers = workers
        self.password = password
        self.password_provider = password_provider
        self.share_group = share_group
        self.report_s = report_s
        self.restart_backoff_s = restart_backoff_s
        self.generation = 0
        self.restarts = 0
        """Worker processes started again after they ended (for tests and logs)."""
        self._latest: dict[int, WorkerReport] = {}
        self._procs: dict[int, _Worker] = {}
        self._ctx = mp.get_context("spawn")

    async def _start(self, index: int) -> _Worker:
        if self.password_provider is not None:
            self.password = await self.password_provider()
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main, name=f"shadowctl-pairing-{self.policy.key}-{index}", daemon=True,
            args=(self.policy, self.password, index, self.workers, self.share_group, self.report_s, child))
        process.start()
        child.close()
        if self.generation:
            parent.send(("reset", self.generation))
        return _Worker(index, process, parent, time.monotonic())

    async def run(self) -> None:
        """Start the workers, collect their reports and restart any that ends, until cancelled."""
        ready = False
        try:
            for index in range(self.workers):
                self._procs[index] = await self._start(index)
            while True:
                if not ready and self.snapshot().connected:
                    ready = True
                    log.info("pairing.workers_connected", policy=self.policy.key, workers=self.workers,
                             pids=sorted(p for p in self.pids().values() if p is not None))
                for index, w in list(self._procs.items()):
                    with contextlib.suppress(EOFError, OSError):
                        while w.conn.poll():
                            report = w.conn.recv()
                            if isinstance(report, WorkerReport) and report.generation == self.generation:
                                self._latest[index] = report
                    if not w.process.is_alive() and time.monotonic() - w.started >= self.restart_backoff_s:
                        log.warning("pairing worker ended; starting it again", policy=self.policy.key,
                                    worker=index, exitcode=w.process.exitcode)
                        w.conn.close()
                        self._latest.pop(index, None)
                        self._procs[index] = await self._start(index)
                        self.restarts += 1
                await asyncio.sleep(min(0.05, self.report_s))
        finally:
            await self._stop_all()

    async def _stop_all(self) -> None:
        for w in self._procs.values():
            with contextlib.suppress(OSError, BrokenPipeError):
                w.conn.send(("stop", 0))
        for w in self._procs.values():
            # join() blocks: in a thread, so the loop (the Lease, the ticks) runs meanwhile.
            await asyncio.to_thread(w.process.join, 5.0)
            if w.process.is_alive():
                w.process.kill()
                await asyncio.to_thread(w.process.join, 1.0)
            w.conn.close()
        self._procs.clear()

    def pids(self) -> dict[int, int | None]:
        """The worker processes' ids, by worker index."""
        return {i: w.process.pid for i, w in self._procs.items()}

    def snapshot(self) -> PartitionedSnapshot:
        """The workers' counts since the last reset, added up (a worker that has not reported counts zero)."""
        reports = [self._latest[i] for i in sorted(self._latest)]
        errors = [r.last_error for r in reports if r.last_error]
        return PartitionedSnapshot(
            tally=add_tallies(r.tally for r in reports),
            latency=add_latency(r.latency for r in reports),
            pending=sum(r.pending for r in reports),
            malformed=sum(r.malformed for r in reports),
            connected=len(reports) == self.workers and all(r.connected for r in reports),
            last_error=errors[0] if errors else None,
            workers=dict(self._latest),
        )

    def reset(self) -> None:
        """Count afresh (a new phase): every worker resets; reports from before it are ignored."""
        self.generation += 1
        self._latest.clear()
        for w in self._procs.values():
            with contextlib.suppress(OSError, BrokenPipeError):
                w.conn.send(("reset", self.generation))


def partitioned_source(policy: ShadowPolicy, *, workers: int, password: str | None = None,
                       password_provider: Callable[[], Awaitable[str]] | None = None,
                       share_group: str | None = None, tls: bool = False) -> PartitionedOutputSource:
    """The source for a policy whose events are paired in ``workers`` processes; SourceConfigError saying
    what stands in the way (no partitions to split, a comparator or TLS the workers cannot carry)."""
    outputs = policy.spec.analysis.outputs
    if outputs is None:
        raise SourceConfigError(f"{policy.key}: spec.analysis.outputs is not set; nothing to compare")
    if outputs.mqtt.partitions < workers:
        raise SourceConfigError(
            f"{policy.key}: {workers} pairing workers need spec.analysis.outputs.mqtt.partitions >= {workers} "
            f"(it is {outputs.mqtt.partitions}; start the taps with the same --partitions)")
    if any(c.name is ComparatorName.semantic for c in outputs.comparators):
        raise SourceConfigError(f"{policy.key}: the semantic comparator runs in the controller's process only; "
                                "pair this policy in one process (no pairing workers)")
    if tls or outputs.mqtt.tls is not None:
        raise SourceConfigError(f"{policy.key}: pairing workers do not carry TLS material from Secrets yet; pair "
                                "this policy in one process")
    return PartitionedOutputSource(policy, workers=workers, password=password, password_provider=password_provider,
                                   share_group=share_group)
