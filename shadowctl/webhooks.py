"""The webhook adapter: POST a JSON payload to a policy's webhook, signed, with its timeout and retries.

The controller sees only :class:`~shadowctl.controller.notify.WebhookPort` (an answer's status code, or
None when none came); httpx and its errors stay here.

Only the status line of an answer is read: the body is never downloaded (a receiver that streams
without end costs nothing: the size limit on an answer is zero bytes), and each attempt, connection
and headers included, ends within the webhook's timeout as a whole, not per read (a receiver that
trickles its headers cannot hold a tick). Redirects are not followed, to any host: a 3xx is the answer
(a confirm-promotion gate then stays closed: only 2xx opens it).

Where a request may go: the policy model refuses URLs that are not http(s), that carry credentials,
or whose host is a link-local or instance-metadata address
(:func:`shadowctl.policy.model.webhook_url_problem`). A name can still resolve to such an address
(``169.254.169.254.nip.io``, a decimal ``http://2852039166/``), so every address the host resolves to
is checked again here, before each attempt, and a forbidden one ends the call without a request. The
connection then resolves the name again; a DNS server that answers differently the second time
(rebinding) is beyond this check: the controller's NetworkPolicy (deploy/networkpolicy.yaml) is the
fence for that.

Signing (``signingSecret``): every request carries ``X-Shadowctl-Signature: t=<unix seconds>,v1=<hex>``
where ``<hex>`` is HMAC-SHA256, keyed with the Secret's value (its UTF-8 bytes), of ``<t>.<body>`` (the
decimal timestamp, a dot, and the exact body bytes). A receiver recomputes it, compares in constant
time and refuses a ``t`` older than a few minutes (a replayed request); docs/controller.md shows the
check. The key is read for every call (through the injected :data:`SigningKey`), so a rotated Secret
applies at once; a key that cannot be read means no request at all, never an unsigned one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from shadowctl.errors import ShadowctlError
from shadowctl.policy.model import Webhook, forbidden_address, webhook_url_problem

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Shadowctl-Signature"
DEFAULT_KEY = "key"
"""The Secret key that holds a webhook's signing key when ``signingSecret`` names only the Secret."""

SigningKey = Callable[[str, str, str], Awaitable[bytes]]
"""``key(namespace, secret_name, secret_key)``: the signing key's bytes; raises a ShadowctlError
(naming the Secret, never its value) when it cannot be read."""


def sign(key: bytes, body: bytes, timestamp: int) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body`` sent at ``timestamp`` (unix seconds)."""
    digest = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(key: bytes, body: bytes, header: str, now: float, tolerance_s: float = 300.0) -> bool:
    """What a receiver does with :data:`SIGNATURE_HEADER` (kept here so the tests and the docs' snippet agree)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(key, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


class WebhookRefused(ShadowctlError):
    """A webhook call was not made: its URL or an address its host resolves to is not allowed, or its
    signing key cannot be read."""


async def _check_addresses(url: str) -> None:
    """Refuse a URL whose host resolves to a link-local or metadata address (see the module docstring)."""
    problem = webhook_url_problem(url)
    if problem is not None:
        raise WebhookRefused(problem)
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # the connection reports the name error as a transport failure, retried as any other
    for info in infos:
        why = forbidden_address(str(info[4][0]))
        if why is not None:
            raise WebhookRefused(f"{host} resolves to {info[4][0]}, {why}")


class HttpWebhooks:
    """POSTs over one connection pool; transport errors and 5xx are retried ``hook.retries`` times."""

    def __init__(self, sleep: Callable[[float], Awaitable[None]], client: httpx.AsyncClient | None = None,
                 signing_key: SigningKey | None = None, wall: Callable[[], float] = time.time) -> None:
        self._sleep = sleep
        self._client = client or httpx.AsyncClient(trust_env=False)
        self._signing_key = signing_key
        self._wall = wall

    async def _key(self, hook: Webhook, namespace: str | None) -> bytes | None:
        if hook.signing_secret is None:
            return None
        name, _, key = hook.signing_secret.partition("/")
        if self._signing_key is None or namespace is None:
            raise WebhookRefused(f"webhook {hook.name!r} asks for signing (signingSecret) but this controller "
                                 "cannot read Secrets")
        return await self._signing_key(namespace, name, key or DEFAULT_KEY)

    async def post(self, hook: Webhook, payload: dict[str, Any], *, namespace: str | None = None) -> int | None:
        """The status code of the answer (2xx, 3xx or 4xx: final), None if only errors and 5xx came, or if
        the call was refused (an address not allowed, a signing key that cannot be read)."""
        limit = hook.timeout.total_seconds()
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            key = await self._key(hook, namespace)
        except ShadowctlError as exc:
            log.warning("webhook.refused", webhook=hook.name, error=str(exc))
            return None
        for attempt in range(hook.retries + 1):
            headers = {"content-type": "application/json"}
            try:
                async with asyncio.timeout(limit):
                    await _check_addresses(hook.url)
                    if key is not None:
                        headers[SIGNATURE_HEADER] = sign(key, body, int(self._wall()))
                    async with self._client.stream("POST", hook.url, content=body, headers=headers, timeout=limit,
                                                   follow_redirects=False) as response:
                        status = response.status_code
            except WebhookRefused as exc:
                log.warning("webhook.refused", webhook=hook.name, error=str(exc))
                return None
            except (httpx.HTTPError, TimeoutError) as exc:
                log.warning("webhook.failed", webhook=hook.name, attempt=attempt + 1,
                            error=str(exc) or type(exc).__name__)
            else:
                if status < 500:
                    return status
                log.warning("webhook.failed", webhook=hook.name, attempt=attempt + 1, status=status)
            if attempt < hook.retries:
                await self._sleep(min(5.0, 0.5 * 2**attempt))
        return None

    async def aclose(self) -> None:
        await self._client.aclose()
