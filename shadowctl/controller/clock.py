"""Time for the controller, injected: the real clock in production, a fake one in tests.

The core never reads the clock; the controller reads it here, once per tick,
and passes it down. Tests drive whole rollouts in seconds by advancing a fake
clock instead of waiting (``tests/fake_clock.py``: a test helper, so it is not
shipped in the package).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def iso(ts: float) -> str:
    """RFC 3339 UTC text for a timestamp (as Kubernetes writes times)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
