"""Kubeconfig files as kubectl reads them: which files, how they merge, their contexts, the namespace to use.

What this adds to the kubernetes library, which :meth:`KubeClient.connect` calls to build a client:

- The files are read and merged here, as kubectl merges them (for each cluster, user and context
  name, and for ``current-context``, the first file that sets it wins; relative paths are relative
  to the file that holds them), without importing the library: ``shadowctl get`` reads a plain
  kubeconfig through :mod:`shadowctl.kube.rest` and must not pay for the library's import.
- A kubeconfig that does not exist is named plainly ("no such file"); the library logs a warning
  and then reports a missing key, which sends a person looking in the wrong place.
- In a pod with no kubeconfig at all (no ``--kubeconfig``, no ``$KUBECONFIG``, no
  ``~/.kube/config``) the pod's service account and its namespace are used, as kubectl does.
- The namespace of the context in use is ``default`` when the context names none, as kubectl's.
  It is also ``default`` when the kubeconfig cannot be read: connecting reports that problem, in
  one message, rather than the namespace lookup in another.
- Every failure is a :class:`ConfigError` (the cause chained) whose message says what to pass
  instead; ``kubeconfig`` values are path lists, as ``$KUBECONFIG`` is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from shadowctl.kube.errors import ConfigError

if TYPE_CHECKING:
    from shadowctl.kube.client import KubeClient

DEFAULT_KUBECONFIG = "~/.kube/config"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
HINT = "pass --kubeconfig or --context, or set KUBECONFIG"


@dataclass(frozen=True)
class KubeconfigContext:
    """One context of a kubeconfig: its name and what it names (None where it names nothing)."""

    name: str
    cluster: str | None
    user: str | None
    namespace: str | None


def _default_path() -> str:
    return str(Path(DEFAULT_KUBECONFIG).expanduser())


def require_kubeconfig(kubeconfig: str | None) -> None:
    """Raise ConfigError naming the kubeconfig when none of its files exists."""
    value = kubeconfig or _default_path()
    paths = [p for p in value.split(os.pathsep) if p]
    if not any(Path(p).expanduser().is_file() for p in paths):
        raise ConfigError(f"kubeconfig {value}: no such file (pass --kubeconfig, or set KUBECONFIG)")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


PATH_KEYS = {"cluster": ("certificate-authority",), "user": ("client-certificate", "client-key", "tokenFile")}
"""The fields that name files, by section: a relative path is relative to the kubeconfig that holds it."""

MAX_KUBECONFIG_BYTES = 16 * 1024 * 1024
"""A kubeconfig larger than this is refused rather than parsed (they are kilobytes)."""


@dataclass(frozen=True)
class Kubeconfig:
    """A kubeconfig's files merged as kubectl merges them: each section's entries by name, in order."""

    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    contexts: dict[str, dict[str, Any]] = field(default_factory=dict)
    current: str | None = None


def kubeconfig_paths(kubeconfig: str | None) -> list[Path]:
    """The files a kubeconfig value names: ``kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``."""
    value = kubeconfig or os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p]


def _absolute(body: dict[str, Any], keys: tuple[str, ...], home: Path) -> dict[str, Any]:
    out = dict(body)
    for key in keys:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            out[key] = str(home / value)
    return out


def _merge_file(path: Path, merged: Kubeconfig) -> Kubeconfig:
    if path.stat().st_size > MAX_KUBECONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_KUBECONFIG_BYTES // (1024 * 1024)} MiB")
    loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if loaded is None:
        return merged
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a kubeconfig is a mapping, not a {type(loaded).__name__}")
    sections = {"cluster": dict(merged.clusters), "user": dict(merged.users), "context": dict(merged.contexts)}
    for key, entries in sections.items():
        listed = loaded.get(f"{key}s") or []
        if not isinstance(listed, list):
            raise ConfigError(f"{path}: {key}s must be a list")
        for entry in listed:
            name = _text(entry.get("name")) if isinstance(entry, dict) else None
            if name is None or name in entries:
                continue  # kubectl: the first file to define a name wins
            body = entry.get(key)
            body = body if isinstance(body, dict) else {}
            entries[name] = _absolute(body, PATH_KEYS.get(key, ()), path.parent)
    current = merged.current or _text(loaded.get("current-context"))
    return Kubeconfig(sections["cluster"], sections["user"], sections["context"], current)


def read_kubeconfig(kubeconfig: str | None) -> Kubeconfig:
    """The kubeconfig's files merged (files that do not exist are skipped, as kubectl skips them).

    Raises ConfigError (the YAML or OS error chained) when a file cannot be read or parsed.
    """
    merged = Kubeconfig()
    for path in kubeconfig_paths(kubeconfig):
        if not path.is_file():
            continue
        try:
            merged = _merge_file(path, merged)
        except ConfigError as exc:
            raise ConfigError(f"cannot load kubeconfig {kubeconfig or path}: {exc.message} ({HINT})") from exc
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot load kubeconfig {kubeconfig or path}: {exc} ({HINT})") from exc
    return merged


def kubeconfig_contexts(kubeconfig: str | None) -> tuple[list[KubeconfigContext], str | None]:
    """The kubeconfig's contexts (its files merged as kubectl merges them) and the current context's name."""
    merged = read_kubeconfig(kubeconfig)
    contexts = [
        KubeconfigContext(name, _text(body.get("cluster")), _text(body.get("user")), _text(body.get("namespace")))
        for name, body in merged.contexts.items()
    ]
    return contexts, merged.current


def context_namespace(kubeconfig: str | None, context: str | None) -> str:
    """The namespace of the context in use (``context``, else the current one); ``default`` where there is none."""
    try:
        contexts, current = kubeconfig_contexts(kubeconfig)
    except ConfigError:
        return "default"  # connecting reports why the file cannot be read
    wanted = context or current
    found = next((c for c in contexts if c.name == wanted), None)
    return found.namespace if found is not None and found.namespace else "default"


def in_pod_without_kubeconfig(kubeconfig: str | None) -> bool:
    """In a pod, with no kubeconfig named and none at the default path: the service account is the way in."""
    return (kubeconfig is None and not Path(DEFAULT_KUBECONFIG).expanduser().is_file()
            and bool(os.environ.get("KUBERNETES_SERVICE_HOST")))


def pod_namespace() -> str:
    """The pod's own namespace, from its service account (``default`` when it cannot be read)."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or "default"
    except OSError:
        return "default"


async def connect_as_kubectl(kubeconfig: str | None = None, context: str | None = None, **options: Any) -> KubeClient:
    """A client for the kubeconfig's context, or in a pod with no kubeconfig for its service account.

    ``options`` go to :meth:`KubeClient.connect`. Raises ConfigError with what to pass instead.
    """
    from shadowctl.kube.client import KubeClient

    in_cluster = in_pod_without_kubeconfig(kubeconfig)
    if not in_cluster:
        require_kubeconfig(kubeconfig)
    try:
        return await KubeClient.connect(kubeconfig=kubeconfig, context=context, in_cluster=in_cluster, **options)
    except ConfigError as exc:
        raise ConfigError(f"{exc.message} ({HINT})") from exc


def default_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace kubectl uses without ``-n``: the pod's own in a pod with no kubeconfig, else the context's."""
    if in_pod_without_kubeconfig(kubeconfig):
        return pod_namespace()
    return context_namespace(kubeconfig, context)
