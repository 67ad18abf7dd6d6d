"""Output comparison per rollout: one output source per policy in its shadow phase.

The hub starts a source (built by an injected factory: the MQTT adapter in
production, a double in tests) when a policy's shadow phase needs it, resets
its tally when a new phase starts, and stops it when the phase ends. It answers
the analyzer's questions "agreement counts since the phase started" and "the
candidate's paired latencies since the phase started" (per quantity).

Paired latencies survive a restart: a source starts from zero, so when the hub
starts one for a phase that already has pairs in `.status` (a restarted
controller, a new leader, a source that died) it keeps those as the base and
answers base + the new source's pairs. The base was written before the source
subscribed, so no pair is counted twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import structlog

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.comparators import AgreementTally
from shadowctl.errors import ShadowctlError
from shadowctl.judge.model import Paired
from shadowctl.policy.model import ShadowPolicy

log = structlog.get_logger(__name__)


class Snapshot(Protocol):
    @property
    def tally(self) -> AgreementTally: ...
    @property
    def latency(self) -> Mapping[str, Paired]: ...
    @property
    def connected(self) -> bool: ...


@runtime_checkable
class JudgeHealth(Protocol):
    """A source with an llm-judge comparator that can say why its judge gives no verdicts."""

    def judge_problem(self) -> str | None:
        """Why the judge's comparator has no data (the judge failed every pair it was asked about), or None."""
        ...


class OutputSourcePort(Protocol):
    """What the hub needs of an output source (the MQTT adapter satisfies it)."""

    async def run(self) -> None: ...
    def snapshot(self) -> Snapshot: ...
    def reset(self) -> None: ...


@dataclass
class _Entry:
    source: OutputSourcePort
    since: float
    task: asyncio.Task[None]
    carried: Mapping[str, Paired]
    """Paired latencies of this phase counted before the source started (restored from `.status`)."""


class OutputHub:
    """Keeps one running output source per policy that compares outputs."""

    def __init__(self, factory: Callable[[ShadowPolicy], OutputSourcePort]) -> None:
        self.factory = factory
        self._entries: dict[str, _Entry] = {}
        self.errors: dict[str, str] = {}

    def ensure(self, policy: ShadowPolicy, since: float, carried: Mapping[str, Paired] | None = None) -> None:
        """A source for `policy` counting from the phase that started at `since`; `carried`: that phase's
        paired latencies as `.status` holds them, counted on top of a source this call starts (a running
        source already counts them)."""
        entry = self._entries.get(policy.key)
        if entry is not None and not entry.task.done():
            if entry.since != since:
                entry.source.reset()
                entry.since = since
                entry.carried = dict(carried or {})
            return
        try:
            source = self.factory(policy)
        except ShadowctlError as exc:
            self.errors[policy.key] = str(exc)
            log.warning("outputs.unavailable", policy=policy.key, error=str(exc))
            return
        self.errors.pop(policy.key, None)
        task = asyncio.create_task(source.run(), name=f"outputs {policy.key}")
        self._entries[policy.key] = _Entry(source, since, task, dict(carried or {}))

    def tally(self, policy_key: str, since: float) -> AgreementTally | None:
        entry = self._entries.get(policy_key)
        if entry is None or entry.since != since:
            return None
        return entry.source.snapshot().tally

    def latency(self, policy_key: str, since: float) -> Mapping[str, Paired] | None:
        """The candidate's paired latencies per quantity since the phase started, those restored from
        `.status` included (None: no source for it)."""
        entry = self._entries.get(policy_key)
        if entry is None or entry.since != since:
            return None
        fresh = entry.source.snapshot().latency
        if not entry.carried:
            return fresh
        out = dict(fresh)
        for quantity, before in entry.carried.items():
            now = out.get(quantity)
            out[quantity] = before if now is None else before + now
        return out

    def judge_problem(self, policy_key: str) -> str | None:
        """Why the policy's llm-judge has no data when its judge keeps failing (None: fine, or no such source)."""
        entry = self._entries.get(policy_key)
        if entry is None or not isinstance(entry.source, JudgeHealth):
            return None
        return entry.source.judge_problem()

    def error(self, policy_key: str) -> str | None:
        """Why the policy has no output source, if it could not be built."""
        return self.errors.get(policy_key)

    async def stop(self, policy_key: str) -> None:
        entry = self._entries.pop(policy_key, None)
        if entry is not None:
            await cancel_and_wait(entry.task)

    async def close(self) -> None:
        for key in list(self._entries):
            await self.stop(key)
