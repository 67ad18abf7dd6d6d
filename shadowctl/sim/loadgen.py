"""A load generator for the local environment: a realistic OpenAI request mix at Poisson arrivals.

Arrivals are open-loop (exponential gaps at ``rps``, scheduled on absolute
times, so a slow response does not slow the schedule) up to ``concurrency``
requests in flight; an arrival that finds every slot taken waits for one and is
counted as ``late``, which is how an overloaded target shows up. It stops by
itself after ``duration_s`` or ``max_requests``, whichever comes first, then
waits at most ``drain_timeout_s`` for requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from shadowctl.sim.errors import SimError
from shadowctl.sim.logs import log_to_stderr
from shadowctl.sim.prompts import PromptMix, RequestSpec, sample_request


@dataclass(frozen=True)
class LoadConfig:
    """What to send, how fast, and for how long."""

    url: str
    rps: float = 10.0
    duration_s: float | None = 60.0
    max_requests: int | None = None
    concurrency: int = 32
    model: str = "sim-model"
    seed: int | None = None
    mix: PromptMix = field(default_factory=PromptMix)
    headers: Mapping[str, str] = field(default_factory=dict)
    traced: bool = True
    """Send a fresh W3C ``traceparent`` with each request, as an instrumented client does (unless ``headers``
    has one), so that a pair's output event points at a trace."""
    request_timeout_s: float = 120.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise SimError(f"load generator: url must start with http:// or https://, got {self.url!r}")
        if not (self.rps > 0 and math.isfinite(self.rps)):
            raise SimError(f"load generator: rps must be a positive number, got {self.rps!r}")
        if self.duration_s is None and self.max_requests is None:
            raise SimError("load generator: give a duration or a request count (it must stop by itself)")
        if self.duration_s is not None and self.duration_s <= 0:
            raise SimError(f"load generator: duration must be > 0 seconds, got {self.duration_s!r}")
        if self.max_requests is not None and self.max_requests < 1:
            raise SimError(f"load generator: request count must be >= 1, got {self.max_requests!r}")
        if self.concurrency < 1:
            raise SimError(f"load generator: concurrency must be >= 1, got {self.concurrency!r}")


@dataclass(frozen=True)
class Outcome:
    """One request's result; ``status`` None means no HTTP response (``error`` says why)."""

    category: str
    path: str
    stream: bool
    status: int | None
    latency_s: float
    ttft_s: float | None = None
    completion_tokens: int | None = None
    error: str | None = None


@dataclass
class LoadResult:
    """Everything the run counted."""

    elapsed_s: float = 0.0
    sent: int = 0
    late: int = 0
    cancelled: int = 0
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return len(self.outcomes)

    @property
    def status_counts(self) -> Counter[str]:
        """Responses by HTTP status (as text), and ``"error"`` for requests without a response."""
        return Counter(str(o.status) if o.status is not None else "error" for o in self.outcomes)

    @property
    def ok(self) -> int:
        return sum(1 for o in self.outcomes if o.status is not None and 200 <= o.status < 300)

    @staticmethod
    def percentile(values: list[float], q: float) -> float | None:
        """The ``q`` quantile (0..1, nearest rank) of ``values``; None when empty."""
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def summary(self) -> dict[str, Any]:
        ok_latency = [o.latency_s for o in self.outcomes if o.status == 200]
        ttfts = [o.ttft_s for o in self.outcomes if o.ttft_s is not None]
        return {
            "elapsed_s": round(self.elapsed_s, 3),
            "sent": self.sent,
            "completed": self.completed,
            "ok": self.ok,
            "late": self.late,
            "cancelled": self.cancelled,
            "status": dict(self.status_counts),
            "by_category": dict(Counter(o.category for o in self.outcomes)),
            "achieved_rps": round(self.sent / self.elapsed_s, 3) if self.elapsed_s > 0 else None,
            "latency_s": {f"p{int(q * 100)}": self.percentile(ok_latency, q) for q in (0.5, 0.95, 0.99)},
            "ttft_s": {f"p{int(q * 100)}": self.percentile(ttfts, q) for q in (0.5, 0.95, 0.99)},
        }


async def _read_stream(resp: aiohttp.ClientResponse, start: float) -> tuple[float | None, int | None]:
    """Time to the first content chunk, and ``usage.completion_tokens`` if the stream reported it."""
    ttft: float | None = None
    tokens: int | None = None
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        try:
            event = json.loads(data)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        usage = event.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            tokens = usage["completion_tokens"]
        if ttft is None:
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or choice.get("text"):
                    ttft = time.monotonic() - start
                    break
    return ttft, tokens


