"""The tap's added latency with a request rewrite vs without (#18: "within 10% of without").

Run by hand (from the repository root; needs /usr/sbin/mosquitto):

    nice -n 10 .venv/bin/python bench/tap/rewrite.py [--rps 20] [--seconds 15] [--rounds 6]

Starts a Mosquitto broker, two lean stub model servers (bench/tap/lean_http.py: the primary and the candidate,
16 token events each, the first after --ttft-ms) and four taps as separate processes, each following its own
route setting (``shadowctl tap --route-policy``, published retained and ``final`` so that it never goes stale):

- ``mirror_plain``: mirror 100% to the candidate, the copy's body as the user sent it;
- ``mirror_rewrite``: the same with a rewrite: ``model``, the system prompt (``replaceSystem``) and
  ``temperature`` (one parse and one serialization of the body per copy, on the user's path);
- ``routed_plain``: every live request answered by the candidate (candidatePercent 100), unchanged;
- ``routed_rewrite``: the same, rewritten (the user's own request is rewritten before it is forwarded).

Every tap publishes its output events to the broker, as in production. Each round sends the same open-loop load
(Poisson arrivals at --rps, one request body of about 1.3 KB with a system prompt, streamed) straight to the
primary stub ("direct") and through each tap, one after another in a shuffled order, and records each run's time
to first body byte (p50, p99), the tap process's CPU per request, and the machine's steal. The added latency of a
tap in a round is its p50 (p99) minus the direct run's in the same round; the summary gives, per share (mirror,
routed), the median over rounds of added latency with and without the rewrite and their ratio, the paired form
(1 + the median over rounds of rewrite - plain, over plain's added latency: robust to rounds that the machine's
other load slowed as a whole), and the ratio of CPU per request. Rounds in which the hypervisor stole more than --max-steal cores during any run are left out
(the criterion is fixed before the run and blind to latencies). Results: bench/results/tap_rewrite.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lean_http
from mirror import cpu_seconds, free_port, pct, steal_seconds, wait_port

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from shadowctl.compare.prompts import prompt_digest  # noqa: E402
from shadowctl.compare.routing import make_setting, rfc3339, route_topic  # noqa: E402
from shadowctl.policy.prompts import PromptApply  # noqa: E402

PY = sys.executable
MOSQUITTO = "/usr/sbin/mosquitto"
SYSTEM_V1 = ("You are a careful assistant for a support team. Answer in plain English, in at most five sentences, "
             "quote the product documentation where it applies, never invent a feature, and say so when you do not "
             "know. Use the customer's own words for the product's parts. ") * 2
SYSTEM_V2 = SYSTEM_V1.replace("five sentences", "three sentences") + "Start with the answer, then the reasons."
USER = ("My order arrived yesterday, but the charger does not fit the socket in my flat. I bought the European "
        "model by mistake, I think. Can I exchange it for the UK one, and do I need to send the box back? ") * 3
BODY = json.dumps({"model": "chat", "stream": True, "max_tokens": 256, "temperature": 0.7, "messages": [
    {"role": "system", "content": SYSTEM_V1}, {"role": "user", "content": USER}]}).encode()
RAW = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: chat\r\ncontent-type: application/json\r\n"
       b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY))
TAPS = ("mirror_plain", "mirror_rewrite", "routed_plain", "routed_rewrite")


def setting(name: str, candidate_url: str) -> bytes:
    """The retained route setting of one tap (final: applied without expiry)."""
    rewrite = None
    if name.endswith("rewrite"):
        rewrite = {"model": "chat-lora-v2", "parameters": {"temperature": 0.2},
                   "prompt": {"apply": "replaceSystem", "primary": SYSTEM_V1, "candidate": SYSTEM_V2,
                              "digest": prompt_digest(PromptApply.replace_system, SYSTEM_V1, SYSTEM_V2)}}
    mirror = name.startswith("mirror")
    return make_setting(policy=f"bench/{name}", generation=1, mirror_percent=100.0 if mirror else None,
                        candidate_percent=0 if mirror else 100, candidate_url=candidate_url,
                        issued_at=rfc3339(time.time()), interval_seconds=30.0, rewrite=rewrite, final=True).to_json()


def rewrite_cost() -> float:
    """Microseconds of CPU for one apply_rewrite of BODY (model, system prompt, temperature) in this process: the
    work the rewrite adds per request, without the proxy around it (median of 5 x 2,000)."""
    import timeit

    from shadowctl.compare.routing import parse_setting
    from shadowctl.tap.proxy import apply_rewrite

    rewrite = parse_setting(setting("mirror_rewrite", "http://x")).rewrite
    assert rewrite is not None and apply_rewrite(BODY, rewrite) is not None
    return round(1e6 * statistics.median(timeit.repeat(lambda: apply_rewrite(BODY, rewrite), number=2000,
                                                       repeat=5)) / 2000, 1)


def counters(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("shadowctl_tap_mirror_requests_total{", "shadowctl_tap_routed_requests_total ",
                            "shadowctl_tap_route_generation ")):
            key = line.split(" ", 1)[0].replace("shadowctl_tap_", "")
            out[key] = float(line.rsplit(" ", 1)[1])
    return out


async def open_loop(port: int, rps: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrivals at `rps` for `seconds`; the time to first body byte of each answer (a new connection only
    when every open one is busy)."""
    idle: list[lean_http.ClientProtocol] = []
    ttfb: list[float] = []

    async def one() -> None:
        conn = idle.pop() if idle else await lean_http.open_client(port)
        sent = time.perf_counter()
        first, done = conn.request(RAW)
        ttfb.append(await first - sent)
        await done
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
    return ttfb


