"""Credentials a policy keeps in Secrets of its own namespace: a Prometheus token, an MQTT password, TLS material.

Why a short-lived cache and not a watch: the controller may read only the Secrets the policies
name (a Role with ``resourceNames``, see ``shadowctl rbac secrets``). RBAC allows a ``watch``
under ``resourceNames`` only when the request selects that one object
(``fieldSelector=metadata.name=NAME``), so a watch would be one open stream per Secret, and
a ``list`` of the namespace's Secrets is exactly what the Role must not allow. A ``get`` per
Secret at most every :data:`DEFAULT_TTL_S` seconds (and again at once after the server refused
the credentials: :meth:`SecretReader.invalidate`) picks up a rotated Secret without a restart
for a handful of requests per minute.

Secret values never reach a log, an error message or ``.status``: errors name the Secret, the
key and the policy field, never the value.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from shadowctl.kube import SECRET, KubeClient, KubeError, NotFound, ResourceRef
from shadowctl.policy.model import TlsSecrets
from shadowctl.sources.base import SourceError

DEFAULT_TTL_S = 30.0
"""How long a Secret read is reused: the longest a rotated Secret waits before it is used (without a 401)."""

CA_KEY = "ca.crt"
"""The key of a CA bundle in a Secret (cert-manager's and the service-account Secrets' name)."""
CERT_KEY, PRIVATE_KEY = "tls.crt", "tls.key"
"""The keys of a ``kubernetes.io/tls`` Secret: the client certificate (chain) and its private key."""


class SecretUnavailable(SourceError):
    """A Secret a policy names cannot be read, lacks the key, or does not hold what it should (no value shown)."""


def parse_secret_ref(text: str, default_key: str) -> tuple[str, str]:
    """``name/key`` (or just ``name``: the default key) as (name, key)."""
    name, _, key = text.partition("/")
    return name, key or default_key


def _decode(namespace: str, name: str, key: str, field: str, data: Mapping[str, str]) -> bytes:
    if key not in data:
        raise SecretUnavailable(f"Secret {namespace}/{name} has no key {key!r} ({field})")
    try:
        return base64.b64decode(data[key], validate=True)
    except ValueError:
        raise SecretUnavailable(f"Secret {namespace}/{name}: key {key!r} is not base64 ({field})") from None


def _text(namespace: str, name: str, key: str, field: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretUnavailable(f"Secret {namespace}/{name}: key {key!r} is not UTF-8 text ({field})") from None


async def _get_data(kube: KubeClient, namespace: str, name: str, field: str) -> dict[str, str]:
    try:
        secret = await kube.get(ResourceRef(SECRET, name, namespace))
    except NotFound:
        raise SecretUnavailable(f"Secret {namespace}/{name} ({field}) not found") from None
    except KubeError as exc:
        # The API's message names the Secret and the verb, never a value.
        raise SecretUnavailable(f"cannot read Secret {namespace}/{name} ({field}): {exc}") from exc
    data = secret.get("data") or {}
    return dict(data) if isinstance(data, dict) else {}


async def read_secret_value(kube: KubeClient, namespace: str, name: str, key: str, *, field: str) -> str:
    """The text under ``key`` of Secret ``namespace/name`` (read now, no cache); SecretUnavailable naming
    the policy ``field`` otherwise."""
    data = await _get_data(kube, namespace, name, field)
    return _text(namespace, name, key, field, _decode(namespace, name, key, field, data))


class SecretReader:
    """Reads the Secrets policies name, each reused for ``ttl`` seconds (see the module docstring).

    One reader serves the whole controller; entries are keyed by (namespace, name), so two
    policies naming one Secret share one ``get``.
    """

    def __init__(self, kube: KubeClient, *, ttl: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.ttl = ttl
        self.clock = clock
        self._held: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}
        self.reads = 0
        """Secrets read from the API server so far (a test counts them)."""

    def invalidate(self, namespace: str, name: str) -> None:
        """Forget ``namespace/name``: the next use reads it again (the server refused what it held)."""
        self._held.pop((namespace, name), None)

    async def _data(self, namespace: str, name: str, field: str) -> dict[str, str]:
        held = self._held.get((namespace, name))
        now = self.clock()
        if held is not None and now - held[0] < self.ttl:
            return held[1]
        self.reads += 1
        data = await _get_data(self.kube, namespace, name, field)
        self._held[(namespace, name)] = (now, data)
        return data

    async def raw(self, namespace: str, name: str, key: str, *, field: str) -> bytes:
        """The bytes under ``key``; SecretUnavailable naming ``field`` otherwise."""
        return _decode(namespace, name, key, field, await self._data(namespace, name, field))

    async def text(self, namespace: str, name: str, key: str, *, field: str) -> str:
        """The text under ``key`` (surrounding whitespace removed: a token file's newline)."""
        return _text(namespace, name, key, field, await self.raw(namespace, name, key, field=field))

    async def tls(self, namespace: str, ca: str | None, cert: str | None, *, field: str) -> TlsMaterial:
        """The PEM material of a policy's ``tls`` (``caSecret``: ``name/key``, key ``ca.crt`` by default;
        ``certSecret``: a ``kubernetes.io/tls`` Secret's name, keys ``tls.crt`` and ``tls.key``)."""
        ca_pem = cert_pem = key_pem = None
        if ca is not None:
            name, key = parse_secret_ref(ca, CA_KEY)
            ca_pem = await self.raw(namespace, name, key, field=f"{field}.caSecret")
        if cert is not None:
            cert_pem = await self.raw(namespace, cert, CERT_KEY, field=f"{field}.certSecret")
            key_pem = await self.raw(namespace, cert, PRIVATE_KEY, field=f"{field}.certSecret")
        return TlsMaterial(ca_pem, cert_pem, key_pem, where=f"{field} in namespace {namespace}")


@dataclass(frozen=True, repr=False)
class TlsMaterial:
    """A CA bundle and a client certificate with its key, PEM (never shown: ``repr`` names only ``where``)."""

    ca_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    where: str = "tls"

    def __repr__(self) -> str:
        return f"TlsMaterial({self.where})"

    def context(self) -> ssl.SSLContext:
        """A client SSLContext trusting only ``ca_pem`` (the system's CAs without one), presenting the client
        certificate if any; SecretUnavailable when the PEM does not load."""
        try:
            context = ssl.create_default_context(cadata=self.ca_pem.decode("ascii") if self.ca_pem else None)
        except (ssl.SSLError, ValueError, UnicodeDecodeError):
            raise SecretUnavailable(f"{self.where}: the CA is not a PEM certificate") from None
        if self.cert_pem is not None and self.key_pem is not None:
            load_cert_chain(context, self.cert_pem, self.key_pem, self.where)
        return context


def load_cert_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes, where: str) -> None:
    """Load a client certificate and key from memory.

    ``ssl`` reads them only from files: on Linux from an anonymous in-memory file
    (``memfd_create``, read through ``/proc/self/fd``), so the key never touches a disk (the
    controller's root filesystem is read-only); elsewhere from a private temporary file removed
    right after loading.
    """
    blob = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    fd = -1
    path = None
    try:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("shadowctl-client-cert")
            os.write(fd, blob)
            path = f"/proc/self/fd/{fd}"
        else:  # pragma: no cover - not Linux
            fd, path = tempfile.mkstemp(prefix="shadowctl-cert-")
            os.write(fd, blob)
        context.load_cert_chain(path)
    except (ssl.SSLError, OSError):
        raise SecretUnavailable(f"{where}: the client certificate or key is not PEM, or they do not match") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if path is not None and not path.startswith("/proc/"):  # pragma: no cover - not Linux
            os.unlink(path)


def tls_provider(kube: KubeClient, namespace: str, tls: TlsSecrets | None, *,
                 field: str) -> Callable[[], Awaitable[ssl.SSLContext]] | None:
    """A policy's ``tls`` as an SSLContext made from its Secrets, read again at every call (each connect, so a
    rotated certificate applies); None when the policy names no Secret."""
    if tls is None or (tls.ca_secret is None and tls.cert_secret is None):
        return None

    async def make() -> ssl.SSLContext:
        reader = SecretReader(kube, ttl=0.0)  # a fresh read per connect; connects are rare
        return (await reader.tls(namespace, tls.ca_secret, tls.cert_secret, field=field)).context()

    return make
