"""The comparators score 220 recorded pairs exactly as they did before the pairing speed-ups of #19.

``tests/fixtures/comparator_golden.json`` holds pairs of events (ASCII and not, CJK, JSON, refusals, empty
answers, redacted events, failed candidates; see ``tests/fixtures/make_comparator_golden.py``) and the scores
the comparators of commit 263a89d gave them. Faster code must give the same floats, bit for bit, the same
comparators left out for redaction, and the same tally.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _reference_f1(a: str, b: str) -> float:
    """token-f1 as it was written before the speed-ups: two Counters over the whole token lists."""
    ta, tb = c.tokens(a), c.tokens(b)
    if not ta or not tb:
        return 1.0 if not ta and not tb else 0.0
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(tb), common / len(ta)
    return 2 * precision * recall / (precision + recall)


_WORD = st.sampled_from(["a", "b", "c", "d", "the", "é", "東", "x1"])


@settings(max_examples=150, deadline=None)
@given(st.lists(_WORD, max_size=30), st.lists(_WORD, max_size=30))
def test_token_f1_and_rouge_l_match_the_plain_computation(a: list[str], b: list[str]) -> None:
    """Few and many differing tokens (the two ways token-f1 intersects the middles), shared prefixes and
    suffixes or none: the same floats as the whole-list Counters and the untrimmed LCS."""
    ta, tb = " ".join(a), " ".join(b)
    assert c.token_f1(ta, tb) == _reference_f1(ta, tb)
    assert c.lcs_length(c.tokens(ta), c.tokens(tb)) == _reference_lcs(c.tokens(ta), c.tokens(tb))


def _reference_lcs(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b):
            prev, row[j + 1] = row[j + 1], prev + 1 if x == y else max(row[j + 1], row[j])
    return row[-1]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet="ab '", min_size=1, max_size=5), min_size=1, max_size=6),
       st.text(alphabet="ab '", max_size=20))
def test_the_trie_pattern_finds_what_the_plain_alternation_finds(phrases: list[str], text: str) -> None:
    plain = re.compile("|".join(re.escape(p) for p in phrases))
    trie = re.compile(c.trie_pattern(phrases))
    assert (trie.search(text) is None) == (plain.search(text) is None)


def test_refusal_phrases_are_found_through_the_trie() -> None:
    for phrase in c.REFUSAL_PHRASES:
        assert c.is_refusal(f"Well. {phrase.upper()} that, sorry.")
        assert not c.is_refusal(phrase[:-1] + "#")
