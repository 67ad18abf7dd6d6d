"""The sampling fraction the controller gives a policy's taps, and the adaptive target
(``spec.analysis.outputs.sampling: {fraction, targetPairsPerSecond, minFraction}``).

The taps publish the output events of a fraction F of requests (:mod:`shadowctl.tap.sampling`); for taps
driven by the route channel the controller sets F in the route setting (v3, ``sampleFraction``). The judge
needs a few thousand pairs, not every request: where pairs arrive faster than ``targetPairsPerSecond``, F is
lowered to what the target needs, never below ``minFraction``, and raised again (never above ``fraction``)
where they arrive much slower. The rule (:func:`next_fraction`) is pure; :class:`SamplingTuner` keeps, per
policy and phase, the fraction in force since when and how many pairs there were then.

What the pairs stand for: with F changing, pairs / F no longer holds for the whole phase. Each stretch of
constant F (an *epoch*) contributes its pairs / its F; the verdict's ``requestsRepresented`` is their sum, and
``sampledFraction`` the phase's effective fraction, pairs / requests represented.

Approximations, stated: a new F is counted from the tick that chooses it, while the taps apply it at the next
tick's route read (up to one interval later, plus the few seconds a request and its pairing take), so the
requests of that stretch are counted at the new F. The tuner lives in the leader's memory: a new leader (or a
restarted controller) starts from the policy's ``fraction``, as if it had held since the phase started, and so
counts the phase's earlier pairs at that fraction (which undercounts the requests they stand for where F had
been lowered) and measures their rate over the whole phase; it adapts again at its first look.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from shadowctl.policy.model import ShadowPolicy

BAND: Final = 1.5
"""Within [target / BAND, target x BAND] pairs per second, F is left as it is (no change on every tick's noise)."""
WINDOW_INTERVALS: Final = 2
"""F is changed only on a rate measured over at least this many analysis intervals at the current F."""


def next_fraction(fraction: float, pairs_per_second: float, target: float, floor: float, ceiling: float) -> float:
    """The fraction to publish next, given the pairs per second measured at `fraction` (pure).

    Proportional: F x target / rate, so one step brings the rate to the target where traffic holds steady;
    clamped to [floor, ceiling]; unchanged inside the band around the target, and when no pair was measured
    (no information). Rounded to 3 significant digits, so that a steady rate gives the same F again."""
    if pairs_per_second <= 0 or target / BAND <= pairs_per_second <= target * BAND:
        return fraction
    wanted = float(f"{fraction * target / pairs_per_second:.3g}")
    return min(ceiling, max(floor, wanted))


@dataclass(frozen=True)
class Epoch:
    """One stretch of a phase at one fraction."""

    since: float
    """The phase's start (a new phase starts afresh)."""
    fraction: float
    started: float
    """When this fraction was chosen (Unix seconds)."""
    pairs_at_start: int
    represented_before: float
    """Requests the phase's pairs before `started` stand for."""

    def represented(self, pairs: int) -> float:
        """Requests the phase's `pairs` stand for."""
        return self.represented_before + max(0, pairs - self.pairs_at_start) / self.fraction


@dataclass(frozen=True)
class Represented:
    """What a phase's pairs stand for: ``fraction`` = pairs / ``requests`` (the phase's effective fraction),
    ``now`` the fraction in force."""

    fraction: float
    requests: float
    now: float
    adaptive: bool


class SamplingTuner:
    """Per policy: the fraction in force for its phase, adapted to the target (see the module docstring)."""

    def __init__(self) -> None:
        self._epochs: dict[str, Epoch] = {}

    def fraction(self, policy: ShadowPolicy) -> float | None:
        """The fraction the route setting carries for `policy` (None: the policy samples every request and does
        not adapt, so the setting carries none and keeps its older schema)."""
        outputs = policy.spec.analysis.outputs
        if outputs is None or not outputs.sampling.carried:
            return None
        epoch = self._epochs.get(policy.key)
        if epoch is None or outputs.sampling.target_pairs_per_second is None:
            return outputs.sampling.fraction
        return min(epoch.fraction, outputs.sampling.fraction)

    def observe(self, policy: ShadowPolicy, since: float, pairs: int, now: float) -> Represented | None:
        """The phase (started at `since`) has `pairs` pairs at `now`: what they stand for; and, for an adaptive
        policy, perhaps a new fraction for the next route setting (:meth:`fraction`). None where the policy samples
        every request."""
        outputs = policy.spec.analysis.outputs
        if outputs is None or not outputs.sampling.carried:
            self._epochs.pop(policy.key, None)
            return None
        sampling = outputs.sampling
        epoch = self._epochs.get(policy.key)
        if epoch is None or epoch.since != since:
            # A new phase, or a new leader: the policy's fraction, as from the phase's start.
            epoch = Epoch(since, sampling.fraction, since, 0, 0.0)
            self._epochs[policy.key] = epoch
        elif epoch.fraction > sampling.fraction:  # the policy's fraction edited below the one in force
            epoch = Epoch(since, sampling.fraction, now, pairs, epoch.represented(pairs))
            self._epochs[policy.key] = epoch
        target = sampling.target_pairs_per_second
        elapsed = now - epoch.started
        interval = policy.spec.analysis.interval.total_seconds()
        if target is not None and elapsed >= WINDOW_INTERVALS * interval:
            rate = (pairs - epoch.pairs_at_start) / elapsed
            new = next_fraction(epoch.fraction, rate, target, sampling.min_fraction, sampling.fraction)
            if new != epoch.fraction:
                epoch = Epoch(since, new, now, pairs, epoch.represented(pairs))
                self._epochs[policy.key] = epoch
        requests = epoch.represented(pairs)
        effective = pairs / requests if pairs and requests else epoch.fraction
        return Represented(fraction=effective, requests=requests, now=epoch.fraction, adaptive=target is not None)

    def forget(self, policy_key: str) -> None:
        """The policy left its shadow phase (or was deleted)."""
        self._epochs.pop(policy_key, None)
