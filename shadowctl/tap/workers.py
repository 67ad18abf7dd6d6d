"""Several tap processes on one port: `shadowctl tap --workers N`.

Why processes: the tap's cost is Python CPU per request and per streamed chunk,
and one event loop uses one core. Past about 0.7 of a core its queue grows and
adds milliseconds to every stream's first byte (measured in docs/outputs.md,
"Tap overhead"). N worker processes each bind the listen address with
``SO_REUSEPORT``; the kernel spreads new connections across them, so no process
hands sockets to another and a slow worker does not hold up the others.

What stays one tap from the outside:

* ``/metrics``, whichever worker answers, shows the sum of all of them:
  prometheus_client's multiprocess mode (each worker writes its samples to
  memory-mapped files in a directory the supervisor creates and removes; the
  worker that is scraped reads them all). Counters and histograms of a worker
  that died are kept; its gauges are dropped (``mark_process_dead``).
* Output events: each worker has its own MQTT connection (own client id) and
  queue; the topic and the schema are the same.

The supervisor (this process) only starts, watches and stops workers: a worker
that exits before it listens (port in use, bad CA file) stops the whole tap with
its exit code; one that dies later is started again after a pause (the
connections it held are lost, as with any process); SIGTERM or SIGINT stops all
of them (SIGTERM first, SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from types import FrameType
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_ENV = "SHADOWCTL_TAP_WORKER"
RESTART_PAUSE_S = 1.0

Target = Callable[[Any, Callable[[], None]], int]
"""A worker's body: ``target(settings, on_ready) -> exit code``; it calls ``on_ready()`` once it listens."""


def worker_index() -> int | None:
    """This process's worker number under a supervisor, else None."""
    raw = os.environ.get(WORKER_ENV)
    return int(raw) if raw is not None and raw.isdigit() else None


def _child(target: Target, settings: Any, index: int, ready: Event) -> None:
    os.environ[WORKER_ENV] = str(index)
    raise SystemExit(target(settings, ready.set))


class Supervisor:
    """Runs `workers` processes of `target` until told to stop."""

    def __init__(self, target: Target, settings: Any, workers: int, *,
                 stop_grace_s: float = 10.0, restart_pause_s: float = RESTART_PAUSE_S) -> None:
        if workers < 2:
            raise ValueError("a supervisor needs at least 2 workers")
        self.target = target
        self.settings = settings
        self.workers = workers
        self.stop_grace_s = stop_grace_s
        self.restart_pause_s = restart_pause_s
        self._ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop or sockets
        self._procs: dict[int, tuple[BaseProcess, Event]] = {}
        self._stopping = False

    def run(self) -> int:
        """Start the workers, watch them, stop them; the exit code for the command."""
        metrics_dir = tempfile.mkdtemp(prefix="shadowctl-tap-metrics-")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the workers, read when they import prometheus_client
        try:
            for index in range(self.workers):
                self._start(index)
            log.info("tap workers started", workers=self.workers, metrics_dir=metrics_dir)
            return self._watch()
        finally:
            self._stop_all()
            os.environ.pop(MULTIPROC_ENV, None)
            for s, handler in previous.items():
                signal.signal(s, handler)
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _start(self, index: int) -> None:
        ready = self._ctx.Event()
        proc = self._ctx.Process(target=_child, args=(self.target, self.settings, index, ready),
                                 name=f"shadowctl-tap-worker-{index}")
        proc.start()
        self._procs[index] = (proc, ready)

    def _watch(self) -> int:
        while not self._stopping:
            sentinels = [p.sentinel for p, _ in self._procs.values()]
            multiprocessing.connection.wait(sentinels, timeout=0.2)
            for index, (proc, ready) in list(self._procs.items()):
                if proc.is_alive() or self._stopping:
                    continue
                code = proc.exitcode if proc.exitcode is not None else 1
                if not ready.is_set():
                    log.error("tap worker failed to start; stopping the tap", worker=index, exit_code=code)
                    return code if code > 0 else 1
                log.warning("tap worker exited; starting it again", worker=index, exit_code=code,
                            restart_in_s=self.restart_pause_s)
                self._forget(proc)
                time.sleep(self.restart_pause_s)
                if not self._stopping:
                    self._start(index)
        return 0

    def _forget(self, proc: BaseProcess) -> None:
        """Drop a dead worker's live gauges from the shared metrics."""
        if proc.pid is None:
            return
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(proc.pid, os.environ.get(MULTIPROC_ENV))  # type: ignore[no-untyped-call]

    def _stop_all(self) -> None:
        procs = [p for p, _ in self._procs.values()]
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                log.warning("tap worker did not stop; killing it", pid=p.pid)
                p.kill()
                p.join(5)
        self._procs.clear()
