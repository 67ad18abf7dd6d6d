"""Durations as people write them in policies: `30s`, `10m`, `1h30m`, `250ms`."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"
MAX_SECONDS = 100 * 365 * 86400.0
"""Longer is a typo (and beyond it timedelta overflows): no rollout step lasts a century."""


def _seconds(value: float) -> timedelta:
    if not value <= MAX_SECONDS:  # also NaN and infinity
        raise ValueError(f"a duration of at most 100 years, got {value:g} s")
    return timedelta(seconds=value)


def parse_duration(value: Any) -> timedelta:
    """Parse `1h30m`-style text (or a number of seconds) into a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', '10m' or '1h30m'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        try:
            return _seconds(float(value))
        except OverflowError:  # an int too large for a float
            raise ValueError("a duration of at most 100 years, got a number too large for one") from None
    if not isinstance(value, str):
        raise ValueError("expected a duration such as '30s', '10m' or '1h30m'")
    text = value.strip()
    pos = 0
    total = 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"{value!r} is not a duration; write it like '30s', '10m' or '1h30m' (units ms, s, m, h, d)")
    return _seconds(total)


def format_duration(value: timedelta) -> str:
    """Format a timedelta the way policies write it (`1h30m`, `45s`, `250ms`)."""
    ms_total = round(value.total_seconds() * 1000)
    if ms_total == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, ms_total = divmod(ms_total, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "description": "A duration such as 30s, 10m or 1h30m."}),
]
