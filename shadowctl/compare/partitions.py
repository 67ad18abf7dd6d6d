"""Partitioned output events: which partition a request's events go to, the topics, and who pairs which.

One process pairing every event of a busy policy runs out of core (docs/scaling.md). So the taps publish
each request's events on one of P partitions, a last topic level ``0..P-1`` after the usual topic, and
several pairing workers each subscribe to their own partitions. A pair needs both of its events in the
same worker, so the partition is a pure function of the request id, computed the same way on every tap:
the tap router's one hash, :func:`shadowctl.compare.routing.bucket` (the hash that chooses the mirrored
share, the candidate's share and the sampled share), taken **modulo** P. Modulo, not the bucket's range
divided in P slices: sampling and mirroring keep the *lowest* buckets (the first F of them), so slices
would send every sampled request to partition 0; the remainder spreads them evenly over the partitions.

A worker's standby: each partition's subscription may be a shared subscription (MQTT 5 and Mosquitto's
``$share/<group>/<filter>``, :func:`shared`): the broker delivers each message to one subscriber of the
group, so two workers subscribing to the same partitions in the same group split them between them, and
when one goes away the other receives them all. What a worker pairs is then the partitions' events it
happened to receive: a pair whose two events went to different members of a group is lost (both expire,
counted as missing), so run a group of one active worker and standbys that subscribe only when it is gone,
or accept the loss while both run (docs/scaling.md says which and what was measured).
"""

from __future__ import annotations

from collections.abc import Sequence

from shadowctl.compare.routing import bucket, valid_topic_level

MAX_PARTITIONS = 256
"""The most partitions a policy may have (``spec.analysis.outputs.mqtt.partitions``, ``--partitions``)."""


def partition(request_id: str, partitions: int) -> int:
    """The partition of a request's events, in ``[0, partitions)``: the same on every tap and worker."""
    return 0 if partitions <= 1 else bucket(request_id) % partitions


def partition_topic(topic: str, request_id: str, partitions: int) -> str:
    """Where a tap publishes a request's event: ``topic`` itself with one partition, else ``topic/<k>``."""
    return topic if partitions <= 1 else f"{topic}/{partition(request_id, partitions)}"


def partition_filters(topic_filter: str, partitions: int, mine: Sequence[int] | None = None) -> list[str]:
    """The subscriptions of a worker pairing partitions `mine` (None: all of them) of ``topic_filter``.

    With one partition, ``[topic_filter]``. A filter ending in ``#`` cannot take a partition level (the
    policy refuses it); ValueError names what is wrong, as for a partition out of range.
    """
    if partitions <= 1:
        return [topic_filter]
    if topic_filter.endswith("#"):
        raise ValueError(f"topic {topic_filter!r} ends in '#': partitions need one more topic level after it")
    chosen = range(partitions) if mine is None else mine
    bad = [k for k in chosen if not 0 <= k < partitions]
    if bad:
        raise ValueError(f"partition {bad[0]} is not in 0..{partitions - 1}")
    return [f"{topic_filter}/{k}" for k in sorted(set(chosen))]


def shared(group: str, topic_filter: str) -> str:
    """``$share/<group>/<filter>``: a shared subscription (one member of `group` gets each message)."""
    if not valid_topic_level(group):
        raise ValueError(f"share group {group!r} must be one topic level, without '/', '+' or '#'")
    return f"$share/{group}/{topic_filter}"


def assignment(worker: int, workers: int, partitions: int) -> tuple[int, ...]:
    """The partitions worker `worker` of `workers` pairs: every `workers`-th one, starting at `worker`.

    Disjoint across workers and covering every partition; with more workers than partitions the extra
    workers get none (give them the same index as an active one, in its share group, to stand by).
    """
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} is not in 0..{workers - 1}")
    return tuple(range(worker, partitions, workers))
