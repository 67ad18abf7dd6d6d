"""Options and output helpers every command shares (kubectl conventions)."""

from __future__ import annotations

import enum
import json
import logging
import sys
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.text import Text


class OutputFormat(str, enum.Enum):
    """How a command prints its result: `-o table|json|yaml`."""

    table = "table"
    json = "json"
    yaml = "yaml"


KubeconfigOpt = Annotated[
    str | None,
    typer.Option("--kubeconfig", help="Path to the kubeconfig file (default: $KUBECONFIG or ~/.kube/config).",
                 envvar="KUBECONFIG", show_default=False),
]
ContextOpt = Annotated[
    str | None, typer.Option("--context", help="The kubeconfig context to use (default: current-context).")
]
NamespaceOpt = Annotated[
    str | None,
    typer.Option("-n", "--namespace", help="Namespace of the ShadowPolicy (default: the context's namespace)."),
]
OutputOpt = Annotated[
    OutputFormat, typer.Option("-o", "--output", help="Output format: table, json or yaml.", case_sensitive=False)
]

console = Console()
err_console = Console(stderr=True)


def emit(data: Any, fmt: OutputFormat) -> None:
    """Print plain data as JSON or YAML (tables are built by each command)."""
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: MESSAGE`` on stderr, each of its lines unwrapped, and return the Exit to raise.

    ``message`` is printed as written (no markup), so a server's answer, a file's content or a usage
    such as ``HOST[/SUBSET]`` needs no escaping; only the ``error:`` prefix is styled.
    """
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    return typer.Exit(code)


def note(message: str) -> None:
    """A warning a person should see on stderr, printed as written (no markup), unwrapped."""
    err_console.print(message, highlight=False, markup=False, soft_wrap=True, style="yellow")


def out(line: str = "") -> None:
    """One line of a command's result on stdout, as written."""
    sys.stdout.write(line + "\n")


class _CurrentStderr:
    """Whatever `sys.stderr` is at write time (test runners swap it; a captured stream may be closed)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(fmt: str, level: str = "info") -> None:
    """structlog: JSON lines (for log collectors) or readable console lines."""
    import structlog  # 0.1 s: only commands that run adapters set logging up (see cli/app.py)

    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
