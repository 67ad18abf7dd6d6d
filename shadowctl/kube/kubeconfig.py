"""Kubeconfig files as kubectl reads them: which files, their contexts, the namespace to use.

What this adds to the kubernetes library, which :meth:`KubeClient.connect` calls:

- A kubeconfig that does not exist is named plainly ("no such file"); the library logs a warning
  and then reports a missing key, which sends a person looking in the wrong place.
- In a pod with no kubeconfig at all (no ``--kubeconfig``, no ``$KUBECONFIG``, no
  ``~/.kube/config``) the pod's service account and its namespace are used, as kubectl does.
- The namespace of the context in use is ``default`` when the context names none, as kubectl's.
  It is also ``default`` when the kubeconfig cannot be read: connecting reports that problem, in
  one message, rather than the namespace lookup in another.
- Every failure is a :class:`ConfigError` (the library's exception chained) whose message says
  what to pass instead; ``kubeconfig`` values are path lists, as ``$KUBECONFIG`` is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes.aio.config.config_exception import ConfigException
from kubernetes.aio.config.kube_config import list_kube_config_contexts

from shadowctl.kube.client import KubeClient
from shadowctl.kube.errors import ConfigError

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


def kubeconfig_contexts(kubeconfig: str | None) -> tuple[list[KubeconfigContext], str | None]:
    """The kubeconfig's contexts (its files merged as kubectl merges them) and the current context's name."""
    try:
        raw, current = list_kube_config_contexts(kubeconfig)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot load kubeconfig {kubeconfig or '(default)'}: {exc} ({HINT})") from exc
    contexts = []
    for entry in raw or []:
        name = _text(entry.get("name")) if isinstance(entry, dict) else None
        if name is None:
            continue
        body = entry.get("context")
        body = body if isinstance(body, dict) else {}
        contexts.append(KubeconfigContext(name, _text(body.get("cluster")), _text(body.get("user")),
                                          _text(body.get("namespace"))))
    return contexts, _text(current.get("name")) if isinstance(current, dict) else None


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
