"""The CLI starts without the heavy parts: the command table is true, and what a light command imports.

Start-up time itself is measured by bench/cli_startup.py (a timed test would be noise on a shared
machine); these tests hold the reasons it is fast.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from conftest_kube import KubeEnv

from shadowctl.cli.app import COMMANDS, load_command
from shadowctl.kube import SHADOW_POLICY

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("scipy", "numpy", "kubernetes", "aiohttp", "shadowctl.judge", "shadowctl.controller", "shadowctl.kube.client",
         "opentelemetry", "shadowctl.otel")
"""What a light command must not import (``shadowctl.kube`` loads its names on first use: its errors, retry
rules and standard-library reader are light; its client imports the kubernetes library and aiohttp)."""


def _loaded_after(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The ``heavy`` modules a fresh interpreter holds after running ``code``."""
    probe = (
        "import sys, json\n" + code + "\n"
        f"print(json.dumps(sorted({{m for m in sys.modules for h in {heavy!r} if m == h or m.startswith(h + '.')}})))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_importing_the_app_loads_neither_scipy_numpy_nor_kubernetes() -> None:
    assert _loaded_after("import shadowctl.cli.app") == []


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["validate", "policies/"], ["schema"]])
def test_light_commands_load_nothing_heavy(argv: list[str]) -> None:
    code = (
        "from shadowctl.cli.app import app\n"
        f"try:\n    app({argv!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
    )
    assert _loaded_after(code) == []


KUBE_COMMANDS = ("apply", "get", "status", "describe", "promote", "rollback", "pause", "resume", "retry")


@pytest.mark.parametrize("command", KUBE_COMMANDS)
def test_the_help_of_a_cluster_command_loads_nothing_heavy(command: str) -> None:
    """Registering a command resolves its signature only: the kube client, the controller's and the
    machine's vocabulary are imported when it runs (get and status are the ones people type most)."""
    code = (
        "from shadowctl.cli.app import app\n"
        f"try:\n    app([{command!r}, '--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
    )
    assert _loaded_after(code) == []


def test_the_controller_loads_opentelemetry_only_with_an_otlp_endpoint() -> None:
    """`shadowctl run` without --otlp-endpoint (the default) never imports the OpenTelemetry SDK."""
    code = (
        "from shadowctl.cli.app import app\n"
        "try:\n    app(['run', '--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "import shadowctl.cli.run_cmd, shadowctl.controller.reconciler\n"
    )
    assert _loaded_after(code, ("opentelemetry", "shadowctl.otel")) == []


@pytest.mark.parametrize("entry", COMMANDS, ids=[c.name for c in COMMANDS])
def test_the_table_says_what_each_module_registers(entry: object) -> None:
    from shadowctl.cli.app import LazyCommand

    assert isinstance(entry, LazyCommand)
    command = load_command(entry.name)
    first = (command.help or "").split("\n\n")[0]
    assert " ".join(first.split()) == entry.help, f"update COMMANDS[{entry.name!r}].help in cli/app.py"


def test_every_registered_command_is_in_the_table() -> None:
    table = {c.name: c.module for c in COMMANDS}
    for module in sorted(set(table.values())):
        holder = typer.Typer()
        importlib.import_module(module).register(holder)
        names = [c.name or c.callback.__name__ for c in holder.registered_commands if c.callback]  # type: ignore[union-attr]
        names += [g.name or g.typer_instance.info.name for g in holder.registered_groups]  # type: ignore[misc]
        for name in names:
            assert table.get(name) == module, f"{module} registers {name!r}: add it to COMMANDS in cli/app.py"


def test_reading_a_status_loads_neither_the_policy_model_nor_numpy() -> None:
    """`get`, `status` and `describe` read `.status` through its model; that must not build the policy
    model's validators (shadowctl.policy loads its names on first use) or import the judge."""
    code = "from shadowctl.policy.status import PolicyStatus\nPolicyStatus.read({'phase': 'Shadowing'})"
    assert _loaded_after(code, ("shadowctl.policy.model", "numpy")) == []


@pytest.mark.parametrize("argv", [["get", "-A"], ["status", "-A"], ["get", "chat", "-n", "default", "-o", "json"],
                                  ["describe", "chat", "-n", "default"]])
def test_reading_commands_read_without_the_kubernetes_library(argv: list[str], kube_env: KubeEnv,
                                                              tmp_path: Path) -> None:
    """With a kubeconfig that states its credentials (a client certificate here), the commands that only
    read go through shadowctl.kube.rest: the kubernetes library, aiohttp and the log set-up stay unloaded,
    and the command still answers from the real API server. Of the controller, only the annotation that
    carries a person's command (controller.commands, a few lines over the status model) and the clock's
    time format are read."""
    policy = yaml.safe_load((REPO / "policies" / "chat-istio.yaml").read_text())
    policy["metadata"] = {"name": "chat", "namespace": "default"}
    kube_env.put_object(SHADOW_POLICY, policy)
    config = kube_env.direct_kubeconfig(tmp_path / "kc")
    code = (
        "import contextlib, io\n"
        "from shadowctl.cli.app import app\n"
        "buffer = io.StringIO()\n"
        "with contextlib.redirect_stdout(buffer):\n"
        f"    try:\n        app({[*argv, '--kubeconfig', str(config)]!r}, standalone_mode=False)\n"
        "    except SystemExit:\n        pass\n"
        "assert 'chat' in buffer.getvalue(), buffer.getvalue()\n"
    )
    light = {"shadowctl.controller", "shadowctl.controller.commands", "shadowctl.controller.clock"}
    assert set(_loaded_after(code, (*HEAVY, "structlog"))) - light == set()


def _all_commands() -> list[tuple[str, Any]]:
    """Every command and subcommand (``judge replay``, ``sim cluster``) as its module builds it."""
    found: list[tuple[str, Any]] = []
    for entry in COMMANDS:
        stack = [(entry.name, load_command(entry.name))]
        while stack:
            path, command = stack.pop()
            found.append((path, command))
            stack.extend((f"{path} {name}", sub) for name, sub in getattr(command, "commands", {}).items())
    return found


RICH_TAG = re.compile(r"(?<!\\)\[([a-z#/@][^\[\]]*)\]")
"""What rich (the help's markup mode) takes for a style tag and drops from the text: ``[default: 5]``."""
STYLES = {"bold", "dim", "italic", "red", "green", "yellow", "/", "/bold", "/dim", "/italic"}


@pytest.mark.parametrize(("path", "command"), _all_commands(), ids=[p for p, _ in _all_commands()])
def test_no_help_text_is_eaten_by_markup(path: str, command: Any) -> None:
    """Help is rendered with rich markup, which silently drops anything that looks like a tag: a help
    that says ``[default: 0.05]`` or ``as [failures, total]`` reaches a newcomer as ``.``."""
    texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
    eaten = [m.group(0) for text in texts for m in RICH_TAG.finditer(text) if m.group(1) not in STYLES]
    assert eaten == [], f"shadowctl {path}: rich would drop {eaten}; write (default: ...) or reword"
