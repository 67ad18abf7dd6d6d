"""Batched vs one-query-per-rollout look against a real, backfilled Prometheus (run by hand).

    .venv/bin/python bench/prometheus_batching.py [--rollouts 1,10,50,200] [--repeat 5]

For R rollouts (each in its own namespace, 30 minutes of vLLM and DCGM series at
15s; phases started in 10 different minutes) it times one look of three metrics
(vllm-ttft, vllm-errors, gpu-cost-per-1k-tokens) answered three ways, side by side:
`grouped` (`fetch_many` as the controller calls it: presets grouped by their variant
labels, one part per window length; the gauge tagged per rollout), `tagged` (`fetch_many`
with the grouped forms removed: every rollout its own tagged part, at most max-batch per
query) and `single` (one `fetch` per request, 3R queries, all concurrently under the same
semaphore), and writes bench/results/prometheus_batching-<max-batch>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest_prometheus import PrometheusServer, backfill  # noqa: E402

from shadowctl.policy.model import ShadowPolicy  # noqa: E402
from shadowctl.sources.base import VariantPair, WindowRequest  # noqa: E402
from shadowctl.sources.prometheus import PrometheusMetricSource  # noqa: E402
from shadowctl.sources.prometheus.promql import build_request  # noqa: E402

T0, STEP, STEPS = 1_700_006_400, 15, 120


def data(rollouts: int) -> str:
    lines: list[str] = []
    for r in range(rollouts):
        ns = f"ns-{r}"
        for pod, scale in (("chat-v1-aaaaa-bbbbb", 1), ("chat-v2-ccccc-ddddd", 2)):
            base = f'namespace="{ns}",pod="{pod}"'
            for k in range(STEPS + 1):
                ts = T0 + STEP * k
                for le, inc in (("0.1", 1), ("0.5", 2), ("1", 3), ("+Inf", 4)):
                    lines.append(f'vllm:time_to_first_token_seconds_bucket{{{base},le="{le}"}} {k * inc * scale} {ts}')
                lines.append(f'vllm:request_success_total{{{base},finished_reason="stop"}} {10 * k} {ts}')
                lines.append(f'vllm:request_success_total{{{base},finished_reason="error"}} {k * scale} {ts}')
                lines.append(f"vllm:generation_tokens_total{{{base}}} {1000 * k * scale} {ts}")
                lines.append(f'DCGM_FI_DEV_GPU_UTIL{{{base},gpu="0"}} 50 {ts}')
    lines.sort(key=lambda ln: (ln.rsplit(" ", 2)[0], int(ln.rsplit(" ", 1)[1])))
    return "\n".join(lines) + "\n# EOF\n"


def requests_for(rollouts: int) -> list[WindowRequest]:
    out = []
    metrics = [
        {"name": "ttft", "preset": "vllm-ttft"},
        {"name": "errors", "preset": "vllm-errors", "kind": "ratio", "statistic": "rate", "margin": "1pp"},
        {"name": "cost", "preset": "gpu-cost-per-1k-tokens", "kind": "gauge", "statistic": "mean"},
    ]
    for r in range(rollouts):
        pol = ShadowPolicy.model_validate({
            "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy",
            "metadata": {"name": f"chat-{r}", "namespace": f"ns-{r}"},
            "spec": {
                "target": {"istio": {"virtualService": "vs", "primary": {"host": "h", "subset": "a"},
                                     "candidate": {"host": "h", "subset": "b"}}},
                "canary": {"steps": [10]},
                "analysis": {"gpuPricePerHour": 2.0, "metrics": metrics,
                             "variants": {"primary": {"workload": "chat-v1"}, "candidate": {"workload": "chat-v2"}}},
            },
        })
        for m in pol.spec.analysis.metrics:
            start = datetime.fromtimestamp(T0 + 60 * (r % 10), UTC)
            out.append(build_request(pol, m, start=start, end=datetime.fromtimestamp(T0 + 1800, UTC)))
    return out


async def look(url: str, reqs: list[WindowRequest], mode: str, max_batch: int) -> tuple[float, int]:
    src = PrometheusMetricSource(url, timeout=60, max_batch=max_batch)
    if mode == "tagged":
        reqs = [dataclasses.replace(r, grouped=None) for r in reqs]
    try:
        started = time.perf_counter()
        if mode != "single":
            results = await src.fetch_many(reqs)
        else:
            answers = await asyncio.gather(*(src.fetch(r) for r in reqs))
            results = {r.key: a for r, a in zip(reqs, answers, strict=True)}
        elapsed = time.perf_counter() - started
    finally:
        await src.aclose()
    bad = [k for k, v in results.items() if not isinstance(v, VariantPair)]
    if bad:
        raise SystemExit(f"unexpected results for {bad[:3]}: {results[bad[0]]}")
    return elapsed, src.queries_sent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rollouts", default="1,10,50,200")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=20, help="parts per batched query")
    args = parser.parse_args()
    counts = [int(x) for x in args.rollouts.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = PrometheusServer(Path(tmp))
        backfill(data(max(counts)), server.data_dir)
        server.start()
        try:
            for n in counts:
                reqs = requests_for(n)
                for mode in ("grouped", "tagged", "single"):
                    times, queries = [], 0
                    for _ in range(args.repeat):
                        elapsed, queries = asyncio.run(look(server.url, reqs, mode, args.max_batch))
                        times.append(elapsed)
                    row = {"rollouts": n, "mode": mode, "max_batch": args.max_batch, "queries": queries,
                           "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4)}
                    rows.append(row)
                    print(json.dumps(row))
        finally:
            server.stop()
    out = REPO / "bench" / "results" / f"prometheus_batching-{args.max_batch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prometheus": "2.42.0 (Debian)", "metrics_per_rollout": 3, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
