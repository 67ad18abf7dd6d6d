"""A stand-in for KServe's InferenceService controller (serverless mode) on the real local API server.

No KServe controller runs on the local control plane (it needs Knative, Pods and
a network layer), so this module plays the part shadowctl depends on: for each
``serving.kserve.io/v1beta1`` InferenceService it keeps the predictor's
revisions and writes the status KServe writes, through the ``/status``
subresource, a moment after each spec write (so the resourceVersion a client
got back from its spec write soon becomes stale, as on a cluster).

What it reproduces, from KServe's own code (``ksvc_reconciler.go`` and
``PropagateStatus`` in ``inference_service_status.go``):

* a change of ``spec.predictor`` other than ``canaryTrafficPercent`` creates
  the next revision ``<name>-predictor-0000N``, ready at once (a change of
  ``canaryTrafficPercent`` alone does not: it is traffic, not a template);
* the Knative traffic KServe programs: with ``canaryTrafficPercent`` set and a
  rolled-out revision, the **latest ready** revision (a ``latestRevision: true``
  target, so a newer ready revision takes the share at once) gets that percent
  and the rolled-out one the rest (tag ``prev``); otherwise the latest ready
  revision gets 100%;
* ``latestRolledoutRevision`` moves to the latest ready revision when that one
  gets 100% (``previousRolledoutRevision`` keeps the one before); when the
  rolled-out latest revision is given less than 100% again while all traffic
  still reaches it, it moves back to the previous one (KServe's rollback after
  a full rollout). KServe reaches the end of such a change over two
  reconciles; the stand-in writes the settled status at once;
* ``status.components.predictor`` (latest created / ready / rolled-out /
  previous rolled-out revisions, ``traffic`` with percents and tag URLs,
  ``url``), the conditions, ``url``, and ``observedGeneration``;
* a ``canaryTrafficPercent`` outside 0..100 (which Knative's webhook refuses in
  KServe's Knative Service) leaves the traffic as it was and marks the
  predictor not ready, with the reason.

Why ``observedGeneration`` is the InferenceService's generation here: KServe copies its Knative Service's,
which counts differently; shadowctl does not compare it (see routers/kserve_build.py).
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import structlog

from shadowctl.kube import INFERENCE_SERVICE, Conflict, KubeError, NotFound, ResourceRef, WatchExpired

DOMAIN = "example.com"
FIELD = "canaryTrafficPercent"
CONDITIONS = ("IngressReady", "LatestDeploymentReady", "PredictorConfigurationReady", "PredictorReady",
              "PredictorRouteReady", "Ready", "RoutesReady")

log = structlog.get_logger(__name__)

JSON = dict[str, Any]


def revision_name(isvc: str, count: int) -> str:
    """The ``count``-th revision of an InferenceService's predictor (KServe's Knative Service is ``<isvc>-predictor``)."""
    return f"{isvc}-predictor-{count:05d}"


def template_of(isvc: JSON) -> JSON:
    """What makes a new revision: ``spec.predictor`` without ``canaryTrafficPercent``."""
    predictor = (isvc.get("spec") or {}).get("predictor")
    template = copy.deepcopy(predictor) if isinstance(predictor, dict) else {}
    template.pop(FIELD, None)
    return template


def canary_percent(isvc: JSON) -> tuple[int | None, str | None]:
    """``(canaryTrafficPercent, problem)``: the value (None: absent), or the reason Knative would refuse it."""
    predictor = (isvc.get("spec") or {}).get("predictor")
    value = predictor.get(FIELD) if isinstance(predictor, dict) else None
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        return None, f"spec.predictor.{FIELD}: {value!r} is not a percent from 0 to 100"
    return value, None


def knative_traffic(canary: int | None, rolled_out: str) -> list[JSON]:
    """The ``spec.traffic`` KServe writes into its Knative Service (``createKnativeService``)."""
    if canary is not None and rolled_out:
        targets: list[JSON] = [{"latestRevision": True, "percent": canary}]
        if canary < 100:
            targets.append({"revisionName": rolled_out, "latestRevision": False, "percent": 100 - canary,
                            "tag": "prev"})
        return targets
    return [{"latestRevision": True, "percent": 100}]


def resolved_traffic(traffic: list[JSON], latest_ready: str, host: str) -> list[JSON]:
    """Knative's ``status.traffic`` for ``traffic``: latest targets resolved, tags given URLs."""
    out = []
    for target in traffic:
        entry = {"revisionName": latest_ready if target.get("latestRevision") else target.get("revisionName"),
                 "latestRevision": bool(target.get("latestRevision")), "percent": target.get("percent", 0)}
        if target.get("tag"):
            entry["tag"] = target["tag"]
            entry["url"] = f"http://{target['tag']}-{host}"
        out.append(entry)
    return out


def propagate(component: JSON, traffic: list[JSON], latest_created: str, latest_ready: str) -> JSON:
    """KServe's ``PropagateStatus`` for the revision fields: ``component`` updated from the Knative status."""
    out = dict(component)
    out["latestCreatedRevision"] = latest_created
    by_revision: dict[str, int] = {}
    for t in traffic:
        by_revision[t["revisionName"]] = by_revision.get(t["revisionName"], 0) + int(t.get("percent") or 0)
    for t in traffic:
        if t["revisionName"] != latest_ready or not t.get("latestRevision"):
            continue
        percent = int(t.get("percent") or 0)
        if out.get("latestRolledoutRevision") != latest_ready:
            if percent == 100:  # the last revision fully rolled out
                out["previousRolledoutRevision"] = out.get("latestRolledoutRevision", "")
                out["latestRolledoutRevision"] = latest_ready
        elif (latest_ready == latest_created and percent < 100 and by_revision.get(latest_ready) == 100
              and out.get("previousRolledoutRevision")):
            # rolled out with 100% and then given less: KServe's rollback to the previous rolled-out revision
            out["latestRolledoutRevision"] = out["previousRolledoutRevision"]
    out["latestReadyRevision"] = latest_ready
    out["traffic"] = traffic
    return {k: v for k, v in out.items() if v != ""}


