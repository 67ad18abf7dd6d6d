"""The controller's tracing port: a span per tick's decision, and per look inside it.

The controller imports no tracing library (contract 4 in pyproject.toml): it opens spans through the
small :class:`Tracer` protocol and computes their attributes here, as plain values. ``shadowctl run``
plugs in the OpenTelemetry adapter (:mod:`shadowctl.otel`) when ``--otlp-endpoint`` is given; the
default, :data:`NO_TRACER`, records nothing and costs no attribute computation (``span.recording``).

Spans (docs/controller.md, "Tracing"):

- ``shadowctl.decision``: one tick of one policy: phase before and after, step, weights, mirror,
  the verdict's outcome and reason, the route actions, an error. Its child:
- ``shadowctl.look``: one look (analysed phases only): the verdict and, per metric (at most
  :data:`MAX_METRICS`), its outcome, observed effect, interval, samples and threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Protocol, Union

from shadowctl.judge import Verdict
from shadowctl.machine import RolloutState

if TYPE_CHECKING:
    from shadowctl.controller.analysis import Look

AttributeValue = Union[str, bool, int, float, Sequence[str], Sequence[float]]  # noqa: UP007 - a runtime alias
Attributes = Mapping[str, AttributeValue]

DECISION_SPAN = "shadowctl.decision"
LOOK_SPAN = "shadowctl.look"
MAX_METRICS = 16
"""Metrics described on a look span; the rest are counted in ``shadowctl.metrics.omitted``."""
MAX_TEXT = 512
"""Characters kept of a reason or an error."""


class Span(Protocol):
    """An open span."""

    @property
    def recording(self) -> bool:
        """Whether attributes are kept (False: the caller need not compute them)."""
        ...

    def set(self, attributes: Attributes) -> None:
        """Add attributes to the span."""
        ...


class Tracer(Protocol):
    """Opens spans; a span opened inside another (in the same task) is its child."""

    def span(self, name: str, attributes: Attributes) -> AbstractContextManager[Span]:
        """A span named `name` for the `with` block; an exception leaving the block is recorded on it."""
        ...


class _NoSpan:
    recording = False

    def set(self, attributes: Attributes) -> None:
        return None


class NoTracer:
    """The default: no spans, nothing exported."""

    @contextmanager
    def _span(self) -> Iterator[Span]:
        yield _NoSpan()

    def span(self, name: str, attributes: Attributes) -> AbstractContextManager[Span]:
        return self._span()


NO_TRACER: Tracer = NoTracer()


def _text(value: str) -> str:
    return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 1] + "…"


def _put(out: dict[str, AttributeValue], key: str, value: float | None) -> None:
    """A number, where there is one (OTel attributes have no null; NaN and infinities are left out)."""
    if value is not None and math.isfinite(value):
        out[key] = value


def policy_attributes(namespace: str, name: str) -> dict[str, AttributeValue]:
    return {"shadowctl.policy.namespace": namespace, "shadowctl.policy.name": name}


def state_attributes(state: RolloutState, prefix: str) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {f"{prefix}.phase": state.phase.value,
                                      f"{prefix}.weight.candidate": state.weight,
                                      f"{prefix}.weight.primary": 100 - state.weight}
    if state.step is not None:
        out[f"{prefix}.step"] = state.step
    _put(out, f"{prefix}.mirror_percent", state.mirror_percent)
    return out


def verdict_attributes(verdict: Verdict) -> dict[str, AttributeValue]:
    """The verdict and its numbers, metric by metric (bounded)."""
    out: dict[str, AttributeValue] = {
        "shadowctl.verdict.outcome": verdict.outcome.value,
        "shadowctl.verdict.reason": _text(verdict.reason),
        "shadowctl.verdict.method": verdict.method,
    }
    _put(out, "shadowctl.verdict.score", verdict.score)
    results = verdict.results[:MAX_METRICS]
    out["shadowctl.metrics"] = [r.name for r in results]
    if len(verdict.results) > MAX_METRICS:
        out["shadowctl.metrics.omitted"] = len(verdict.results) - MAX_METRICS
    for r in results:
        key = f"shadowctl.metric.{r.name}"
        out[f"{key}.outcome"] = r.outcome.value
        out[f"{key}.statistic"] = r.statistic
        out[f"{key}.critical"] = r.critical
        out[f"{key}.effect_scale"] = "ratio" if r.margin.relative else "difference"
        _put(out, f"{key}.effect", r.effect)
        _put(out, f"{key}.interval.low", r.interval[0])
        _put(out, f"{key}.interval.high", r.interval[1])
        _put(out, f"{key}.threshold", r.threshold)
        _put(out, f"{key}.samples.primary", r.n_primary)
        _put(out, f"{key}.samples.candidate", r.n_candidate)
    return out


def look_attributes(look: Look) -> dict[str, AttributeValue]:
    out = verdict_attributes(look.verdict)
    if look.source_errors:
        out["shadowctl.source_errors"] = [_text(e) for e in look.source_errors[:MAX_METRICS]]
    if look.tally is not None:
        for name, counts in sorted(look.tally.counts.items())[:MAX_METRICS]:
            out[f"shadowctl.agreement.{name}.candidate_pairs"] = counts.candidate_pairs
            out[f"shadowctl.agreement.{name}.candidate_agree"] = counts.candidate_agree
    return out


def decision_attributes(before: RolloutState | None, after: RolloutState | None, look: Look | None,
                        actions: Sequence[str], error: str | None) -> dict[str, AttributeValue]:
    """A tick's decision: where the rollout was, where it went, on what verdict, with which route actions."""
    out: dict[str, AttributeValue] = {}
    if before is not None:
        out.update(state_attributes(before, "shadowctl.before"))
    if after is not None:
        out.update(state_attributes(after, "shadowctl.after"))
        if after.message:
            out["shadowctl.after.message"] = _text(after.message)
    if before is not None and after is not None:
        out["shadowctl.transitioned"] = after.phase is not before.phase or after.step != before.step
    if look is not None:
        out["shadowctl.verdict.outcome"] = look.verdict.outcome.value
        out["shadowctl.verdict.reason"] = _text(look.verdict.reason)
    out["shadowctl.actions"] = list(actions)
    if error is not None:
        out["shadowctl.error"] = _text(error)
    return out
