"""The `shadowctl` command: wires concrete adapters to the core and prints results.

Each group of commands lives in its own module and registers itself here.
"""

from __future__ import annotations

from typing import Annotated

import typer

from shadowctl import __version__
from shadowctl.cli.common import configure_logging

app = typer.Typer(
    name="shadowctl",
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
        typer.echo(f"shadowctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Shadow-traffic and canary controller for GPU-served models."""
    # Library and adapter logs go to stderr, warnings and worse, so that `-o json` stays clean;
    # `shadowctl run` and `shadowctl demo` configure their own.
    configure_logging("console", "warning")


def _register() -> None:
    # Imported here so that each module can register its commands on `app`.
    from shadowctl.cli import policy_cmds

    policy_cmds.register(app)
    __import__("shadowctl.cli.tap_cmd", fromlist=["register"]).register(app)
    __import__("shadowctl.cli.query_cmd", fromlist=["register"]).register(app)
    __import__("shadowctl.cli.judge_cmd", fromlist=["register"]).register(app)
    __import__("shadowctl.cli.render_cmd", fromlist=["register"]).register(app)
    __import__("shadowctl.cli.run_cmd", fromlist=["register"]).register(app)
    __import__("shadowctl.cli.demo_cmd", fromlist=["register"]).register(app)
    __import__("shadowctl.cli.rollout_cmds", fromlist=["register"]).register(app)
    __import__("shadowctl.cli.sim_cmd", fromlist=["register"]).register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    app()
