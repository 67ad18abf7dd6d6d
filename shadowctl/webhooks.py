"""The webhook adapter: POST a JSON payload to a policy's webhook, with its timeout and retries.

The controller sees only :class:`~shadowctl.controller.notify.WebhookPort` (an answer's status code, or
None when none came); httpx and its errors stay here.
"""

from __future__ import annotations

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
        for attempt in range(hook.retries + 1):
            try:
                response = await self._client.post(hook.url, json=payload, timeout=hook.timeout.total_seconds())
            except httpx.HTTPError as exc:
                log.warning("webhook.failed", webhook=hook.name, attempt=attempt + 1, error=str(exc) or type(exc).__name__)
            else:
                if response.status_code < 500:
                    return response.status_code
                log.warning("webhook.failed", webhook=hook.name, attempt=attempt + 1, status=response.status_code)
            if attempt < hook.retries:
                await self._sleep(min(5.0, 0.5 * 2**attempt))
        return None

    async def aclose(self) -> None:
        await self._client.aclose()
