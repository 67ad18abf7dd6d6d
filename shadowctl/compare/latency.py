"""Latency of paired answers: what each side of a pair took, per quantity (pure).

A pair is the primary's and the candidate's answer to the same request (:mod:`.pairing`), so their
latencies differ only by what the two servers did: the request's own share (prompt length, output
length) is the same on both sides. The paired judge compares them as log ratios
(:mod:`shadowctl.judge.paired`); this module only reads the numbers off the events:

* ``ttft``: time to first token, ``ttft_s`` (the tap measures it for streamed answers only);
* ``tpot``: time per output token after the first, ``(e2e_s - ttft_s) / (output_tokens - 1)``
  (streamed answers with at least two output tokens);
* ``e2e``: end-to-end time, ``e2e_s``.

A side without the quantity gives None (the pair is dropped and counted by the caller). A pair with
a failed side is not a latency pair at all (an error's latency says nothing about the model's speed):
:func:`pair_latency` returns None for it.
"""

from __future__ import annotations

from typing import Final

from shadowctl.compare.events import OutputEvent
from shadowctl.compare.pairing import Pair

QUANTITIES: Final = ("ttft", "tpot", "e2e")


def event_latency(event: OutputEvent, quantity: str) -> float | None:
    """The ``quantity`` of one answer in seconds, or None where the event does not define it."""
    if quantity == "e2e":
        return event.e2e_s
    if quantity == "ttft":
        return event.ttft_s
    if quantity == "tpot":
        tokens = event.output_tokens
        if event.ttft_s is None or tokens is None or tokens < 2:
            return None
        return (event.e2e_s - event.ttft_s) / (tokens - 1)
    raise ValueError(f"unknown latency quantity {quantity!r}; use one of {', '.join(QUANTITIES)}")


def pair_latency(pair: Pair, quantity: str) -> tuple[float | None, float | None] | None:
    """(primary, candidate) ``quantity`` of a pair; None when a side failed (not a latency pair)."""
    if not (pair.primary.ok and pair.other.ok):
        return None
    return event_latency(pair.primary, quantity), event_latency(pair.other, quantity)
