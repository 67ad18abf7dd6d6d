"""Credentials a policy keeps in a Secret of its own namespace (a Prometheus token, an MQTT password)."""

from __future__ import annotations

import base64

from shadowctl.kube import SECRET, KubeClient, KubeError, NotFound, ResourceRef
from shadowctl.sources.base import SourceError


async def read_secret_value(kube: KubeClient, namespace: str, name: str, key: str, *, field: str) -> str:
    """The text under ``key`` of Secret ``namespace/name``; SourceError naming the policy ``field`` otherwise."""
    try:
        secret = await kube.get(ResourceRef(SECRET, name, namespace))
    except NotFound:
        raise SourceError(f"Secret {namespace}/{name} ({field}) not found") from None
    except KubeError as exc:
        raise SourceError(f"cannot read Secret {namespace}/{name} ({field}): {exc}") from exc
    data = secret.get("data") or {}
    if key not in data:
        raise SourceError(f"Secret {namespace}/{name} has no key {key!r} ({field})")
    try:
        return base64.b64decode(data[key], validate=True).decode("utf-8").strip()
    except (ValueError, UnicodeDecodeError):
        raise SourceError(f"Secret {namespace}/{name}: key {key!r} is not base64 UTF-8 text ({field})") from None


def parse_secret_ref(text: str, default_key: str) -> tuple[str, str]:
    """``name/key`` (or just ``name``: the default key) as (name, key)."""
    name, _, key = text.partition("/")
    return name, key or default_key
