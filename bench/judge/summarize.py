"""Print bench/results/judge.json as the markdown tables quoted in docs/judge.md.

    .venv/bin/python bench/judge/summarize.py [bench/results/judge.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _s(x: float | None) -> str:
    return "never" if x is None else f"{x:.0f} s"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / "judge.json"
    data = json.loads(path.read_text())
    cells: list[dict[str, Any]] = data["cells"]
    meta = data["meta"]
    print(f"`nice .venv/bin/python {meta['command']}` ({meta['seconds']:.0f} s; alpha {meta['alpha']}, "
          f"beta {meta['beta']}, a look every {meta['interval_s']:.0f} s, {meta['looks']} looks)\n")
    print("A/A: share of runs that ever fail within 100 looks, % (standard error)\n")
    print("| cell | runs | shadowctl mean | p50 | p99 / rate | kayenta | window fl0 | window fl3 |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for c in cells:
        if c["cell"]["effect"] not in ("none", "err-aa"):
            continue
        m = c["methods"]

        def f(name: str, m: dict[str, Any] = m) -> str:
            if name not in m:
                return "-"
            return f"{_pct(m[name]['fail_any_100'])} ({100 * m[name]['fail_any_se']:.2f})"

        for k, v in m.items():
            if k.startswith("shadowctl"):
                worst = max(worst, v["fail_any_100"])
        p99 = f("shadowctl:p99") if "shadowctl:p99" in m else f("shadowctl:rate")
        print(f"| {c['cell']['label']} | {c['reps']} | {f('shadowctl:mean')} | {f('shadowctl:p50')} | {p99} | "
              f"{f('kayenta')} | {f('window-fl0')} | {f('window-fl3')} |")
    print(f"\nWorst shadowctl A/A false-fail rate over all cells and statistics: {100 * worst:.2f}%\n")
    print("Regressions: detected (fail before any pass) within 10 minutes, %, and median time to fail\n")
    print("| cell | runs | shadowctl (statistic) | within 10 min | median | oracle | oracle-2s | kayenta |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cells:
        eff = c["cell"]["effect"]
        if eff in ("none", "err-aa"):
            continue
        m = c["methods"]
        stat = "shadowctl:rate" if eff.startswith("err") else ("shadowctl:p99" if eff == "p99+30%" else "shadowctl:mean")
        r = m[stat]
        o = m.get("oracle")
        o2 = m.get("oracle-2s")
        k = m.get("kayenta")
        print(f"| {c['cell']['label']} | {c['reps']} | {stat.split(':')[1]} | {_pct(r['fail_within_10min'])} | "
              f"{_s(r['median_fail_delay_s'])} | {_s(o['median_fail_delay_s']) if o else '-'} | "
              f"{_s(o2['median_fail_delay_s']) if o2 else '-'} | {_s(k['median_fail_delay_s']) if k else '-'} |")


if __name__ == "__main__":
    main()