class LoadGenerator:
    """Send requests by a :class:`LoadConfig`; ``await run()`` returns a :class:`LoadResult`.

    Pass an ``aiohttp.ClientSession`` to reuse one; otherwise the generator opens and closes its own.
    """

    def __init__(self, config: LoadConfig, *, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self._session = session
        self._rng = random.Random(config.seed)
        self._stop = asyncio.Event()
        self.result = LoadResult()

    def stop(self) -> None:
        """End the run early (requests in flight still finish, within the drain timeout)."""
        self._stop.set()

    async def run(self) -> LoadResult:
        cfg = self.config
        own = self._session is None
        session = self._session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.request_timeout_s))
        slots = asyncio.Semaphore(cfg.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + cfg.duration_s if cfg.duration_s is not None else math.inf
        next_at = start
        try:
            while not self._stop.is_set():
                if cfg.max_requests is not None and self.result.sent >= cfg.max_requests:
                    break
                next_at += self._rng.expovariate(cfg.rps)
                if next_at >= end:
                    break
                delay = next_at - loop.time()
                if delay > 0:
                    try:
                        async with asyncio.timeout(delay):
                            await self._stop.wait()
                        break
                    except TimeoutError:
                        pass
                if slots.locked():
                    self.result.late += 1
                await slots.acquire()
                spec = sample_request(self._rng, cfg.mix, model=cfg.model)
                self.result.sent += 1
                task = asyncio.create_task(self._one(session, spec, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=cfg.drain_timeout_s)
                for task in pending:
                    task.cancel()
                self.result.cancelled = len(pending)
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self.result.elapsed_s = loop.time() - start
            if own:
                await session.close()
        return self.result

    async def _one(self, session: aiohttp.ClientSession, spec: RequestSpec, slots: asyncio.Semaphore) -> None:
        url = self.config.url.rstrip("/") + spec.path
        start = time.monotonic()
        status: int | None = None
        ttft: float | None = None
        tokens: int | None = None
        error: str | None = None
        try:
            headers = dict(self.config.headers)
            if self.config.traced and not any(k.lower() == "traceparent" for k in headers):
                headers["traceparent"] = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
            async with session.post(url, json=spec.body, headers=headers) as resp:
                status = resp.status
                if spec.stream and resp.status == 200:
                    ttft, tokens = await _read_stream(resp, start)
                else:
                    body = await resp.read()
                    if resp.status == 200:
                        try:
                            usage = json.loads(body).get("usage") or {}
                            tokens = usage.get("completion_tokens")
                        except (ValueError, AttributeError):
                            error = "the 200 response is not JSON"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            slots.release()
        self.result.outcomes.append(
            Outcome(spec.category, spec.path, spec.stream, status, time.monotonic() - start, ttft, tokens, error)
        )


async def run_load(config: LoadConfig) -> LoadResult:
    """Run one load generation to its end."""
    return await LoadGenerator(config).run()


def _headers(values: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    for item in values:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            parser.error(f"--header {item!r}: expected NAME:VALUE")
        out[name.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m shadowctl.sim.loadgen --url URL --rps 20 --duration 60``: prints a summary."""
    log_to_stderr()
    parser = argparse.ArgumentParser(prog="python -m shadowctl.sim.loadgen",
                                     description="Send an OpenAI-style request mix at Poisson arrivals.")
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--rps", type=float, default=10.0, help="mean arrivals per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to send for (0: no limit, needs --count)")
    parser.add_argument("--count", type=int, default=None, help="stop after this many requests")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--model", default="sim-model")
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of streaming requests, 0..1")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--header", action="append", default=[], help="NAME:VALUE, repeatable (e.g. Host:chat.llm)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        config = LoadConfig(
            url=args.url, rps=args.rps, duration_s=args.duration or None, max_requests=args.count,
            concurrency=args.concurrency, model=args.model, seed=args.seed,
            mix=PromptMix(stream_share=args.stream_share), headers=_headers(args.header, parser),
        )
    except (SimError, ValueError) as exc:
        parser.error(str(exc))
    try:
        result = asyncio.run(run_load(config))
    except KeyboardInterrupt:
        return 130
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:>12}: {value}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
