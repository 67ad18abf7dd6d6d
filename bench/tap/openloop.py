"""What the tap benchmarks share: an open-loop load through the lean client, and readings of the machine.

bench/tap/mirror.py and bench/tap/rewrite.py each had their own copy of these; this is the one copy. The load is
open-loop (Poisson arrivals at a fixed rate whatever the answers do, as users send them; a new connection only
when every open one is busy), sent with the lean client of bench/tap/lean_http.py so that the instrument leaves
the cores to the code under test.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lean_http

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Load:
    """What one open-loop run saw, per answered request."""

    ttfb: list[float] = field(default_factory=list)
    """Seconds from sending the request to the answer's first body byte."""
    path: list[float] = field(default_factory=list)
    """The same, less the time the stub says it held the request (its ``held_ns``): the time spent on the way
    there and back (client, network, tap), without the model server's time and its timer's jitter."""
    errors: int = 0
    """Requests whose connection was lost before the answer ended."""


async def open_loop(port: int, raw: bytes, rps: float, seconds: float, seed: int = 1) -> Load:
    """Send `raw` (a whole HTTP/1.1 request) to 127.0.0.1:`port` at Poisson arrivals of `rps` per second for
    `seconds`; the arrival times are drawn from `seed`, so runs with the same seed send the same schedule."""
    idle: list[lean_http.ClientProtocol] = []
    load = Load()

    async def one() -> None:
        conn = idle.pop() if idle else await lean_http.open_client(port)
        sent = time.perf_counter()
        first, done = conn.request(raw)
        try:
            ttfb = await first - sent
            await done
        except ConnectionError:
            load.errors += 1
            return
        load.ttfb.append(ttfb)
        held = conn.held_s
        if held is not None:
            load.path.append(ttfb - held)
        idle.append(conn)

    rng = random.Random(seed)
    tasks = []
    end = time.perf_counter() + seconds
    at = time.perf_counter()
    while at < end:
        tasks.append(asyncio.create_task(one()))
        at += rng.expovariate(rps)
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
    await asyncio.gather(*tasks)
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    return load


def pct(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values` (nearest rank below; NaN when empty)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, within: float = 30.0) -> None:
    """Return once something listens on 127.0.0.1:`port`; exit the benchmark after `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port} after {within:g} s")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used; stolen time is not in it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def steal_seconds() -> float:
    """Seconds the hypervisor has stolen from this machine's CPUs (all of them together) since boot."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(cpu[8]) / TICKS


def start_stub(ttft_ms: float, gap_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    """A lean stub model server (bench/tap/lean_http.py) as its own process, listening; and its port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("lean_http.py")), "serve", str(port),
                             str(ttft_ms), str(gap_ms)])
    wait_port(port)
    return proc, port
