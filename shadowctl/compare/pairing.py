"""Pure pairing of output events by request id.

The primary's tap publishes the answer users got; the candidate's tap (and a
second primary replica publishing as variant ``baseline``) publishes the answer
to the mirrored copy of the same request, which carries the same
``x-request-id``. :class:`Pairer` joins them. It does no I/O and never reads the
clock: every call takes ``now`` (seconds, any monotonic origin), which is what
makes it testable with literal data and replayable.

Decisions worth knowing:

- The TTL runs from the moment the *pairer* first saw a request id, not from
  the event's ``started_at``: taps on different nodes have different clocks, and
  a slow candidate answer is still a valid answer.
- Only mirrored copies (``shadow=True``) of the candidate and baseline are
  paired. In the canary phase the candidate serves live traffic under request
  ids the primary never saw; holding those would only fill memory.
- Memory is bounded by ``max_pending`` request ids and by ``max_pending_chars``
  characters of text (prompts and answers) held in them; when either is full, the
  oldest is evicted (counted per variant), so a flood of unmatched primaries
  (mirroring 10% means 90% of primary answers never get a partner), or of a few
  huge answers, cannot grow without bound. A count alone was not a bound: an
  answer may be 200,000 characters (the tap's cap), so 100,000 ids could hold 20 GB. Completed ids are remembered for one TTL, also bounded, so that a late
  duplicate (QoS 1 delivers at least once) is recognised and not re-paired.
- A pair whose prompt hashes differ is not a pair of the same request (a
  request id reused by a client); it is counted and dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from shadowctl.compare.events import Endpoint, OutputEvent, Variant

_PAIRED_ENDPOINTS = frozenset({Endpoint.chat, Endpoint.completions})


@dataclass(frozen=True, slots=True)
class Pair:
    """The primary's answer and another variant's answer to the same request."""

    primary: OutputEvent
    other: OutputEvent

    @property
    def request_id(self) -> str:
        return self.primary.request_id

    @property
    def variant(self) -> Variant:
        """``candidate`` or ``baseline``: whose answer is compared with the primary's."""
        return self.other.variant


def _zero() -> dict[Variant, int]:
    return dict.fromkeys(Variant, 0)


@dataclass(slots=True)
class PairingStats:
    """Counters since the pairer was created. ``expired``/``evicted`` count events that never got a partner."""

    received: dict[Variant, int] = field(default_factory=_zero)
    paired: dict[Variant, int] = field(default_factory=_zero)  # by the non-primary variant
    duplicates: dict[Variant, int] = field(default_factory=_zero)
    expired: dict[Variant, int] = field(default_factory=_zero)
    evicted: dict[Variant, int] = field(default_factory=_zero)
    missing: dict[Variant, int] = field(default_factory=_zero)  # primaries that never got this partner
    late: dict[Variant, int] = field(default_factory=_zero)  # arrived after their request id expired or was evicted
    not_shadow: int = 0  # candidate/baseline answers to live (non-mirrored) requests
    unexpected_baseline: int = 0  # baseline events while the policy's baseline is fixed
    not_compared_endpoint: int = 0  # embeddings: nothing to compare as text
    prompt_mismatch: int = 0

    def delivery_rate(self, variant: Variant) -> float | None:
        """Share of settled primary answers that found a partner of ``variant`` (None before any settled).

        With Istio mirroring at P%, a healthy candidate gives about P/100; much less means
        mirrored requests are lost or the candidate's tap is not publishing.
        """
        done = self.paired[variant] + self.missing[variant]
        return None if done == 0 else self.paired[variant] / done

    def as_dict(self) -> dict[str, object]:
        """Plain data for status, logs and metrics."""

        def per(d: dict[Variant, int]) -> dict[str, int]:
            return {v.value: n for v, n in d.items()}

        return {
            "received": per(self.received),
            "paired": per(self.paired),
            "duplicates": per(self.duplicates),
            "expired": per(self.expired),
            "evicted": per(self.evicted),
            "missing": per(self.missing),
            "late": per(self.late),
            "notShadow": self.not_shadow,
            "unexpectedBaseline": self.unexpected_baseline,
            "notComparedEndpoint": self.not_compared_endpoint,
            "promptMismatch": self.prompt_mismatch,
        }


@dataclass(slots=True)
class _Pending:
    first_seen: float
    events: dict[Variant, OutputEvent]
    emitted: set[Variant]
    chars: int = 0


def _chars(event: OutputEvent) -> int:
    """What an event holds in memory, roughly: its texts' characters (tool calls' arguments included)."""
    n = len(event.output) + (len(event.prompt) if event.prompt is not None else 0)
    if event.tool_calls:
        n += sum(len(c.arguments) + len(c.name) for c in event.tool_calls)
    return n


