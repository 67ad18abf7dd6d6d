"""The ownership record kept in the ``shadowctl.dev/managed`` annotation, and the builders' result type.

Why in the object and not in the policy's status: the record must be written in
the same atomic write as the change it describes (a crash between two writes
would otherwise leave a change nobody knows how to undo), and whoever undoes it
(the controller after a restart, ``shadowctl rollback``, a person with kubectl)
looks at the object anyway.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from shadowctl.routers.base import MANAGED_ANNOTATION, RouterError

JSON = dict[str, Any]
RECORD_VERSION = 1


class Build(NamedTuple):
    """A builder's result: the new object (a deep copy) and whether it differs from the input."""

    obj: JSON
    modified: bool


def load_record(obj: JSON) -> JSON:
    """The parsed annotation of ``obj`` (``{}`` when absent). Raises RouterError when it is not our JSON."""
    meta = obj.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(MANAGED_ANNOTATION)
    if raw is None:
        return {}
    try:
        record = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise RouterError(
            f"{_name(obj)}: annotation {MANAGED_ANNOTATION} is not JSON ({exc}); fix or remove it by hand"
        ) from exc
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise RouterError(
            f"{_name(obj)}: annotation {MANAGED_ANNOTATION} is not a version-{RECORD_VERSION} shadowctl record"
        )
    return record


def store_record(obj: JSON, record: JSON) -> None:
    """Write ``record`` into ``obj``'s annotation in place; an empty record removes the annotation."""
    meta = obj.setdefault("metadata", {})
    body = {k: v for k, v in record.items() if k != "version" and v}
    annotations = meta.get("annotations")
    if not body:
        if isinstance(annotations, dict) and MANAGED_ANNOTATION in annotations:
            del annotations[MANAGED_ANNOTATION]
            if not annotations:
                del meta["annotations"]
        return
    if not isinstance(annotations, dict):
        annotations = meta["annotations"] = {}
    annotations[MANAGED_ANNOTATION] = json.dumps(
        {"version": RECORD_VERSION, **body}, sort_keys=True, separators=(",", ":")
    )


def _name(obj: JSON) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', 'object')} {meta.get('namespace', '?')}/{meta.get('name', '?')}"


def object_name(obj: JSON) -> str:
    """``VirtualService ns/name`` for messages."""
    return _name(obj)
