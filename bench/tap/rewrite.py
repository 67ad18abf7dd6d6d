"""The tap's added latency with a request rewrite vs without (#18: "within 10% of without").

Run by hand (from the repository root; needs /usr/sbin/mosquitto):

    nice -n 10 .venv/bin/python bench/tap/rewrite.py [--rps 20] [--seconds 30] [--rounds 10]

Starts a Mosquitto broker, two lean stub model servers (bench/tap/lean_http.py: the primary and the candidate,
16 token events each, the first after --ttft-ms) and four taps as separate processes, each following its own
route setting (``shadowctl tap --route-policy``, published retained and ``final`` so that it never goes stale):

- ``mirror_plain``: mirror 100% to the candidate, the copy's body as the user sent it;
- ``mirror_rewrite``: the same with a rewrite: ``model``, the system prompt (``replaceSystem``) and
  ``temperature`` (one parse and one serialization of the body per copy, after the user's request is forwarded);
- ``routed_plain``: every live request answered by the candidate (candidatePercent 100), unchanged;
- ``routed_rewrite``: the same, rewritten (the user's own request is rewritten before it is forwarded).

Every tap publishes its output events to the broker, as in production. A round lasts --seconds; during it the
five targets (the primary stub straight, "direct", and each tap) each get their own open-loop load at the same
time (bench/tap/openloop.py: Poisson arrivals at --rps, each target its own draw; one request body of about
1.3 KB with a system prompt, streamed). Plain and rewrite thus run in the same seconds, under the same load from
the machine's other users, request by request rather than run after run.

What is measured per request: the time to the first body byte (``ttfb``), and that time less the time the stub
says it held the request (``path``: client to stub and back, through the tap or not). The path leaves out the
stub's timer, which fires up to 1 ms late (the event loop sleeps in whole milliseconds): noise larger than the
difference measured. A tap's added latency (p50, p99) is its path quantile minus the direct target's.

Per share (mirror, routed), the summary gives: per round, the ratio of the added latency with the rewrite to
without it, the median of these ratios over the rounds kept and their interquartile range (the headline
figures); the same ratio on all kept rounds' requests pooled (``pooled``; on ttfb too, for comparison with the
first runs); and the ratio of the tap's CPU per request (utime + stime from /proc: steal is not in it). Rounds in
which the hypervisor stole more than --max-steal cores are left out (the criterion is fixed before the run and
blind to latencies); the machine's other load is not left out, it is recorded (``loadavg``). With
--baseline-src DIR, the two routed taps also run from another tree (``base_routed``), in the same rounds, so
that a change to the tap is compared with the code before it. Results: bench/results/tap_rewrite.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openloop import Load, cpu_seconds, free_port, open_loop, pct, start_stub, steal_seconds, wait_port

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


def share_summary(good: list[dict[str, dict[str, Any]]], pooled: dict[str, Any], share: str) -> dict[str, Any]:
    """One share's (``mirror`` or ``routed``) figures over the rounds kept: see the module docstring."""
    out: dict[str, Any] = {}
    for kind in ("plain", "rewrite"):
        name = f"{share}_{kind}"
        out[kind] = {"cpu_ms_per_request": round(statistics.median(r[name]["cpu_ms_per_request"] for r in good), 3),
                     "requests": sum(r[name]["requests"] for r in good),
                     "errors": sum(r[name]["errors"] for r in good)}
        for q in ("p50", "p99"):
            for measure in ("path", "ttfb"):
                key = f"{measure}_ms_{q}"
                out[kind][f"added_{key}_pooled"] = round(pooled[name][key] - pooled["direct"][key], 3)
            out[kind][f"added_path_ms_{q}_per_round"] = [round(r[name][f"path_ms_{q}"] - r["direct"][f"path_ms_{q}"], 3)
                                                        for r in good]
    plain, rewrite = out["plain"], out["rewrite"]
    for q in ("p50", "p99"):
        ratios = [round(b / a, 3) if a > 0 else None for a, b in zip(plain[f"added_path_ms_{q}_per_round"],
                                                                      rewrite[f"added_path_ms_{q}_per_round"],
                                                                      strict=True)]
        valid = sorted(x for x in ratios if x is not None)
        out[f"ratio_added_path_{q}_per_round"] = ratios
        out[f"ratio_added_path_{q}_median"] = round(statistics.median(valid), 3) if valid else None
        out[f"ratio_added_path_{q}_iqr"] = ([round(pct(valid, 0.25), 3), round(pct(valid, 0.75), 3)]
                                            if valid else None)
        for measure in ("path", "ttfb"):
            a, b = plain[f"added_{measure}_ms_{q}_pooled"], rewrite[f"added_{measure}_ms_{q}_pooled"]
            out[f"ratio_added_{measure}_{q}_pooled"] = round(b / a, 3) if a > 0 else None
    a, b = plain["cpu_ms_per_request"], rewrite["cpu_ms_per_request"]
    out["ratio_cpu_ms_per_request"] = round(b / a, 3) if a > 0 else None
    return out


def quantiles(load: Load) -> dict[str, float]:
    """p50 and p99 of a load's time to first byte and of its path time, in ms."""
    return {f"{m}_ms_{q}": round(1000 * pct(getattr(load, m), x), 3)
            for m in ("ttfb", "path") for q, x in (("p50", 0.5), ("p99", 0.99))}


