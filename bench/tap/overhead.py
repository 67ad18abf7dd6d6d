"""Tap overhead: time to first byte of streamed answers, direct vs through `shadowctl tap`.

Run by hand (from the repository root):

    nice .venv/bin/python bench/tap/overhead.py [--requests 1000]

Starts the stub model server (100 ms to the first token, then a token every 20 ms, like a model
server; `--ttft-ms 0 --gap-ms 0` for an instant one) and the tap (publishing to a Mosquitto broker
when the binary exists) as separate processes, then, for 1, 50 and 200 concurrent streams,
measures the time from sending a request to its first body byte, direct and through the tap, and
reports p50/p99 and the added latency. Results go to bench/results/tap_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


async def run(url: str, concurrency: int, total: int) -> list[float]:
    """`concurrency` streams in flight at all times (closed loop); aiohttp as the client because the
    client is the measuring instrument and must not be the bottleneck."""
    ttfb: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker(n: int) -> None:
            for _ in range(n):
                t0 = time.perf_counter()
                async with client.post(url + "/v1/chat/completions", json=BODY) as r:
                    first = True
                    async for _chunk in r.content.iter_any():
                        if first:
                            ttfb.append(time.perf_counter() - t0)
                            first = False
        per = max(1, total // concurrency)
        await asyncio.gather(*(worker(2) for _ in range(concurrency)))  # warm-up connections
        ttfb.clear()
        await asyncio.gather(*(worker(per) for _ in range(concurrency)))
    return ttfb


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,50,200", help="comma-separated levels")
    parser.add_argument("--ttft-ms", type=float, default=100.0, help="the stub's time to first token")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="the stub's time between tokens")
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp())
    try:
        stub_port, tap_port = free_port(), free_port()
        procs.append(subprocess.Popen([PY, str(ROOT / "bench/tap/stub_server.py"), str(stub_port),
                                       str(args.ttft_ms), str(args.gap_ms)]))
        tap_cmd = [PY, "-c", "from shadowctl.cli.app import main; main()", "tap", "--listen", f"127.0.0.1:{tap_port}",
                   "--upstream", f"http://127.0.0.1:{stub_port}", "--service", "bench/chat"]
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if os.path.exists(mosquitto):
            mq_port = free_port()
            (tmp / "m.conf").write_text(f"listener {mq_port} 127.0.0.1\nallow_anonymous true\n")
            procs.append(subprocess.Popen([mosquitto, "-c", str(tmp / "m.conf")], stderr=subprocess.DEVNULL))
            wait_port(mq_port)
            tap_cmd += ["--mqtt", f"mqtt://127.0.0.1:{mq_port}"]
        procs.append(subprocess.Popen(tap_cmd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                      stderr=subprocess.DEVNULL))
        wait_port(stub_port)
        wait_port(tap_port)
        results: dict[str, object] = {"requests_per_run": args.requests, "publishing": len(procs) == 3,
                                      "stub_ttft_ms": args.ttft_ms, "stub_gap_ms": args.gap_ms}
        for conc in (int(c) for c in args.concurrency.split(",")):
            direct = asyncio.run(run(f"http://127.0.0.1:{stub_port}", conc, args.requests))
            tapped = asyncio.run(run(f"http://127.0.0.1:{tap_port}", conc, args.requests))
            row = {
                "direct_p50_ms": pct(direct, 50), "direct_p99_ms": pct(direct, 99),
                "tap_p50_ms": pct(tapped, 50), "tap_p99_ms": pct(tapped, 99),
            }
            row["added_p50_ms"] = row["tap_p50_ms"] - row["direct_p50_ms"]
            row["added_p99_ms"] = row["tap_p99_ms"] - row["direct_p99_ms"]
            results[f"concurrency_{conc}"] = {k: round(v, 3) for k, v in row.items()}
            print(conc, results[f"concurrency_{conc}"], flush=True)
        out = ROOT / "bench/results/tap_overhead.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=10)


if __name__ == "__main__":
    main()
