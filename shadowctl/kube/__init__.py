"""shadowctl.kube: Kubernetes access on kubernetes.aio, with its own errors and bounded retries.

The names below load on first use: ``shadowctl get`` reads through :mod:`.rest` (the standard
library's HTTPS) and must not import the kubernetes library, which :mod:`.client` does.

Public API::

    client = await KubeClient.connect(kubeconfig=None, context=None)   # or KubeClient.for_url(url)
    obj = await client.get(ResourceRef(VIRTUAL_SERVICE, "reviews", "default"))
    items, rv = await client.list(KNATIVE_SERVICE, "default", label_selector="app=x")
    await client.replace(VIRTUAL_SERVICE, obj)   # PUT with its resourceVersion; Conflict if stale
    await client.patch_merge(ref, {...}, resource_version=rv)
    async for ev in client.watch(gvr, ns, rv): ...            # WatchExpired on 410 -> list again

    client = await connect_as_kubectl(kubeconfig, context)   # as kubectl: a missing file named, the pod's SA
    namespace = default_namespace(kubeconfig, context)       # the context's namespace, else "default"
    reader = RestReader.for_kubeconfig(kubeconfig, context)  # GET/list without the library, or None
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shadowctl.lazy import lazy_exports

if TYPE_CHECKING:
    from shadowctl.kube.client import KubeClient
    from shadowctl.kube.errors import (
        AlreadyExists,
        BadRequest,
        ConfigError,
        Conflict,
        Forbidden,
        Gone,
        Invalid,
        KubeError,
        NotFound,
        Unauthorized,
        Unavailable,
        UnsupportedMediaType,
        WatchExpired,
    )
    from shadowctl.kube.kubeconfig import (
        KubeconfigContext,
        connect_as_kubectl,
        default_namespace,
        kubeconfig_contexts,
        require_kubeconfig,
    )
    from shadowctl.kube.leader import LeaderElector
    from shadowctl.kube.objects import JSON, KubeReader, ListResult, WatchEvent
    from shadowctl.kube.refs import (
        CONFIG_MAP,
        DESTINATION_RULE,
        EVENT,
        EVENT_V1,
        GVR,
        HTTP_ROUTE,
        INFERENCE_SERVICE,
        KNATIVE_CONFIGURATION,
        KNATIVE_REVISION,
        KNATIVE_ROUTE,
        KNATIVE_SERVICE,
        LEASE,
        NAMESPACE,
        SECRET,
        SHADOW_POLICY,
        VIRTUAL_SERVICE,
        ResourceRef,
    )
    from shadowctl.kube.rest import RestReader
    from shadowctl.kube.retry import RetryPolicy

_HOME = {
    "KubeClient": "client",
    "LeaderElector": "leader",
    "RestReader": "rest",
    "RetryPolicy": "retry",
    **dict.fromkeys(("JSON", "KubeReader", "ListResult", "WatchEvent"), "objects"),
    **dict.fromkeys(("KubeconfigContext", "connect_as_kubectl", "default_namespace", "kubeconfig_contexts",
                     "require_kubeconfig"), "kubeconfig"),
    **dict.fromkeys(("AlreadyExists", "BadRequest", "ConfigError", "Conflict", "Forbidden", "Gone", "Invalid",
                     "KubeError", "NotFound", "Unauthorized", "Unavailable", "UnsupportedMediaType",
                     "WatchExpired"), "errors"),
}
"""Where each name lives; the rest (resource kinds and references) are in :mod:`.refs`."""

__all__ = [
    "CONFIG_MAP",
    "DESTINATION_RULE",
    "EVENT",
    "EVENT_V1",
    "GVR",
    "HTTP_ROUTE",
    "INFERENCE_SERVICE",
    "JSON",
    "KNATIVE_CONFIGURATION",
    "KNATIVE_REVISION",
    "KNATIVE_ROUTE",
    "KNATIVE_SERVICE",
    "LEASE",
    "NAMESPACE",
    "SECRET",
    "SHADOW_POLICY",
    "VIRTUAL_SERVICE",
    "AlreadyExists",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "Forbidden",
    "Gone",
    "Invalid",
    "KubeClient",
    "KubeError",
    "KubeReader",
    "KubeconfigContext",
    "LeaderElector",
    "ListResult",
    "NotFound",
    "ResourceRef",
    "RestReader",
    "RetryPolicy",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "WatchEvent",
    "WatchExpired",
    "connect_as_kubectl",
    "default_namespace",
    "kubeconfig_contexts",
    "require_kubeconfig",
]

__getattr__ = lazy_exports(__name__, __all__, _HOME, "refs")
