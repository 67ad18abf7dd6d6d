"""`shadowctl demo`: a whole rollout on this machine, on a local control plane, without a GPU."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from shadowctl.cli.common import configure_logging, console, fail
from shadowctl.errors import ShadowctlError


def demo(
    scenario: Annotated[str, typer.Option("--scenario", "-s",
                                          help="good | bad-latency | bad-output | errors | tail, or a prompt "
                                               "rollout: prompt-good | prompt-bad (a new system prompt, the taps "
                                               "as the only router, judged by an llm-judge).")] = "good",
    report_dir: Annotated[Path | None, typer.Option("--report-dir",
                                                    help="Where to write the report (default: ./demo-report-<time>).")]
    = None,
    live: Annotated[bool, typer.Option("--live/--no-live", help="Show the live view while it runs.")] = True,
    short: Annotated[bool, typer.Option("--short", help="The test suite's shorter timings.")] = False,
    target: Annotated[str | None, typer.Option(
        "--target", help="What routes the traffic: istio (istio/chat.yaml's VirtualService, the default), kserve "
                         "(kserve/chat.yaml's InferenceService, its shadow phase through the primary's tap) or "
                         "gateway-api (gateway-api/chat.yaml's HTTPRoute). The prompt scenarios are always routed "
                         "by the primary's tap (spec.target.tap): tap, or leave it out.",
        show_default=False)] = None,
) -> None:
    """Run a rollout end to end on this machine and say what the controller decided, and why.

    Starts, on free local ports: a real Kubernetes control plane (kube-apiserver and etcd from hack/setup.sh, with the CRDs and deploy/rbac.yaml), a mesh simulator routing by the VirtualService (or, with --target gateway-api, the HTTPRoute; with --target kserve, the traffic a stand-in for KServe's controller reports for the InferenceService), simulated vLLM-like model servers with a shadowctl tap in front of each, a real Prometheus and Mosquitto, a load generator and the controller (`shadowctl run`, as deploy/rbac.yaml's ServiceAccount).

    The scenario sets how the candidate behaves. Exit code 0 when the outcome is the one the scenario expects, 1 otherwise.

    Examples: shadowctl demo --scenario bad-latency --target gateway-api; shadowctl demo --scenario prompt-bad
    """
    from shadowctl.demo.prompt_rollout import PROMPT_SCENARIOS
    from shadowctl.demo.report import write_report
    from shadowctl.demo.run import run_scenario
    from shadowctl.demo.scenarios import FULL, SCENARIOS, SHORT, TARGETS

    known = {**SCENARIOS, **PROMPT_SCENARIOS}
    if scenario not in known:
        raise fail(f"unknown scenario {scenario!r}; choose one of: {', '.join(known)}", 2)
    if scenario in PROMPT_SCENARIOS:
        if target not in (None, "tap"):
            raise fail(f"--target {target}: the prompt scenarios are routed by the primary's tap "
                       "(spec.target.tap); leave --target out", 2)
        target = "tap"
    elif target is None:
        target = "istio"
    elif target not in TARGETS:
        raise fail(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}", 2)
    chosen = known[scenario]
    configure_logging("console", "warning")
    folder = report_dir or Path(f"demo-report-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{scenario}")
    try:
        data = asyncio.run(run_scenario(chosen, SHORT if short else FULL, console=console,
                                        live=live and sys.stdout.isatty(), target=target))
        paths = write_report(data, folder)
    except KeyboardInterrupt:
        raise fail("interrupted; everything was stopped", 130) from None
    except ShadowctlError as exc:
        raise fail(str(exc)) from None
    verdict = "as expected" if data["passed"] else f"NOT as expected (expected {data['expected']})"
    console.print(f"\n[bold]{data['outcome']}[/] after {data['duration_s']:.0f}s: {verdict}")
    if data.get("final_message"):
        console.print(f"last decision: {data['final_message']}", highlight=False, markup=False)
    if data["invariants"]["violations"]:
        console.print("[red]invariant violations:[/]\n" + json.dumps(data["invariants"]["violations"], indent=2))
    console.print(f"report: {paths.markdown}  chart: {paths.chart}", highlight=False, markup=False)
    raise typer.Exit(0 if data["passed"] else 1)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
