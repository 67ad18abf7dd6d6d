"""One controller replica for the fault campaign: `shadowctl run`'s wiring with a stub metric source.

This is :func:`shadowctl.cli.run_cmd.run_controller` (the function behind `shadowctl run`: KubeClient,
Lease election with its stand-by loop, the manager's watch-driven workers, the reconciler, routers,
notifier, /metrics) as its own process, so the campaign can SIGKILL it or SIGSTOP it, with one part
replaced: the metric source is :class:`ScheduledSource`, a stub at the port (the real Prometheus adapter
is tested against a real Prometheus in tests/test_prometheus_*.py; a real Prometheus fed with per-rollout
histories for a thousand rollouts does not fit this machine).

The stub answers as a Prometheus would for two lognormal latency arms and error rates (a "bad" candidate
is slower and fails more, so its rollout is rolled back), and carries out the campaign's Prometheus
faults, per policy and time window, read from a JSON schedule file the campaign rewrites (atomically) as
rollouts start:

* ``prom-down``: every query unreachable (SourceUnavailable), as when the server refuses connections;
* ``prom-slow``: each fetch of an affected policy waits ``slow_s`` seconds first;
* ``prom-nan``: the series hold only NaN (NoData, as the adapter reports it);
* ``prom-empty``: the query answers nothing (NoData);
* ``prom-reset``: a counter reset inside the window: the increase covers only the part after the reset.

Run by bench/faults/run.py: ``python bench/faults/controller.py --kubeconfig K --schedule S --listen ADDR``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shadowctl.cli.common import configure_logging
from shadowctl.cli.run_cmd import RunOptions, run_controller
from shadowctl.sources.base import (
    CountWindow,
    HistogramWindow,
    MetricKey,
    NoData,
    SourceUnavailable,
    Unavailability,
    Variant,
    VariantPair,
    WindowRequest,
    WindowResult,
)
from shadowctl.sources.prometheus import build_requests

# Fine log-spaced buckets (5% apart), as tests/controller_helpers.py: coarse buckets cannot resolve a 10% margin.
LE = (*(round(0.05 * 1.05**i, 6) for i in range(100)), math.inf)
PROM_FAULTS = ("prom-down", "prom-slow", "prom-nan", "prom-empty", "prom-reset")


def _lognorm_cdf(x: float, median: float, sigma: float) -> float:
    if math.isinf(x):
        return 1.0
    return 0.5 * (1 + math.erf(math.log(x / median) / (sigma * math.sqrt(2))))


@dataclass(frozen=True)
class Arm:
    median: float = 0.4
    sigma: float = 0.5
    error_rate: float = 0.01


GOOD = Arm()
BAD = Arm(median=0.8, error_rate=0.08)


@dataclass
class ScheduledSource:
    """Cumulative windows of known distributions (`rate` requests per second per arm), faulted by schedule."""

    schedule_path: Path
    rate: float = 5000.0
    """Requests per second per arm: high, so that a 1 s interval's looks carry enough evidence to pass in
    seconds (with 200/s each phase needed about 48 s of looks)."""
    slow_s: float = 3.0
    _schedule: dict[str, Any] = field(default_factory=dict)
    _mtime: float = -1.0
    plan = staticmethod(build_requests)  # requests as the Prometheus source makes them

    def _policies(self) -> dict[str, Any]:
        try:
            mtime = self.schedule_path.stat().st_mtime
        except OSError:
            return {}
        if mtime != self._mtime:
            with contextlib.suppress(OSError, ValueError):
                self._schedule = json.loads(self.schedule_path.read_text())
                self._mtime = mtime
        policies = self._schedule.get("policies")
        return policies if isinstance(policies, dict) else {}

    def _active(self, entry: dict[str, Any], now: float) -> set[str]:
        return {str(f["kind"]) for f in entry.get("faults", []) if f["from"] <= now < f["to"]}

    async def fetch(self, request: WindowRequest) -> WindowResult:
        return (await self.fetch_many([request]))[request.key]

    async def fetch_many(self, requests: Sequence[WindowRequest]) -> dict[MetricKey, WindowResult]:
        policies = self._policies()
        now = time.time()
        active = {req.key.policy: self._active(policies.get(req.key.policy) or {}, now) for req in requests}
        if any("prom-slow" in kinds for kinds in active.values()):
            await asyncio.sleep(self.slow_s)
        out: dict[MetricKey, WindowResult] = {}
        for req in requests:
            kinds = active[req.key.policy]
            entry = policies.get(req.key.policy) or {}
            if "prom-down" in kinds:
                out[req.key] = SourceUnavailable(req.key.metric, req.primary.expr, Unavailability.unreachable,
                                                 "connection refused (injected)")
                continue
            if "prom-nan" in kinds:
                out[req.key] = NoData(req.key.metric, Variant.candidate, req.candidate.expr,
                                      "all 3 samples are NaN or Inf (injected)")
                continue
            if "prom-empty" in kinds:
                out[req.key] = NoData(req.key.metric, None, req.primary.expr, "no samples in the window (injected)")
                continue
            n = self.rate * (req.end - req.start).total_seconds()
            if "prom-reset" in kinds:
                n *= 0.3  # increase() over a window with a reset: only what came after the reset
            candidate = BAD if entry.get("bad") else GOOD
            if req.key.metric == "errors":
                out[req.key] = VariantPair(CountWindow(GOOD.error_rate * n, n), CountWindow(candidate.error_rate * n, n))
            else:
                out[req.key] = VariantPair(self._hist(GOOD, n), self._hist(candidate, n))
        return out

    @staticmethod
    def _hist(arm: Arm, n: float) -> HistogramWindow:
        return HistogramWindow(LE, tuple(round(n * _lognorm_cdf(b, arm.median, arm.sigma)) for b in LE))

    async def check(self) -> SourceUnavailable | None:
        return None

    async def aclose(self) -> None:
        return None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--schedule", type=Path, required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--namespace", default=None)
    parser.add_argument("--lease-namespace", default="shadowctl")
    parser.add_argument("--lease-duration", type=float, default=4.0)
    parser.add_argument("--renew-deadline", type=float, default=3.0)
    parser.add_argument("--retry-period", type=float, default=0.5)
    args = parser.parse_args(argv)
    configure_logging("json")
    opts = RunOptions(args.kubeconfig, None, args.namespace, None, None, None, args.listen, True,
                      "shadowctl-faults", args.lease_namespace, args.lease_duration, args.renew_deadline,
                      args.retry_period, 0.0)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_controller(opts, stop, metric_source=ScheduledSource(args.schedule))

    print(f"controller {os.getpid()} starting", flush=True)
    asyncio.run(_main())


if __name__ == "__main__":
    main()