def settle(component: JSON, canary: int | None, latest: str, host: str) -> JSON:
    """Reconcile until nothing moves (KServe takes one reconcile per move; at most three are ever needed)."""
    for _ in range(4):
        traffic = resolved_traffic(knative_traffic(canary, component.get("latestRolledoutRevision", "")), latest, host)
        after = propagate(component, traffic, latest, latest)
        if after == component:
            break
        component = after
    return component


def conditions(now: str, problem: str | None) -> list[JSON]:
    out = []
    for kind in CONDITIONS:
        failed = problem is not None and kind in ("PredictorConfigurationReady", "PredictorReady", "Ready",
                                                  "LatestDeploymentReady")
        entry: JSON = {"type": kind, "status": "False" if failed else "True", "lastTransitionTime": now}
        if failed:
            entry.update(reason="RevisionFailed", message=problem)
        out.append(entry)
    return out


def inference_service_status(isvc: JSON, latest: str, now: str) -> JSON:
    """The status KServe reports for ``isvc`` when ``latest`` is its predictor's newest (ready) revision."""
    meta = isvc["metadata"]
    name, ns = meta["name"], meta.get("namespace", "default")
    host = f"{name}-predictor.{ns}.{DOMAIN}"
    old = ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}
    canary, problem = canary_percent(isvc)
    if problem is not None:  # Knative refuses the Knative Service: the traffic stays as it was
        component = dict(old, latestCreatedRevision=latest) if old.get("traffic") else settle({}, None, latest, host)
    else:
        component = settle(old, canary, latest, host)
    component["url"] = f"http://{host}"
    component["address"] = {"url": f"http://{name}-predictor.{ns}.svc.cluster.local"}
    return {
        "observedGeneration": meta.get("generation", 1),
        "url": f"http://{name}.{ns}.{DOMAIN}",
        "address": {"url": f"http://{name}.{ns}.svc.cluster.local"},
        "components": {"predictor": component},
        "conditions": conditions(now, problem),
        "modelStatus": {"states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
                        "transitionStatus": "UpToDate"},
    }


class KServeStandIn:
    """Watches InferenceServices and writes their status as KServe's controller does.

    ``kube`` is an admin :class:`~shadowctl.kube.KubeClient`. :meth:`start` starts the loop; :meth:`stop` ends it.
    """

    def __init__(self, kube: Any) -> None:
        self.kube = kube
        self._task: asyncio.Task[None] | None = None
        self._seen: dict[str, tuple[JSON, int, str]] = {}  # uid -> (template, revision count, latest revision)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._control(), name="kserve-stand-in")

    async def stop(self) -> None:
        from shadowctl.aio import cancel_and_wait

        await cancel_and_wait(self._task)

    async def _control(self) -> None:
        version = ""
        while True:
            try:
                if not version:
                    listing = await self.kube.list(INFERENCE_SERVICE)
                    for isvc in listing.items:
                        await self._reconcile(isvc)
                    version = listing.resource_version
                async for event in self.kube.watch(INFERENCE_SERVICE, resource_version=version, timeout_seconds=300):
                    version = event.resource_version or version
                    if event.type == "BOOKMARK":
                        continue
                    if event.type == "DELETED":
                        self._seen.pop((event.object.get("metadata") or {}).get("uid", ""), None)
                    else:
                        await self._reconcile(event.object)
            except WatchExpired:
                version = ""
            except KubeError as exc:
                log.warning("kserve stand-in: API error, retrying", error=str(exc))
                version = ""
                await asyncio.sleep(0.5)

    def _latest(self, isvc: JSON) -> str:
        """The predictor's newest revision, creating the next one when the template changed."""
        meta = isvc["metadata"]
        uid = meta.get("uid", "")
        template = template_of(isvc)
        seen = self._seen.get(uid)
        if seen is None:
            # First sight (or the stand-in restarted): a status already current names the latest revision.
            component = ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}
            created = component.get("latestCreatedRevision")
            if created and (isvc.get("status") or {}).get("observedGeneration") == meta.get("generation"):
                count = int(str(created).rsplit("-", 1)[-1]) if str(created).rsplit("-", 1)[-1].isdigit() else 1
                seen = (template, count, str(created))
            else:
                count = int(str(created).rsplit("-", 1)[-1]) if created and str(created)[-5:].isdigit() else 0
                seen = ({"__none__": True}, count, str(created or ""))
        last_template, count, latest = seen
        if template != last_template:
            count += 1
            latest = revision_name(meta["name"], count)
        self._seen[uid] = (template, count, latest)
        return latest

    async def _reconcile(self, isvc: JSON) -> None:
        from datetime import UTC, datetime

        meta = isvc["metadata"]
        if meta.get("deletionTimestamp"):
            return
        status = isvc.get("status") or {}
        if status.get("observedGeneration") == meta.get("generation") and status.get("components"):
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        latest = self._latest(isvc)
        ref = ResourceRef(INFERENCE_SERVICE, meta["name"], meta.get("namespace") or "default")
        for _ in range(5):
            try:
                isvc["status"] = inference_service_status(isvc, latest, now)
                await self.kube.replace_status(INFERENCE_SERVICE, isvc)
                return
            except Conflict:
                try:
                    isvc = await self.kube.get(ref)
                except NotFound:
                    return
                if (isvc.get("metadata") or {}).get("generation") != meta.get("generation"):
                    return  # a newer spec: its own watch event reconciles it
            except NotFound:
                return
