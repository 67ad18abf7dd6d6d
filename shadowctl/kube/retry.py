"""Bounded retries with exponential backoff, jitter and ``Retry-After``.

Which failures are retried depends on whether repeating the request is safe:

* 429 and 503 are retried for every verb: the server says it did not act.
* Other 5xx, timeouts and connection errors are retried only for requests that
  are safe to repeat: reads, PUT (it carries a resourceVersion, so a repeat of
  an applied write is a 409, never a double write), merge patches, deletes.
  POST (create) and JSON patches are not: a timed-out create may have happened.
"""

from __future__ import annotations

import email.utils
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from shadowctl.kube.errors import Conflict, KubeError, Unavailable


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry. ``attempts`` counts the first try (1 = no retries)."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    jitter: float = 0.5
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("RetryPolicy.jitter must be within [0, 1]")

    def should_retry(self, err: KubeError, idempotent: bool, attempt: int) -> bool:
        """Whether failed try number ``attempt`` is tried again (the rules in this module's docstring)."""
        if attempt >= self.attempts or isinstance(err, Conflict):
            return False
        if err.status in (429, 503):
            return True
        if err.status is None and isinstance(err, Unavailable):
            return idempotent
        return err.status is not None and err.status >= 500 and idempotent

    def delay(
        self, attempt: int, retry_after: float | None, rand: Callable[[], float] = random.random
    ) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based).

        A server's ``Retry-After`` wins (capped at ``max_retry_after``); otherwise
        ``base_delay * 2**(attempt-1)`` capped at ``max_delay``, of which the
        ``jitter`` fraction is randomised so that many clients do not retry in step.
        """
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        full: float = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return full * (1.0 - self.jitter) + full * self.jitter * rand()


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
