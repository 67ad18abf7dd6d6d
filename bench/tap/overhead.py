"""Tap overhead: time to first byte of streamed answers, direct vs through `shadowctl tap`.

Run by hand (from the repository root):

    nice .venv/bin/python bench/tap/overhead.py [--requests 1000]

Starts the stub model server (100 ms to the first token, then a token every 20 ms, like a model
server; `--ttft-ms 0 --gap-ms 0` for an instant one) and the tap (publishing to a Mosquitto broker
when the binary exists) as separate processes, then, for 1, 50 and 200 concurrent streams,
measures the time from sending a request to its first body byte, direct and through the tap, and
reports p50/p99 and the added latency. Results go to bench/results/tap_overhead.json.

How the load is shaped (the same for direct and tap):

- `--concurrency N` streams are kept in flight (closed loop): each of N workers sends its next
  request when its previous answer has ended. With `--phase spread` (the default) each worker
  starts at a random moment within one answer's duration, so that N streams are in flight at
  staggered stages, as under real traffic; `--phase aligned` starts all workers at once, so that
  N requests arrive in the same millisecond again and again (a burst test: a single-process
  proxy then queues them, and the added latency measures that queue, not the proxy's cost).
- Each worker's first 2 requests warm the connections up and are not measured.
- The kernel's TCP counters (`nstat`: listen-queue overflows and drops, SYN retransmissions,
  retransmission timeouts) are read before and after each run and reported as deltas: a SYN
  dropped by a full listen queue is retried after 1 s, which shows up as a 1 s stall.

`--tap-src DIR` runs the tap from another checkout (e.g. a copy of the previous version), for a
before/after comparison on the same machine in one run; `--tap-workers N` passes `--workers N`;
`--tap-uvloop` runs the tap on uvloop's event loop (uvloop must be installed; not a dependency of
shadowctl: this measures what it would bring).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
BODY = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
WARMUP = 2
NSTAT_KEYS = ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPSynRetrans", "TcpExtTCPTimeouts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def nstat() -> dict[str, int]:
    """Absolute TCP counters (empty when nstat is not installed)."""
    try:
        out = subprocess.run(["nstat", "-asz", "--json"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    data = json.loads(out)
    counters = data.get("kernel", data)
    return {k: int(counters.get(k, 0)) for k in NSTAT_KEYS}


async def run(url: str, concurrency: int, per_worker: int, answer_s: float, aligned: bool) -> list[float]:
    """`concurrency` streams in flight at all times (closed loop); aiohttp as the client because the
    client is the measuring instrument and must not be the bottleneck."""
    ttfb: list[float] = []
    rng = random.Random(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:

        async def worker() -> None:
            if not aligned:
                await asyncio.sleep(rng.random() * answer_s)
            for i in range(WARMUP + per_worker):
                t0 = time.perf_counter()
                async with client.post(url + "/v1/chat/completions", json=BODY) as r:
                    first = True
                    async for _chunk in r.content.iter_any():
                        if first:
                            if i >= WARMUP:
                                ttfb.append(time.perf_counter() - t0)
                            first = False

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfb


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per run (at least 1 per stream)")
    parser.add_argument("--concurrency", default="1,50,200", help="comma-separated levels")
    parser.add_argument("--ttft-ms", type=float, default=100.0, help="the stub's time to first token")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="the stub's time between tokens")
    parser.add_argument("--phase", choices=("spread", "aligned"), default="spread")
    parser.add_argument("--tap-src", default=str(ROOT), help="checkout to run the tap from")
    parser.add_argument("--tap-workers", type=int, default=0, help="pass --workers N to the tap (0: not passed)")
    parser.add_argument("--tap-uvloop", action="store_true", help="run the tap on uvloop (installed separately)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/tap_overhead.json"))
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp())
    answer_s = (args.ttft_ms + 16 * args.gap_ms) / 1000
    try:
        stub_port, tap_port = free_port(), free_port()
        procs.append(
            subprocess.Popen(
                [PY, str(ROOT / "bench/tap/stub_server.py"), str(stub_port), str(args.ttft_ms), str(args.gap_ms)]
            )
        )
        boot = "from shadowctl.cli.app import main; main()"
        if args.tap_uvloop:
            boot = "import uvloop; uvloop.install(); " + boot
        tap_cmd = [
            PY,
            "-c",
            boot,
            "tap",
            "--listen",
            f"127.0.0.1:{tap_port}",
            "--upstream",
            f"http://127.0.0.1:{stub_port}",
            "--service",
            "bench/chat",
        ]
        if args.tap_workers:
            tap_cmd += ["--workers", str(args.tap_workers)]
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if os.path.exists(mosquitto):
            mq_port = free_port()
            (tmp / "m.conf").write_text(f"listener {mq_port} 127.0.0.1\nallow_anonymous true\n")
            procs.append(subprocess.Popen([mosquitto, "-c", str(tmp / "m.conf")], stderr=subprocess.DEVNULL))
            wait_port(mq_port)
            tap_cmd += ["--mqtt", f"mqtt://127.0.0.1:{mq_port}"]
        # Run from the tap's checkout so that its package is the one imported.
        procs.append(
            subprocess.Popen(
                tap_cmd, cwd=args.tap_src, env={**os.environ, "PYTHONPATH": args.tap_src}, stderr=subprocess.DEVNULL
            )
        )
        wait_port(stub_port)
        wait_port(tap_port)
        results: dict[str, object] = {
            "requests_per_run": args.requests,
            "publishing": len(procs) == 3,
            "stub_ttft_ms": args.ttft_ms,
            "stub_gap_ms": args.gap_ms,
            "phase": args.phase,
            "tap_workers": args.tap_workers,
            "tap_uvloop": args.tap_uvloop,
            "tap_src": "this checkout" if Path(args.tap_src).resolve() == ROOT else args.tap_src,
        }
        for conc in (int(c) for c in args.concurrency.split(",")):
            per = max(1, args.requests // conc)
            row: dict[str, float] = {}
            for name, port in (("direct", stub_port), ("tap", tap_port)):
                before = nstat()
                values = asyncio.run(run(f"http://127.0.0.1:{port}", conc, per, answer_s, args.phase == "aligned"))
                after = nstat()
                row[f"{name}_p50_ms"] = pct(values, 50)
                row[f"{name}_p99_ms"] = pct(values, 99)
                row[f"{name}_max_ms"] = max(values) * 1000
                for key in NSTAT_KEYS:
                    if key in before:
                        row[f"{name}_{key.removeprefix('TcpExt')}"] = after[key] - before[key]
            row["added_p50_ms"] = row["tap_p50_ms"] - row["direct_p50_ms"]
            row["added_p99_ms"] = row["tap_p99_ms"] - row["direct_p99_ms"]
            results[f"concurrency_{conc}"] = {k: round(v, 3) for k, v in row.items()}
            print(conc, results[f"concurrency_{conc}"], flush=True)
        out = Path(args.out)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
