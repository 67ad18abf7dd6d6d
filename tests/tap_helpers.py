"""Shared helpers for the tap and output-source tests: run a tap in-process, collect MQTT messages."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.events import Variant
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.proxy import (
    MirrorConfig,
    RunningServer,
    TapConfig,
    TapProxy,
    bound_port,
    default_topic,
    start_server,
)
from shadowctl.tap.publisher import BrokerSettings, EventPublisher


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningTap:
    url: str
    proxy: TapProxy
    metrics: TapMetrics
    publisher: EventPublisher | None
    topic: str
    running: RunningServer

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def running_tap(
    upstream: str,
    *,
    broker: tuple[str, int] | None = None,
    variant: Variant = Variant.primary,
    mirror: MirrorConfig | None = None,
    redact_prompts: bool = False,
    queue_size: int = 1000,
    broker_timeout_s: float = 5.0,
    **config_fields: Any,
) -> AsyncIterator[RunningTap]:
    metrics = TapMetrics(variant.value)
    topic = default_topic("ns", "chat", variant)
    publisher = None
    if broker is not None:
        settings = BrokerSettings(host=broker[0], port=broker[1], timeout_s=broker_timeout_s, keepalive_s=5)
        publisher = EventPublisher(settings, metrics, queue_size=queue_size, backoff_initial_s=0.05,
                                   backoff_max_s=0.2)
    config = TapConfig(upstream=upstream, variant=variant, namespace="ns", service="chat", topic=topic,
                       redact_prompts=redact_prompts, mirror=mirror, **config_fields)
    proxy = TapProxy(config, publisher, metrics)
    runner = await start_server(proxy, "127.0.0.1", 0)
    task = asyncio.create_task(publisher.run()) if publisher is not None else None
    try:
        yield RunningTap(f"http://127.0.0.1:{bound_port(runner)}", proxy, metrics, publisher, topic, runner)
    finally:
        await runner.cleanup()
        if task is not None:
            await cancel_and_wait(task)


@dataclass
class Collected:
    messages: list[bytes] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def collecting(host: str, port: int, topic: str) -> AsyncIterator[Collected]:
    """Subscribe (QoS 1) in the background and collect payloads."""
    out = Collected()

    async def loop() -> None:
        async with aiomqtt.Client(host, port) as client:
            await client.subscribe(topic, qos=1)
            out.ready.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                out.messages.append(message.payload)

    task = asyncio.create_task(loop())
    try:
        await asyncio.wait_for(out.ready.wait(), 10)
        yield out
    finally:
        await cancel_and_wait(task)


async def eventually(predicate: Callable[[], bool], limit: float = 10.0, what: str = "condition") -> None:
    """Wait until predicate() holds (polling); fail with a message after a generous timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
