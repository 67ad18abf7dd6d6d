"""What a read returns, for both ways of reading (:class:`~shadowctl.kube.client.KubeClient` and
:class:`~shadowctl.kube.rest.RestReader`): plain JSON dicts, a list's items with its resourceVersion,
a watch event, and the :class:`KubeReader` port that commands which only read are written against."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

from shadowctl.kube.errors import KubeError
from shadowctl.kube.refs import GVR, ResourceRef

JSON = dict[str, Any]


def decode_object(data: bytes | None, request: str) -> JSON:
    """An answer's body as a JSON object (``{}`` when empty); KubeError naming ``request`` otherwise."""
    if not data:
        return {}
    try:
        decoded = json.loads(data)
    except ValueError as exc:
        raise KubeError(f"{request}: the server sent no JSON: {data[:200]!r}") from exc
    if not isinstance(decoded, dict):
        raise KubeError(f"{request}: expected a JSON object, got {type(decoded).__name__}")
    return decoded


class ListResult(NamedTuple):
    """A list call's items and the list's ``metadata.resourceVersion`` (start a watch from it)."""

    items: list[JSON]
    resource_version: str

    @classmethod
    def of(cls, body: JSON, gvr: GVR) -> ListResult:
        """The result of a list answer ``body``; items get the apiVersion and kind a real server leaves out."""
        items = body.get("items") or []
        for item in items:
            item.setdefault("apiVersion", gvr.api_version)
            if gvr.kind:
                item.setdefault("kind", gvr.kind)
        return cls(items, str((body.get("metadata") or {}).get("resourceVersion") or ""))


@dataclass(frozen=True)
class WatchEvent:
    """One watch event: ``type`` is ADDED, MODIFIED, DELETED or BOOKMARK; ``object`` the object."""

    type: Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
    object: JSON

    @property
    def resource_version(self) -> str:
        """The object's resourceVersion: resume a watch from the last one seen."""
        return str((self.object.get("metadata") or {}).get("resourceVersion") or "")


class KubeReader(Protocol):
    """Reading objects: what ``shadowctl get``, ``status`` and ``describe`` need, and nothing more.

    Both readers raise only :class:`~shadowctl.kube.errors.KubeError` subclasses, mapped from the
    same HTTP statuses, and retry by the same :class:`~shadowctl.kube.retry.RetryPolicy` rules.
    """

    async def get(self, ref: ResourceRef) -> JSON:
        """GET one object. Raises NotFound."""
        ...

    async def list(
        self,
        gvr: GVR,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> ListResult:
        """List objects (``namespace=None``: all namespaces); items and the list's resourceVersion."""
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...
