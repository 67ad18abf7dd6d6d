"""Tap overhead: time to first byte of streamed answers, direct vs through `shadowctl tap`.

Run by hand (from the repository root):

    nice .venv/bin/python bench/tap/overhead.py [--requests 1000]

Starts the stub model server (100 ms to the first token, then a token every 20 ms, like a model
server; `--ttft-ms 0 --gap-ms 0` for an instant one) and the taps (publishing to a Mosquitto broker
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
- Client and stub are lean asyncio protocols by default (bench/tap/lean_http.py), so that the
  instrument leaves the cores to the tap; `--instrument aiohttp` uses aiohttp's client and
  bench/tap/stub_server.py instead (about 0.75 of a core between them at 200 streams).
- Before each run the bench waits until the machine is idle again (at most 30 s): a tap still
  publishing the previous run's events would otherwise load the next one. Each run records the
  CPU (in cores) the client, stub, broker and each tap used, the machine's busy and stolen CPU
  (steal: the hypervisor running someone else on our virtual CPUs) and the request rate.
- The kernel's TCP counters (`nstat`: listen-queue overflows and drops, SYN retransmissions,
  retransmission timeouts) are read before and after each run and reported as deltas: a SYN
  dropped by a full listen queue is retried after 1 s, which shows up as a 1 s stall.

Rounds in which the hypervisor stole more than `--max-steal` cores (0.05) during any of their runs
are left out and tried again, up to `--max-attempts` (3) x `--rounds` attempts: on a shared
virtual machine, stolen CPU shows up as latency of whatever runs at the time, direct or tap, and
such rounds measure the neighbours, not the tap. The JSON lists the steal of each round left out.
The criterion is fixed before the run and blind to its latencies.

`--tap-workers 1,2` starts one tap per value (`shadowctl tap --workers N`) and measures each next
to going direct, `--rounds R` times interleaved (direct, tap 1, tap 2, direct, ...); the summary is
the median over rounds of each round's added latency. `--tap-src DIR` runs the taps from another
checkout; `--baseline-src DIR` adds taps from a second checkout (e.g. the previous version, from
`git archive`), named base_wN, run interleaved with the others, so that old and new are compared
in the same minutes; each tap's CPU per request (ms) is in the summary; `--tap-uvloop` (`--baseline-uvloop`: the baseline taps only) runs them on uvloop's event loop
(uvloop must be installed; not a dependency of shadowctl: this measures what it would bring).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lean_http

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
    """`concurrency` streams in flight at all times (closed loop), with aiohttp's client
    (`--instrument aiohttp`)."""
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


async def run_lean(port: int, concurrency: int, per_worker: int, answer_s: float, aligned: bool) -> list[float]:
    """The same closed loop with the lean protocol client (bench/tap/lean_http.py): a fraction of the
    CPU of aiohttp's client, so that the tap, not the instrument, gets the cores."""
    body = json.dumps(BODY).encode()
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body))
    ttfb: list[float] = []
    rng = random.Random(concurrency)

    async def worker() -> None:
        if not aligned:
            await asyncio.sleep(rng.random() * answer_s)
        conn = await lean_http.open_client(port)
        try:
            for i in range(WARMUP + per_worker):
                t0 = time.perf_counter()
                first, done = conn.request(raw)
                arrived = await first
                await done
                if i >= WARMUP:
                    ttfb.append(arrived - t0)
        finally:
            assert conn.transport is not None
            conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfb


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live children (a supervisor's workers), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far (/proc/stat); steal is time the
    hypervisor gave our virtual CPUs to someone else."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def settle(limit_s: float = 30.0, idle_cores: float = 0.15) -> float:
    """Wait until the machine is idle again (a tap still publishing the previous run's events, or
    its broker, would otherwise load the next run); the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        busy_before, _ = machine_cpu()
        time.sleep(0.5)
        busy_after, _ = machine_cpu()
        if (busy_after - busy_before) / 0.5 < idle_cores:
            break
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def start_tap(args: argparse.Namespace, port: int, stub_port: int, mq_port: int | None, workers: int,
              src: str, uvloop: bool) -> subprocess.Popen[bytes]:
    boot = "from shadowctl.cli.app import main; main()"
    if uvloop:
        boot = "import uvloop; uvloop.install(); " + boot
    cmd = [PY, "-c", boot, "tap", "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{stub_port}",
           "--service", "bench/chat", "--workers", str(workers)]
    if mq_port is not None:
        cmd += ["--mqtt", f"mqtt://127.0.0.1:{mq_port}"]
    # Run from the tap's checkout so that its package is the one imported.
    return subprocess.Popen(cmd, cwd=src, env={**os.environ, "PYTHONPATH": src},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(port: int, conc: int, per: int, answer_s: float, aligned: bool, client: str,
            watch: dict[str, int]) -> dict[str, float]:
    """One run; with the CPU (in cores) each watched process and this one (the client) used during it."""
    settled_s = settle()
    before = nstat()
    stat_before = machine_cpu()
    cpu_before = {name: cpu_seconds(pid) for name, pid in watch.items()}
    own_before, wall_before = time.process_time(), time.perf_counter()
    if client == "lean":
        values = asyncio.run(run_lean(port, conc, per, answer_s, aligned))
    else:
        values = asyncio.run(run(f"http://127.0.0.1:{port}", conc, per, answer_s, aligned))
    wall = time.perf_counter() - wall_before
    after = nstat()
    row = {"p50_ms": pct(values, 50), "p99_ms": pct(values, 99), "max_ms": max(values) * 1000}
    row["cpu_client"] = (time.process_time() - own_before) / wall
    row["requests_per_s"] = conc * (WARMUP + per) / wall
    row["settled_s"] = settled_s
    stat_after = machine_cpu()
    row["machine_busy_cores"] = (stat_after[0] - stat_before[0]) / wall
    row["machine_steal_cores"] = (stat_after[1] - stat_before[1]) / wall
    for name, pid in watch.items():
        row[f"cpu_{name}"] = (cpu_seconds(pid) - cpu_before[name]) / wall
    for key in NSTAT_KEYS:
        if key in before:
            row[key.removeprefix("TcpExt")] = after[key] - before[key]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per run (at least 1 per stream)")
    parser.add_argument("--concurrency", default="1,50,200", help="comma-separated levels")
    parser.add_argument("--ttft-ms", type=float, default=100.0, help="the stub's time to first token")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="the stub's time between tokens")
    parser.add_argument("--phase", choices=("spread", "aligned"), default="spread")
    parser.add_argument("--tap-src", default=str(ROOT), help="checkout to run the tap from")
    parser.add_argument("--tap-workers", default="1", help="comma-separated --workers values, each a tap of its own")
    parser.add_argument("--baseline-src", default=None,
                        help="also run taps from this checkout (e.g. the previous version), named base_wN, "
                             "interleaved with the others: a side-by-side comparison in one run")
    parser.add_argument("--baseline-uvloop", action="store_true", help="run the baseline taps on uvloop")
    parser.add_argument("--rounds", type=int, default=1, help="repeat direct and every tap this often, interleaved")
    parser.add_argument("--max-steal", type=float, default=0.05,
                        help="leave out a round in which the hypervisor stole more than this many cores in any run")
    parser.add_argument("--max-attempts", type=int, default=3,
                        help="give up after rounds x this many attempts at a steal-free round")
    parser.add_argument("--tap-uvloop", action="store_true", help="run the tap on uvloop (installed separately)")
    parser.add_argument("--instrument", choices=("lean", "aiohttp"), default="lean",
                        help="load client and stub server: lean asyncio protocols, or aiohttp's (as before)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/tap_overhead.json"))
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.tap_workers.split(",")]
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp())
    answer_s = (args.ttft_ms + 16 * args.gap_ms) / 1000
    try:
        stub_port = free_port()
        if args.instrument == "lean":
            stub_cmd = [PY, str(ROOT / "bench/tap/lean_http.py"), "serve", str(stub_port), str(args.ttft_ms),
                        str(args.gap_ms)]
        else:
            stub_cmd = [PY, str(ROOT / "bench/tap/stub_server.py"), str(stub_port), str(args.ttft_ms), str(args.gap_ms)]
        procs.append(subprocess.Popen(stub_cmd))
        watch = {"stub": procs[-1].pid}
        mq_port = None
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if os.path.exists(mosquitto):
            mq_port = free_port()
            (tmp / "m.conf").write_text(f"listener {mq_port} 127.0.0.1\nallow_anonymous true\n")
            procs.append(subprocess.Popen([mosquitto, "-c", str(tmp / "m.conf")], stderr=subprocess.DEVNULL))
            watch["broker"] = procs[-1].pid
            wait_port(mq_port)
        targets = {"direct": stub_port}
        sources = [("tap", args.tap_src, args.tap_uvloop)]
        if args.baseline_src:
            sources.append(("base", args.baseline_src, args.baseline_uvloop))
        for w in worker_counts:
            for label, src, uvloop in sources:
                port = free_port()
                procs.append(start_tap(args, port, stub_port, mq_port, w, src, uvloop))
                targets[f"{label}_w{w}"] = port
                watch[f"{label}_w{w}"] = procs[-1].pid
        for port in targets.values():
            wait_port(port)
        time.sleep(2.0)  # every worker of every tap listening
        results: dict[str, object] = {
            "command": "bench/tap/overhead.py " + " ".join(sys.argv[1:]),
            "requests_per_run": args.requests,
            "rounds": args.rounds,
            "publishing": mq_port is not None,
            "stub_ttft_ms": args.ttft_ms,
            "stub_gap_ms": args.gap_ms,
            "phase": args.phase,
            "tap_workers": worker_counts,
            "tap_uvloop": args.tap_uvloop,
            "tap_src": "this checkout" if Path(args.tap_src).resolve() == ROOT else args.tap_src,
            "baseline_src": args.baseline_src,
            "baseline_uvloop": args.baseline_uvloop,
            "max_steal_cores": args.max_steal,
            "instrument": args.instrument,
            "cpus": os.cpu_count(),
        }
        for conc in (int(c) for c in args.concurrency.split(",")):
            per = max(1, args.requests // conc)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            discarded: list[dict[str, float]] = []  # the steal of each round left out
            attempts = 0
            while len(runs["direct"]) < args.rounds and attempts < args.rounds * args.max_attempts:
                attempts += 1
                one = {name: measure(port, conc, per, answer_s, args.phase == "aligned", args.instrument, watch)
                       for name, port in targets.items()}
                steal = {name: r["machine_steal_cores"] for name, r in one.items()}
                if max(steal.values()) > args.max_steal:
                    discarded.append(steal)
                    print(conc, f"round left out: the hypervisor stole up to {max(steal.values()):.2f} cores",
                          flush=True)
                    continue
                for name, r in one.items():
                    runs[name].append(r)
            summary: dict[str, object] = {"rounds_kept": len(runs["direct"]), "rounds_left_out_for_steal": discarded}
            if not runs["direct"]:
                print(conc, "no round without steal: nothing to report at this level", flush=True)
                results[f"concurrency_{conc}"] = summary
                continue
            for name, rows in runs.items():
                summary[name] = {"p50_ms": round(statistics.median(r["p50_ms"] for r in rows), 3),
                                 "p99_ms": round(statistics.median(r["p99_ms"] for r in rows), 3),
                                 "runs": [{k: round(v, 3) for k, v in r.items()} for r in rows]}
            for name in targets:
                if name == "direct":
                    continue
                added = [(t["p50_ms"] - d["p50_ms"], t["p99_ms"] - d["p99_ms"])
                         for t, d in zip(runs[name], runs["direct"], strict=True)]
                cpu_ms = [1000 * t[f"cpu_{name}"] / t["requests_per_s"] for t in runs[name]]
                summary[f"{name}_added"] = {"p50_ms": round(statistics.median(a[0] for a in added), 3),
                                            "p99_ms": round(statistics.median(a[1] for a in added), 3),
                                            "per_round": [[round(a, 2) for a in pair] for pair in added],
                                            "cpu_ms_per_request": round(statistics.median(cpu_ms), 3)}
                print(conc, name, "added p50/p99 (median of rounds):", summary[f"{name}_added"], flush=True)
            results[f"concurrency_{conc}"] = summary
        out = Path(args.out)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
