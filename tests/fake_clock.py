"""A clock for tests: time moves only when a test says so (the controller takes its clock injected).

A test helper, kept out of the package: production code has ``SystemClock`` only.
"""

from __future__ import annotations

import asyncio


class FakeClock:
    """A clock that moves only when told to; `sleep` returns once `advance` passed its deadline."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._changed = asyncio.Event()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._changed.set()

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + seconds
        while self._now < deadline:
            self._changed.clear()
            await self._changed.wait()
