"""Fuzz every path where outside input reaches shadowctl (run by hand, from the repository root).

    .venv/bin/pip install -e '.[fuzz]'                                   # atheris, for --engine atheris
    .venv/bin/python bench/fuzz/run.py --engine hypothesis --runs 10000  # structured inputs
    .venv/bin/python bench/fuzz/run.py --engine atheris --runs 10000     # bytes, coverage-guided
    .venv/bin/python bench/fuzz/run.py --engine hypothesis --runs 500 --target policy render
    .venv/bin/python bench/fuzz/run.py --target render --replay bench/fuzz/findings/render-slow-<hash>.bin

The paths are in bench/fuzz/targets.py. Each target runs in a process of its own, so that a crash or
a hang is that target's finding and nothing else's. A finding is an exception the path does not
answer with on purpose (a traceback a user would see, or a tick that dies); each is counted by type and
place, and its first input is saved under bench/fuzz/findings/. Per target the results say how many
inputs ran, the findings, the slowest input, and the most memory one input allocated (tracemalloc's peak
during that input, numpy's arrays included, measured on every tenth input since tracing slows an input
2-5x; the process's own peak RSS also counts the engine's bookkeeping, hypothesis keeps a tree of what it
tried), against the bounds of issue #16 (2 s and 200 MiB per input). Timings include the machine's other
load and, on every tenth input, tracemalloc's; each input's CPU time (this process's) is measured too, and
the first five inputs over the time bound are saved under bench/fuzz/findings/ (``slow_inputs``: wall and
CPU seconds, traced or not) so that ``--replay FILE`` can time them again alone. Results go to
bench/results/fuzz-<engine>.json; docs/reliability.md quotes them with the command.

Hypothesis draws inputs shaped like real ones (policies, VirtualServices, replay looks, output events,
Prometheus answers, ShadowPolicy objects, OpenAI requests and streams) with fields removed or of the
wrong type; it does not shrink (``Phase.generate`` only): this is a census, not a debugging session.
Atheris (libFuzzer) mutates bytes from a corpus of such inputs, guided by the coverage of the whole
program (``atheris.instrument_all()`` after the first input has imported every module the path uses).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FINDINGS = HERE / "findings"


MEMORY_SAMPLE = 10
"""One input in this many has its allocations measured (never the first, which imports what the path uses)."""


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Stats:
    """What one target's run saw."""

    target: str
    limit_s: float = 2.0
    runs: int = 0
    refused: int = 0
    slowest_s: float = 0.0
    slowest_cpu_s: float = 0.0
    largest_mib: float = 0.0
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)
    slow: list[dict[str, Any]] = field(default_factory=list)

    def one(self, run: Any, expected: tuple[type[BaseException], ...], data: bytes) -> None:
        tracing = self.runs % MEMORY_SAMPLE == 1  # tracemalloc slows an input 2-5x: every tenth is measured
        if tracing:
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
        started, started_cpu = time.perf_counter(), time.process_time()
        try:
            run(data)
        except expected:
            self.refused += 1
        except Exception as exc:  # the census: every escape is a finding, and the run goes on
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            key = f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"
            found = self.findings.setdefault(key, {"count": 0, "message": str(exc)[:300]})
            found["count"] += 1
            if "input" not in found:
                found["input"] = self._save(data)
        wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        self.slowest_s = max(self.slowest_s, wall)
        self.slowest_cpu_s = max(self.slowest_cpu_s, cpu)
        if wall > self.limit_s and len(self.slow) < 5:  # kept to replay: the machine's load, or the input's own cost?
            self.slow.append({"input": self._save(data, "slow"), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                              "traced": tracing})
        if tracing:
            self.largest_mib = max(self.largest_mib, (tracemalloc.get_traced_memory()[1] - before) / 2**20)
            tracemalloc.stop()
        self.runs += 1

    def _save(self, data: bytes, kind: str = "") -> str:
        FINDINGS.mkdir(exist_ok=True)
        path = FINDINGS / f"{self.target}-{kind + '-' if kind else ''}{hashlib.sha256(data).hexdigest()[:12]}.bin"
        path.write_bytes(data)
        return str(path.relative_to(REPO))

    def record(self, engine: str, limit_s: float, limit_mib: float) -> dict[str, Any]:
        return {
            "target": self.target, "engine": engine, "runs": self.runs, "refused_in_words": self.refused,
            "findings": self.findings, "slowest_input_s": round(self.slowest_s, 4),
            "slowest_input_cpu_s": round(self.slowest_cpu_s, 4), "slow_inputs": self.slow,
            "largest_input_mib": round(self.largest_mib, 2), "peak_rss_mib": round(_rss_mib(), 1),
            "within_bounds": not self.findings and self.slowest_s <= limit_s and self.largest_mib <= limit_mib,
        }


