"""The fault campaign's MQTT side: a real Mosquitto, a delaying TCP proxy in front of it, and the taps' stand-in.

The campaign's policies compare outputs over MQTT (``spec.analysis.outputs``), so the broker is part of every
shadow phase's verdict; its faults (``mqtt-down``, ``mqtt-slow``, ``mqtt-restart``) are global, like api-slow:

* :class:`Mosquitto`: the real broker (Debian package ``mosquitto``) on a fixed port, ``persistence false``,
  so a restart forgets every session, subscription and retained message; stopped and started again on the
  same port, as a broker pod behind its Service would be;
* :class:`DelayProxy`: what the controllers connect to (the policies' ``outputs.mqtt.broker``); it forwards
  bytes both ways, each chunk held ``delay`` seconds when set (``mqtt-slow``: events late, nothing lost);
  while the broker is down it accepts and closes at once (the controllers see the connection fail);
* :class:`Publisher`: the taps of every running rollout, in one asyncio task: ``pairs_per_s`` paired
  primary/candidate output events per rollout per second, straight to the broker (a tap is not behind the
  controllers' proxy). A bad candidate answers differently on :data:`BAD_DISAGREEMENT` of the requests, so its
  agreement fails. It reconnects when the broker comes back; what it published meanwhile is lost, as a tap's
  events are (their partners expire as missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import aiomqtt

from shadowctl.compare.events import Endpoint, OutputEvent, Variant
from shadowctl.sim.mosquitto import MOSQUITTO, start_broker

TOPIC = "shadowctl/outputs/{namespace}/{name}/{variant}"
"""Where a rollout's taps publish: the policies' default topic ``shadowctl/outputs/{namespace}/{service}/+``,
with the service named as the rollout (the route object's name)."""
ANSWER = "The capital of France is Paris, a city on the Seine."
WRONG = "I am sorry, but I cannot help with questions about geography today."
BAD_DISAGREEMENT = 0.5
"""The share of a bad candidate's answers that differ from the primary's (token-f1 well below 0.5). Not all of
them: the judge's agreement test cannot fail a candidate that never agrees (see docs/reliability.md)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One mosquitto process on 127.0.0.1:port without persistence; stop and start again on the same port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.config.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                               "max_queued_messages 100000\nmax_inflight_messages 1000\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if not os.path.exists(MOSQUITTO):
            raise RuntimeError(f"the campaign needs the mosquitto binary ({MOSQUITTO}; Debian package mosquitto)")
        self.proc = start_broker(self.config, self.log, self.host, self.port, timeout, new_session=True)

    def stop(self) -> None:
        """SIGKILL, as a broker pod's container dies: no clean DISCONNECT to anyone, every session gone."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None


class DelayProxy:
    """A TCP proxy in the campaign's event loop: controllers -> proxy -> broker, each chunk held `delay` s."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return  # the broker is down: the client sees its connection closed
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only :meth:`stop` cancels: end quietly (asyncio's stream callback reports a cancelled handler task
            # as an error in the log).
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward until either side closes; a chunk read while `delay` is set leaves `delay` s later, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                data = await reader.read(65536)
                queue.put_nowait((time.monotonic() + self.delay, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
            writer.close()  # the other direction ends too (its reader sees EOF)


class Publisher:
    """Paired output events for every running rollout, from one task (the taps' stand-in)."""

    def __init__(self, broker: Mosquitto, namespace: str, pairs_per_s: float = 10.0, tick_s: float = 0.2) -> None:
        self.broker = broker
        self.namespace = namespace
        self.pairs_per_s = pairs_per_s
        self.tick_s = tick_s
        self.rollouts: dict[str, bool] = {}
        """Running rollouts: name -> bad candidate."""
        self.published = 0
        self.lost = 0
        self.reconnects = 0
        self._rng = random.Random(0)
        self._carry: dict[str, float] = {}

    def _events(self, name: str, bad: bool) -> list[tuple[str, bytes]]:
        due = self._carry.get(name, 0.0) + self.pairs_per_s * self.tick_s
        n = int(due)
        self._carry[name] = due - n
        out = []
        now = time.time()
        for _ in range(n):
            rid = uuid.uuid4().hex
            candidate = WRONG if bad and self._rng.random() < BAD_DISAGREEMENT else ANSWER
            for variant, text in ((Variant.primary, ANSWER), (Variant.candidate, candidate)):
                event = OutputEvent(request_id=rid, variant=variant, shadow=variant is Variant.candidate,
                                    service=f"{self.namespace}/{name}", endpoint=Endpoint.chat,
                                    prompt_hash="0" * 64, output=text, status=200, started_at=now, e2e_s=0.3)
                topic = TOPIC.format(namespace=self.namespace, name=name, variant=variant.value)
                out.append((topic, event.to_json()))
        return out

    async def run(self) -> None:
        """Publish until cancelled; reconnect (every 0.2 s) while the broker is down."""
        while True:
            try:
                async with aiomqtt.Client(self.broker.host, self.broker.port, keepalive=10,
                                          identifier=f"faults-taps-{uuid.uuid4().hex[:8]}") as client:
                    while True:
                        started = time.monotonic()
                        for name, bad in list(self.rollouts.items()):
                            for topic, payload in self._events(name, bad):
                                await client.publish(topic, payload, qos=0)
                                self.published += 1
                        await asyncio.sleep(max(0.0, self.tick_s - (time.monotonic() - started)))
            except aiomqtt.MqttError:
                self.reconnects += 1
                # What the taps would have published while the broker was down is lost.
                for name, bad in list(self.rollouts.items()):
                    self.lost += len(self._events(name, bad))
                await asyncio.sleep(0.2)
