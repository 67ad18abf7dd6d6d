"""An emulated Kubernetes API server for tests and the local environment, on kmock's KubernetesEmulator.

kmock provides the HTTP server, request parsing and API discovery; its object
store merges dicts and knows nothing of resourceVersion, so this class takes
over every request on a known resource and serves it like kube-apiserver where
shadowctl depends on it:

* one global resourceVersion counter (as etcd's revision), bumped by every
  write; a no-op update is not a write (same resourceVersion, no watch event);
  a stale PUT or a patch carrying a stale resourceVersion gets 409;
* ``metadata.generation`` moves only when something outside metadata and
  status changes; ``uid`` and ``creationTimestamp`` are set on create;
* ``/status`` is a separate subresource for resources that declare it: the
  main resource ignores ``status``, ``/status`` ignores everything else;
* merge patch (RFC 7386), JSON patch (RFC 6902, failed ``test`` -> 422); a
  strategic merge patch on a custom resource -> 415 (on built-in kinds it is
  applied as a merge patch, which is the same for the fields Leases and Events use);
* list returns its resourceVersion; watch resumes after a resourceVersion, and
  answers a version older than its bounded history with an ERROR event (410);
  ``timeoutSeconds`` ends a watch;
* CRD schemas from ``../shared/crds`` (and ``deploy/crd.yaml``) prune unknown
  fields and reject invalid objects with 422 and field causes;
* Knative's webhook and controller for ``serving.knative.dev/v1`` Services
  (see :mod:`shadowctl.sim.knative`);
* fault injection: fail the next N matching requests, add latency, cut watches.

Everything runs on one event loop and no mutation awaits midway, so the store
needs no lock.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import json
import os
import re
import secrets
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import structlog
import yaml
from kmock import KubernetesEmulator, ResourceInfo, Server, resource

from shadowctl.kube.refs import GVR
from shadowctl.sim import knative
from shadowctl.sim.kube_patch import PatchError, json_patch, merge_patch
from shadowctl.sim.kube_schema import Cause, CRDVersion, load_crd_file, prune, validate
from shadowctl.sim.logs import log_to_stderr

log = structlog.get_logger(__name__)

JSON = dict[str, Any]
StoreKey = tuple[str, str]  # (group, plural): shared by every version of a resource
ObjKey = tuple[str, str]  # (namespace or "", name)

CRD_FILES = (
    "istio-virtualservice.yaml",
    "istio-destinationrule.yaml",
    "knative-service.yaml",
    "knative-revision.yaml",
    "knative-configuration.yaml",
    "knative-route.yaml",
)
KSVC: StoreKey = ("serving.knative.dev", "services")
KREV: StoreKey = ("serving.knative.dev", "revisions")
_META_KEEP = ("uid", "creationTimestamp", "generation", "resourceVersion", "deletionTimestamp", "name", "namespace")


@dataclass
class ResourceDef:
    """A served resource version."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    schema: JSON | None = None
    custom: bool = True
    singular: str = ""
    short_names: list[str] = field(default_factory=list)

    @property
    def store_key(self) -> StoreKey:
        return (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def title(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


BUILTINS = (
    ResourceDef("", "v1", "events", "Event", custom=False),
    ResourceDef("events.k8s.io", "v1", "events", "Event", custom=False),
    ResourceDef("coordination.k8s.io", "v1", "leases", "Lease", custom=False),
    ResourceDef("", "v1", "namespaces", "Namespace", namespaced=False, custom=False, status_subresource=True),
    ResourceDef("", "v1", "configmaps", "ConfigMap", custom=False),
    ResourceDef("", "v1", "secrets", "Secret", custom=False),
)
# Registered without a schema when no CRD file describes them.
FALLBACK_CRDS = (
    ResourceDef("networking.istio.io", "v1", "virtualservices", "VirtualService", status_subresource=True),
    ResourceDef("networking.istio.io", "v1", "destinationrules", "DestinationRule", status_subresource=True),
    ResourceDef("serving.knative.dev", "v1", "services", "Service", status_subresource=True),
    ResourceDef("serving.knative.dev", "v1", "revisions", "Revision", status_subresource=True),
    ResourceDef("serving.knative.dev", "v1", "configurations", "Configuration", status_subresource=True),
    ResourceDef("serving.knative.dev", "v1", "routes", "Route", status_subresource=True),
    ResourceDef("shadowctl.dev", "v1alpha1", "shadowpolicies", "ShadowPolicy", status_subresource=True),
)


class ApiError(Exception):
    """An API error answered as a ``Status`` object."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: JSON | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}


@dataclass
class Fault:
    """Answer the next ``remaining`` matching requests with ``status``."""

    status: int
    remaining: int
    verb: str | None = None
    path: re.Pattern[str] | None = None
    retry_after: float | None = None

    def matches(self, verb: str, path: str) -> bool:
        return (self.verb is None or self.verb == verb) and (self.path is None or bool(self.path.search(path)))


@dataclass(frozen=True)
class RequestRecord:
    """One request the emulator served: Kubernetes verb, HTTP method, path and query."""

    verb: str
    method: str
    path: str
    query: dict[str, str]


@dataclass
class _HistoryEntry:
    rv: int
    store_key: StoreKey
    type: str
    obj: JSON


def default_crds_dir(repo: Path | None = None) -> Path:
    """``<repo>/../shared/crds`` where ``repo`` defaults to this checkout's root."""
    root = repo if repo is not None else Path(__file__).resolve().parents[2]
    return root.parent / "shared" / "crds"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _spec_part(obj: JSON) -> JSON:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _parse_selector(text: str | None) -> list[tuple[str, str, set[str]]]:
    """A label selector as (key, op, values) terms; op is =, !=, in, notin, exists, !exists."""
    if not text:
        return []
    terms: list[tuple[str, str, set[str]]] = []
    for part in re.findall(r"[^,(]+(?:\([^)]*\))?", text):
        part = part.strip()
        if not part:
            continue
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", part):
            terms.append((m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}))
        elif m := re.fullmatch(r"([\w./-]+)\s*(!=|==|=)\s*([\w./-]*)", part):
            terms.append((m[1], "!=" if m[2] == "!=" else "=", {m[3]}))
        elif m := re.fullmatch(r"!\s*([\w./-]+)", part):
            terms.append((m[1], "!exists", set()))
        elif re.fullmatch(r"[\w./-]+", part):
            terms.append((part, "exists", set()))
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
    return terms


def _labels_match(obj: JSON, terms: list[tuple[str, str, set[str]]]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, values in terms:
        present = key in labels
        value = labels.get(key)
        ok = {
            "=": present and value in values,
            "!=": not present or value not in values,
            "in": present and value in values,
            "notin": not present or value not in values,
            "exists": present,
            "!exists": not present,
        }[op]
        if not ok:
            return False
    return True


def _parse_fields(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("metadata.name", "metadata.namespace"):
            raise ApiError(400, "BadRequest", f"field selector {part!r} not supported")
        out[key.strip()] = value.strip().lstrip("=")
    return out


class KubeAPIEmulator(KubernetesEmulator):
    """The emulated API server; see the module docstring for what it emulates.

    In-process use::

        emu = KubeAPIEmulator()            # CRDs from ../shared/crds when present
        await emu.start()                  # 127.0.0.1, free port
        emu.url; emu.kubeconfig(path)
        emu.get_object(VIRTUAL_SERVICE, "default", "reviews")
        emu.fail_next(3, status=429, retry_after=2)
        await emu.stop()
    """

    def __init__(
        self,
        *,
        crds_dir: Path | str | None = None,
        load_crds: bool = True,
        policy_crd: Path | str | None = None,
        history_limit: int = 1000,
        token: str | None = None,
    ) -> None:
        """``crds_dir`` defaults to ``<repo>/../shared/crds``; ``policy_crd`` to ``<repo>/deploy/crd.yaml``.

        ``token``: when set, requests must carry ``Authorization: Bearer <token>`` (else 401).
        """
        super().__init__()
        self._defs: dict[tuple[str, str, str], ResourceDef] = {}
        self._store: dict[StoreKey, dict[ObjKey, JSON]] = collections.defaultdict(dict)
        self._rv = 0
        self._history: collections.deque[_HistoryEntry] = collections.deque(maxlen=history_limit)
        self._history_floor = 0  # events with rv <= floor may be gone
        self._tick = asyncio.Event()
        self._cut_generation = 0
        self._stopping = False
        self._faults: list[Fault] = []
        self._latency: list[tuple[float, str | None]] = []
        self._ksvc_state: dict[ObjKey, tuple[JSON, int, str]] = {}  # template, revision count, latest
        self._server: Server | None = None
        self.token = token
        self.verb_counts: collections.Counter[str] = collections.Counter()
        self.request_log: list[RequestRecord] = []
        self.schemas_loaded: list[str] = []
        repo = Path(__file__).resolve().parents[2]
        for rdef in BUILTINS:
            self.register(rdef)
        for rdef in FALLBACK_CRDS:
            self.register(rdef)
        if load_crds:
            folder = Path(crds_dir) if crds_dir is not None else default_crds_dir(repo)
            if folder.is_dir():
                for name in CRD_FILES:
                    if (folder / name).is_file():
                        self.load_crds(folder / name)
            else:
                log.info("kubeapi.crds_absent", folder=str(folder), note="schema validation skipped")
            policy = Path(policy_crd) if policy_crd is not None else repo / "deploy" / "crd.yaml"
            if policy.is_file():
                self.load_crds(policy)

    # ----------------------------------------------------------------- registry

    def register(self, rdef: ResourceDef) -> None:
        """Serve a resource version (replacing a previous definition of the same version)."""
        self._defs[(rdef.group, rdef.version, rdef.plural)] = rdef
        self.resources[resource(rdef.group, rdef.version, rdef.plural)] = ResourceInfo(
            kind=rdef.kind,
            namespaced=rdef.namespaced,
            singular=rdef.singular or rdef.kind.lower(),
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            shortnames=set(rdef.short_names),
            subresources={"status"} if rdef.status_subresource else set(),
        )

    def load_crds(self, path: Path) -> list[CRDVersion]:
        """Serve every version of the CRDs in a YAML file, validating against their schemas."""
        versions = load_crd_file(path)
        for v in versions:
            self.register(
                ResourceDef(
                    v.group,
                    v.version,
                    v.plural,
                    v.kind,
                    v.namespaced,
                    v.status_subresource,
                    v.schema,
                    singular=v.singular,
                    short_names=v.short_names,
                )
            )
            self.schemas_loaded.append(f"{v.plural}.{v.group}/{v.version}")
        return versions

    def definition(self, gvr: GVR) -> ResourceDef:
        """The served definition for a GVR (KeyError when not served)."""
        return self._defs[(gvr.group, gvr.version, gvr.plural)]

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving on ``host:port`` (0: a free port); returns the URL."""
        await self.__aenter__()
        self._server = Server(self, host=host, port=port or None)
        await self._server.__aenter__()
        return self.url

    async def stop(self) -> None:
        """End all watches and stop serving."""
        self._stopping = True
        self._wake()
        await asyncio.sleep(0)
        if self._server is not None:
            await self._server.__aexit__(None, None, None)
            self._server = None
        await self.__aexit__(None, None, None)

    @property
    def url(self) -> str:  # type: ignore[override]  # kmock's is a yarl.URL; a str suits kubeconfigs
        """The base URL, e.g. ``http://127.0.0.1:40123``."""
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        return str(self._server.url).rstrip("/")

    def kubeconfig_dict(self, namespace: str = "default") -> JSON:
        """A kubeconfig for this server: plain http, a token user, context ``shadowctl-sim``."""
        user: JSON = {"token": self.token} if self.token else {}
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "shadowctl-sim", "cluster": {"server": self.url}}],
            "users": [{"name": "shadowctl-sim", "user": user}],
            "contexts": [
                {
                    "name": "shadowctl-sim",
                    "context": {"cluster": "shadowctl-sim", "user": "shadowctl-sim", "namespace": namespace},
                }
            ],
            "current-context": "shadowctl-sim",
        }

    def kubeconfig(self, path: Path | str, namespace: str = "default") -> Path:
        """Write :meth:`kubeconfig_dict` to ``path``; returns the path."""
        out = Path(path)
        out.write_text(yaml.safe_dump(self.kubeconfig_dict(namespace), sort_keys=False), encoding="utf-8")
        return out

    # ----------------------------------------------------------------- test controls

    def fail_next(
        self,
        count: int,
        status: int = 500,
        *,
        verb: str | None = None,
        path: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``count`` requests matching ``verb`` (get, list, watch, create, update, patch,
        delete) and ``path`` (a regex searched in the URL path) with ``status`` (and ``Retry-After``)."""
        self._faults.append(Fault(status, count, verb, re.compile(path) if path else None, retry_after))

    def set_latency(self, seconds: float, *, verb: str | None = None) -> None:
        """Delay every (matching) request by ``seconds``; 0 removes all latency."""
        if seconds <= 0:
            self._latency.clear()
        else:
            self._latency.append((seconds, verb))

    def cut_watches(self) -> None:
        """Drop the connection of every open watch (as a network cut would)."""
        self._cut_generation += 1
        self._wake()

    def compact(self) -> None:
        """Forget the watch history: a watch from any version before now gets 410 Gone."""
        self._history.clear()
        self._history_floor = self._rv

    def reset_counts(self) -> None:
        """Clear the request log and the per-verb counts."""
        self.verb_counts.clear()
        self.request_log.clear()

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion."""
        return self._rv

    def _def_for(self, gvr: GVR) -> ResourceDef:
        try:
            return self.definition(gvr)
        except KeyError:
            raise KeyError(f"resource {gvr} is not served") from None

    def get_object(self, gvr: GVR, namespace: str | None, name: str) -> JSON | None:
        """A copy of the stored object, or None."""
        rdef = self._def_for(gvr)
        obj = self._store[rdef.store_key].get((namespace or "", name))
        return self._render(obj, rdef) if obj is not None else None

    def list_objects(self, gvr: GVR, namespace: str | None = None) -> list[JSON]:
        """Copies of the stored objects (all namespaces when ``namespace`` is None)."""
        rdef = self._def_for(gvr)
        return [
            self._render(o, rdef)
            for (ns, _), o in sorted(self._store[rdef.store_key].items())
            if namespace is None or ns == namespace
        ]

    def put_object(self, gvr: GVR, obj: JSON) -> JSON:
        """Create or update an object directly, with the same rules as the HTTP API (ApiError on refusal)."""
        rdef = self._def_for(gvr)
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") if rdef.namespaced else None
        current = self._store[rdef.store_key].get((ns or "", meta.get("name", "")))
        if current is None:
            return self._create(rdef, ns, copy.deepcopy(obj), {})
        body = copy.deepcopy(obj)
        body.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
        result = self._update(rdef, ns, meta["name"], body, {}, subresource=None)
        if rdef.status_subresource and "status" in obj:
            body = copy.deepcopy(result)
            body["status"] = obj["status"]
            result = self._update(rdef, ns, meta["name"], body, {}, subresource="status")
        return result

    def delete_object(self, gvr: GVR, namespace: str | None, name: str) -> None:
        """Delete an object directly (finalizers are honoured)."""
        self._delete(self._def_for(gvr), namespace, name, None)

    # ----------------------------------------------------------------- HTTP entry

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is None or not res.plural or res.version is None:
            return await super(KubernetesEmulator, self)._handle(request)
        raw: aiohttp.web.BaseRequest = request._raw_request
        method = raw.method.upper()
        params = dict(request.params)
        name, sub = request.name, request.subresource
        if method == "GET":
            verb = "watch" if params.get("watch") in ("true", "1") else ("get" if name else "list")
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())
        self.verb_counts[verb] += 1
        self.request_log.append(RequestRecord(verb, method, raw.path, params))
        if len(self._requests) > 20000:  # kmock keeps every request; bound it for long runs
            del self._requests[:10000]
        try:
            self._check_auth(raw)
            for seconds, only in list(self._latency):
                if only is None or only == verb:
                    await asyncio.sleep(seconds)
            self._inject_fault(verb, raw.path)
            rdef = self._defs.get((res.group, res.version, res.plural))
            if rdef is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if sub not in (None, "status") or (sub == "status" and not rdef.status_subresource):
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({sub})")
            ns = request.namespace if rdef.namespaced else None
            if verb == "watch":
                return await self._watch(raw, rdef, ns, name, params)
            return self._dispatch(verb, rdef, ns, name, sub, request, params)
        except ApiError as err:
            return self._status_response(err)

    def _dispatch(
        self,
        verb: str,
        rdef: ResourceDef,
        ns: str | None,
        name: str | None,
        sub: str | None,
        request: Any,
        params: dict[str, str],
    ) -> aiohttp.web.StreamResponse:
        if rdef.namespaced and ns is None and verb not in ("list",):
            raise ApiError(404, "NotFound", "the server could not find the requested resource (no namespace)")
        if verb == "get":
            assert name is not None
            return aiohttp.web.json_response(self._render(self._must_get(rdef, ns, name), rdef))
        if verb == "list":
            return aiohttp.web.json_response(self._list(rdef, ns, params))
        data = self._body(request)
        if verb == "create":
            if name is not None:
                raise ApiError(405, "MethodNotAllowed", "POST to a named object is not allowed")
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "the body must be a JSON object")
            obj = self._create(rdef, ns, data, params)
            return aiohttp.web.json_response(self._render(obj, rdef), status=201)
        if name is None:
            raise ApiError(405, "MethodNotAllowed", f"{verb} needs an object name (collection verbs not emulated)")
        if verb == "update":
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "the body must be a JSON object")
            return aiohttp.web.json_response(self._render(self._update(rdef, ns, name, data, params, sub), rdef))
        if verb == "patch":
            ctype = request._raw_request.content_type
            return aiohttp.web.json_response(self._render(self._patch(rdef, ns, name, ctype, data, params, sub), rdef))
        if verb == "delete":
            return aiohttp.web.json_response(self._render(self._delete(rdef, ns, name, data), rdef))
        raise ApiError(405, "MethodNotAllowed", f"method {verb} not allowed")

    def _check_auth(self, raw: aiohttp.web.BaseRequest) -> None:
        if self.token is None:
            return
        if raw.headers.get("Authorization", "") != f"Bearer {self.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")

    def _inject_fault(self, verb: str, path: str) -> None:
        for fault in self._faults:
            if fault.remaining > 0 and fault.matches(verb, path):
                fault.remaining -= 1
                self._faults = [f for f in self._faults if f.remaining > 0]
                reason = {429: "TooManyRequests", 409: "Conflict", 503: "ServiceUnavailable", 504: "Timeout"}.get(
                    fault.status, "InternalError"
                )
                headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                raise ApiError(fault.status, reason, f"injected fault: {fault.status} {reason}", headers=headers)

    @staticmethod
    def _body(request: Any) -> Any:
        if request.data is None and request.body:
            raise ApiError(400, "BadRequest", "the request body is not valid JSON")
        return request.data

    @staticmethod
    def _status_response(err: ApiError) -> aiohttp.web.Response:
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "message": err.message,
            "reason": err.reason,
            "code": err.code,
        }
        if err.details:
            body["details"] = err.details
        return aiohttp.web.json_response(body, status=err.code, headers=err.headers)

    # ----------------------------------------------------------------- storage

    def _render(self, obj: JSON, rdef: ResourceDef) -> JSON:
        out = copy.deepcopy(obj)
        out["apiVersion"] = rdef.api_version
        out["kind"] = rdef.kind
        return out

    def _must_get(self, rdef: ResourceDef, ns: str | None, name: str) -> JSON:
        obj = self._store[rdef.store_key].get((ns or "", name))
        if obj is None:
            raise ApiError(
                404,
                "NotFound",
                f'{rdef.title} "{name}" not found',
                details={"name": name, "group": rdef.group, "kind": rdef.plural},
            )
        return obj

    def _list(self, rdef: ResourceDef, ns: str | None, params: dict[str, str]) -> JSON:
        terms = _parse_selector(params.get("labelSelector"))
        fields = _parse_fields(params.get("fieldSelector"))
        items = [
            self._render(o, rdef)
            for (ons, oname), o in sorted(self._store[rdef.store_key].items())
            if (ns is None or ons == ns)
            and _labels_match(o, terms)
            and fields.get("metadata.name", oname) == oname
            and fields.get("metadata.namespace", ons) == ons
        ]
        return {
            "apiVersion": rdef.api_version,
            "kind": f"{rdef.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _commit(self, rdef: ResourceDef, obj: JSON, event: str) -> JSON:
        meta = obj["metadata"]
        key = (meta.get("namespace") or "", meta["name"])
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        if event == "DELETED":
            self._store[rdef.store_key].pop(key, None)
        else:
            self._store[rdef.store_key][key] = obj
        if len(self._history) == self._history.maxlen and self._history:
            self._history_floor = self._history[0].rv
        self._history.append(_HistoryEntry(self._rv, rdef.store_key, event, copy.deepcopy(obj)))
        self._wake()
        return obj

    def _wake(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    def _admit(self, rdef: ResourceDef, obj: JSON, params: dict[str, str]) -> JSON:
        """Prune and validate against the schema, then run the webhooks; returns the pruned object."""
        name = (obj.get("metadata") or {}).get("name") or (obj.get("metadata") or {}).get("generateName", "")
        causes: list[Cause] = []
        if rdef.schema is not None:
            dropped: list[str] = []
            obj = prune(obj, rdef.schema, "", dropped)
            if dropped and params.get("fieldValidation") == "Strict":
                causes += [Cause(p, "FieldValueInvalid", f'unknown field "{p}"') for p in dropped]
            causes += validate(obj, rdef.schema)
        if rdef.store_key == KSVC:
            ns = (obj.get("metadata") or {}).get("namespace") or ""
            revisions = {n for (rns, n) in self._store[KREV] if rns == ns}
            causes += [Cause(c.field, c.reason, c.message) for c in knative.validate_service(obj, revisions)]
        if causes:
            raise ApiError(
                422,
                "Invalid",
                f'{rdef.kind}.{rdef.group or "core"} "{name}" is invalid: ' + "; ".join(c.message for c in causes),
                details={
                    "name": name,
                    "group": rdef.group,
                    "kind": rdef.kind,
                    "causes": [c.to_status() for c in causes],
                },
            )
        return obj

    def _create(self, rdef: ResourceDef, ns: str | None, data: JSON, params: dict[str, str]) -> JSON:
        obj = copy.deepcopy(data)
        self._check_type(rdef, obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if rdef.namespaced:
            body_ns = meta.get("namespace")
            if ns is None:
                ns = body_ns
            if body_ns and body_ns != ns:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            if not ns:
                raise ApiError(400, "BadRequest", "a namespace is required")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if meta.get("generateName"):
                for _ in range(20):
                    candidate = meta["generateName"] + secrets.token_hex(3)[:5]
                    if (ns or "", candidate) not in self._store[rdef.store_key]:
                        break
                meta["name"] = candidate
            else:
                raise ApiError(
                    422,
                    "Invalid",
                    f"{rdef.kind} is invalid: metadata.name: Required value: name or generateName is required",
                    details={
                        "causes": [
                            {
                                "field": "metadata.name",
                                "reason": "FieldValueRequired",
                                "message": "Required value: name or generateName is required",
                            }
                        ]
                    },
                )
        name = meta["name"]
        if (ns or "", name) in self._store[rdef.store_key]:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{rdef.title} "{name}" already exists',
                details={"name": name, "group": rdef.group, "kind": rdef.plural},
            )
        if rdef.status_subresource:
            obj.pop("status", None)
        obj = self._admit(rdef, obj, params)
        meta = obj["metadata"]
        for key in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        obj = self._commit(rdef, obj, "ADDED")
        self._after_write(rdef, obj, None)
        return obj  # the spec write itself: a controller's follow-up status write is newer

    def _check_type(self, rdef: ResourceDef, obj: JSON) -> None:
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if api_version and api_version != rdef.api_version:
            # Other served versions of the same resource share the storage.
            group = api_version.rpartition("/")[0] if "/" in api_version else ""
            if group != rdef.group:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"the API version in the data ({api_version}) does not match the expected API version "
                    f"({rdef.api_version})",
                )
        if kind and kind != rdef.kind:
            raise ApiError(400, "BadRequest", f"the kind in the data ({kind}) does not match {rdef.kind}")
        obj["apiVersion"], obj["kind"] = rdef.api_version, rdef.kind

    def _update(
        self, rdef: ResourceDef, ns: str | None, name: str, data: JSON, params: dict[str, str], subresource: str | None
    ) -> JSON:
        current = self._must_get(rdef, ns, name)
        new = copy.deepcopy(data)
        self._check_type(rdef, new)
        meta = new.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(
                400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match the URL ({name})"
            )
        if rdef.namespaced and meta.get("namespace", ns) != ns:
            raise ApiError(400, "BadRequest", "the namespace of the object does not match the namespace on the URL")
        rv = meta.get("resourceVersion")
        if rv and str(rv) != current["metadata"]["resourceVersion"]:
            raise self._conflict(rdef, name)
        if not rv and rdef.custom:
            raise ApiError(
                422,
                "Invalid",
                f'{rdef.kind}.{rdef.group} "{name}" is invalid: metadata.resourceVersion: Invalid value: 0x0: '
                "must be specified for an update",
                details={
                    "causes": [
                        {
                            "field": "metadata.resourceVersion",
                            "reason": "FieldValueInvalid",
                            "message": "must be specified for an update",
                        }
                    ]
                },
            )
        if subresource == "status":
            merged = copy.deepcopy(current)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        else:
            if rdef.status_subresource:
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
                else:
                    new.pop("status", None)
            for key in _META_KEEP:
                if key in current["metadata"]:
                    new["metadata"][key] = current["metadata"][key]
                else:
                    new["metadata"].pop(key, None)
        new = self._admit(rdef, new, params)
        if new == current:
            return current  # a no-op update writes nothing: same resourceVersion, no event
        if _spec_part(new) != _spec_part(current):
            new["metadata"]["generation"] = int(current["metadata"].get("generation") or 0) + 1
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._commit(rdef, new, "DELETED")
        obj = self._commit(rdef, new, "MODIFIED")
        if subresource is None:
            self._after_write(rdef, obj, current)
        return obj  # the spec write itself: a controller's follow-up status write is newer

    def _patch(
        self,
        rdef: ResourceDef,
        ns: str | None,
        name: str,
        ctype: str,
        data: Any,
        params: dict[str, str],
        subresource: str | None,
    ) -> JSON:
        current = self._must_get(rdef, ns, name)
        if ctype == "application/strategic-merge-patch+json" and not rdef.custom:
            ctype = "application/merge-patch+json"
        if ctype == "application/merge-patch+json":
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
            patched = merge_patch(current, data)
        elif ctype == "application/json-patch+json":
            try:
                patched = json_patch(current, data)
            except PatchError as exc:
                raise ApiError(exc.status, "Invalid" if exc.status == 422 else "BadRequest", exc.message) from exc
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format ({ctype}) - accepted media types include: "
                "application/json-patch+json, application/merge-patch+json",
            )
        if not isinstance(patched, dict):
            raise ApiError(422, "Invalid", "the patched object is not a JSON object")
        patched_rv = (patched.get("metadata") or {}).get("resourceVersion")
        if patched_rv is not None and str(patched_rv) != current["metadata"]["resourceVersion"]:
            raise self._conflict(rdef, name)
        patched.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self._update(rdef, ns, name, patched, params, subresource)

    def _delete(self, rdef: ResourceDef, ns: str | None, name: str, options: Any) -> JSON:
        current = self._must_get(rdef, ns, name)
        pre = (options or {}).get("preconditions") or {} if isinstance(options, dict) else {}
        if pre.get("resourceVersion") and pre["resourceVersion"] != current["metadata"]["resourceVersion"]:
            raise self._conflict(rdef, name)
        if pre.get("uid") and pre["uid"] != current["metadata"].get("uid"):
            raise self._conflict(rdef, name)
        if current["metadata"].get("finalizers"):
            if current["metadata"].get("deletionTimestamp"):
                return current
            obj = copy.deepcopy(current)
            obj["metadata"]["deletionTimestamp"] = _now()
            return self._commit(rdef, obj, "MODIFIED")
        gone = copy.deepcopy(current)
        self._commit(rdef, gone, "DELETED")
        if rdef.store_key == KSVC:
            self._ksvc_state.pop((ns or "", name), None)
        return gone

    @staticmethod
    def _conflict(rdef: ResourceDef, name: str) -> ApiError:
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {rdef.title} "{name}": the object has been modified; '
            "please apply your changes to the latest version and try again",
            details={"name": name, "group": rdef.group, "kind": rdef.plural},
        )

    # ----------------------------------------------------------------- controllers

    def _after_write(self, rdef: ResourceDef, obj: JSON, previous: JSON | None) -> None:
        if rdef.store_key != KSVC or obj["metadata"].get("deletionTimestamp"):
            return
        if previous is not None and _spec_part(previous) == _spec_part(obj):
            return
        meta = obj["metadata"]
        key = (meta.get("namespace") or "", meta["name"])
        template = (obj.get("spec") or {}).get("template") or {}
        last_template, count, latest = self._ksvc_state.get(key, (None, 0, ""))
        if template != last_template:
            count += 1
            latest = knative.next_revision_name(meta["name"], template, count)
            rev_def = self._defs[("serving.knative.dev", "v1", "revisions")]
            if (key[0], latest) not in self._store[KREV]:
                revision = knative.revision_for(obj, latest, int(meta.get("generation") or 1))
                revision["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
                revision["status"] = {
                    "observedGeneration": 1,
                    "conditions": knative.ready_conditions(
                        ["Active", "ContainerHealthy", "Ready", "ResourcesAvailable"], _now()
                    ),
                }
                self._commit(rev_def, revision, "ADDED")
            self._ksvc_state[key] = (copy.deepcopy(template), count, latest)
        status_obj = copy.deepcopy(obj)
        status_obj["status"] = knative.service_status(obj, latest, _now())
        self._commit(rdef, status_obj, "MODIFIED")

    # ----------------------------------------------------------------- watch

    def _history_since(self, rv: int, rdef: ResourceDef) -> Iterator[_HistoryEntry]:
        for entry in self._history:
            if entry.rv > rv and entry.store_key == rdef.store_key:
                yield entry

    async def _watch(
        self, raw: aiohttp.web.BaseRequest, rdef: ResourceDef, ns: str | None, name: str | None, params: dict[str, str]
    ) -> aiohttp.web.StreamResponse:
        terms = _parse_selector(params.get("labelSelector"))
        fields = _parse_fields(params.get("fieldSelector"))
        if name:
            fields["metadata.name"] = name
        rv_text = params.get("resourceVersion") or ""
        try:
            since = int(rv_text) if rv_text not in ("", "0") else None
        except ValueError:
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_text!r}") from None
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        cut_generation = self._cut_generation

        def wanted(obj: JSON) -> bool:
            meta = obj.get("metadata") or {}
            return (
                (ns is None or meta.get("namespace") == ns)
                and fields.get("metadata.name", meta.get("name")) == meta.get("name")
                and fields.get("metadata.namespace", meta.get("namespace")) == meta.get("namespace")
                and _labels_match(obj, terms)
            )

        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(raw)

        async def send(kind: str, obj: JSON) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        try:
            if since is None:
                cursor = self._rv
                for _key, obj in sorted(self._store[rdef.store_key].items()):
                    if wanted(obj):
                        await send("ADDED", self._render(obj, rdef))
            else:
                cursor = since
            while not self._stopping:
                if cursor < self._history_floor:
                    await send(
                        "ERROR",
                        {
                            "apiVersion": "v1",
                            "kind": "Status",
                            "metadata": {},
                            "status": "Failure",
                            "message": f"too old resource version: {cursor} ({self._rv})",
                            "reason": "Expired",
                            "code": 410,
                        },
                    )
                    break
                tick = self._tick
                for entry in list(self._history_since(cursor, rdef)):
                    cursor = entry.rv
                    if wanted(entry.obj):
                        await send(entry.type, self._render(entry.obj, rdef))
                if self._cut_generation != cut_generation:
                    if raw.transport is not None:
                        raw.transport.close()
                    return response
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        await tick.wait()
                except TimeoutError:
                    break
                if self._cut_generation != cut_generation:
                    if raw.transport is not None:
                        raw.transport.close()
                    return response
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        return response


def main(argv: list[str] | None = None) -> int:
    """``python -m shadowctl.sim.kubeapi``: serve until interrupted."""
    log_to_stderr()
    parser = argparse.ArgumentParser(prog="python -m shadowctl.sim.kubeapi", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--kubeconfig-out", type=Path, help="write a kubeconfig here (else print it)")
    parser.add_argument("--crds", type=Path, help="folder of upstream CRD YAMLs (default ../shared/crds)")
    parser.add_argument("--token", default=os.environ.get("SHADOWCTL_SIM_TOKEN") or secrets.token_hex(16))
    args = parser.parse_args(argv)

    async def serve() -> None:
        emu = KubeAPIEmulator(crds_dir=args.crds, token=args.token)
        await emu.start(args.host, args.port)
        if args.kubeconfig_out:
            emu.kubeconfig(args.kubeconfig_out)
            print(f"serving {emu.url}; kubeconfig written to {args.kubeconfig_out}", flush=True)
        else:
            print(yaml.safe_dump(emu.kubeconfig_dict(), sort_keys=False), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await emu.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"kubeapi: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
