"""Reads without the kubernetes library: GET and list over the standard library's HTTP client.

Why a second way to read: ``shadowctl get`` and ``status`` are typed many times a day and should
answer as a whole process within 0.3 s, like kubectl; importing ``kubernetes.aio`` and aiohttp
alone takes 0.2 s of that (docs/cli.md, Start-up). A read is one authenticated GET, so for the
commands that only read, this module speaks HTTP itself (``http.client`` and ``ssl``).

It covers what a kubeconfig states outright: the server (with a path prefix, as behind Rancher),
its CA (file or data) or ``insecure-skip-tls-verify``, a client certificate and key (files or
data), a bearer token or ``tokenFile``, basic auth; and a pod's service account. Credentials that
need code to produce them (an ``exec`` or ``auth-provider`` plugin), impersonation, ``proxy-url``
and ``tls-server-name`` are left to :class:`~shadowctl.kube.client.KubeClient`:
:meth:`RestReader.for_kubeconfig` returns None and the caller uses the client. It never writes and
never watches.

What it shares with :class:`KubeClient`, so that both read alike: the error classes, mapped from
the same ``Status`` body by :func:`~shadowctl.kube.errors.from_status`; the retry rules
(:meth:`RetryPolicy.should_retry` and :meth:`RetryPolicy.delay`); :meth:`ListResult.of`; the
paths of :class:`GVR` and :class:`ResourceRef`. ``tests/test_kube_rest.py`` runs the same reads
through both against the real API server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import json
import os
import random
import ssl
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from shadowctl.kube.errors import ConfigError, KubeError, Unavailable, from_status
from shadowctl.kube.kubeconfig import (
    HINT,
    Kubeconfig,
    in_pod_without_kubeconfig,
    read_kubeconfig,
    require_kubeconfig,
)
from shadowctl.kube.objects import JSON, ListResult, decode_object
from shadowctl.kube.refs import GVR, ResourceRef
from shadowctl.kube.retry import RetryPolicy, parse_retry_after

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
PLUGIN_KEYS = {"cluster": ("proxy-url", "tls-server-name"), "user": ("exec", "auth-provider", "as", "as-groups",
                                                                      "as-uid", "as-user-extra")}
"""Settings that need the kubernetes library (code that makes credentials, a proxy, impersonation)."""

Query = list[tuple[str, str]]


@dataclass(frozen=True)
class Endpoint:
    """Where the API server is and how to authenticate, as a kubeconfig context states it."""

    server: str
    ca_file: str | None = None
    ca_data: str | None = None
    insecure: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    token: str | None = None
    token_file: str | None = None
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_kubeconfig(cls, config: Kubeconfig, context: str | None, where: str) -> Endpoint | None:
        """The endpoint of ``context`` (else the current one); None where it needs the kubernetes library.

        ``where`` names the kubeconfig in errors. Raises ConfigError for a context, cluster or server
        that is missing, and for certificate data that is not base64.
        """
        name = context or config.current
        if not name:
            raise ConfigError(f"kubeconfig {where}: no context given and no current-context ({HINT})")
        ctx = config.contexts.get(name)
        if ctx is None:
            raise ConfigError(f"kubeconfig {where}: context {name!r} not found ({HINT})")
        cluster = config.clusters.get(str(ctx.get("cluster") or ""))
        if cluster is None:
            raise ConfigError(f"kubeconfig {where}: context {name!r} names cluster {ctx.get('cluster')!r}, "
                              f"which is not defined ({HINT})")
        user = config.users.get(str(ctx.get("user") or ""), {})
        if any(cluster.get(k) for k in PLUGIN_KEYS["cluster"]) or any(user.get(k) for k in PLUGIN_KEYS["user"]):
            return None
        server = cluster.get("server")
        if not isinstance(server, str) or not server:
            raise ConfigError(f"kubeconfig {where}: cluster {ctx.get('cluster')!r} has no server ({HINT})")
        return cls(
            server=server.rstrip("/"),
            ca_file=_str(cluster.get("certificate-authority")),
            ca_data=_pem(cluster.get("certificate-authority-data"), "certificate-authority-data", where),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
            cert_file=_str(user.get("client-certificate")),
            key_file=_str(user.get("client-key")),
            cert_data=_data(user.get("client-certificate-data"), "client-certificate-data", where),
            key_data=_data(user.get("client-key-data"), "client-key-data", where),
            token=_str(user.get("token")),
            token_file=_str(user.get("tokenFile")),
            username=_str(user.get("username")),
            password=_str(user.get("password")),
        )

    @classmethod
    def in_cluster(cls) -> Endpoint:
        """The pod's service account: the API server from the environment, its CA and rotating token."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ConfigError("in-cluster configuration: KUBERNETES_SERVICE_HOST is not set")
        host = f"[{host}]" if ":" in host else host
        return cls(server=f"https://{host}:{port}", ca_file=str(SERVICE_ACCOUNT / "ca.crt"),
                   token_file=str(SERVICE_ACCOUNT / "token"))

    def ssl_context(self) -> ssl.SSLContext:
        """A TLS context that checks the server as the kubeconfig says, with the client certificate."""
        try:
            context = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
            if self.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if self.cert_file or self.cert_data:
                _load_client_cert(context, self)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"cannot load the TLS settings of {self.server}: {exc}") from exc
        return context

    def authorization(self) -> str | None:
        """The Authorization header: the token (the file read each time: bound tokens rotate), else basic."""
        token = self.token
        if self.token_file:
            try:
                token = Path(self.token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read the token file {self.token_file}: {exc}") from exc
        if token:
            return f"Bearer {token}"
        if self.username is not None and self.password is not None:
            pair = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return f"Basic {pair}"
        return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _data(value: Any, key: str, where: str) -> bytes | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"kubeconfig {where}: {key} is not base64: {exc} ({HINT})") from exc