class Pairer:
    """Joins primary, candidate and (optionally) baseline events by request id within a TTL."""

    def __init__(self, ttl: float, *, max_pending: int = 100_000, max_pending_chars: int = 256 * 1024 * 1024,
                 expect_baseline: bool = False) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        if max_pending_chars < 1:
            raise ValueError("max_pending_chars must be at least 1")
        self.ttl = ttl
        self.max_pending = max_pending
        self.max_pending_chars = max_pending_chars
        self.held_chars = 0
        """Characters of text held by the pending events (bounded by ``max_pending_chars``)."""
        self.expect_baseline = expect_baseline
        self.stats = PairingStats()
        # Insertion order is first-seen order, so the oldest entry is always first.
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        # Settled ids -> (when settled, whether they completed); bounded like the pending map.
        self._done: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self._wanted = (
            frozenset({Variant.candidate, Variant.baseline}) if expect_baseline else frozenset({Variant.candidate})
        )

    def __len__(self) -> int:
        """Request ids waiting for a partner."""
        return len(self._pending)

    def add(self, event: OutputEvent, now: float) -> list[Pair]:
        """Take one event seen at ``now``; return the pairs it completes (zero, one or two)."""
        self.expire(now)
        variant = event.variant
        self.stats.received[variant] += 1
        if event.endpoint not in _PAIRED_ENDPOINTS:
            self.stats.not_compared_endpoint += 1
            return []
        if variant is not Variant.primary and not event.shadow:
            self.stats.not_shadow += 1
            return []
        if variant is Variant.baseline and not self.expect_baseline:
            self.stats.unexpected_baseline += 1
            return []
        rid = event.request_id
        settled = self._done.get(rid)
        if settled is not None:
            (self.stats.duplicates if settled[1] else self.stats.late)[variant] += 1
            return []
        entry = self._pending.get(rid)
        if entry is None:
            if len(self._pending) >= self.max_pending:
                self._drop_oldest(now)
            entry = _Pending(first_seen=now, events={}, emitted=set())
            self._pending[rid] = entry
        elif variant in entry.events:
            self.stats.duplicates[variant] += 1
            return []
        entry.events[variant] = event
        size = _chars(event)
        entry.chars += size
        self.held_chars += size
        if self.held_chars > self.max_pending_chars:
            self._shed(rid, now)
        pairs: list[Pair] = []
        primary = entry.events.get(Variant.primary)
        if primary is not None:
            for other_variant in self._wanted:
                other = entry.events.get(other_variant)
                if other is None or other_variant in entry.emitted:
                    continue
                entry.emitted.add(other_variant)
                if other.prompt_hash != primary.prompt_hash:
                    self.stats.prompt_mismatch += 1
                    continue
                self.stats.paired[other_variant] += 1
                pairs.append(Pair(primary=primary, other=other))
            if entry.emitted >= self._wanted:
                del self._pending[rid]
                self.held_chars -= entry.chars
                self._remember(rid, now, completed=True)
        return pairs

    def expire(self, now: float) -> int:
        """Drop request ids older than the TTL, counting their events as expired; return how many."""
        n = 0
        deadline = now - self.ttl
        while self._pending:
            rid, entry = next(iter(self._pending.items()))
            if entry.first_seen > deadline:
                break
            del self._pending[rid]
            self.held_chars -= entry.chars
            self._count_unmatched(entry, self.stats.expired)
            # Remember it for one more TTL: a partner arriving after expiry is late, not a new request.
            self._remember(rid, now, completed=False)
            n += 1
        while self._done:
            rid, (seen, _) = next(iter(self._done.items()))
            if seen > deadline:
                break
            del self._done[rid]
        return n

    def _shed(self, keep: str, now: float) -> None:
        """Evict the oldest entries other than `keep` (the one an event just joined) until the texts held fit
        ``max_pending_chars``; `keep` alone may exceed it (one event larger than the budget)."""
        while self.held_chars > self.max_pending_chars and len(self._pending) > 1:
            if next(iter(self._pending)) == keep:  # the oldest: step over it, keeping first-seen order
                kept = self._pending.pop(keep)
                self._drop_oldest(now)
                self._pending[keep] = kept
                self._pending.move_to_end(keep, last=False)
            else:
                self._drop_oldest(now)

    def _drop_oldest(self, now: float) -> None:
        rid, entry = self._pending.popitem(last=False)
        self.held_chars -= entry.chars
        self._count_unmatched(entry, self.stats.evicted)
        self._remember(rid, now, completed=False)

    def _count_unmatched(self, entry: _Pending, into: dict[Variant, int]) -> None:
        """Count the events of a settled entry that never took part in a pair, and the partners it lacked."""
        has_primary = Variant.primary in entry.events
        for variant in entry.events:
            if variant is Variant.primary:
                if not entry.emitted:
                    into[variant] += 1
            elif variant not in entry.emitted:
                into[variant] += 1
        if has_primary:
            for wanted in self._wanted - entry.emitted:
                self.stats.missing[wanted] += 1

    def _remember(self, rid: str, when: float, *, completed: bool) -> None:
        self._done[rid] = (when, completed)
        self._done.move_to_end(rid)
        while len(self._done) > self.max_pending:
            self._done.popitem(last=False)
