"""The MQTT output source: subscribes to the taps' output events and turns them into agreement counts.

The adapter does only I/O: it receives payloads, parses them strictly
(malformed ones are counted and skipped, never fatal), reads the clock, and
hands events to the pure :class:`~shadowctl.compare.pairing.Pairer` and
comparators in ``shadowctl.compare``. What it exposes is a snapshot: the
:class:`~shadowctl.compare.comparators.AgreementTally` so far, the pairing
counters (the mirror delivery rate is a health signal of its own), and whether
the broker is reachable right now, so that the controller never reads "no
events" as "all agree".

Subscriptions use QoS 1 and a clean session: events published while this
source is disconnected are lost, their partners expire, and the ``missing``
counters say so.

Partitioned (``spec.analysis.outputs.mqtt.partitions`` P > 1): the taps publish each request's events
under one more topic level, its partition (:mod:`shadowctl.compare.partitions`); a source given
``mine`` subscribes to those partitions only, so several worker processes pair disjoint partitions,
and with ``share_group`` each subscription is an MQTT 5 shared subscription (``$share/<group>/...``),
so a second worker in the same group stands by for the same partitions. Memory: the pairer holds at
most ``max_pending`` request ids, and the client's queue of received messages not yet paired at most
``max_queued`` (beyond it the client drops messages, whose partners then expire as missing).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiomqtt
import structlog

from shadowctl.aio import cancel_and_wait, cancel_requested
from shadowctl.compare.comparators import (
    AgreementTally,
    BoundComparator,
    Embedder,
    PairResult,
    TallyBuilder,
    build_comparators,
    compare_pair,
)
from shadowctl.compare.events import MalformedEvent, OutputEvent, Variant, parse_broker_url, parse_event
from shadowctl.compare.latency import QUANTITIES, pair_latency
from shadowctl.compare.pairing import Pair, Pairer
from shadowctl.compare.partitions import partition_filters, shared
from shadowctl.compare.redaction import redact
from shadowctl.judge.model import Paired, PairedSketch
from shadowctl.policy.model import BaselineMode, MetricKind, Redaction, RedactionMode, ShadowPolicy
from shadowctl.sources.base import SourceConfigError, SourceError
from shadowctl.sources.llmjudge import PairJudge
from shadowctl.sources.mqtt_read import Received, paho_version, read_in_bulk, take_publishes

log = structlog.get_logger(__name__)

MAX_EVENT_BYTES = 8 * 1024 * 1024
"""An event larger than this is counted as malformed and never parsed (the tap caps outputs; a long
prompt is far smaller): the broker accepts up to 256 MB per message unless told otherwise."""

DRAIN_BATCH = 64
"""Messages taken from the client's queue per wait on it (:meth:`MqttOutputSource.events`)."""

#: MQTT v3.1.1 connect return codes and v5 reason codes that mean "bad credentials / not allowed".
_AUTH_CODES = frozenset({4, 5, 134, 135})


Incoming = aiomqtt.Message | Received
"""A message in the source's inbox: from aiomqtt, or taken off the connection directly (:func:`take_publishes`)."""


class OutputSourceError(SourceError):
    """The output source cannot deliver events."""


class BrokerUnavailable(OutputSourceError):
    """The broker cannot be reached, or the connection was lost."""


class BrokerRejected(OutputSourceError):
    """The broker refused the credentials or the subscription."""


class EmbedderUnavailable(OutputSourceError):
    """The semantic comparator's local embedding model cannot be loaded."""


@dataclass(frozen=True, slots=True)
class OutputSnapshot:
    """Where output comparison stands: counts for the judge plus health."""

    tally: AgreementTally
    latency: dict[str, Paired]
    """Per latency quantity the source collects (ttft, tpot, e2e): the candidate's pairs since the last reset."""
    pairing: dict[str, object]
    pending: int
    malformed: int
    connected: bool
    last_error: str | None
    judge: dict[str, int] | None = None
    """The llm-judge comparator's counters (offered, judged, wins, ties, losses, failed, capped, requests)."""


def _rc(exc: aiomqtt.MqttError) -> int | None:
    rc = getattr(exc, "rc", None)
    if rc is None:
        return None
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


