"""`--kubeconfig`, `--context` and `-n` to a KubeClient (or a reader) and a namespace, and a failure to one line.

The kubeconfig itself (which file, which context, its namespace, the pod's service account) is
:mod:`shadowctl.kube.kubeconfig`; this is the command line's side: the flags, how fast to give up,
and what a person reads when connecting or a request fails (one line on stderr, exit 1, never a
traceback).

The kube client is imported inside the functions, not at the top (and commands that only read use
the standard library's reader, :mod:`shadowctl.kube.rest`, where the kubeconfig allows): the command modules import this
one to register their commands, and ``shadowctl get --help`` should not pay for the Kubernetes
library (``tests/test_cli_startup.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from shadowctl.cli.common import configure_logging, fail
from shadowctl.errors import ShadowctlError
from shadowctl.kube.retry import RetryPolicy

if TYPE_CHECKING:
    from shadowctl.kube import KubeClient, KubeError, KubeReader

T = TypeVar("T")

CLI_RETRY = RetryPolicy(attempts=3, base_delay=0.2, max_delay=1.0)
"""A CLI should fail fast when the cluster is down: 3 tries within about a second."""
USER_AGENT = "shadowctl-cli"


class CliError(ShadowctlError):
    """A failure a command explains itself: printed as one line, exit ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Conn:
    """Where to connect, and the namespace the user asked for (None: the context's)."""

    kubeconfig: str | None
    context: str | None
    namespace: str | None


async def connect(conn: Conn) -> tuple[KubeClient, str]:
    """A client for the kubeconfig context, and the namespace to use (``-n``, else the context's)."""
    from shadowctl.kube import connect_as_kubectl, default_namespace

    client = await connect_as_kubectl(conn.kubeconfig, conn.context, retry=CLI_RETRY)
    return client, conn.namespace or default_namespace(conn.kubeconfig, conn.context)


async def with_client(conn: Conn, body: Callable[[KubeClient, str], Awaitable[T]]) -> T:
    """Run ``body(client, namespace)`` and close the client."""
    client, namespace = await connect(conn)
    try:
        return await body(client, namespace)
    finally:
        await client.close()


async def with_reader(conn: Conn, body: Callable[[KubeReader, str], Awaitable[T]]) -> T:
    """Run ``body(reader, namespace)`` for a command that only reads, and close the reader.

    The reader is :class:`~shadowctl.kube.rest.RestReader` (no kubernetes library to import: the
    command starts in a fraction of the time) where the kubeconfig states its credentials outright,
    else the full client (exec and auth-provider plugins, proxies).
    """
    from shadowctl.kube.kubeconfig import default_namespace
    from shadowctl.kube.rest import RestReader

    reader = RestReader.for_kubeconfig(conn.kubeconfig, conn.context, retry=CLI_RETRY, user_agent=USER_AGENT)
    if reader is None:
        configure_logging("console", "warning")  # the client logs its retries (see cli/app.py's ``logs``)
        return await with_client(conn, body)
    try:
        return await body(reader, conn.namespace or default_namespace(conn.kubeconfig, conn.context))
    finally:
        await reader.close()


def explain(exc: KubeError) -> str:
    """One line a person can act on, for an API failure the command did not anticipate."""
    from shadowctl.kube import ConfigError, Forbidden, Invalid, Unauthorized, Unavailable

    server = exc.message.split(": ", 1)[1] if exc.message.startswith("HTTP ") and ": " in exc.message else exc.message
    if isinstance(exc, ConfigError):
        return exc.message  # kube.kubeconfig words these, with what to pass instead
    if isinstance(exc, Unauthorized):
        return "the cluster refused the credentials (401 Unauthorized): check the user or token in your kubeconfig"
    if isinstance(exc, Forbidden):
        return f"forbidden (403): {server}"
    if isinstance(exc, Unavailable):
        return f"cannot reach the Kubernetes API server: {exc.message}"
    if isinstance(exc, Invalid):
        causes = "; ".join(f"{c.get('field', '')}: {c.get('message', '')}".strip(": ") for c in exc.causes)
        return f"the API server rejected the object (422 Invalid): {causes or server}"
    return f"the API server answered {exc.message}"


def one_line(text: str) -> str:
    """``text`` (a server's words, as often as not) on one line."""
    return " ".join(text.split())


def run_async(make: Callable[[], Coroutine[Any, Any, T]], *, interrupt_code: int = 130) -> T:
    """Run a command's coroutine; every expected failure becomes one line on stderr and exit 1."""
    from shadowctl.kube import KubeError

    try:
        return asyncio.run(make())
    except CliError as exc:
        raise fail(one_line(exc.message), exc.code) from None
    except KubeError as exc:
        raise fail(one_line(explain(exc))) from None
    except KeyboardInterrupt:
        raise typer.Exit(interrupt_code) from None
