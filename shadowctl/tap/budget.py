"""The shadow GPU budget (issue 18 item 3): what one tap process may send the candidate off the users' path.

A mirrored copy (and a resent baseline copy) costs a GPU that is not serving users: with a rewrite candidate it
is the primary's own server. The route setting's ``budget`` caps it per tap process with two token buckets
(copies per second, tokens per second) and a back-off on the candidate's queue:

- **Rate**: a copy is sent only when both buckets hold its cost; each bucket holds at most one second of its
  rate (a burst of users' requests cannot turn into a burst of copies). A copy's token cost is an estimate made
  before it is sent: its body's bytes / 4 (the prompt) plus its ``max_tokens`` (the answer at most; the budget's
  ``maxTokens`` caps it and sets it where the request has none, so the estimate is an upper bound).
- **Queue**: with ``maxQueue``, :class:`QueueWatch` reads the candidate's ``vllm:num_requests_waiting`` from its
  ``/metrics`` every :data:`SCRAPE_EVERY_S` (each read bounded: :data:`SCRAPE_TIMEOUT_S`,
  :data:`SCRAPE_MAX_BYTES`). Above ``maxQueue``, the share of copies the budget lets through halves (down to 0);
  at or below it, it grows back by :data:`RECOVER_STEP` per read (additive increase, multiplicative decrease). A
  read that fails (timeout, refused, too large, no such series) counts as above: the tap cannot see the queue,
  so it backs off rather than guess. Which copies the share keeps is chosen by the request id's bucket
  (:func:`shadowctl.compare.routing.in_share`), the same on every tap.

Users' requests are never delayed by any of this: a copy over budget is skipped (counted), never queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import structlog

from shadowctl.compare.routing import Budget, in_share

log = structlog.get_logger(__name__)

SCRAPE_EVERY_S = 1.0
SCRAPE_TIMEOUT_S = 1.0
SCRAPE_MAX_BYTES = 4 * 1024 * 1024
"""A /metrics page larger than this is not read to its end (a failed read)."""
RECOVER_STEP = 0.1
MIN_SHARE = 1 / 64
"""Below this the share is 0 (halving never reaches 0 by itself)."""
WAITING = re.compile(rb"^vllm:num_requests_waiting(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)


def queue_length(page: bytes) -> float | None:
    """The sum of every ``vllm:num_requests_waiting`` sample on a Prometheus text page; None without one."""
    values = [float(m.group(1)) for m in WAITING.finditer(page)]
    if not values or any(math.isnan(v) for v in values):
        return None
    return sum(values)


@dataclass
class _Bucket:
    rate: float
    level: float
    at: float

    def take(self, cost: float, now: float) -> bool:
        """Refill for the time passed (at most one second of rate), then take `cost` if there is enough (a cost
        above a full bucket is taken from a full one, leaving a debt)."""
        self.level = min(self.rate, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < min(cost, self.rate):
            return False
        self.level -= cost
        return True


@dataclass
class BudgetGate:
    """The buckets and the back-off share of one tap process for one budget (kept while the budget is the same)."""

    budget: Budget
    clock: Callable[[], float] = time.monotonic
    share: float = 1.0
    """Share of copies the queue back-off lets through (1: all)."""
    admitted: int = 0
    skipped_rate: int = 0
    skipped_queue: int = 0
    _requests: _Bucket | None = field(default=None, init=False)
    _tokens: _Bucket | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        now = self.clock()
        b = self.budget
        self._requests = _Bucket(b.requests_per_second, b.requests_per_second, now) if b.requests_per_second else None
        self._tokens = _Bucket(b.tokens_per_second, b.tokens_per_second, now) if b.tokens_per_second else None

    def admit(self, request_id: str, cost_tokens: int) -> str | None:
        """None when the copy may go; else why not (``skipped_queue``, ``skipped_budget``), counted."""
        if self.share < 1.0 and not in_share(request_id, self.share * 100):
            self.skipped_queue += 1
            return "skipped_queue"
        now = self.clock()
        if self._requests is not None and not self._requests.take(1, now):
            self.skipped_rate += 1
            return "skipped_budget"
        if self._tokens is not None and not self._tokens.take(cost_tokens, now):
            if self._requests is not None:
                self._requests.level += 1  # not sent: give the request back
            self.skipped_rate += 1
            return "skipped_budget"
        self.admitted += 1
        return None

    def observe_queue(self, waiting: float | None) -> None:
        """One read of the candidate's queue (None: could not read it): halve or grow the share."""
        limit = self.budget.max_queue
        if limit is None:
            return
        if waiting is None or waiting > limit:
            self.share = 0.0 if self.share / 2 < MIN_SHARE else self.share / 2
        else:
            self.share = min(1.0, self.share + RECOVER_STEP)


def token_cost(body: bytes, limit: int | None) -> int:
    """A copy's estimated tokens: its body's bytes / 4 plus its answer's limit."""
    return len(body) // 4 + (limit or 0)


class QueueWatch:
    """Reads the candidate's queue for a :class:`BudgetGate` while the gate wants it (see the module docstring)."""

    def __init__(self, client: httpx.AsyncClient, metrics_url: str, gate: BudgetGate,
                 every_s: float = SCRAPE_EVERY_S, timeout_s: float = SCRAPE_TIMEOUT_S,
                 max_bytes: int = SCRAPE_MAX_BYTES) -> None:
        self.client = client
        self.metrics_url = metrics_url
        self.gate = gate
        self.every_s = every_s
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.last: float | None = None
        """The last queue length read (None: the last read failed)."""

    async def read(self) -> float | None:
        """One bounded read of the candidate's ``vllm:num_requests_waiting``; None when it fails."""
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.client.stream("GET", self.metrics_url) as response:
                    if response.status_code != 200:
                        return None
                    page = bytearray()
                    async for chunk in response.aiter_bytes():
                        page += chunk
                        if len(page) > self.max_bytes:
                            return None
            return queue_length(bytes(page))
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            log.debug("tap.budget_queue_unreadable", url=self.metrics_url, error=type(exc).__name__)
            return None

    async def run(self) -> None:
        """Read and feed the gate every ``every_s`` until cancelled."""
        while True:
            self.last = await self.read()
            self.gate.observe_queue(self.last)
            await asyncio.sleep(self.every_s)

    async def stop(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
