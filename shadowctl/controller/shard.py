"""Which controller shard runs a policy: a stable hash of ``namespace/name``, spread by jump consistent hash.

``shadowctl run --shard I/N`` runs the policies whose :func:`shard_of` is ``I``; each shard elects its own
leader (its own Lease, :meth:`Shard.lease_name`), so N shards with two replicas each run N policies'
workers at once, each policy in exactly one of them.

The function, stated exactly so that another program (a dashboard, a script checking the spread) can
compute it too:

1. ``key = blake2b(f"{namespace}/{name}".encode("utf-8"), digest_size=8)``, read as a big-endian unsigned
   64-bit integer. Python's ``hash()`` is salted per process (PYTHONHASHSEED), so two replicas would
   disagree; crc32 clusters on names that differ in one digit (p0001, p0002, ...).
2. ``shard = jump(key, N)``, the jump consistent hash of Lamping and Veach ("A Fast, Minimal Memory,
   Consistent Hash Algorithm", 2014): uniform over ``0..N-1``, and when N grows to N+1 only about
   1/(N+1) of the policies move (each to the new shard); ``key % N`` would move about N/(N+1) of them.

Why the name and not a label: a policy's namespace and name never change, so its shard never changes
while N stays the same, and no one has to label anything; the label selector (``-l``) still narrows what
a controller watches, and applies before the shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

_MASK = 2**64 - 1
_JUMP_MULTIPLIER = 2862933555777941757  # the 64-bit linear congruential step of the paper's reference code


def policy_key(namespace: str, name: str) -> int:
    """The policy's 64-bit key: blake2b-64 of ``namespace/name`` (UTF-8), big-endian."""
    digest = hashlib.blake2b(f"{namespace}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash: the bucket in ``0..buckets-1`` of a 64-bit ``key``."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    key &= _MASK
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _JUMP_MULTIPLIER + 1) & _MASK
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def shard_of(namespace: str, name: str, count: int) -> int:
    """The shard (``0..count-1``) that runs the policy ``namespace/name`` when there are ``count`` shards."""
    return jump_hash(policy_key(namespace, name), count)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard index/count``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` (for example ``0/2``, the first of two shards); ValueError saying what is wrong."""
        index, sep, count = text.strip().partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"{text!r} is not I/N (for example 0/2: the first of two shards, counted from 0)")
        shard = int(index), int(count)
        if shard[1] < 1 or shard[0] >= shard[1]:
            raise ValueError(f"{text!r}: the index counts from 0 and must be below the count (0/2 and 1/2 for two)")
        return cls(*shard)

    def owns(self, namespace: str, name: str) -> bool:
        """Whether this shard runs the policy ``namespace/name``."""
        return self.count == 1 or shard_of(namespace, name, self.count) == self.index

    def lease_name(self, base: str) -> str:
        """The Lease this shard's replicas elect their leader with: ``<base>-<index>-of-<count>``.

        The count is part of the name: after N changes, shard 0 of 3 never waits behind (or takes over
        from) a leader of shard 0 of 2, which runs a different set of policies."""
        return base if self.count == 1 else f"{base}-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


ALL = Shard(0, 1)
"""No sharding: one shard that runs every policy (the Lease keeps its name)."""
