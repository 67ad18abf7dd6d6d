"""How a person's command reaches the controller: an annotation on the ShadowPolicy.

`shadowctl promote|rollback|pause|resume|retry` write ``shadowctl.dev/command``
(JSON: command, a fresh id, when, who). The controller carries out a command
whose id differs from ``status.lastCommand.id`` once, at its next tick, and
records the id; so a command survives a controller restart, is never applied
twice, and works from a laptop against any cluster (no port-forward, no API of
our own). Annotations are metadata: writing one does not bump the generation,
so it does not restart the analysis.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from shadowctl.policy.status import Command, PolicyStatus

COMMAND_ANNOTATION = "shadowctl.dev/command"


@dataclass(frozen=True)
class PendingCommand:
    command: Command
    id: str
    at: str = ""
    by: str = ""

    def to_json(self) -> str:
        return json.dumps({"command": self.command.value, "id": self.id, "at": self.at, "by": self.by})


def new_command(command: Command, at: str, by: str = "") -> PendingCommand:
    return PendingCommand(command, uuid.uuid4().hex[:12], at, by)


def command_patch(cmd: PendingCommand) -> dict[str, Any]:
    """The merge patch a CLI sends to ask for ``cmd``."""
    return {"metadata": {"annotations": {COMMAND_ANNOTATION: cmd.to_json()}}}


def pending_command(obj: dict[str, Any]) -> PendingCommand | None:
    """The command waiting on ``obj``, if its id was not carried out yet (unreadable ones are ignored)."""
    meta = obj.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    raw = annotations.get(COMMAND_ANNOTATION) if isinstance(annotations, dict) else None
    if not raw:
        return None
    try:
        data = json.loads(raw)
        cmd = PendingCommand(Command(data["command"]), str(data["id"]), str(data.get("at", "")),
                             str(data.get("by", "")))
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    done = PolicyStatus.of(obj).last_command
    return None if done is not None and done.id == cmd.id else cmd