async def run_one(port: int, pid: int | None, rps: float, seconds: float, seed: int) -> dict[str, float]:
    cpu0 = cpu_seconds(pid) if pid is not None else 0.0
    steal0, t0 = steal_seconds(), time.perf_counter()
    ttfb = await open_loop(port, rps, seconds, seed)
    await asyncio.sleep(0.5)  # copies in flight and events finish
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0 if pid is not None else 0.0
    n = len(ttfb)
    return {"requests": n, "ttfb_ms_p50": round(1000 * pct(ttfb, 0.5), 2),
            "ttfb_ms_p99": round(1000 * pct(ttfb, 0.99), 2), "cpu_ms_per_request": round(1000 * cpu / n, 3),
            "steal_cores": round((steal_seconds() - steal0) / wall, 3), "loadavg": os.getloadavg()[0]}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rps", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-steal", type=float, default=0.05)
    ap.add_argument("--ttft-ms", type=float, default=100.0)
    ap.add_argument("--gap-ms", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tap_rewrite.json")
    args = ap.parse_args()
    import aiomqtt

    procs: list[subprocess.Popen[bytes]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-rewrite-"))
    try:
        broker = free_port()
        (work / "m.conf").write_text(f"listener {broker} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        procs.append(subprocess.Popen([MOSQUITTO, "-c", str(work / "m.conf")], stdout=subprocess.DEVNULL,  # noqa: ASYNC220
                                      stderr=subprocess.DEVNULL))
        wait_port(broker)
        stubs = []
        for _ in range(2):
            port = free_port()
            procs.append(subprocess.Popen([PY, str(Path(__file__).parent / "lean_http.py"), "serve", str(port),  # noqa: ASYNC220
                                           str(args.ttft_ms), str(args.gap_ms)]))
            wait_port(port)
            stubs.append(port)
        primary, candidate = stubs
        async with aiomqtt.Client("127.0.0.1", broker) as client:
            for name in TAPS:
                await client.publish(route_topic("bench", name), setting(name, f"http://127.0.0.1:{candidate}"),
                                     qos=1, retain=True)
        taps: dict[str, tuple[int, int]] = {}
        for name in TAPS:
            port = free_port()
            proc = subprocess.Popen([PY, "-m", "shadowctl", "tap", "--upstream", f"http://127.0.0.1:{primary}",  # noqa: ASYNC220
                                     "--service", "bench/chat", "--listen", f"127.0.0.1:{port}",
                                     "--mqtt", f"mqtt://127.0.0.1:{broker}", "--route-policy", f"bench/{name}",
                                     "--tap-id", name], cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            procs.append(proc)
            wait_port(port)
            taps[name] = (port, proc.pid)
        for name, (port, _) in taps.items():
            deadline = time.monotonic() + 30
            while counters(port).get("route_generation") != 1.0:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not apply its route setting")
                await asyncio.sleep(0.2)
        for port in [primary, *(p for p, _ in taps.values())]:  # warm up: connections, first-use imports
            await open_loop(port, 10, 2.0, 0)
        before = {name: counters(port) for name, (port, _) in taps.items()}
        rounds: list[dict[str, Any]] = []
        order_rng = random.Random(7)
        attempt = 0
        kept = 0
        while kept < args.rounds and attempt < 3 * args.rounds:
            attempt += 1
            runs: dict[str, dict[str, float]] = {}
            order = ["direct", *TAPS]
            order_rng.shuffle(order)
            for name in order:
                port, pid = (primary, None) if name == "direct" else taps[name]
                runs[name] = await run_one(port, pid, args.rps, args.seconds, attempt)
            steal = max(r["steal_cores"] for r in runs.values())
            left_out = steal > args.max_steal
            kept += not left_out
            rounds.append({"attempt": attempt, "order": order, "left_out": left_out, "max_steal": steal,
                           "runs": runs})
            print(json.dumps({"attempt": attempt, "left_out": left_out, "steal": steal,
                              **{k: (v["ttfb_ms_p50"], v["ttfb_ms_p99"]) for k, v in runs.items()}}), flush=True)
        after = {name: counters(port) for name, (port, _) in taps.items()}
        good = [r["runs"] for r in rounds if not r["left_out"]]
        summary: dict[str, Any] = {}
        for share in ("mirror", "routed"):
            one: dict[str, Any] = {}
            for kind in ("plain", "rewrite"):
                name = f"{share}_{kind}"
                one[kind] = {
                    "added_ms_p50": round(statistics.median(
                        float(r[name]["ttfb_ms_p50"]) - float(r["direct"]["ttfb_ms_p50"]) for r in good), 2),
                    "added_ms_p99": round(statistics.median(
                        float(r[name]["ttfb_ms_p99"]) - float(r["direct"]["ttfb_ms_p99"]) for r in good), 2),
                    "cpu_ms_per_request": round(statistics.median(
                        float(r[name]["cpu_ms_per_request"]) for r in good), 3),
                    "counters": {k: after[name].get(k, 0.0) - before[name].get(k, 0.0) for k in after[name]
                                 if k != "route_generation"}}
            plain, rewrite = one["plain"], one["rewrite"]
            for key in ("added_ms_p50", "added_ms_p99", "cpu_ms_per_request"):
                one[f"ratio_{key}"] = round(rewrite[key] / plain[key], 3) if plain[key] > 0 else None
            # Per round, the paired difference rewrite - plain (the same minutes, the same direct run); its median
            # over rounds against plain's added latency is the robust form of the ratio on a noisy machine.
            for q in ("p50", "p99"):
                diffs = [round(r[f"{share}_rewrite"][f"ttfb_ms_{q}"] - r[f"{share}_plain"][f"ttfb_ms_{q}"], 2)
                         for r in good]
                one[f"rewrite_minus_plain_ms_{q}_per_round"] = diffs
                one[f"rewrite_minus_plain_ms_{q}_median"] = round(statistics.median(diffs), 3)
                added = plain[f"added_ms_{q}"]
                one[f"paired_ratio_added_ms_{q}"] = round(1 + statistics.median(diffs) / added, 3) if added > 0 else None
            summary[share] = one
        result = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
                  "body_bytes": len(BODY), "apply_rewrite_us": rewrite_cost(), "rounds_kept": len(good), "rounds_tried": attempt,
                  "cpus": os.cpu_count(), "summary": summary, "rounds": rounds}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
