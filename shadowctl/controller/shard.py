"""Which controller shard runs a policy: a stable hash of ``namespace/name`` into one of 1,024 buckets, and the
buckets dealt out to the shards; the bucket is also a label, so that the API server filters each shard's list
and watch.

``shadowctl run --shard I/N`` runs the policies whose :func:`shard_of` is ``I``; each shard elects its own
leader (its own Lease, :meth:`Shard.lease_name`), so N shards with two replicas each run N policies'
workers at once, each policy in exactly one of them.

The function, stated exactly so that another program (a dashboard, a script checking the spread, an
admission webhook writing the label) can compute it too:

1. ``key = blake2b(f"{namespace}/{name}".encode("utf-8"), digest_size=8)``, read as a big-endian unsigned
   64-bit integer. Python's ``hash()`` is salted per process (PYTHONHASHSEED), so two replicas would
   disagree; crc32 clusters on names that differ in one digit (p0001, p0002, ...).
2. ``bucket = key % 1024``: the policy's label ``shadowctl.dev/shard-bucket`` (:data:`BUCKET_LABEL`), the
   same for every N.
3. The buckets are dealt to the N shards by :func:`bucket_table`, built up from one shard: going from n-1 to
   n shards, each shard ``i < n-1`` keeps its lowest-numbered buckets up to its share (``1024 // n``, one
   more for ``i < 1024 % n``) and hands the rest to the new shard ``n-1``. So every shard holds 1024/N
   buckets to within one, and when N grows to N+1 a policy either stays or moves to the new shard N
   (about 1/(N+1) of them move; ``bucket % N`` would move about N/(N+1)). N is at most 1,024.

Why the bucket and not the shard as the label: a label ``I-of-N`` would have to change with N, and while old
and new shards run side by side (a rolling update) they would relabel the same policies back and forth. The
bucket never changes (a namespace and name never do), so any writer (a shard, a webhook, a person's
``kubectl label``) writes the same value, and a shard selects its buckets: ``shadowctl.dev/shard-bucket in
(...)`` (:meth:`Shard.selector`; 512 values at N = 2, about 3 KB of URL, under the 8 KB request line many
proxies accept). A policy without the label is found by a second, normally empty, watch
(``!shadowctl.dev/shard-bucket``, :meth:`Shard.unlabelled`) and labelled by the shard that owns it
(controller/manager.py). Why dealt and not hashed (jump consistent hash of the bucket): balance. Hashed,
the bucket counts alone spread the shards' shares by +-15% at N = 10; dealt, only the names' own spread
is left (about +-5% over 10,000 names).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any


def policy_key(namespace: str, name: str) -> int:
    """The policy's 64-bit key: blake2b-64 of ``namespace/name`` (UTF-8), big-endian."""
    digest = hashlib.blake2b(f"{namespace}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


BUCKETS = 1024
"""Buckets a policy's key falls into; also the most shards there can be."""

BUCKET_LABEL = "shadowctl.dev/shard-bucket"
"""The label holding a policy's bucket (decimal), written by the shard that owns it on first sight."""


def bucket_of(namespace: str, name: str) -> int:
    """The policy's bucket (``0..BUCKETS-1``): its key modulo 1,024."""
    return policy_key(namespace, name) % BUCKETS


@functools.lru_cache(maxsize=8)
def bucket_table(count: int) -> tuple[int, ...]:
    """The shard of every bucket when there are ``count`` shards (see the module docstring, step 3)."""
    if not 1 <= count <= BUCKETS:
        raise ValueError(f"the shard count must be 1 to {BUCKETS}, not {count}")
    held: list[list[int]] = [list(range(BUCKETS))]  # each shard's buckets, ascending
    for n in range(2, count + 1):
        new: list[int] = []
        for i, buckets in enumerate(held):
            share = BUCKETS // n + (1 if i < BUCKETS % n else 0)
            new.extend(buckets[share:])
            del buckets[share:]
        held.append(sorted(new))
    table = [0] * BUCKETS
    for i, buckets in enumerate(held):
        for b in buckets:
            table[b] = i
    return tuple(table)


def shard_of(namespace: str, name: str, count: int) -> int:
    """The shard (``0..count-1``) that runs the policy ``namespace/name`` when there are ``count`` shards."""
    return bucket_table(count)[bucket_of(namespace, name)]


def labelled_bucket(obj: dict[str, Any]) -> str | None:
    """The object's ``shadowctl.dev/shard-bucket`` label as written (None: no label)."""
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    value = labels.get(BUCKET_LABEL) if isinstance(labels, dict) else None
    return str(value) if value is not None else None


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard index/count``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= index < count")
        if self.count > BUCKETS:
            raise ValueError(f"shard {self.index}/{self.count}: at most {BUCKETS} shards")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` (for example ``0/2``, the first of two shards); ValueError saying what is wrong."""
        index, sep, count = text.strip().partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"{text!r} is not I/N (for example 0/2: the first of two shards, counted from 0)")
        shard = int(index), int(count)
        if shard[1] < 1 or shard[0] >= shard[1]:
            raise ValueError(f"{text!r}: the index counts from 0 and must be below the count (0/2 and 1/2 for two)")
        if shard[1] > BUCKETS:
            raise ValueError(f"{text!r}: at most {BUCKETS} shards (the policies' buckets)")
        return cls(*shard)

    def owns(self, namespace: str, name: str) -> bool:
        """Whether this shard runs the policy ``namespace/name``."""
        return self.count == 1 or shard_of(namespace, name, self.count) == self.index

    def buckets(self) -> list[int]:
        """The buckets this shard runs, ascending."""
        table = bucket_table(self.count)
        return [b for b in range(BUCKETS) if table[b] == self.index]

    def selector(self, base: str | None = None) -> str | None:
        """The label selector of this shard's policies: ``base`` (``-l``) and its buckets (``base`` alone
        without sharding). A policy not labelled yet is not selected: see :meth:`unlabelled`."""
        if self.count == 1:
            return base
        mine = f"{BUCKET_LABEL} in ({','.join(map(str, self.buckets()))})"
        return f"{base},{mine}" if base else mine

    def unlabelled(self, base: str | None = None) -> str:
        """The label selector of the policies no shard selects yet (``base`` and no bucket label)."""
        return f"{base},!{BUCKET_LABEL}" if base else f"!{BUCKET_LABEL}"

    def lease_name(self, base: str) -> str:
        """The Lease this shard's replicas elect their leader with: ``<base>-<index>-of-<count>``.

        The count is part of the name: after N changes, shard 0 of 3 never waits behind (or takes over
        from) a leader of shard 0 of 2, which runs a different set of policies."""
        return base if self.count == 1 else f"{base}-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


ALL = Shard(0, 1)
"""No sharding: one shard that runs every policy (the Lease keeps its name)."""
