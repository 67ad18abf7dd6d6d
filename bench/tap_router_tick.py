"""What the tap router costs the controller per tick: one short MQTT session per call, through a real Mosquitto.

Every tick of a policy with ``shadow.mode: tap`` calls ``TapRouter.read()`` once (connect, subscribe to the
route topic and the reports, the sync probe, renew ``issuedAt``, wait until every counted tap reports the
generation, disconnect); a step adds an ``apply()``. This measures, with N taps following the setting in
this process (``RouteFollower``, as in every tap worker):

* ``read``: a heartbeat while every tap applies the setting (the common tick);
* ``apply``: a change of the mirror share, returned once every tap has reported it;
* ``apply_silent_tap``: a change while one tap has stopped following but still counts (its last report is
  younger than 3 intervals): the call waits the whole confirmation timeout, puts the setting back and raises
  NotConfirmed. (A heartbeat ``read`` is not slowed by such a tap while its last report names the retained
  generation: it confirms at once.)

Per call: wall time (median, p95) and the controller process's CPU time (mean; steal is not in it). The taps
run in the same process, so the CPU figure includes their work on each setting; ``read`` is measured
after the taps have applied the setting, so it is mostly the controller's session.

Run: .venv/bin/python bench/tap_router_tick.py [--taps 4] [--calls 100] [--out bench/results/tap_router_tick.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from shadowctl.aio import cancel_and_wait
from shadowctl.routers.base import RouteState
from shadowctl.routers.tap import ChannelSettings, NotConfirmed, TapChannel, TapRouter
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.publisher import BrokerSettings
from shadowctl.tap.routes import RouteFollower

REPO = Path(__file__).resolve().parents[1]
NS, POLICY = "llm", "chat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summary(walls: list[float], cpus: list[float]) -> dict[str, Any]:
    walls_ms = sorted(w * 1000 for w in walls)
    return {"calls": len(walls), "wall_ms_p50": round(statistics.median(walls_ms), 2),
            "wall_ms_p95": round(walls_ms[max(0, int(0.95 * len(walls_ms)) - 1)], 2),
            "cpu_ms_mean": round(1000 * statistics.fmean(cpus), 2)}


async def timed(call: Any) -> tuple[float, float, BaseException | None]:
    w0, c0 = time.perf_counter(), time.process_time()
    error: BaseException | None = None
    try:
        await call()
    except NotConfirmed as exc:
        error = exc
    return time.perf_counter() - w0, time.process_time() - c0, error


async def measure(port: int, taps: int, calls: int, confirm_s: float) -> dict[str, Any]:
    followers = [RouteFollower(BrokerSettings("127.0.0.1", port, keepalive_s=10), NS, POLICY, f"tap-{i}",
                               TapMetrics("primary"), own_candidate_url=True) for i in range(taps)]
    tasks = [asyncio.create_task(f.run()) for f in followers]
    try:
        for f in followers:
            async with asyncio.timeout(10):
                await f.connected.wait()
        router = TapRouter(TapChannel(ChannelSettings("127.0.0.1", port), NS, POLICY), NS, POLICY, 30.0,
                           confirm_timeout_s=confirm_s)
        await router.apply(RouteState(100, 0, 10.0))
        out: dict[str, Any] = {}
        walls, cpus = [], []
        for _ in range(calls):
            w, c, err = await timed(router.read)
            assert err is None, err
            walls.append(w)
            cpus.append(c)
        out["read"] = summary(walls, cpus)
        walls, cpus = [], []
        for i in range(calls):
            w, c, err = await timed(lambda i=i: router.apply(RouteState(100, 0, 10.0 + (i % 2))))
            assert err is None, err
            walls.append(w)
            cpus.append(c)
        out["apply"] = summary(walls, cpus)
        await cancel_and_wait(tasks[-1])  # one tap stops following; its last report still counts
        walls, cpus = [], []
        for i in range(min(calls, 3)):
            w, c, err = await timed(lambda i=i: router.apply(RouteState(100, 0, 20.0 + i)))
            assert isinstance(err, NotConfirmed), err
            walls.append(w)
            cpus.append(c)
        out["apply_silent_tap"] = summary(walls, cpus)
        return out
    finally:
        await cancel_and_wait(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--taps", type=int, default=4, help="taps following the setting (tap worker processes)")
    parser.add_argument("--calls", type=int, default=100, help="calls of read() and of apply() to time")
    parser.add_argument("--confirm-s", type=float, default=5.0,
                        help="the router's confirmation timeout (the controller's: 5 s)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tap_router_tick.json",
                        help="where to write the JSON result")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    port = free_port()
    (tmp / "m.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(tmp / "m.conf")],
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        result = {"taps": args.taps, "confirm_timeout_s": args.confirm_s,
                  **asyncio.run(measure(port, args.taps, args.calls, args.confirm_s))}
        print(json.dumps(result, indent=2))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        broker.terminate()
        broker.wait(timeout=10)


if __name__ == "__main__":
    main()
