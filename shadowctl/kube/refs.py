"""Resource types (GVR), object references and the resources shadowctl touches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote


@dataclass(frozen=True)
class GVR:
    """A resource type: API group (``""`` for core), version, plural, and whether it is namespaced."""

    group: str
    version: str
    plural: str
    kind: str = ""
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        """``apiVersion`` as written in objects: ``v1`` or ``group/version``."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """The REST path; ``namespace=None`` on a namespaced resource means all namespaces."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
            if subresource:
                base += f"/{subresource}"
        return base

    def __str__(self) -> str:
        return f"{self.plural}.{self.version}.{self.group}" if self.group else f"{self.plural}.{self.version}"


@dataclass(frozen=True)
class ResourceRef:
    """One object: its type, name and namespace (None for cluster-scoped objects)."""

    gvr: GVR
    name: str
    namespace: str | None = None

    @classmethod
    def of(cls, gvr: GVR, obj: dict[str, Any]) -> ResourceRef:
        """The reference of an object dict (from its ``metadata.name`` / ``metadata.namespace``)."""
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{gvr}: object has no metadata.name")
        ns = meta.get("namespace")
        return cls(gvr, name, ns if gvr.namespaced and isinstance(ns, str) else None)

    def path(self, subresource: str | None = None) -> str:
        """The REST path of this object (or of its subresource)."""
        return self.gvr.path(self.namespace, self.name, subresource)

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.gvr.plural}.{self.gvr.group or 'core'}/{where}{self.name}"


VIRTUAL_SERVICE = GVR("networking.istio.io", "v1", "virtualservices", "VirtualService")
DESTINATION_RULE = GVR("networking.istio.io", "v1", "destinationrules", "DestinationRule")
KNATIVE_SERVICE = GVR("serving.knative.dev", "v1", "services", "Service")
KNATIVE_REVISION = GVR("serving.knative.dev", "v1", "revisions", "Revision")
KNATIVE_CONFIGURATION = GVR("serving.knative.dev", "v1", "configurations", "Configuration")
KNATIVE_ROUTE = GVR("serving.knative.dev", "v1", "routes", "Route")
HTTP_ROUTE = GVR("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
INFERENCE_SERVICE = GVR("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService")
SHADOW_POLICY = GVR("shadowctl.dev", "v1alpha1", "shadowpolicies", "ShadowPolicy")
LEASE = GVR("coordination.k8s.io", "v1", "leases", "Lease")
EVENT = GVR("", "v1", "events", "Event")
EVENT_V1 = GVR("events.k8s.io", "v1", "events", "Event")
NAMESPACE = GVR("", "v1", "namespaces", "Namespace", namespaced=False)
SECRET = GVR("", "v1", "secrets", "Secret")
CONFIG_MAP = GVR("", "v1", "configmaps", "ConfigMap")
