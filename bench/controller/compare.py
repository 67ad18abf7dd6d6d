"""Today's controller against an older tree, side by side in one run (same machine, same minutes).

Each trial runs bench/controller/run.py once per tree, alternating the order, with PYTHONPATH set to
the tree (both use this checkout's virtual environment and control-plane binaries). Results go to
bench/results/controller-looks.json: per tree and trial, tick p50/p99, metric queries per round,
judge passes, API requests per tick and the process's peak RSS.

Run: .venv/bin/python bench/controller/compare.py --base /tmp/base [--sizes 1000] [--trials 2]
(make the older tree with `git worktree add /tmp/base <commit>`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(tree: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        argv = [sys.executable, str(REPO / "bench" / "controller" / "run.py"), "--sizes", *map(str, args.sizes),
                "--rounds", str(args.rounds), "--modes", *args.modes, "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run(argv, check=True, env=env, cwd=tree, timeout=3600)
        rows: list[dict[str, object]] = json.loads(out.read_text())
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", type=Path, required=True, help="the older tree (a git worktree)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["staggered"])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "controller-looks.json")
    args = parser.parse_args()
    trees = {"today": REPO, "base": args.base.resolve()}
    results = []
    for trial in range(args.trials):
        order = list(trees.items()) if trial % 2 == 0 else list(reversed(trees.items()))
        for name, tree in order:
            for row in run(tree, args):
                results.append({"tree": name, "trial": trial, **row})
                print(json.dumps(results[-1]), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
