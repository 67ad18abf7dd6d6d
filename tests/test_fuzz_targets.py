"""bench/fuzz's targets stay runnable: each path's structured inputs, a few dozen each, without a finding.

The census itself (10,000 inputs per path, hypothesis and atheris) is bench/fuzz/run.py, run by hand;
this keeps its harness from rotting as the paths change, and is a small fuzz test of every path in itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "fuzz"))

import contextlib

import targets

TARGETS = targets.targets()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_a_path_answers_its_structured_inputs_in_words(name: str) -> None:
    target = TARGETS[name]

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(target.structured)
    def one(data: bytes) -> None:
        with contextlib.suppress(target.expected):
            target.run(data)

    one()


def test_a_finding_is_a_finding() -> None:
    """The harness's own check: an input that escapes as a traceback is not swallowed by a target."""
    broken = targets.Target("broken", lambda data: [][len(data)], st.just(b"x"))
    with pytest.raises(IndexError):
        broken.run(b"x")