def child(args: argparse.Namespace) -> None:
    """Run one target in this process and write its record to ``args.out``."""
    sys.path.insert(0, str(HERE))
    import structlog
    import targets

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))  # the paths log refusals
    [name] = args.target
    target = targets.targets()[name]
    stats = Stats(name, limit_s=args.max_seconds)
    out = Path(args.out)

    def write() -> None:
        out.write_text(json.dumps(stats.record(args.engine, args.max_seconds, args.max_mib)))

    if args.engine == "hypothesis":
        from hypothesis import HealthCheck, Phase, given, seed, settings

        @seed(args.seed)
        @settings(max_examples=args.runs, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(target.structured)
        def census(data: bytes) -> None:
            stats.one(target.run, target.expected, data)

        census()
        write()
        return

    import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]  # untyped, and an extra
    from hypothesis.errors import NonInteractiveExampleWarning

    corpus = Path(tempfile.mkdtemp(prefix=f"shadowctl-fuzz-{name}-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        for i in range(50):
            (corpus / f"seed-{i}").write_bytes(target.structured.example())
    stats.one(target.run, target.expected, (corpus / "seed-0").read_bytes())  # imports what the path uses
    atheris.instrument_all()

    def one_input(data: bytes) -> None:
        stats.one(target.run, target.expected, data)
        if stats.runs % 500 == 0 or stats.runs >= args.runs:
            write()

    write()
    atheris.Setup([sys.argv[0], f"-runs={args.runs - 1}", f"-seed={args.seed}", "-max_len=65536",
                   "-timeout=60", "-rss_limit_mb=4096", str(corpus)], one_input)
    atheris.Fuzz()


def replay(args: argparse.Namespace) -> None:
    """Run one saved input through one target 5 times (the first also imports what the path uses): wall and
    CPU seconds of each run, and how it ended."""
    sys.path.insert(0, str(HERE))
    import structlog
    import targets

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    if not args.target or len(args.target) != 1:
        raise SystemExit("--replay needs exactly one --target")
    target = targets.targets()[args.target[0]]
    data = args.replay.read_bytes()
    for attempt in range(5):
        started, started_cpu = time.perf_counter(), time.process_time()
        try:
            target.run(data)
            outcome = "accepted"
        except target.expected as exc:
            outcome = f"refused: {str(exc)[:120]}"
        except Exception as exc:  # a finding: say which, as the census does
            outcome = f"{type(exc).__name__}: {str(exc)[:120]}"
        print(json.dumps({"run": attempt + 1, "wall_s": round(time.perf_counter() - started, 4),
                          "cpu_s": round(time.process_time() - started_cpu, 4), "outcome": outcome}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis")
    parser.add_argument("--runs", type=int, default=10_000, help="inputs per target")
    parser.add_argument("--target", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=2.0, help="the bound per input, seconds")
    parser.add_argument("--max-mib", type=float, default=200.0, help="the bound on one input's allocations, MiB")
    parser.add_argument("--out", type=Path, help="results (default: bench/results/fuzz-<engine>.json)")
    parser.add_argument("--replay", type=Path, metavar="FILE",
                        help="time one saved input (bench/fuzz/findings/...) on the one --target, 5 times, and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.replay:
        replay(args)
        return
    sys.path.insert(0, str(HERE))
    import targets

    names = args.target or list(targets.targets())
    results = []
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            argv = [sys.executable, __file__, "--child", "--engine", args.engine, "--target", name,
                    "--runs", str(args.runs), "--seed", str(args.seed), "--max-seconds", str(args.max_seconds),
                    "--max-mib", str(args.max_mib), "--out", tmp.name]
            started = time.perf_counter()
            done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=3600,
                                  env={**os.environ, "PYTHONHASHSEED": "0"})
            text = Path(tmp.name).read_text()
            record = json.loads(text) if text else {"target": name, "engine": args.engine, "runs": 0}
            record["wall_s"] = round(time.perf_counter() - started, 1)
            if done.returncode != 0:  # atheris ends with a crash report when the process itself died
                record["process"] = f"exit {done.returncode}: {done.stderr[-600:]}"
                record["within_bounds"] = False
        results.append(record)
        print(json.dumps(record), flush=True)
    out = args.out or REPO / "bench" / "results" / f"fuzz-{args.engine}.json"
    if args.target and out.exists():  # a rerun of some targets replaces their records, keeps the others
        ran = {r["target"] for r in results}
        kept = [r for r in json.loads(out.read_text()) if r.get("target") not in ran]
        order = list(targets.targets())
        results = sorted(kept + results, key=lambda r: order.index(r["target"]) if r["target"] in order else 99)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
