"""The tap's mirror leg: CPU per copy, copies dropped, and the user's time to first byte, old vs new.

Run by hand (from the repository root):

    git archive REV | tar -x -C /tmp/base      # the version to compare with (e.g. HEAD before a change)
    nice -n 10 .venv/bin/python bench/tap/mirror.py --baseline-src /tmp/base [--rps 50,200] [--seconds 20]

Starts two lean stub model servers (bench/tap/lean_http.py: the primary and the candidate, each answer
16 token events, the first after --ttft-ms, then one every --gap-ms) and, for each source tree (this one,
"new", and --baseline-src, "base"), two taps as separate processes (``python -m shadowctl tap``, no
broker: metrics only): one with ``--mirror-to`` the candidate at --mirror-percent, one without a mirror.
Each tap gets the same open-loop load (requests sent at a fixed rate whatever the answers do, as users
send them; a new connection only when every open one is busy), one tap at a time, interleaved over
--rounds rounds (base, new, base, new...) so that old and new run in the same minutes.

Per run: the tap process's CPU (utime + stime from /proc; steal is not in it, so it is the robust figure
on a shared machine) per request, the copies the tap counted by outcome (``shadowctl_tap_mirror_requests``:
sent, dropped_in_flight_cap, failed), the user's time to first body byte (p50, p99), and the machine's
steal. CPU per copy is (CPU per request with the mirror - CPU per request without) / copies per request.
Results go to bench/results/tap_mirror.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openloop import cpu_seconds, free_port, open_loop, pct, start_stub, steal_seconds, wait_port

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
BODY = json.dumps({"model": "bench", "stream": True, "messages": [{"role": "user", "content": "hello"}]}).encode()
RAW = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: chat\r\ncontent-type: application/json\r\n"
       b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY))


def mirror_counts(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("shadowctl_tap_mirror_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


def start_tap(src: Path, upstream: int, candidate: int | None, percent: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [PY, "-m", "shadowctl", "tap", "--upstream", f"http://127.0.0.1:{upstream}", "--service", "llm/chat",
            "--listen", f"127.0.0.1:{port}"]
    if candidate is not None:
        argv += ["--mirror-to", f"http://127.0.0.1:{candidate}", "--mirror-percent", str(percent)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen(argv, cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


async def run_one(pid: int, port: int, rps: float, seconds: float) -> dict[str, object]:
    before = mirror_counts(port)
    cpu0, steal0, t0 = cpu_seconds(pid), steal_seconds(), time.perf_counter()
    load = await open_loop(port, RAW, rps, seconds)
    ttfb, errors = load.ttfb, load.errors
    await asyncio.sleep(1.0)  # copies still in flight finish
    cpu, steal, wall = cpu_seconds(pid) - cpu0, steal_seconds() - steal0, time.perf_counter() - t0
    after = mirror_counts(port)
    copies = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    n = len(ttfb)
    return {"requests": n, "errors": errors, "cpu_s": round(cpu, 3), "cpu_ms_per_request": round(1000 * cpu / n, 3),
            "copies": copies, "ttfb_ms_p50": round(1000 * pct(ttfb, 0.5), 1),
            "ttfb_ms_p99": round(1000 * pct(ttfb, 0.99), 1), "steal_cores": round(steal / wall, 3),
            "wall_s": round(wall, 1), "loadavg": os.getloadavg()[0]}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-src", type=Path, required=True, help="the tree to compare with (git archive REV)")
    ap.add_argument("--rps", default="50,200", help="request rates, comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mirror-percent", type=float, default=100.0)
    ap.add_argument("--ttft-ms", type=float, default=120.0)
    ap.add_argument("--gap-ms", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tap_mirror.json")
    args = ap.parse_args()
    (primary_stub, primary), (candidate_stub, candidate) = (start_stub(args.ttft_ms, args.gap_ms) for _ in range(2))
    stubs = [primary_stub, candidate_stub]
    taps: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for name, src in (("base", args.baseline_src.resolve()), ("new", ROOT)):
            taps[f"{name}_mirror"] = start_tap(src, primary, candidate, args.mirror_percent)
            taps[f"{name}_plain"] = start_tap(src, primary, None, 0.0)
        for _, port in taps.values():  # warm up: connections, imports on first use
            await open_loop(port, RAW, 20, 2.0)
        runs: list[dict[str, object]] = []
        for rps in (float(r) for r in args.rps.split(",")):
            for rnd in range(args.rounds):
                for name, (proc, port) in taps.items():
                    result = await run_one(proc.pid, port, rps, args.seconds)
                    result.update(tap=name, rps=rps, round=rnd)
                    runs.append(result)
                    print(json.dumps(result), flush=True)
        summary: dict[str, dict[str, object]] = {}
        for rps in (float(r) for r in args.rps.split(",")):
            for name in taps:
                mine = [r for r in runs if r["tap"] == name and r["rps"] == rps]
                copies = {k: sum(float(r["copies"].get(k, 0)) for r in mine)  # type: ignore[attr-defined]
                          for k in ("sent", "dropped_in_flight_cap", "failed")}
                summary[f"{name}@{rps:g}"] = {
                    "cpu_ms_per_request_median": statistics.median(float(r["cpu_ms_per_request"]) for r in mine),
                    "ttfb_ms_p50_median": statistics.median(float(r["ttfb_ms_p50"]) for r in mine),
                    "ttfb_ms_p99_median": statistics.median(float(r["ttfb_ms_p99"]) for r in mine),
                    "requests": sum(int(r["requests"]) for r in mine), "copies": copies}
            for tree in ("base", "new"):
                m, p = summary[f"{tree}_mirror@{rps:g}"], summary[f"{tree}_plain@{rps:g}"]
                per_request = float(m["cpu_ms_per_request_median"]) - float(p["cpu_ms_per_request_median"])
                sent = float(m["copies"]["sent"]) / max(1, int(m["requests"]))  # type: ignore[index]
                m["cpu_ms_per_copy"] = round(per_request / sent, 3) if sent else None
        result = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
                  "summary": summary, "runs": runs}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
    finally:
        for proc, _ in taps.values():
            proc.terminate()
        for proc in stubs:
            proc.terminate()
        for proc in [*(p for p, _ in taps.values()), *stubs]:
            proc.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
