"""A stand-in for Knative Serving's webhook and controller on the real local API server.

No Knative controller runs on the local control plane (it needs Pods, an
activator and a network layer), so this module plays the two parts of Knative
Serving that shadowctl depends on, for ``serving.knative.dev/v1`` Services:

* **Webhook**, a real ``ValidatingWebhookConfiguration`` the API server calls
  over HTTPS before it stores a Service (a refusal is a 422 with field causes,
  as Knative's own webhook gives): traffic percents sum to 100, each target has
  ``revisionName`` XOR ``latestRevision: true`` (a target with neither defaults
  to ``latestRevision: true``, as Knative's defaulting does), tags are unique,
  and a named revision exists (or is the one this very write creates through
  ``spec.template.metadata.name``).
* **Controller**: a change of ``spec.template`` creates the next Revision
  ``<service>-0000N`` (or the template's own name), marked Ready at once; the
  Service's status then names it latest created / latest ready and resolves
  ``status.traffic`` with tag URLs. Like the real controller it writes that
  status after the spec write, through the ``/status`` subresource, so the
  resourceVersion a client got back from its spec write soon becomes stale.

Why not Knative's own webhook (``knative.dev/serving/cmd/webhook``): it starts
informers for Knative's config maps and needs its system namespace and
certificates controller; building and running it without the rest of Knative
was judged more machinery than the three rules it would enforce here.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

DOMAIN = "example.com"


class Cause(NamedTuple):
    """One refused field, as a Kubernetes Status ``details.causes`` entry."""

    field: str
    reason: str
    message: str


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


# ----------------------------------------------------------------- the webhook


def admission_response(review: dict[str, Any], causes: list[Cause]) -> dict[str, Any]:
    """The ``AdmissionReview`` answer to ``review``: allowed, or refused as a 422 Invalid with ``causes``."""
    request = review.get("request") or {}
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": not causes}
    if causes:
        kind = (request.get("kind") or {}).get("kind", "Service")
        name = request.get("name") or ((request.get("object") or {}).get("metadata") or {}).get("name", "")
        response["status"] = {
            "status": "Failure",
            "code": 422,
            "reason": "Invalid",
            "message": "validation failed: " + "; ".join(c.message for c in causes),
            "details": {
                "name": name,
                "group": "serving.knative.dev",
                "kind": kind,
                "causes": [c._asdict() for c in causes],
            },
        }
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


class KnativeStandIn:
    """The webhook (an HTTPS server the API server calls) and the controller loop, on one event loop.

    ``kube`` is an admin :class:`~shadowctl.kube.KubeClient`; ``ssl`` the
    webhook's serving context (a certificate the API server's ``caBundle``
    trusts). :meth:`start` listens and starts the controller; the caller then
    registers :meth:`webhook_configuration` with the API server.
    """

    WEBHOOK = "validation.webhook.serving.knative.dev"

    def __init__(self, kube: Any, ssl: Any, ca_bundle: bytes) -> None:
        self.kube = kube
        self._ssl = ssl
        self._ca_bundle = ca_bundle
        self.port = 0
        self._runner: Any = None
        self._task: Any = None
        self._templates: dict[tuple[str, str, str], tuple[dict[str, Any], int, str]] = {}

    async def start(self) -> None:
        """Serve the webhook on a free loopback port and start watching Services."""
        import asyncio

        from aiohttp import web

        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/validate", self._validate)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        self._task = asyncio.create_task(self._control(), name="knative-stand-in")

    async def stop(self) -> None:
        """Stop the controller loop and the webhook server."""
        from shadowctl.aio import cancel_and_wait

        await cancel_and_wait(self._task)
        if self._runner is not None:
            await self._runner.cleanup()

    def webhook_configuration(self) -> dict[str, Any]:
        """The ``ValidatingWebhookConfiguration`` that sends Service writes to this webhook."""
        import base64

        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": self.WEBHOOK},
            "webhooks": [
                {
                    "name": self.WEBHOOK,
                    "clientConfig": {
                        "url": f"https://127.0.0.1:{self.port}/validate",
                        "caBundle": base64.b64encode(self._ca_bundle).decode(),
                    },
                    "rules": [
                        {
                            "apiGroups": ["serving.knative.dev"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["services"],
                            "scope": "Namespaced",
                        }
                    ],
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 10,
                }
            ],
        }

    async def _validate(self, request: Any) -> Any:
        from aiohttp import web

        from shadowctl.kube.refs import KNATIVE_REVISION

        try:
            review = await request.json()
            obj = review["request"]["object"]
            namespace = review["request"].get("namespace") or obj["metadata"].get("namespace")
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "not an AdmissionReview"}, status=400)
        revisions = {r["metadata"]["name"] for r in (await self.kube.list(KNATIVE_REVISION, namespace)).items}
        return web.json_response(admission_response(review, validate_service(obj, revisions)))

    # ----------------------------------------------------------------- the controller

    async def _control(self) -> None:
        import asyncio

        import structlog

        from shadowctl.kube.errors import KubeError, WatchExpired
        from shadowctl.kube.refs import KNATIVE_SERVICE

        log = structlog.get_logger(__name__)
        version = ""
        while True:
            try:
                if not version:
                    listing = await self.kube.list(KNATIVE_SERVICE)
                    for svc in listing.items:
                        await self._reconcile(svc)
                    version = listing.resource_version
                async for event in self.kube.watch(KNATIVE_SERVICE, resource_version=version, timeout_seconds=300):
                    if event.type == "BOOKMARK":
                        version = event.resource_version or version
                        continue
                    version = event.resource_version or version
                    if event.type == "DELETED":
                        meta = event.object.get("metadata") or {}
                        self._templates.pop((meta.get("namespace") or "", meta.get("name", ""), meta.get("uid", "")), None)
                    else:
                        await self._reconcile(event.object)
            except WatchExpired:
                version = ""
            except KubeError as exc:
                log.warning("knative stand-in: API error, retrying", error=str(exc))
                version = ""
                await asyncio.sleep(0.5)

    async def _reconcile(self, svc: dict[str, Any]) -> None:
        """Create the Revision a new template needs and write the Service's status, as Knative's controller does."""
        from datetime import UTC, datetime

        from shadowctl.kube.errors import Conflict, NotFound
        from shadowctl.kube.refs import KNATIVE_REVISION, KNATIVE_SERVICE, ResourceRef

        meta = svc["metadata"]
        if meta.get("deletionTimestamp"):
            return
        status = svc.get("status") or {}
        if status.get("observedGeneration") == meta.get("generation") and status.get("traffic") is not None:
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        key = (meta.get("namespace") or "", meta["name"], meta.get("uid", ""))
        template = (svc.get("spec") or {}).get("template") or {}
        last_template, count, latest = self._templates.get(key, (None, 0, ""))
        if last_template is None:
            own = await self.kube.list(KNATIVE_REVISION, key[0], label_selector=f"serving.knative.dev/service={key[1]}")
            revisions = sorted(own.items, key=lambda r: int(r["metadata"]["labels"].get(
                "serving.knative.dev/configurationGeneration", "0") or 0))
            if revisions:
                count, latest = len(revisions), revisions[-1]["metadata"]["name"]
                last_template = {"metadata": {}, "spec": revisions[-1].get("spec") or {}}
                tmeta = template.get("metadata") or {}
                if tmeta.get("name") not in (None, latest) or (revisions[-1].get("spec") or {}) != (template.get("spec") or {}):
                    last_template = None
                else:
                    last_template = template
        if template != last_template:
            count += 1
            latest = next_revision_name(meta["name"], template, count)
            revision = revision_for(svc, latest, count)
            try:
                created = await self.kube.create(KNATIVE_REVISION, revision)
                created["status"] = {
                    "observedGeneration": 1,
                    "conditions": ready_conditions(["Active", "ContainerHealthy", "Ready", "ResourcesAvailable"], now),
                }
                await self.kube.replace_status(KNATIVE_REVISION, created)
            except Conflict:
                pass  # it exists already (a restart of the stand-in): keep it
            self._templates[key] = (template, count, latest)
        else:
            self._templates[key] = (template, count, latest)
        ref = ResourceRef(KNATIVE_SERVICE, key[1], key[0])
        for _ in range(5):
            try:
                svc["status"] = service_status(svc, latest, now)
                await self.kube.replace_status(KNATIVE_SERVICE, svc)
                return
            except Conflict:
                try:
                    svc = await self.kube.get(ref)
                except NotFound:
                    return
                meta = svc["metadata"]
            except NotFound:
                return
