"""Async access to the Kubernetes API on ``kubernetes.aio``, returning plain JSON dicts.

Why raw REST paths instead of the typed APIs or the dynamic client: shadowctl
handles custom resources (Istio, Knative, its own ShadowPolicy) next to Leases
and Events, wants the objects as JSON dicts (unknown fields must survive a round
trip), and must not pay for discovery on start. So every call goes through the
library's ``ApiClient`` (configuration, auth, TLS, connection pool) with a path
built from a :class:`~shadowctl.kube.refs.GVR`, and the response is decoded by
the library as ``object``.

The library's own retries are left off; this module retries by
:class:`~shadowctl.kube.retry.RetryPolicy` (sleep and randomness injectable for
tests) and counts every HTTP attempt per verb, so tests can prove that a
reconcile with nothing to change made no write.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import aiohttp
import structlog
from kubernetes.aio.client import ApiClient, Configuration
from kubernetes.aio.client.exceptions import ApiException
from kubernetes.aio.config import ConfigException, load_incluster_config, load_kube_config

from shadowctl.kube.errors import ConfigError, KubeError, Unavailable, WatchExpired, from_status
from shadowctl.kube.objects import JSON, ListResult, WatchEvent, decode_object
from shadowctl.kube.refs import EVENT, GVR, ResourceRef
from shadowctl.kube.retry import RetryPolicy, parse_retry_after

log = structlog.get_logger(__name__)

Query = list[tuple[str, str]]
Operations = list[JSON]
Sleep = Callable[[float], Awaitable[None]]

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
WRITE_VERBS = frozenset({"create", "update", "patch", "delete"})


class KubeClient:
    """A small async Kubernetes client: CRUD, patches, status, watch, events; own errors and retries.

    Build it with :meth:`connect` (kubeconfig or in-cluster) or :meth:`for_url`;
    close it with :meth:`close` or ``async with``. Every method raises only
    :class:`~shadowctl.kube.errors.KubeError` subclasses (and ``ValueError`` for
    programming mistakes such as a replace without a resourceVersion).
    """

    def __init__(
        self,
        api_client: Any,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        component: str = "shadowctl",
    ) -> None:
        """Wrap a ``kubernetes.aio.client.ApiClient``; ``timeout`` is per HTTP attempt, in seconds."""
        self._api = api_client
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rand = rand
        self._now = now
        self.component = component
        self.requests_by_verb: Counter[str] = Counter()

    # ----------------------------------------------------------------- construction

    @classmethod
    async def connect(
        cls,
        *,
        kubeconfig: str | Path | None = None,
        context: str | None = None,
        in_cluster: bool | None = None,
        **options: Any,
    ) -> Self:
        """Load configuration and build a client.

        ``in_cluster=None`` picks the service-account configuration when running
        in a pod (``KUBERNETES_SERVICE_HOST`` set) and no kubeconfig was named,
        else the kubeconfig (``kubeconfig`` path, else ``$KUBECONFIG``, else
        ``~/.kube/config``) with ``context`` (else its current context).
        ``options`` go to the constructor. Raises ConfigError.
        """
        configuration = Configuration()
        if in_cluster is None:
            in_cluster = kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        try:
            if in_cluster:
                load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            else:
                path = str(kubeconfig) if kubeconfig is not None else None
                await load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=path,
                    context=context,
                    client_configuration=configuration,
                    persist_config=False,
                )
        except ConfigException as exc:
            where = "in-cluster configuration" if in_cluster else f"kubeconfig {kubeconfig or '(default)'}"
            raise ConfigError(f"cannot load {where}: {exc}") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot load kubeconfig {kubeconfig or '(default)'}: {exc}") from exc
        configuration.retries = None
        return cls(ApiClient(configuration), **options)

    @classmethod
    def for_url(cls, url: str, *, token: str | None = None, **options: Any) -> Self:
        """A client for a plain URL (``kubectl proxy``, a fault proxy) with an optional bearer token."""
        configuration = Configuration(host=url.rstrip("/"))
        if token:
            configuration.api_key = {"BearerToken": token}
            configuration.api_key_prefix = {"BearerToken": "Bearer"}
        configuration.retries = None
        return cls(ApiClient(configuration), **options)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._api.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ----------------------------------------------------------------- counters

    @property
    def request_count(self) -> int:
        """HTTP attempts made so far (retries included)."""
        return sum(self.requests_by_verb.values())

    @property
    def write_count(self) -> int:
        """HTTP attempts with a writing verb (create, update, patch, delete) so far."""
        return sum(n for verb, n in self.requests_by_verb.items() if verb in WRITE_VERBS)

    # ----------------------------------------------------------------- reads

    async def get(self, ref: ResourceRef) -> JSON:
        """GET one object. Raises NotFound."""
        return await self._call("get", "GET", ref.path())

    async def list(
        self,
        gvr: GVR,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> ListResult:
        """List objects (``namespace=None``: all namespaces); returns items and the list's resourceVersion."""
        query = _query(labelSelector=label_selector, fieldSelector=field_selector)
        return ListResult.of(await self._call("list", "GET", gvr.path(namespace), query=query), gvr)

    # ----------------------------------------------------------------- writes

    async def create(self, gvr: GVR, obj: JSON, namespace: str | None = None) -> JSON:
        """POST a new object (namespace from the argument, else from ``metadata.namespace``).

        Raises AlreadyExists (a Conflict) when the name is taken, Invalid on validation.
        """
        ns = namespace if namespace is not None else (obj.get("metadata") or {}).get("namespace")
        if gvr.namespaced and not ns:
            raise ValueError(f"{gvr}: create needs a namespace")
        return await self._call(
            "create", "POST", gvr.path(ns if gvr.namespaced else None), body=obj, idempotent=False
        )

    async def replace(self, gvr: GVR, obj: JSON) -> JSON:
        """PUT the whole object; it must carry the ``metadata.resourceVersion`` it was computed from.

        Raises Conflict when that version is stale (re-read and recompute), NotFound, Invalid.
        """
        _require_rv(gvr, obj)
        return await self._call("update", "PUT", ResourceRef.of(gvr, obj).path(), body=obj)

    async def patch_merge(
        self, ref: ResourceRef, patch: JSON, *, resource_version: str | None = None
    ) -> JSON:
        """JSON merge patch (RFC 7386: null deletes a key, lists are replaced whole).

        With ``resource_version`` the patch is conditional (409 Conflict when stale).
        """
        return await self._call(
            "patch", "PATCH", ref.path(), body=_with_rv(patch, resource_version), content_type=MERGE_PATCH
        )

    async def patch_json(self, ref: ResourceRef, operations: Operations) -> JSON:
        """JSON patch (RFC 6902); a leading ``test`` operation makes it conditional (422 when it fails)."""
        return await self._call(
            "patch", "PATCH", ref.path(), body=list(operations), content_type=JSON_PATCH, idempotent=False
        )

    async def patch_status(
        self, ref: ResourceRef, patch: JSON, *, resource_version: str | None = None
    ) -> JSON:
        """Merge-patch the ``/status`` subresource (only ``status`` changes there)."""
        return await self._call(
            "patch",
            "PATCH",
            ref.path("status"),
            body=_with_rv(patch, resource_version),
            content_type=MERGE_PATCH,
        )

    async def replace_status(self, gvr: GVR, obj: JSON) -> JSON:
        """PUT the ``/status`` subresource; carries ``metadata.resourceVersion`` like :meth:`replace`."""
        _require_rv(gvr, obj)
        return await self._call("update", "PUT", ResourceRef.of(gvr, obj).path("status"), body=obj)

    async def delete(self, ref: ResourceRef, *, resource_version: str | None = None) -> None:
        """DELETE an object, optionally only if still at ``resource_version``. Raises NotFound."""
        body: JSON = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if resource_version:
            body["preconditions"] = {"resourceVersion": resource_version}
        await self._call("delete", "DELETE", ref.path(), body=body)

    async def create_event(
        self,
        involved: JSON,
        *,
        reason: str,
        message: str,
        type: Literal["Normal", "Warning"] = "Normal",
        action: str = "",
    ) -> JSON:
        """Record a core/v1 Event about ``involved`` (a full object dict) in the object's namespace."""
        meta = involved.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        stamp = self._now().astimezone(UTC)
        text = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        event: JSON = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'object')}.", "namespace": namespace},
            "involvedObject": {
                k: v
                for k, v in {
                    "apiVersion": involved.get("apiVersion"),
                    "kind": involved.get("kind"),
                    "name": meta.get("name"),
                    "namespace": meta.get("namespace"),
                    "uid": meta.get("uid"),
                    "resourceVersion": meta.get("resourceVersion"),
                }.items()
                if v
            },
            "reason": reason,
            "message": message[:1024],
            "type": type,
            "action": action or reason,
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": os.environ.get("HOSTNAME", self.component),
            "firstTimestamp": text,
            "lastTimestamp": text,
            "eventTime": stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "count": 1,
        }
        return await self._call("create", "POST", EVENT.path(namespace), body=event, idempotent=False)

    # ----------------------------------------------------------------- watch

    async def watch(
        self,
        gvr: GVR,
        namespace: str | None = None,
        resource_version: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Stream changes after ``resource_version`` (from :meth:`list`).

        Without a version the server first sends ADDED for every current object.
        The iterator ends when the server ends the stream (``timeout_seconds``,
        or the connection drops): watch again from the last event's
        ``resource_version``. Raises WatchExpired when the version is too old
        (410, as a response or an ERROR event): list again, then watch from the
        list's version. Opening the stream is retried like a read.
        """
        query = _query(
            watch="true",
            resourceVersion=resource_version,
            labelSelector=label_selector,
            fieldSelector=field_selector,
            timeoutSeconds=str(timeout_seconds) if timeout_seconds is not None else None,
            allowWatchBookmarks="true",
        )
        read_limit = None if timeout_seconds is None else timeout_seconds + self.timeout
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=read_limit)
        response = await self._open_stream(gvr.path(namespace), query, timeout)
        try:
            while True:
                try:
                    line = await response.response.content.readline()
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.info("kube.watch.dropped", resource=str(gvr), error=str(exc))
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except ValueError as exc:
                    raise KubeError(f"watch {gvr}: undecodable event: {line[:200]!r}") from exc
                kind = raw.get("type")
                obj = raw.get("object") or {}
                if kind == "ERROR":
                    code = int(obj.get("code") or 500)
                    err = from_status(code, obj)
                    if code == 410:
                        raise WatchExpired(err.message, status=410, reason=err.reason)
                    raise err
                if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
                    raise KubeError(f"watch {gvr}: unknown event type {kind!r}")
                yield WatchEvent(kind, obj)
        finally:
            response.response.release()

    async def _open_stream(self, path: str, query: Query, client_timeout: aiohttp.ClientTimeout) -> Any:
        attempt = 0
        while True:
            attempt += 1
            self.requests_by_verb["watch"] += 1
            try:
                response = await self._send("GET", path, query, None, None, client_timeout)
                if response.status != 200:
                    await response.read()
                    self._raise_for(response)
                return response
            except KubeError as err:
                if isinstance(err, WatchExpired) or err.status == 410:
                    raise WatchExpired(err.message, status=410, reason=err.reason) from err.__cause__
                if not self.retry.should_retry(err, True, attempt):
                    raise
                await self._backoff(attempt, err, "watch", path)

    # ----------------------------------------------------------------- plumbing

    async def _call(
        self,
        verb: str,
        method: str,
        path: str,
        *,
        query: Query | None = None,
        body: Any = None,
        content_type: str | None = None,
        idempotent: bool = True,
    ) -> JSON:
        limits = aiohttp.ClientTimeout(total=self.timeout)
        attempt = 0
        while True:
            attempt += 1
            self.requests_by_verb[verb] += 1
            try:
                response = await self._send(method, path, query or [], body, content_type, limits)
                try:
                    async with asyncio.timeout(self.timeout):
                        await response.read()
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    raise Unavailable(f"{method} {path}: reading the response failed: {exc!r}") from exc
                finally:
                    response.response.release()
                if not 200 <= response.status <= 299:
                    self._raise_for(response)
                return decode_object(response.data, f"{method} {path}")
            except KubeError as err:
                if not self.retry.should_retry(err, idempotent, attempt):
                    raise
                await self._backoff(attempt, err, verb, path)

    async def _send(
        self,
        method: str,
        path: str,
        query: Query,
        body: Any,
        content_type: str | None,
        client_timeout: aiohttp.ClientTimeout,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            _, url, headers, body, _ = await self._api.param_serialize(
                method,
                path,
                query_params=query or None,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            return await self._api.call_api(
                method, url, header_params=headers, body=body, _request_timeout=client_timeout
            )
        except TimeoutError as exc:
            raise Unavailable(f"{method} {path}: no answer within {self.timeout:g}s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        except ApiException as exc:  # raised by the REST layer before any response
            raise KubeError(f"{method} {path}: {exc.reason}") from exc

    def _raise_for(self, response: Any) -> None:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), self._now())
        try:
            self._api.response_deserialize(response, {"2XX": "object"})
        except ApiException as exc:
            try:
                decoded: Any = json.loads(exc.body or "")
            except ValueError:
                decoded = exc.body or ""
            raise from_status(int(exc.status or 0), decoded, retry_after=retry_after) from exc
        raise KubeError(f"HTTP {response.status} without an error")  # pragma: no cover - guarded by caller

    async def _backoff(self, attempt: int, err: KubeError, verb: str, path: str) -> None:
        delay = self.retry.delay(attempt, err.retry_after, self._rand)
        log.info(
            "kube.retry",
            verb=verb,
            path=path,
            attempt=attempt,
            status=err.status,
            delay=round(delay, 3),
            error=err.message,
        )
        await self._sleep(delay)


def _query(**params: str | None) -> Query:
    return [(k, v) for k, v in params.items() if v]


def _require_rv(gvr: GVR, obj: JSON) -> None:
    if not (obj.get("metadata") or {}).get("resourceVersion"):
        raise ValueError(f"{gvr}: a replace must carry metadata.resourceVersion (read, modify, write)")


def _with_rv(patch: JSON, resource_version: str | None) -> JSON:
    if not resource_version:
        return patch
    meta = dict(patch.get("metadata") or {})
    meta["resourceVersion"] = resource_version
    return {**patch, "metadata": meta}