def _pem(value: Any, key: str, where: str) -> str | None:
    data = _data(value, key, where)
    return data.decode("ascii", errors="replace") if data is not None else None


def _load_client_cert(context: ssl.SSLContext, endpoint: Endpoint) -> None:
    """Load the client certificate; data is written to a private temporary folder for ``ssl`` and removed."""
    if endpoint.cert_data is None and endpoint.key_data is None:
        context.load_cert_chain(str(endpoint.cert_file), endpoint.key_file)
        return
    with tempfile.TemporaryDirectory(prefix="shadowctl-tls-") as folder:
        cert = endpoint.cert_file
        key = endpoint.key_file
        if endpoint.cert_data is not None:
            cert = os.path.join(folder, "cert.pem")
            Path(cert).write_bytes(endpoint.cert_data)
        if endpoint.key_data is not None:
            key = os.path.join(folder, "key.pem")
            Path(key).write_bytes(endpoint.key_data)
        context.load_cert_chain(str(cert), key)


class RestReader:
    """GET and list on the API server with the standard library; a :class:`~shadowctl.kube.objects.KubeReader`.

    Raises only :class:`~shadowctl.kube.errors.KubeError` subclasses: the server's status mapped as
    :class:`KubeClient` maps it, Unavailable when no answer came (after the retries). The blocking
    HTTP exchange runs in a worker thread, so the event loop is never held.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        user_agent: str = "shadowctl",
    ) -> None:
        """``timeout`` bounds each socket operation of an attempt, in seconds."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rand = rand
        self._user_agent = user_agent
        parts = urlsplit(endpoint.server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"server {endpoint.server!r}: expected http(s)://host[:port][/prefix] ({HINT})")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._tls = endpoint.ssl_context() if self._https else None
        self._conn: http.client.HTTPConnection | None = None
        self.requests_by_verb: Counter[str] = Counter()

    @classmethod
    def for_kubeconfig(cls, kubeconfig: str | None, context: str | None, **options: Any) -> RestReader | None:
        """A reader for the kubeconfig's context (a pod's service account where kubectl would use it);
        None when the context needs the kubernetes library (see the module's docstring).

        Raises ConfigError with what to pass instead, as :func:`connect_as_kubectl` does.
        """
        if in_pod_without_kubeconfig(kubeconfig):
            return cls(Endpoint.in_cluster(), **options)
        require_kubeconfig(kubeconfig)
        endpoint = Endpoint.from_kubeconfig(read_kubeconfig(kubeconfig), context, kubeconfig or "(default)")
        return None if endpoint is None else cls(endpoint, **options)

    async def get(self, ref: ResourceRef) -> JSON:
        """GET one object. Raises NotFound."""
        return await self._read("get", ref.path(), [])

    async def list(
        self,
        gvr: GVR,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> ListResult:
        """List objects (``namespace=None``: all namespaces); items and the list's resourceVersion."""
        query = [(k, v) for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v]
        return ListResult.of(await self._read("list", gvr.path(namespace), query), gvr)

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _read(self, verb: str, path: str, query: Query) -> JSON:
        attempt = 0
        while True:
            attempt += 1
            self.requests_by_verb[verb] += 1
            try:
                status, retry_after, data = await asyncio.to_thread(self._exchange, path, query)
                if not 200 <= status <= 299:
                    raise from_status(status, _decoded_error(data), retry_after=retry_after)
                return decode_object(data, f"GET {path}")
            except KubeError as err:
                if not self.retry.should_retry(err, True, attempt):
                    raise
                await self._sleep(self.retry.delay(attempt, err.retry_after, self._rand))

    def _exchange(self, path: str, query: Query) -> tuple[int, float | None, bytes]:
        """One GET: the status, the server's Retry-After and the body. Raises Unavailable without an answer."""
        target = self._prefix + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json", "User-Agent": self._user_agent}
        auth = self.endpoint.authorization()
        if auth:
            headers["Authorization"] = auth
        try:
            conn = self._connection()
            conn.request("GET", target, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError and timeouts are OSErrors
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise Unavailable(f"GET {path}: {type(exc).__name__}: {exc}") from exc
        return response.status, parse_retry_after(response.getheader("Retry-After")), data

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._tls is not None:
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                         context=self._tls)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        return self._conn


def _decoded_error(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", errors="replace")