async def one_round(targets: dict[str, tuple[int, int | None]], rps: float, seconds: float,
                    seed: int) -> tuple[dict[str, dict[str, Any]], dict[str, Load], float]:
    """Every target under its own open-loop load at the same time (distinct arrival draws); per target its
    quantiles and CPU per request, the loads, and the machine's steal over the round (cores)."""
    cpu0 = {name: cpu_seconds(pid) for name, (_, pid) in targets.items() if pid is not None}
    steal0, t0 = steal_seconds(), time.perf_counter()
    loads = await asyncio.gather(*(open_loop(port, RAW, rps, seconds, seed * 100 + i)
                                   for i, (port, _) in enumerate(targets.values())))
    await asyncio.sleep(0.5)  # copies in flight and events finish
    steal = (steal_seconds() - steal0) / (time.perf_counter() - t0)
    runs: dict[str, dict[str, Any]] = {}
    for (name, (_, pid)), load in zip(targets.items(), loads, strict=True):
        n = len(load.ttfb)
        cpu = cpu_seconds(pid) - cpu0[name] if pid is not None else 0.0
        runs[name] = {"requests": n, "errors": load.errors, "without_held": n - len(load.path), **quantiles(load),
                      "cpu_ms_per_request": round(1000 * cpu / max(1, n), 3)}
    return runs, dict(zip(targets, loads, strict=True)), round(steal, 3)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rps", type=float, default=20.0, help="requests per second to each target (default 20)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of one round, in seconds (default 30)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds to keep (default 10; at most 3x as many tried)")
    ap.add_argument("--max-steal", type=float, default=0.05,
                    help="leave out a round in which the hypervisor stole more than this many cores (default 0.05)")
    ap.add_argument("--ttft-ms", type=float, default=100.0, help="the stubs' time to the first token (default 100)")
    ap.add_argument("--gap-ms", type=float, default=10.0, help="the stubs' time between tokens (default 10)")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="also run the two routed taps from this tree (e.g. git archive REV | tar -x -C DIR) as "
                         "base_routed_plain and base_routed_rewrite, in the same rounds: old and new side by side")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tap_rewrite.json",
                    help="where the JSON results go (default bench/results/tap_rewrite.json)")
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
        stubs = [start_stub(args.ttft_ms, args.gap_ms) for _ in range(2)]
        procs += [proc for proc, _ in stubs]
        primary, candidate = (port for _, port in stubs)
        names = TAPS + (("base_routed_plain", "base_routed_rewrite") if args.baseline_src is not None else ())
        async with aiomqtt.Client("127.0.0.1", broker) as client:
            for name in names:
                await client.publish(route_topic("bench", name), setting(name, f"http://127.0.0.1:{candidate}"),
                                     qos=1, retain=True)
        taps: dict[str, tuple[int, int]] = {}
        for name in names:
            port = free_port()
            src = args.baseline_src.resolve() if name.startswith("base_") else ROOT
            proc = subprocess.Popen([PY, "-m", "shadowctl", "tap", "--upstream", f"http://127.0.0.1:{primary}",  # noqa: ASYNC220
                                     "--service", "bench/chat", "--listen", f"127.0.0.1:{port}",
                                     "--mqtt", f"mqtt://127.0.0.1:{broker}", "--route-policy", f"bench/{name}",
                                     "--tap-id", name], cwd=src, env={**os.environ, "PYTHONPATH": str(src)},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            wait_port(port)
            taps[name] = (port, proc.pid)
        for name, (port, _) in taps.items():
            deadline = time.monotonic() + 30
            while counters(port).get("route_generation") != 1.0:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not apply its route setting")
                await asyncio.sleep(0.2)
        targets: dict[str, tuple[int, int | None]] = {"direct": (primary, None), **taps}
        await one_round(targets, 10, 2.0, 0)  # warm up: connections, first-use imports
        before = {name: counters(port) for name, (port, _) in taps.items()}
        rounds: list[dict[str, Any]] = []
        kept: dict[str, Load] = {name: Load() for name in targets}
        attempt = 0
        while sum(not r["left_out"] for r in rounds) < args.rounds and attempt < 3 * args.rounds:
            attempt += 1
            runs, loads, steal = await one_round(targets, args.rps, args.seconds, attempt)
            left_out = steal > args.max_steal
            if not left_out:
                for name, load in loads.items():
                    kept[name].ttfb += load.ttfb
                    kept[name].path += load.path
            rounds.append({"attempt": attempt, "left_out": left_out, "steal_cores": steal,
                           "loadavg": os.getloadavg()[0], "runs": runs})
            print(json.dumps({"attempt": attempt, "left_out": left_out, "steal": steal,
                              "loadavg": os.getloadavg()[0],
                              **{k: (v["path_ms_p50"], v["path_ms_p99"]) for k, v in runs.items()}}), flush=True)
        after = {name: counters(port) for name, (port, _) in taps.items()}
        good = [r["runs"] for r in rounds if not r["left_out"]]
        pooled = {name: quantiles(load) for name, load in kept.items()}
        summary: dict[str, Any] = {"direct": pooled["direct"]}
        for share in ("mirror", "routed", *(("base_routed",) if args.baseline_src is not None else ())):
            summary[share] = share_summary(good, pooled, share)
            for kind in ("plain", "rewrite"):
                name = f"{share}_{kind}"
                summary[share][kind]["counters"] = {k: after[name].get(k, 0.0) - before[name].get(k, 0.0)
                                                    for k in after[name] if k != "route_generation"}
        loadavg = [r["loadavg"] for r in rounds]
        result = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
                  "body_bytes": len(BODY), "apply_rewrite_us": rewrite_cost(), "rounds_kept": len(good),
                  "rounds_tried": attempt, "cpus": os.cpu_count(), "loadavg_range": [min(loadavg), max(loadavg)],
                  "summary": summary, "rounds": rounds}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if not kk.endswith("per_round")}
                          if isinstance(v, dict) else v for k, v in summary.items()}, indent=1))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
