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

from shadowctl.policy.yaml_bounds import YamlLimits


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

YAML_LIMITS = YamlLimits()
MaxBytesOpt = Annotated[int, typer.Option("--max-bytes", min=1, help="Refuse a YAML file larger than this, in bytes.")]
MaxDepthOpt = Annotated[int, typer.Option("--max-depth", min=1, help="Refuse YAML nested deeper than this.")]
MaxNodesOpt = Annotated[
    int, typer.Option("--max-nodes", min=1, help="Refuse YAML of more nodes than this, every alias expanded.")
]


def yaml_limits(max_bytes: int = YAML_LIMITS.max_bytes, max_depth: int = YAML_LIMITS.max_depth,
                max_nodes: int = YAML_LIMITS.max_nodes) -> YamlLimits:
    """The limits of --max-bytes, --max-depth and --max-nodes (a hostile file fails fast, with its line)."""
    return YamlLimits(max_bytes=max_bytes, max_depth=max_depth, max_nodes=max_nodes)


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
