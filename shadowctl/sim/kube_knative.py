"""What Knative Serving's webhook and controller do to a ``serving.knative.dev/v1`` Service, in the emulator.

Webhook (admission, synchronous, 422 on failure): traffic percents sum to 100,
each target has ``revisionName`` XOR ``latestRevision: true`` (a target with
neither field defaults to ``latestRevision: true``, as Knative's defaulting
does), tags are unique, and a named revision exists (or is the one this very
write creates through ``spec.template.metadata.name``).

Controller: a change of ``spec.template`` creates the next Revision
``<service>-0000N`` (or the template's own name), which is ready at once; the
Service's status then names it latest created / latest ready and resolves
``status.traffic`` with tag URLs. The emulator writes that status as a second
write right after the spec write, as the real controller does, so the
resourceVersion returned by the spec write is already stale.
"""

from __future__ import annotations

import copy
from typing import Any

from shadowctl.sim.kube_schema import Cause

DOMAIN = "example.com"


def default_traffic(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """``spec.traffic`` with Knative's defaults applied (100% to the latest revision when absent)."""
    traffic = spec.get("traffic")
    if not traffic:
        return [{"latestRevision": True, "percent": 100}]
    out = []
    for target in traffic:
        t = dict(target) if isinstance(target, dict) else {}
        if "latestRevision" not in t:
            t["latestRevision"] = not t.get("revisionName")
        out.append(t)
    return out


def validate_service(obj: dict[str, Any], existing_revisions: set[str]) -> list[Cause]:
    """The webhook's traffic rules for a Service; ``existing_revisions`` are Revision names in its namespace."""
    spec = obj.get("spec") or {}
    causes: list[Cause] = []
    traffic = spec.get("traffic")
    if traffic is None:
        return causes
    if not isinstance(traffic, list):
        return [Cause("spec.traffic", "FieldValueTypeInvalid", "spec.traffic: must be a list")]
    own_name = ((spec.get("template") or {}).get("metadata") or {}).get("name")
    total = 0
    tags: dict[str, int] = {}
    for i, target in enumerate(default_traffic(spec)):
        where = f"spec.traffic[{i}]"
        percent = target.get("percent", 0) or 0
        if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= 100:
            causes.append(Cause(f"{where}.percent", "FieldValueInvalid", f"{where}.percent: must be 0..100"))
            percent = 0
        total += percent
        name = target.get("revisionName")
        if target.get("latestRevision") and name:
            causes.append(
                Cause(
                    f"{where}.revisionName",
                    "FieldValueInvalid",
                    f"{where}: may not set revisionName {name!r} when latestRevision is true",
                )
            )
        elif not target.get("latestRevision") and not name:
            causes.append(
                Cause(
                    where,
                    "FieldValueRequired",
                    f"{where}: expected exactly one, got neither: revisionName, latestRevision=true",
                )
            )
        elif name and name not in existing_revisions and name != own_name:
            causes.append(
                Cause(
                    f"{where}.revisionName", "FieldValueNotFound", f"{where}.revisionName: revision {name!r} not found"
                )
            )
        tag = target.get("tag")
        if tag:
            if tag in tags:
                causes.append(
                    Cause(f"{where}.tag", "FieldValueDuplicate", f"{where}.tag: Multiple definitions for {tag!r}")
                )
            tags[tag] = i
    if total != 100:
        causes.append(
            Cause("spec.traffic", "FieldValueInvalid", f"spec.traffic: Traffic targets sum to {total}, want 100")
        )
    return causes


def next_revision_name(service: str, template: dict[str, Any], count: int) -> str:
    """The Revision name for the ``count``-th template (1-based): the template's own name, or ``<svc>-0000N``."""
    own = (template.get("metadata") or {}).get("name")
    return str(own) if own else f"{service}-{count:05d}"


def revision_for(service: dict[str, Any], name: str, configuration_generation: int) -> dict[str, Any]:
    """A ready Revision object stamped from the Service's template."""
    meta = service["metadata"]
    template = copy.deepcopy((service.get("spec") or {}).get("template") or {})
    tmeta = template.get("metadata") or {}
    labels = dict(tmeta.get("labels") or {})
    labels.update(
        {
            "serving.knative.dev/service": meta["name"],
            "serving.knative.dev/configuration": meta["name"],
            "serving.knative.dev/configurationGeneration": str(configuration_generation),
            "serving.knative.dev/serviceUID": meta.get("uid", ""),
        }
    )
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Revision",
        "metadata": {
            "name": name,
            "namespace": meta.get("namespace"),
            "labels": labels,
            "annotations": dict(tmeta.get("annotations") or {}),
            "ownerReferences": [
                {
                    "apiVersion": "serving.knative.dev/v1",
                    "kind": "Configuration",
                    "name": meta["name"],
                    "uid": meta.get("uid", ""),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template.get("spec") or {},
    }


def ready_conditions(types: list[str], now: str) -> list[dict[str, Any]]:
    return [{"type": t, "status": "True", "lastTransitionTime": now} for t in types]


def service_status(service: dict[str, Any], latest: str | None, now: str) -> dict[str, Any]:
    """The status Knative's controller reports for ``service`` when ``latest`` is its newest ready revision."""
    meta = service["metadata"]
    name, ns = meta["name"], meta.get("namespace", "default")
    traffic = []
    for target in default_traffic(service.get("spec") or {}):
        entry: dict[str, Any] = {
            "revisionName": latest if target.get("latestRevision") else target.get("revisionName"),
            "percent": target.get("percent", 0) or 0,
            "latestRevision": bool(target.get("latestRevision")),
        }
        if target.get("tag"):
            entry["tag"] = target["tag"]
            entry["url"] = f"http://{target['tag']}-{name}.{ns}.{DOMAIN}"
        traffic.append(entry)
    return {
        "observedGeneration": meta.get("generation", 1),
        "latestCreatedRevisionName": latest,
        "latestReadyRevisionName": latest,
        "url": f"http://{name}.{ns}.{DOMAIN}",
        "address": {"url": f"http://{name}.{ns}.svc.cluster.local"},
        "traffic": traffic,
        "conditions": ready_conditions(["ConfigurationsReady", "Ready", "RoutesReady"], now),
    }
