"""Comparators on literal examples, including Unicode, empty and very long answers; the agreement tally."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadowctl.compare import comparators as c
from shadowctl.compare.comparators import (
    AgreementTally,
    ComparatorUnavailable,
    build_comparators,
    compare_pair,
    judge_inputs,
)
from shadowctl.compare.events import Endpoint, OutputEvent, ToolCall, Variant
from shadowctl.compare.pairing import Pair
from shadowctl.policy.model import Comparator, ComparatorName, Outputs
from shadowctl.policy.status import ComparatorCounts, OutputTally


def ev(variant: Variant, output: str, *, status: int = 200, tools: list[ToolCall] | None = None) -> OutputEvent:
    return OutputEvent(request_id="r1", variant=variant, shadow=variant is not Variant.primary, service="ns/svc",
                       endpoint=Endpoint.chat, prompt_hash="h", output=output, tool_calls=tools, status=status,
                       started_at=0.0, e2e_s=1.0)


def test_exact_and_normalized_exact() -> None:
    assert c.exact("Hello", "Hello") == 1.0
    assert c.exact("Hello", "hello") == 0.0
    assert c.normalized_exact("  Hello\n\tWORLD ", "hello world") == 1.0
    # NFKC folds the full-width letters and the ligature; casefold maps ß to ss.
    assert c.normalized_exact("Ｈｅｌｌｏ ﬁne Straße", "hello fine strasse") == 1.0
    assert c.normalized_exact("hello", "hello!") == 0.0
    assert c.normalized_exact("", "   ") == 1.0


def test_tokens_split_cjk_per_character_and_drop_punctuation() -> None:
    assert c.tokens("東京は日本の首都です。") == ("東", "京", "は", "日", "本", "の", "首", "都", "で", "す")
    assert c.tokens("Don’t stop, it's 42!") == ("don", "t", "stop", "it", "s", "42")


def test_token_f1_literals() -> None:
    assert c.token_f1("the cat sat", "the cat sat") == 1.0
    # overlap 2 of 3 and 2 of 4: p = 2/4, r = 2/3, f1 = 4/7
    assert c.token_f1("the cat sat", "the cat lay down") == pytest.approx(4 / 7)
    assert c.token_f1("", "") == 1.0
    assert c.token_f1("", "anything") == 0.0
    assert c.token_f1("abc", "xyz") == 0.0


def test_rouge_l_literals() -> None:
    # LCS("a b c d e", "a c e f") = "a c e" = 3; p = 3/4, r = 3/5; f = 2pr/(p+r) = 2/3
    assert c.rouge_l("a b c d e", "a c e f") == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert c.rouge_l("x y", "x y") == 1.0
    assert c.rouge_l("", "") == 1.0
    assert c.rouge_l("", "x") == 0.0
    assert c.rouge_l("a", "b") == 0.0


def _lcs_table(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


@given(st.lists(st.sampled_from("abcd"), max_size=40), st.lists(st.sampled_from("abcde"), max_size=40))
def test_bit_parallel_lcs_matches_the_quadratic_table(a: list[str], b: list[str]) -> None:
    assert c.lcs_length(a, b) == _lcs_table(a, b)
    assert c.lcs_length(b, a) == _lcs_table(a, b)


def test_very_long_outputs_are_scored() -> None:
    words = [f"w{i % 997}" for i in range(20_000)]
    a = " ".join(words)
    b = " ".join([*words[:10_000], "changed", *words[10_001:]])
    assert c.rouge_l(a, b) == pytest.approx(19_999 / 20_000)
    assert 0.99 < c.token_f1(a, b) < 1.0
    assert c.length_ratio(a, " ".join(words[:5000])) == pytest.approx(0.25)


def test_length_ratio() -> None:
    assert c.length_ratio("one two", "one two three four") == 0.5
    assert c.length_ratio("", "") == 1.0
    assert c.length_ratio("", "x") == 0.0


def test_json_valid_and_structure() -> None:
    assert c.json_valid('{"a": 1}', '```json\n{"b": [1]}\n```') == 1.0
    assert c.json_valid('{"a": 1}', "not json") == 0.0
    assert c.json_valid("plain", "also plain") == 1.0
    # same keys and types, different values
    assert c.json_structure('{"name": "x", "n": 1, "tags": ["a"]}', '{"tags": ["b", "c"], "n": 2.5, "name": "y"}') == 1.0
    # n changes type: facts {$:object, $.name:string, $.n:number} vs {$:object, $.name:string, $.n:string}
    assert c.json_structure('{"name": "x", "n": 1}', '{"name": "x", "n": "1"}') == pytest.approx(2 / 4)
    assert c.json_structure('{"a": 1}', "oops") == 0.0
    assert c.json_structure("oops", "nope") == 1.0
    assert c.json_structure("[]", "{}") == 0.0


def test_refusal() -> None:
    assert c.is_refusal("I’m sorry, but I can’t help with that request.")
    assert c.is_refusal("I cannot assist with creating malware.")
    assert not c.is_refusal("Sure! Here is the recipe.")
    assert not c.is_refusal("")
    assert c.refusal("I'm unable to do that.", "I must decline.") == 1.0
    assert c.refusal("I'm unable to do that.", "Sure, here it is.") == 0.0


def test_tool_calls() -> None:
    a = [ToolCall(name="get_weather", arguments='{"city": "Paris", "unit": "C"}')]
    same = [ToolCall(name="get_weather", arguments='{"unit":"C","city":"Paris"}')]
    other_args = [ToolCall(name="get_weather", arguments='{"city": "Lyon", "unit": "C"}')]
    assert c.tool_calls(a, same) == 1.0
    assert c.tool_calls(a, other_args) == 0.0
    assert c.tool_calls(None, []) == 1.0
    assert c.tool_calls(a, None) == 0.0
    two = [*same, ToolCall(name="get_time", arguments="{}")]
    assert c.tool_calls(a, two) == 0.5
    assert c.tool_calls(two, list(reversed(two))) == 1.0
    assert c.tool_calls([ToolCall(name="f", arguments="{bad")], [ToolCall(name="f", arguments="{bad")]) == 1.0


def test_cosine() -> None:
    assert c.cosine01([1, 0], [1, 0]) == 1.0
    assert c.cosine01([1, 0], [-1, 0]) == 0.0
    assert c.cosine01([1, 1], [1, 0]) == pytest.approx(2**-0.5)


def test_semantic_without_an_embedder_is_a_clear_error() -> None:
    with pytest.raises(ComparatorUnavailable, match=r"shadowctl\[semantic\]"):
        build_comparators([Comparator(name=ComparatorName.semantic)])
    bound = build_comparators([Comparator(name=ComparatorName.semantic, threshold=0.9)],
                              embedder=lambda t: [float(len(t)), 1.0])
    pair = Pair(primary=ev(Variant.primary, "abc"), other=ev(Variant.candidate, "xyz"))
    result = compare_pair(pair, bound)
    assert result is not None and result.agrees[ComparatorName.semantic]


def test_compare_pair_failed_sides() -> None:
    comps = build_comparators([Comparator(name=ComparatorName.exact, threshold=1.0),
                               Comparator(name=ComparatorName.token_f1, threshold=0.5)])
    ok = compare_pair(Pair(ev(Variant.primary, "a b c"), ev(Variant.candidate, "a b d")), comps)
    assert ok is not None
    assert ok.scores[ComparatorName.exact] == 0.0 and not ok.agrees[ComparatorName.exact]
    assert ok.agrees[ComparatorName.token_f1]
    # a failed candidate disagrees everywhere, even if its (empty) text matched
    bad = compare_pair(Pair(ev(Variant.primary, ""), ev(Variant.candidate, "", status=500)), comps)
    assert bad is not None and not any(bad.agrees.values())
    # a failed primary gives nothing to compare
    assert compare_pair(Pair(ev(Variant.primary, "", status=503), ev(Variant.candidate, "x")), comps) is None


def test_tally_keeps_the_last_disagreeing_candidate_pairs_with_their_trace() -> None:
    comps = build_comparators([Comparator(name=ComparatorName.exact, threshold=1.0)])
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    def pair(rid: str, variant: Variant, output: str, traced: bool) -> Pair:
        primary = ev(Variant.primary, "yes").model_copy(update={"request_id": rid,
                                                                "traceparent": tp if traced else None})
        return Pair(primary, ev(variant, output).model_copy(update={"request_id": rid}))

    results = [compare_pair(pair(f"r{i}", Variant.candidate, "no", i % 2 == 0), comps) for i in range(7)]
    results += [compare_pair(pair("agrees", Variant.candidate, "yes", True), comps),
                compare_pair(pair("noise", Variant.baseline, "no", True), comps)]
    tally = AgreementTally().add_many(results)
    assert [d.request_id for d in tally.disagreements] == ["r2", "r3", "r4", "r5", "r6"]  # the last 5, candidate only
    assert tally.disagreements[0].trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tally.disagreements[1].trace_id is None and tally.disagreements[1].comparators == ["exact"]
    stored = OutputTally.model_validate(json.loads(json.dumps(tally.to_record(1.0).to_json())))
    assert AgreementTally.from_record(stored) == tally
    more = AgreementTally.from_record(stored).add(compare_pair(pair("r7", Variant.candidate, "no", False), comps))
    assert [d.request_id for d in more.disagreements] == ["r3", "r4", "r5", "r6", "r7"]


def test_tally_accumulates_serialises_and_feeds_the_judge() -> None:
    comps = build_comparators([Comparator(name=ComparatorName.exact, threshold=1.0)])
    p = ev(Variant.primary, "yes")
    results = [
        compare_pair(Pair(p, ev(Variant.candidate, "yes")), comps),
        compare_pair(Pair(p, ev(Variant.candidate, "no")), comps),
        compare_pair(Pair(p, ev(Variant.baseline, "yes")), comps),
        compare_pair(Pair(ev(Variant.primary, "", status=500), ev(Variant.candidate, "x")), comps),
    ]
    empty = AgreementTally()
    tally = empty.add_many(results)
    assert empty.counts == {}  # immutable: the old tally is unchanged
    t = tally.counts["exact"]
    assert (t.candidate_pairs, t.candidate_agree, t.baseline_pairs, t.baseline_agree) == (2, 1, 1, 1)
    assert tally.skipped_primary_failed == 1
    text = json.dumps(tally.to_record(12.0).to_json())
    stored = OutputTally.model_validate(json.loads(text))
    assert stored.phase_started_at == 12.0 and AgreementTally.from_record(stored) == tally
    assert tally.add(None).skipped_primary_failed == 2

    outputs = Outputs.model_validate({"mqtt": {"broker": "mqtt://b:1883"}, "comparators": [{"name": "exact"}],
                                      "minRelativeAgreement": 0.8})
    (inp,) = judge_inputs(tally, outputs)
    assert (inp.candidate_agree, inp.candidate_pairs, inp.baseline_agree, inp.baseline_pairs) == (1, 2, 1, 1)
    assert inp.fixed_baseline is None and inp.min_relative_agreement == 0.8 and inp.critical
    fixed = Outputs.model_validate({"mqtt": {"broker": "mqtt://b"}, "comparators": [{"name": "exact"}],
                                    "baseline": {"mode": "fixed", "agreement": 0.7}})
    (inp2,) = judge_inputs(tally, fixed)
    assert inp2.fixed_baseline == 0.7 and inp2.baseline_pairs == 0


def _normalize_reference(text: str) -> str:
    """The definition :func:`c.normalize` implements with faster steps."""
    import re
    import unicodedata

    folded = unicodedata.normalize("NFKC", text).casefold()
    folded = folded.translate(str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"}))
    return re.sub(r"\s+", " ", folded).strip()


_TEXT = st.lists(st.sampled_from([*"aZ9_-'. \t\n\x0b\x1c\x85\xa0\u3000\u2028\u2019\u02bcßİﬁＡ東é", "e\u0301"]),
                 max_size=30).map("".join)


@given(_TEXT)
def test_fast_normalize_and_tokens_match_their_definition(text: str) -> None:
    c.normalize.cache_clear()
    c.tokens.cache_clear()
    assert c.normalize(text) == _normalize_reference(text)
    assert c.tokens(text) == tuple(c._TOKEN.findall(_normalize_reference(text)))


def test_normalize_literals() -> None:
    assert c.normalize("  It\u2019s\u00a0 A\u3000TEST\x1c ") == "it's a test"
    assert c.normalize("Tab\tand\x0bvertical") == "tab and vertical"
    assert c.tokens("R2-D2 isn't_here") == ("r2", "d2", "isn", "t", "here")


@given(st.lists(st.sampled_from("ab"), max_size=6), st.lists(st.sampled_from("abc"), max_size=12),
       st.lists(st.sampled_from("abc"), max_size=12), st.lists(st.sampled_from("ab"), max_size=6))
def test_lcs_with_shared_prefix_and_suffix(pre: list[str], a: list[str], b: list[str], suf: list[str]) -> None:
    x, y = pre + a + suf, pre + b + suf
    assert c.lcs_length(x, y) == _lcs_table(x, y)
    assert c.lcs_length(tuple(x), tuple(y)) == _lcs_table(x, y)


def test_parse_json_prefilter_keeps_pythons_json() -> None:
    assert c.parse_json("NaN")[0] and c.parse_json("-Infinity")[0] and c.parse_json(" \n[1]") == (True, [1])
    assert c.parse_json("null") == (True, None) and c.parse_json("true") == (True, True)
    assert c.parse_json("The answer is 4.") == (False, None)
    assert c.parse_json("\x0c[]") == (False, None)  # form feed is not JSON whitespace
    assert c.parse_json("nope") == (False, None) and c.parse_json("") == (False, None)


def test_tally_builder_matches_add_many() -> None:
    comps = build_comparators([Comparator(name=ComparatorName.exact, threshold=1.0),
                               Comparator(name=ComparatorName.token_f1, threshold=0.5)])
    p = ev(Variant.primary, "yes it is")
    results = [compare_pair(Pair(p, ev(v, text, status=s)), comps)
               for v, text, s in [(Variant.candidate, "yes it is", 200), (Variant.candidate, "no", 200),
                                  (Variant.baseline, "yes", 200), (Variant.candidate, "x", 500)]]
    results.append(compare_pair(Pair(ev(Variant.primary, "", status=503), ev(Variant.candidate, "x")), comps))
    builder = c.TallyBuilder()
    for r in results:
        builder.add(r)
    frozen = builder.tally()
    assert frozen is builder.tally()  # cached until the next add
    assert frozen == AgreementTally().add_many(results)
    assert frozen.counts["exact"] == ComparatorCounts(candidate_pairs=3, candidate_agree=1, baseline_pairs=1,
                                                       baseline_agree=0)
    assert frozen.skipped_primary_failed == 1
    resumed = c.TallyBuilder(frozen)
    resumed.add(results[0])
    assert resumed.tally().counts["exact"].candidate_pairs == 4