class MqttOutputSource:
    """Subscribes to a topic filter, pairs events by request id, and tallies agreement."""

    def __init__(
        self,
        broker_url: str,
        topic: str,
        comparators: Sequence[BoundComparator],
        *,
        pair_ttl_s: float,
        expect_baseline: bool,
        username: str | None = None,
        password: str | None = None,
        password_provider: Callable[[], Awaitable[str]] | None = None,
        tls_context: ssl.SSLContext | None = None,
        tls_provider: Callable[[], Awaitable[ssl.SSLContext]] | None = None,
        max_pending: int = 100_000,
        latency: Sequence[str] = (),
        timeout_s: float = 10.0,
        backoff_max_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        redaction: Redaction | None = None,
        partitions: int = 1,
        mine: Sequence[int] | None = None,
        share_group: str | None = None,
        max_queued: int = 100_000,
        model_judge: PairJudge | None = None,
    ) -> None:
        """``partitions``: how many partitions the taps publish on (1: none); ``mine``: the partitions this
        source pairs (None: all); ``share_group``: subscribe as a member of this MQTT 5 shared-subscription
        group (None: a plain subscription); ``max_queued``: received messages waiting to be paired, at most."""
        try:
            self.host, self.port, tls = parse_broker_url(broker_url)
        except ValueError as exc:
            raise SourceConfigError(f"outputs.mqtt.broker: {exc}") from exc
        self.topic = topic
        try:
            filters = partition_filters(topic, partitions, mine)
            self.filters = [shared(share_group, f) for f in filters] if share_group is not None else filters
        except ValueError as exc:
            raise SourceConfigError(f"outputs.mqtt: {exc}") from exc
        """What the source subscribes to: the topic, its partitions, each shared in ``share_group`` if given."""
        self.share_group = share_group
        self.max_queued = max_queued
        self.comparators = list(comparators)
        self.redaction = redaction if redaction is not None and redaction.mode is not RedactionMode.none else None
        """The policy's redaction, applied to every event as it arrives, whatever the tap that sent it did."""
        self._slow = any(c.slow for c in self.comparators)
        self.model_judge = model_judge
        """The llm-judge comparator's judge, if the policy has one: it gets every candidate pair, in the background."""
        self.username = username
        self.password = password
        self.password_provider = password_provider
        """Read at every (re)connect, so a rotated Secret applies; overrides ``password``."""
        self.tls_context = tls_context if tls_context is not None else (ssl.create_default_context() if tls else None)
        self.tls_provider = tls_provider
        """Read at every (re)connect (a CA and client certificate from Secrets); overrides ``tls_context``."""
        self.timeout_s = timeout_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.pairer = Pairer(pair_ttl_s, max_pending=max_pending, expect_baseline=expect_baseline)
        self._tally = TallyBuilder()
        unknown = sorted(set(latency) - set(QUANTITIES))
        if unknown:
            raise SourceConfigError(f"unknown latency quantity {unknown[0]!r}; use one of {', '.join(QUANTITIES)}")
        self.quantities = tuple(dict.fromkeys(latency))
        """The latency quantities whose pairs are collected (those the policy's paired-latency metrics judge)."""
        self._latency = {q: PairedSketch() for q in self.quantities}
        self.malformed = 0
        self.connected = False
        self.last_error: str | None = None
        self.subscribed = asyncio.Event()
        self._client_id = f"shadowctl-outputs-{uuid.uuid4().hex[:12]}"
        self._inbox: asyncio.Queue[Incoming] | None = None
        self._said_slow = False

    @classmethod
    def from_policy(
        cls,
        policy: ShadowPolicy,
        *,
        password: str | None = None,
        password_provider: Callable[[], Awaitable[str]] | None = None,
        embedder: Embedder | None = None,
        tls_context: ssl.SSLContext | None = None,
        tls_provider: Callable[[], Awaitable[ssl.SSLContext]] | None = None,
        mine: Sequence[int] | None = None,
        share_group: str | None = None,
        model_judge: PairJudge | None = None,
    ) -> MqttOutputSource:
        """Build the source a policy's ``analysis.outputs`` describes (topic placeholders filled in); ``mine``
        and ``share_group``: a pairing worker's partitions and shared-subscription group (see ``__init__``)."""
        outputs = policy.spec.analysis.outputs
        if outputs is None:
            raise SourceConfigError(f"{policy.key}: spec.analysis.outputs is not set; nothing to compare")
        target = policy.spec.target
        service = target.istio.virtual_service if target.istio is not None else (
            target.knative.service if target.knative is not None else policy.metadata.name
        )
        try:
            topic = outputs.mqtt.topic.format(
                namespace=policy.metadata.namespace, service=service, name=policy.metadata.name
            )
        except (KeyError, IndexError, ValueError) as exc:
            raise SourceConfigError(
                f"{policy.key}: spec.analysis.outputs.mqtt.topic {outputs.mqtt.topic!r}: unknown placeholder {exc}; "
                "use {namespace}, {service} or {name}"
            ) from exc
        comparators = build_comparators(outputs.comparators, embedder=embedder)
        quantities = [m.quantity.value for m in policy.spec.analysis.metrics
                      if m.kind is MetricKind.paired_latency and m.quantity is not None]
        return cls(
            outputs.mqtt.broker,
            topic,
            comparators,
            pair_ttl_s=outputs.pair_ttl.total_seconds(),
            expect_baseline=outputs.baseline.mode in (BaselineMode.primary_replica, BaselineMode.resend),
            latency=quantities,
            username=outputs.mqtt.username,
            password=password,
            password_provider=password_provider,
            tls_context=tls_context,
            tls_provider=tls_provider,
            redaction=outputs.redaction,
            partitions=outputs.mqtt.partitions,
            mine=mine,
            share_group=share_group,
            model_judge=model_judge,
        )

    # ------------------------------------------------------------------ raw stream

    def _client(self) -> aiomqtt.Client:
        """The MQTT client, reading its connection in bulk and taking QoS 1 messages off it directly
        (:mod:`shadowctl.sources.mqtt_read`; plain TCP)."""
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=self._client_id,
            tls_context=self.tls_context,
            timeout=self.timeout_s,
            keepalive=30,
            # Shared subscriptions are MQTT 5's; a plain subscription keeps 3.1.1, which every broker speaks.
            protocol=aiomqtt.ProtocolVersion.V5 if self.share_group is not None else None,
            max_queued_incoming_messages=self.max_queued,
            # The inbox also holds the messages take_publishes delivers (Received): aiomqtt only puts its own
            # into it and hands out whatever it holds (client.messages), so its type says Message alone.
            queue_type=cast("type[asyncio.Queue[aiomqtt.Message]]", self._inbox_type()),
        )
        if read_in_bulk(client) and not take_publishes(client, self._deliver) and not self._said_slow:
            self._said_slow = True  # once per source, not at every reconnect
            log.info("output source: messages go through paho's own reader (slower); this paho-mqtt version is "
                     "not one the direct path was written for", paho=paho_version())
        return client

    def _deliver(self, message: Received) -> None:
        """Queue a message taken directly off the connection, as aiomqtt queues those it receives (beyond
        ``max_queued`` it is dropped and its partner expires as missing)."""
        inbox = self._inbox
        if inbox is None:
            return
        try:
            inbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("output source: message queue is full; discarding a message", max_queued=self.max_queued)

    def _inbox_type(self) -> type[asyncio.Queue[Incoming]]:
        """The queue class the client keeps received messages in, which hands this source its instance.

        Taking one message at a time through ``client.messages`` costs a task and an ``asyncio.wait`` per
        message, about a quarter of the source's CPU at a few thousand events a second
        (docs/scaling.md); :meth:`_received` takes what else is already queued without them."""
        source = self

        class Inbox(asyncio.Queue[Incoming]):
            def __init__(self, maxsize: int = 0) -> None:
                super().__init__(maxsize)
                source._inbox = self

        return Inbox

    def _received(self, first: Incoming) -> list[Incoming]:
        """`first` and up to DRAIN_BATCH - 1 messages already waiting behind it (so the loop still gets a
        turn every DRAIN_BATCH messages: the controller's Lease and ticks run on it)."""
        batch = [first]
        inbox = self._inbox
        while inbox is not None and len(batch) < DRAIN_BATCH and not inbox.empty():
            batch.append(inbox.get_nowait())
        return batch

    def _wrap(self, exc: BaseException, doing: str) -> OutputSourceError:
        where = f"mqtt broker {self.host}:{self.port}"
        if isinstance(exc, aiomqtt.MqttError) and _rc(exc) in _AUTH_CODES:
            return BrokerRejected(f"{where} rejected {doing}: {exc} (check outputs.mqtt.username and the password)")
        return BrokerUnavailable(f"{where}: {doing} failed: {exc}")

    async def events(self) -> AsyncIterator[OutputEvent]:
        """Valid events as they arrive; malformed payloads are counted and skipped.

        Raises :class:`BrokerUnavailable` or :class:`BrokerRejected` (chained to the MQTT error)
        when the connection cannot be made or is lost.
        """
        doing = "connecting"
        if self.password_provider is not None:
            try:
                self.password = await self.password_provider()
            except SourceError as exc:
                # Retried with backoff like an unreachable broker: the Secret may appear (or be fixed) later.
                raise BrokerUnavailable(f"mqtt broker {self.host}:{self.port}: no password: {exc}") from exc
        if self.tls_provider is not None:
            try:
                self.tls_context = await self.tls_provider()
            except SourceError as exc:
                raise BrokerUnavailable(f"mqtt broker {self.host}:{self.port}: no TLS material: {exc}") from exc
        try:
            async with self._client() as client:
                shown = self.filters[0] if len(self.filters) == 1 else self.filters
                doing = f"subscribing to {shown!r}"
                topics = self.filters[0] if len(self.filters) == 1 else [(f, 1) for f in self.filters]
                granted = await client.subscribe(topics, qos=1, timeout=self.timeout_s)
                codes = [getattr(g, "value", g) for g in granted]
                if any(isinstance(c, int) and c >= 0x80 for c in codes):
                    raise BrokerRejected(f"mqtt broker {self.host}:{self.port} refused the subscription to "
                                         f"{shown!r} (codes {codes})")
                self.connected = True
                self.last_error = None
                self.subscribed.set()
                doing = "receiving"
                async for first in client.messages:
                    for message in self._received(first):
                        payload: Any = message.payload
                        if isinstance(payload, bytearray):
                            payload = bytes(payload)
                        if not isinstance(payload, bytes | str) or len(payload) > MAX_EVENT_BYTES:
                            self.malformed += 1
                            continue
                        try:
                            yield parse_event(payload)
                        except MalformedEvent as exc:
                            self.malformed += 1
                            log.debug("malformed output event", topic=str(message.topic), error=str(exc))
        except (aiomqtt.MqttError, OSError) as exc:
            raise self._wrap(exc, doing) from exc
        finally:
            self.connected = False
            self.subscribed.clear()

    # ------------------------------------------------------------------ pairing and tally

    def ingest(self, event: OutputEvent) -> None:
        """Pair one event at the current time and add the resulting comparisons to the tally."""
        if self.redaction is not None:
            event = redact(event, self.redaction.mode, self.redaction.max_chars)
        pairs = self.pairer.add(event, self.clock())
        if pairs and self._latency:
            self._add_latency(pairs)
        for pair in pairs:
            self._tally.add(compare_pair(pair, self.comparators))
        if pairs and self.model_judge is not None:
            self._offer_judge(pairs)

    def _offer_judge(self, pairs: list[Pair]) -> None:
        """Hand the pairs to the model judge (it returns at once); its verdicts count in the tally of now,
        not in one started after a :meth:`reset`."""
        judge = self.model_judge
        assert judge is not None
        tally = self._tally

        def deliver(result: PairResult) -> None:
            if self._tally is tally:
                tally.add(result)

        for pair in pairs:
            judge.offer(pair, deliver)

    def _add_latency(self, pairs: list[Pair]) -> None:
        """Count the candidate's pairs per latency quantity (a failed side: not a latency pair)."""
        for pair in pairs:
            if pair.variant is not Variant.candidate:
                continue
            for quantity, sketch in self._latency.items():
                values = pair_latency(pair, quantity)
                if values is None:
                    sketch.errored()
                else:
                    sketch.add(*values)

    async def ingest_async(self, event: OutputEvent) -> None:
        """:meth:`ingest`, with slow comparators (an embedding model) scored in a worker thread.

        The controller's loop also renews the leader Lease and runs every policy's tick; an
        embedding takes about 10 ms of CPU (torch releases the GIL while it computes), so scoring
        on the loop would stall all of them under load. Pairing stays on the loop (cheap, and the
        pairer is not thread-safe); a comparison that ends after :meth:`reset` is not counted in
        the new tally.
        """
        if not self._slow:
            self.ingest(event)
            return
        if self.redaction is not None:
            event = redact(event, self.redaction.mode, self.redaction.max_chars)
        pairs = self.pairer.add(event, self.clock())
        if not pairs:
            return
        if self._latency:
            self._add_latency(pairs)
        if self.model_judge is not None:
            self._offer_judge(pairs)
        tally = self._tally
        comparators = self.comparators
        results = await asyncio.to_thread(lambda: [compare_pair(pair, comparators) for pair in pairs])
        if self._tally is tally:
            for result in results:
                tally.add(result)

    @property
    def tally(self) -> AgreementTally:
        """Agreement counts since the last :meth:`reset`."""
        return self._tally.tally()

    async def run(self) -> None:
        """Consume until cancelled, reconnecting with backoff; bad credentials are raised, not retried."""
        expiry = asyncio.create_task(self._expire_periodically())
        judging = asyncio.create_task(self.model_judge.run()) if self.model_judge is not None else None
        backoff = 0.2
        try:
            while True:
                try:
                    async for event in self.events():
                        if cancel_requested():  # aiomqtt's wait_for returned instead of raising
                            raise asyncio.CancelledError
                        backoff = 0.2
                        try:
                            await self.ingest_async(event)
                        except Exception:  # a comparator bug costs this event, not the source
                            log.exception("cannot pair or compare an output event", request_id=event.request_id)
                except BrokerRejected:
                    raise
                except BrokerUnavailable as exc:
                    self.last_error = str(exc)
                    log.warning("output source disconnected; retrying", error=str(exc), retry_in_s=backoff)
                if cancel_requested():  # a cancellation aiomqtt's wait_for turned into an error
                    raise asyncio.CancelledError
                await asyncio.sleep(backoff)
                backoff = min(self.backoff_max_s, backoff * 2)
        finally:
            await cancel_and_wait(expiry)
            if judging is not None:
                await cancel_and_wait(judging)

    async def _expire_periodically(self) -> None:
        period = max(0.05, min(5.0, self.pairer.ttl / 4))
        while True:
            await asyncio.sleep(period)
            self.pairer.expire(self.clock())

    def judge_problem(self) -> str | None:
        """Why the llm-judge comparator has no data when its judge keeps failing (None: no judge, or fine)."""
        return self.model_judge.problem() if self.model_judge is not None else None

    def snapshot(self) -> OutputSnapshot:
        """Counts and health so far (cheap; safe to call at every analysis interval)."""
        return OutputSnapshot(
            tally=self.tally,
            latency={q: sketch.snapshot() for q, sketch in self._latency.items()},
            pairing=self.pairer.stats.as_dict(),
            pending=len(self.pairer),
            malformed=self.malformed,
            connected=self.connected,
            last_error=self.last_error,
            judge=self.model_judge.stats.as_dict() if self.model_judge is not None else None,
        )

    def reset(self) -> None:
        """Start a new tally and new latency pairs (pending pairs and health counters are kept)."""
        self._tally = TallyBuilder()
        self._latency = {q: PairedSketch() for q in self.quantities}


def load_local_embedder(model_dir: str) -> Embedder:
    """Load a sentence-transformers model from a local directory for the ``semantic`` comparator.

    The library is an optional extra and is imported only here; the model is never downloaded
    (offline mode is forced). Raises :class:`EmbedderUnavailable` with what to do.
    """
    try:
        module: Any = importlib.import_module("sentence_transformers")
    except ImportError as exc:
        raise EmbedderUnavailable(
            "comparator 'semantic' needs the optional extra: pip install 'shadowctl[semantic]' "
            "(sentence-transformers), then point --embedding-model at a model directory on local disk"
        ) from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = module.SentenceTransformer(model_dir, local_files_only=True)
    except Exception as exc:  # the library raises many types; all mean "cannot load"
        raise EmbedderUnavailable(f"cannot load the embedding model from {model_dir!r}: {exc}") from exc

    lock = threading.Lock()  # sources score in worker threads; one encode at a time (torch uses the cores)

    def embed(text: str) -> Sequence[float]:
        with lock:
            vector = model.encode(text, normalize_embeddings=True)
        return [float(x) for x in vector]

    return embed
