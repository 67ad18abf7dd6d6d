"""The comparators score 220 recorded pairs exactly as they did before the pairing speed-ups of #19.

``tests/fixtures/comparator_golden.json`` holds pairs of events (ASCII and not, CJK, JSON, refusals, empty
answers, redacted events, failed candidates; see ``tests/fixtures/make_comparator_golden.py``) and the scores
the comparators of commit 263a89d gave them. Faster code must give the same floats, bit for bit, the same
comparators left out for redaction, and the same tally.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shadowctl.compare import comparators as c
from shadowctl.compare.comparators import TallyBuilder, build_comparators, compare_pair
from shadowctl.compare.events import parse_event
from shadowctl.compare.pairing import Pair
from shadowctl.policy.model import Comparator, ComparatorName

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "comparator_golden.json").read_text())


def _pairs() -> list[tuple[Pair, dict[str, Any]]]:
    return [(Pair(parse_event(json.dumps(row["primary"])), parse_event(json.dumps(row["other"]))), row)
            for row in GOLDEN["pairs"]]


def _clear_caches() -> None:
    """Score from scratch: nothing computed by an earlier test may answer for today's code."""
    for fn in (c.normalize, c.tokens, c.is_refusal, c._shape_of):
        fn.cache_clear()


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_scores_redactions_and_tally_are_as_recorded(order: str) -> None:
    _clear_caches()
    comparators = build_comparators([Comparator(name=ComparatorName(n), threshold=0.5)
                                     for n in GOLDEN["comparators"]])
    pairs = _pairs() if order == "forward" else _pairs()[::-1]  # each text seen first from another pair
    tally = TallyBuilder()
    wrong = []
    for pair, row in pairs:
        result = compare_pair(pair, comparators)
        tally.add(result)
        got = None if result is None else {k.value: v for k, v in result.scores.items()}
        redacted = None if result is None else [k.value for k in result.redacted]
        if got != row["scores"] or redacted != row["redacted"]:
            wrong.append((pair.primary.output, pair.other.output, got, row["scores"], redacted, row["redacted"]))
    assert not wrong, f"{len(wrong)} pairs differ; the first: {wrong[0]}"
    counts = json.loads(tally.tally().to_record().model_dump_json(by_alias=True))["comparators"]
    assert counts == GOLDEN["tally"]["comparators"]
    if order == "forward":  # disagreements are the last five in arrival order
        record = json.loads(tally.tally().to_record().model_dump_json(by_alias=True))
        assert record["disagreements"] == GOLDEN["tally"]["disagreements"]


def test_the_text_scores_alone_are_as_recorded() -> None:
    """The string-level functions, called directly (what other modules use), on the unredacted pairs."""
    _clear_caches()
    checked = 0
    for pair, row in _pairs():
        if row["scores"] is None or pair.primary.redaction is not None or not pair.other.ok:
            continue
        a, b = pair.primary.output, pair.other.output
        for name, fn in ((ComparatorName.token_f1, c.token_f1), (ComparatorName.rouge_l, c.rouge_l),
                         (ComparatorName.refusal, c.refusal), (ComparatorName.normalized_exact, c.normalized_exact),
                         (ComparatorName.json_structure, c.json_structure)):
            assert fn(a, b) == row["scores"][name.value], (name, a, b)
            checked += 1
    assert checked > 800
