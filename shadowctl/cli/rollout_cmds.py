"""`shadowctl promote|rollback|pause|resume|retry`: steer a rollout by the command annotation.

Each writes ``shadowctl.dev/command`` (the command, a fresh id, when, who) with a merge patch; the
controller carries it out once, at its next tick, and records it in ``status.lastCommand``.

Why the commands refuse some requests instead of sending them: the controller takes every command
from the annotation and records it as handled even when the state machine ignores it (``promote``
while nothing waits for approval). A person would then see "carried out" and nothing happen. So
each command first reads the phase and refuses, with the reason and the command that would work,
what the machine would ignore; the check and the write are tied by the resourceVersion read (a
conditional merge patch), so a phase change in between is re-read and re-checked rather than raced.

The machine, the controller's command format and the kube client are imported where a command
runs: ``promote --help`` loads none of them.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated

import typer

from shadowctl.cli.common import ContextOpt, KubeconfigOpt, NamespaceOpt, note, out
from shadowctl.cli.connect import CliError, Conn, run_async, with_client
from shadowctl.cli.objects import (
    CONFLICT_ATTEMPTS,
    JSON,
    KIND_LABEL,
    key_of,
    meta_of,
    phase_of,
    read_policy,
    status_of,
)

if TYPE_CHECKING:
    from shadowctl.kube import KubeClient
    from shadowctl.policy.status import Command, CommandRecord

#: Seconds between reads while `--wait` waits for the controller (tests lower it).
POLL_SECONDS = 1.0


def refusal_text(command: Command, obj: JSON) -> str | None:
    """What a person is told when the object's phase refuses ``command`` (None: the controller would act).

    Which commands a phase accepts is :func:`shadowctl.machine.refusal`, the rule ``step`` itself
    applies; this only words it for the command line, with what would work instead.
    """
    from pydantic import ValidationError

    from shadowctl.controller.status import parse_policy
    from shadowctl.machine import REFUSED_SPEC_COMMANDS, Refusal, RolloutState, refusal

    status = status_of(obj)
    phase_name = status.phase.value
    if command not in REFUSED_SPEC_COMMANDS:
        try:
            parse_policy(obj)
        except ValidationError as exc:  # the controller leaves it waiting until the spec is fixed
            where = ".".join(map(str, exc.errors()[0]["loc"])) or "spec"
            return (f"{key_of(obj)} has a spec the model refuses ({where}: {exc.errors()[0]['msg']}); the "
                    f"controller carries out only rollback until it is fixed (`shadowctl rollback "
                    f"{meta_of(obj).get('name')}` works meanwhile; a rollout in flight is rolled back at "
                    f"{status.deadline_at or 'its deadline'} unless the spec is fixed first)")
    # `.status.phase` is what `get` and `status` show; the rollout block adds where a pause came from.
    state = replace(RolloutState.from_record(status.rollout), phase=status.phase)
    why = refusal(command, state)
    if why is None:
        return None
    name = meta_of(obj).get("name")
    text = f"{key_of(obj)} is {phase_name}: {why}"
    if why is Refusal.nothing_to_approve:
        text += (f". `shadowctl promote {name} --full` skips the remaining analysis and sends 100% of live "
                 "traffic to the candidate")
    elif why is Refusal.already_paused:
        text += f"; `shadowctl resume {name}` continues it"
    return text


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


@dataclass(frozen=True)
class Sent:
    id: str
    phase: str
    replaced: str | None  # a pending command of someone else that this one replaced


async def send_command(client: KubeClient, namespace: str, name: str, command: Command) -> Sent:
    """Check the phase, then write the command annotation conditionally on what was read (409: again)."""
    from shadowctl.controller.clock import iso
    from shadowctl.controller.commands import command_patch, new_command, pending_command
    from shadowctl.kube import SHADOW_POLICY, Conflict, NotFound, ResourceRef

    ref = ResourceRef(SHADOW_POLICY, name, namespace)
    for _ in range(CONFLICT_ATTEMPTS):
        obj = await read_policy(client, namespace, name)
        why = refusal_text(command, obj)
        if why is not None:
            raise CliError(why)
        previous = pending_command(obj)
        cmd = new_command(command, iso(time.time()), _who())
        try:
            await client.patch_merge(ref, command_patch(cmd), resource_version=meta_of(obj).get("resourceVersion"))
        except Conflict:
            continue
        except NotFound as exc:
            raise CliError(f"{KIND_LABEL} {namespace}/{name} not found") from exc
        replaced = f"{previous.command.value} (id {previous.id})" if previous is not None else None
        return Sent(cmd.id, phase_of(obj), replaced)
    raise CliError(f"{KIND_LABEL} {namespace}/{name} kept changing; try again")


async def wait_for(client: KubeClient, namespace: str, name: str, sent_id: str, seconds: float,
                   sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> CommandRecord:
    """Poll until ``status.lastCommand.id`` is ``sent_id`` or ``seconds`` passed; returns that lastCommand."""
    from shadowctl.controller.commands import pending_command

    deadline = time.monotonic() + seconds
    while True:
        obj = await read_policy(client, namespace, name)
        last = status_of(obj).last_command
        if last is not None and last.id == sent_id:
            return last
        pending = pending_command(obj)
        if pending is not None and pending.id != sent_id:
            raise CliError(f"another command, {pending.command.value} (id {pending.id}), replaced this one "
                           "before the controller acted on it")
        if time.monotonic() >= deadline:
            raise CliError(f"the controller did not carry out the command (id {sent_id}) within {seconds:g}s; "
                           f"is `shadowctl run` running and watching namespace {namespace}?")
        await sleep(POLL_SECONDS)


def _timeout_seconds(text: str) -> float:
    from shadowctl.policy.duration import parse_duration

    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


WaitOpt = Annotated[bool, typer.Option("--wait", help="Wait until the controller has carried out the command.")]
TimeoutOpt = Annotated[str, typer.Option("--timeout", help="How long --wait waits, e.g. 30s or 5m.")]
NameArg = Annotated[str, typer.Argument(help="The policy's name.", show_default=False)]


def _command(command: Command, conn: Conn, name: str, wait: bool, timeout: str) -> None:
    """Send ``command`` to the named policy, and with ``wait`` wait until the controller carried it out."""
    from shadowctl.policy.status import Command

    seconds = _timeout_seconds(timeout)
    verb = "promote --full" if command is Command.promote_full else command.value

    async def body(client: KubeClient, ns: str) -> tuple[str, CommandRecord | None]:
        sent = await send_command(client, ns, name, command)
        if sent.replaced:
            note(f"note: this replaces {sent.replaced}, which the controller had not carried out yet")
        out(f"{verb} requested for {ns}/{name} (phase {sent.phase}); the controller acts at its next tick")
        if not wait:
            return ns, None
        sys.stdout.flush()
        return ns, await wait_for(client, ns, name, sent.id, seconds)

    ns, done = run_async(lambda: with_client(conn, body))
    if done is not None:
        out(f"{verb} carried out for {ns}/{name}: phase {done.result or '?'}")


def promote(
    name: NameArg,
    full: Annotated[bool, typer.Option("--full", help="Skip the remaining analysis: send 100% to the candidate "
                                                     "now, from any running phase.")] = False,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "2m",
) -> None:
    """Approve a promotion that waits for a person (phase WaitingPromotion), or with --full promote now.

    Example: shadowctl promote chat -n llm --wait
    """
    from shadowctl.policy.status import Command

    _command(Command.promote_full if full else Command.promote, Conn(kubeconfig, context, namespace), name, wait,
             timeout)


def rollback(
    name: NameArg,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "2m",
) -> None:
    """Roll back: 100% of live traffic to the primary and the mirror removed (also after a promotion).

    Example: shadowctl rollback chat -n llm
    """
    from shadowctl.policy.status import Command

    _command(Command.rollback, Conn(kubeconfig, context, namespace), name, wait, timeout)


def pause(
    name: NameArg,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "2m",
) -> None:
    """Pause a rollout in analysis: traffic stays where it is and no step is taken until resume.

    The progress deadline still runs while paused.

    Example: shadowctl pause chat -n llm
    """
    from shadowctl.policy.status import Command

    _command(Command.pause, Conn(kubeconfig, context, namespace), name, wait, timeout)


def resume(
    name: NameArg,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "2m",
) -> None:
    """Resume a paused rollout; the analysis of the phase it was paused in starts again.

    Example: shadowctl resume chat -n llm
    """
    from shadowctl.policy.status import Command

    _command(Command.resume, Conn(kubeconfig, context, namespace), name, wait, timeout)


def retry(
    name: NameArg,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "2m",
) -> None:
    """Start a finished (Succeeded, RolledBack, Failed) or paused rollout again from its first phase.

    Example: shadowctl retry chat -n llm
    """
    from shadowctl.policy.status import Command

    _command(Command.retry, Conn(kubeconfig, context, namespace), name, wait, timeout)


def register(app: typer.Typer) -> None:
    app.command("promote")(promote)
    app.command("rollback")(rollback)
    app.command("pause")(pause)
    app.command("resume")(resume)
    app.command("retry")(retry)
