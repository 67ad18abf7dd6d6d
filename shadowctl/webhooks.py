"""The webhook adapter: POST a JSON payload to a policy's webhook, with its timeout and retries.

The controller sees only :class:`~shadowctl.controller.notify.WebhookPort` (an answer's status code, or
None when none came); httpx and its errors stay here.

Only the status line of an answer is read: the body is never downloaded (a receiver that streams
without end costs nothing), and each attempt, connection and headers included, ends within the
webhook's timeout as a whole, not per read (a receiver that trickles its headers cannot hold a
tick). Redirects are not followed: a 3xx is the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import structlog

from shadowctl.policy.model import Webhook

log = structlog.get_logger(__name__)


class HttpWebhooks:
    """POSTs over one connection pool; transport errors and 5xx are retried ``hook.retries`` times."""

    def __init__(self, sleep: Callable[[float], Awaitable[None]], client: httpx.AsyncClient | None = None) -> None:
        self._sleep = sleep
        self._client = client or httpx.AsyncClient()

    async def post(self, hook: Webhook, payload: dict[str, Any]) -> int | None:
        """The status code of the answer (2xx, 3xx or 4xx: final), None if only errors and 5xx came."""
        limit = hook.timeout.total_seconds()
        for attempt in range(hook.retries + 1):
            try:
                async with asyncio.timeout(limit):
                    async with self._client.stream("POST", hook.url, json=payload, timeout=limit,
                                                   follow_redirects=False) as response:
                        status = response.status_code
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
