"""Whole-process start-up of the CLI, trees side by side in one run (run by hand).

    .venv/bin/python bench/cli_startup.py --kubeconfig /tmp/kc.yaml \\
        --tree base=/tmp/cli_base --tree now=. [--rounds 10] [--max-steal 0.05]

Each command runs as `python -m shadowctl ...` with PYTHONPATH set to the tree, from an empty
folder (so that `-m` does not put another checkout first on sys.path), on this venv's interpreter:
the trees share their dependencies and differ only in shadowctl's code. The commands are
`--version`, `validate TREE/policies/`, `get --help`, and `get -A` and `status -A` against the
cluster of `--kubeconfig` (a running `shadowctl sim cluster`, with at least one policy applied).

A round runs every command once in every tree, alternating (the order of the trees rotates from
round to round); every command and tree first runs once unmeasured, which also writes the tree's
bytecode caches. A round in which the hypervisor stole more than `--max-steal` cores during any of
its runs (read from /proc/stat around each run) is left out and run again, up to `--max-attempts`
times `--rounds`: stolen CPU is the neighbours' load, not ours. The criterion is fixed before the
run and blind to the timings. Wall time is what a person waits; CPU time (user + system of the
process, from wait4) does not include steal and is the steadier figure.

Prints a table of medians and p90 (nearest rank) per command and tree, with the ratio of the last
tree to the first, then what `-X importtime` says the last tree's `get -A` and `status -A` spend
their imports on; writes bench/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def commands(kubeconfig: str) -> dict[str, list[str]]:
    """The measured commands, by label; `{tree}` is replaced by the tree's root."""
    return {
        "--version": ["--version"],
        "validate policies/": ["validate", "{tree}/policies"],
        "get --help": ["get", "--help"],
        "get -A": ["get", "-A", "--kubeconfig", kubeconfig],
        "status -A": ["status", "-A", "--kubeconfig", kubeconfig],
    }


def proc_stat() -> float:
    """Seconds the hypervisor has stolen from this machine's virtual CPUs so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[7] / os.sysconf("SC_CLK_TCK")


def run_once(tree: Path, argv: list[str], cwd: str, extra: list[str] | None = None) -> dict[str, Any]:
    """One whole process: wall and CPU seconds, the steal meanwhile (cores), its exit code."""
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "120"}
    env.pop("KUBECONFIG", None)
    args = [sys.executable, *(extra or []), "-m", "shadowctl", *(a.replace("{tree}", str(tree)) for a in argv)]
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: nothing blocks while we wait4
        steal0, t0 = proc_stat(), time.perf_counter()
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        steal = (proc_stat() - steal0) / wall
        proc.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "steal_cores": steal,
            "rc": proc.returncode, "stderr": stderr[-500:]}


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def importtime(tree: Path, argv: list[str], cwd: str, top: int = 8) -> list[tuple[str, float]]:
    """The slowest top-level imports of one run (cumulative seconds), from `python -X importtime`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "shadowctl", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        if not name.startswith("  "):  # a top-level import: one space after the bar, nested ones two more each
            rows.append((name.strip(), int(cumulative) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def revision(tree: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "shadowctl"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev + (" + uncommitted changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True, help="a running cluster with a ShadowPolicy applied")
    parser.add_argument("--tree", action="append", required=True, metavar="LABEL=DIR",
                        help="a checkout to measure (repeatable; the ratio is last / first)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-steal", type=float, default=0.05,
                        help="leave out a round in which the hypervisor stole more than this many cores in any run")
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench/results/cli_startup.json"))
    args = parser.parse_args()
    trees = {label: Path(path).resolve() for label, path in (t.split("=", 1) for t in args.tree)}
    cmds = commands(str(Path(args.kubeconfig).resolve()))
    cwd = tempfile.mkdtemp(prefix="cli-startup-")

    for label, tree in trees.items():  # unmeasured: bytecode caches, page cache, and a check that each works
        for name, argv in cmds.items():
            first = run_once(tree, argv, cwd)
            if first["rc"] != 0:
                sys.exit(f"{label}: `shadowctl {name}` exited {first['rc']}: {first['stderr']}")

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {t: [] for t in trees} for n in cmds}
    left_out: list[float] = []
    attempts = 0
    labels = list(trees)
    while len(runs["--version"][labels[0]]) < args.rounds and attempts < args.rounds * args.max_attempts:
        order = labels[attempts % len(labels):] + labels[:attempts % len(labels)]
        attempts += 1
        one = {n: {t: run_once(trees[t], argv, cwd) for t in order} for n, argv in cmds.items()}
        worst = max(r["steal_cores"] for per in one.values() for r in per.values())
        if worst > args.max_steal:
            left_out.append(round(worst, 3))
            continue
        for n, per in one.items():
            for t, r in per.items():
                runs[n][t].append(r)

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for n in cmds:
        summary[n] = {}
        for t in trees:
            walls = [r["wall_s"] for r in runs[n][t]]
            cpus = [r["cpu_s"] for r in runs[n][t]]
            if walls:
                summary[n][t] = {"wall_median_s": statistics.median(walls), "wall_p90_s": p90(walls),
                                 "cpu_median_s": statistics.median(cpus)}
    first, last = labels[0], labels[-1]
    head = f"{'command':<20}" + "".join(f"{t + ' median':>14}{t + ' p90':>11}{t + ' cpu':>11}" for t in labels)
    head += f"{last + '/' + first:>12}"
    print(f"{len(runs['--version'][first])} rounds kept, {len(left_out)} left out (steal > {args.max_steal} cores)")
    print(head)
    for n, per in summary.items():
        if len(per) != len(labels):
            continue
        row = f"{n:<20}" + "".join(f"{per[t]['wall_median_s']:>13.3f}s{per[t]['wall_p90_s']:>10.3f}s"
                                   f"{per[t]['cpu_median_s']:>10.3f}s" for t in labels)
        row += f"{per[last]['wall_median_s'] / per[first]['wall_median_s']:>12.2f}"
        print(row)

    imports = {n: importtime(trees[last], cmds[n], cwd) for n in ("get -A", "status -A")}
    for n, rows in imports.items():
        print(f"\n{last}: `shadowctl {n}` imports (cumulative, top level): "
              + ", ".join(f"{name} {seconds:.3f}s" for name, seconds in rows))

    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "trees": {t: {"path": str(p), "revision": revision(p)} for t, p in trees.items()},
        "rounds_kept": len(runs["--version"][first]),
        "max_steal_cores": args.max_steal,
        "left_out_steal_cores": left_out,
        "summary": summary,
        "imports_of_last_tree": {n: dict(rows) for n, rows in imports.items()},
        "runs": {n: {t: [{k: v for k, v in r.items() if k != "stderr"} for r in rs] for t, rs in per.items()}
                 for n, per in runs.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
