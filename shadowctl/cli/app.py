"""The `shadowctl` command: wires concrete adapters to the core and prints results.

Each group of commands lives in its own module, loaded only when one of its commands runs (or its
own ``--help`` is asked for): :data:`COMMANDS` names the module and the one-line help of every
command, so ``shadowctl --version``, ``shadowctl --help`` and a light command do not import the
judge (scipy), the controller or the Kubernetes client. ``tests/test_cli_startup.py`` checks that
the table says what each module registers, and what importing the app loads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

import shadowctl


@dataclass(frozen=True)
class LazyCommand:
    """One top-level command: the module whose ``register(app)`` defines it, and its one-line help."""

    name: str
    module: str
    help: str
    logs: bool = True
    """It runs adapters, which log: the CLI's log set-up (stderr, warnings and worse) comes first."""


COMMANDS: tuple[LazyCommand, ...] = (
    LazyCommand("validate", "shadowctl.cli.policy_cmds",
                "Check ShadowPolicy files and report every problem as FILE:LINE:COL: path: message.", logs=False),
    LazyCommand("schema", "shadowctl.cli.policy_cmds", "Print the JSON Schema of a ShadowPolicy, for editors.",
                logs=False),
    LazyCommand("tap", "shadowctl.cli.tap_cmd",
                "Proxy an OpenAI-compatible model server and publish each answer to MQTT for comparison."),
    LazyCommand("query", "shadowctl.cli.query_cmd",
                "Run a policy's metric queries and print what primary and candidate did."),
    LazyCommand("render", "shadowctl.cli.render_cmd",
                "Print the object shadowctl would write for a traffic split, without a cluster."),
    LazyCommand("run", "shadowctl.cli.run_cmd",
                "Run the controller: carry out every ShadowPolicy it selects, until stopped (SIGTERM/Ctrl-C)."),
    LazyCommand("demo", "shadowctl.cli.demo_cmd",
                "Run a rollout end to end on this machine and say what the controller decided, and why."),
    LazyCommand("apply", "shadowctl.cli.apply_cmd",
                "Create or update ShadowPolicies from files, like kubectl apply."),
    LazyCommand("get", "shadowctl.cli.view_cmds",
                "List ShadowPolicies, or show one, with their phase, step, weight, mirror and last verdict.",
                logs=False),
    LazyCommand("status", "shadowctl.cli.view_cmds",
                "Show where rollouts stand: phase, step, weights, mirror, the last decision and each metric's "
                "evidence.", logs=False),
    LazyCommand("describe", "shadowctl.cli.view_cmds",
                "Explain why a rollout is where it is: spec, verdict numbers, history, events.", logs=False),
    LazyCommand("promote", "shadowctl.cli.rollout_cmds",
                "Approve a promotion that waits for a person (phase WaitingPromotion), or with --full promote now."),
    LazyCommand("rollback", "shadowctl.cli.rollout_cmds",
                "Roll back: 100% of live traffic to the primary and the mirror removed (also after a promotion)."),
    LazyCommand("pause", "shadowctl.cli.rollout_cmds",
                "Pause a rollout in analysis: traffic stays where it is and no step is taken until resume."),
    LazyCommand("resume", "shadowctl.cli.rollout_cmds",
                "Resume a paused rollout; the analysis of the phase it was paused in starts again."),
    LazyCommand("retry", "shadowctl.cli.rollout_cmds",
                "Start a finished (Succeeded, RolledBack, Failed) or paused rollout again from its first phase."),
    LazyCommand("judge", "shadowctl.cli.judge_cmd", "Run the statistical judge offline."),
    LazyCommand("rbac", "shadowctl.cli.rbac_cmd",
                "Print the Roles that let the controller read exactly the Secrets (or ConfigMaps) policies name.", logs=False),
    LazyCommand("sim", "shadowctl.cli.sim_cmd",
                "Parts of the local environment that tests and the demo use, started one at a time."),
)
BY_NAME = {c.name: c for c in COMMANDS}


def load_command(name: str) -> Any:
    """The click command ``name`` as its module registers it (imports the module)."""
    entry = BY_NAME[name]
    # No completion options: the root has none, and a module that registers one command would offer them.
    holder = typer.Typer(rich_markup_mode="rich", pretty_exceptions_enable=False, add_completion=False)
    importlib.import_module(entry.module).register(holder)
    built = typer.main.get_command(holder)
    if isinstance(built, TyperGroup):
        found = built.commands.get(name)
        if found is None:
            raise LookupError(f"{entry.module} does not register a command {name!r}")
        return found
    if built.name != name:
        raise LookupError(f"{entry.module} registers {built.name!r}, not {name!r}")
    return built


class LazyGroup(TyperGroup):
    """The root group: commands come from :data:`COMMANDS`, their modules imported on first use."""

    _listing = False

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        # The names alone, for typer's "did you mean ...?" (get_command never reads this mapping).
        self.commands = {c.name: TyperCommand(name=c.name, help=c.help) for c in COMMANDS}

    def list_commands(self, ctx: Any) -> list[str]:
        return [c.name for c in COMMANDS]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        entry = BY_NAME.get(cmd_name)
        if entry is None:
            return None
        if self._listing:  # the root's help lists names and one-line helps: nothing to import
            return TyperCommand(name=entry.name, help=entry.help, short_help=entry.help)
        if entry.logs:
            from shadowctl.cli.common import configure_logging

            # Library and adapter logs go to stderr, warnings and worse, so that `-o json` stays clean;
            # `shadowctl run` and `shadowctl demo` configure their own.
            configure_logging("console", "warning")
        return load_command(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="shadowctl",
    cls=LazyGroup,
    help=(
        "Shadow-traffic and canary controller for GPU-served models.\n\n"
        "Takes a candidate model version from 'deployed, no traffic' to 'serving 100%' (or back to "
        "nothing): Istio mirroring in a shadow phase, stepwise traffic in a canary phase, statistical "
        "judgement over Prometheus metrics and paired outputs, automatic promote or rollback."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shadowctl {shadowctl.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Shadow-traffic and canary controller for GPU-served models."""


def main() -> None:
    """Console-script entry point."""
    app()
