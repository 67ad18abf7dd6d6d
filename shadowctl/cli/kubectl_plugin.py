"""``kubectl shadow ...``: the rollout commands as a kubectl plugin (the console script ``kubectl-shadow``).

kubectl finds a plugin by its file name (an executable ``kubectl-shadow`` on ``PATH``) and runs it with
every argument that follows the plugin's name, its own global flags included, as plain argv: it parses
none of them for the plugin. So this entry point reads kubectl's spellings of the flags shadowctl
shares (``--kubeconfig``, ``--context``, ``-n``/``--namespace``, ``-A``/``--all-namespaces``, each as
``--flag VALUE``, ``--flag=VALUE``, ``-nVALUE`` or ``-n=VALUE``) in any position, puts them after the
command name, and hands the rest to the ``shadowctl`` command of the same name unchanged: one
implementation, the same output, errors and exit codes. kubectl's other global flags (``--as``,
``--user``, ``--token``, ...) are refused in words rather than ignored, since ignoring ``--as`` would
act as someone else than the person asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from shadowctl.errors import ShadowctlError

COMMANDS = ("get", "status", "describe", "promote", "rollback", "pause", "resume", "retry")
"""The shadowctl commands the plugin offers: what a person runs against a cluster's rollouts."""
ALL_NAMESPACES = ("get", "status")
"""The commands that take ``-A``."""

_VALUE_FLAGS = {"--kubeconfig": "--kubeconfig", "--context": "--context", "-n": "--namespace",
                "--namespace": "--namespace"}
_SWITCHES = ("-A", "--all-namespaces")
_UNSUPPORTED = (
    "--as", "--as-group", "--as-uid", "--cluster", "--user", "-s", "--server", "--token", "--username",
    "--password", "--certificate-authority", "--client-certificate", "--client-key", "--tls-server-name",
    "--insecure-skip-tls-verify", "--request-timeout", "--cache-dir", "--match-server-version",
    "--disable-compression", "--profile", "--profile-output", "--warnings-as-errors", "--log-flush-frequency",
)
"""kubectl's global flags that shadowctl has no equivalent for (``--as`` would act as someone else)."""


class PluginUsage(ShadowctlError):
    """A command line the plugin cannot run: printed as ``error: ...`` with exit code 2."""


def translate(argv: Sequence[str]) -> list[str]:
    """The ``shadowctl`` argv for a ``kubectl shadow`` argv (the arguments after the plugin's name).

    Raises PluginUsage for a missing or unknown command, a flag without its value, ``-A`` for a command
    without it, or a kubectl global flag shadowctl does not take. An empty list means: print the help.
    """
    rest: list[str] = []
    kube: dict[str, str] = {}
    all_namespaces = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        name, eq, value = arg.partition("=")
        if arg.startswith("-n") and not arg.startswith("--") and len(arg) > 2:  # -nllm, -n=llm
            kube["--namespace"] = arg[2:].removeprefix("=")
        elif name in _VALUE_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise PluginUsage(f"flag needs an argument: {arg}")
                i += 1
                value = argv[i]
            kube[_VALUE_FLAGS[name]] = value
        elif name in _SWITCHES:
            if eq and value.lower() not in ("true", "false", "1", "0"):
                raise PluginUsage(f"invalid argument {value!r} for {name}: true or false")
            all_namespaces = not eq or value.lower() in ("true", "1")
        elif name in _UNSUPPORTED or (arg.startswith("-v") and arg[2:].lstrip("=").isdigit()) or name == "--v":
            raise PluginUsage(f"kubectl's {name} is not supported by kubectl shadow (it takes --kubeconfig, "
                              "--context, -n and -A; use a kubeconfig context for the rest)")
        else:
            rest.append(arg)
        i += 1
    if not rest or rest[0] in ("-h", "--help", "help"):
        return []
    command = rest[0]
    if command not in COMMANDS:
        hint = "put the command first, e.g. kubectl shadow get -o yaml" if command.startswith("-") else (
            f"unknown command {command!r}")
        raise PluginUsage(f"{hint}; commands: {', '.join(COMMANDS)}")
    if all_namespaces and command not in ALL_NAMESPACES:
        raise PluginUsage(f"-A (--all-namespaces) is for {' and '.join(ALL_NAMESPACES)}, not {command}")
    flags = [part for flag, val in kube.items() for part in (flag, val)]
    return [command, *flags, *(["--all-namespaces"] if all_namespaces else []), *rest[1:]]


def usage() -> str:
    """The plugin's own help: its commands with shadowctl's one-line helps, and the flags it reads."""
    from shadowctl.cli.app import BY_NAME

    width = max(len(c) for c in COMMANDS)
    lines = [
        "kubectl shadow: shadowctl's rollout commands as a kubectl plugin.",
        "",
        "Usage: kubectl shadow COMMAND [ARGS]... [--kubeconfig PATH] [--context NAME] [-n NAMESPACE] [-A]",
        "",
        "Commands:",
        *(f"  {c.ljust(width)}  {BY_NAME[c].help}" for c in COMMANDS),
        "",
        "kubectl's --kubeconfig, --context, -n/--namespace and -A/--all-namespaces (get, status) may stand",
        "anywhere after 'shadow'. 'kubectl shadow COMMAND --help' shows a command's options.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point of ``kubectl-shadow``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        translated = translate(args)
    except PluginUsage as exc:
        from shadowctl.cli.common import fail

        fail(str(exc), 2)
        raise SystemExit(2) from None
    if not translated:
        sys.stdout.write(usage() + "\n")
        raise SystemExit(0)
    from shadowctl.cli.app import app

    app(args=translated, prog_name="kubectl shadow")
