"""shadowctl.tap.jsonbody reads and writes exactly what ``json.loads`` and ``json.dumps`` do (a rewrite's bytes).

Pure functions: compared with the standard module on generated documents and on the edge cases where the two
could part (encodings, a BOM, NaN, lone surrogates, trailing data, deep nesting, documents that are not objects);
``edit_object`` (orjson where it gives json's bytes) also where orjson and json part (integers beyond 64 bits,
floats below 1e-4).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shadowctl.tap.jsonbody import dump_compact, edit_object, load_object


def reference_load(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def reference_dump(data: dict[str, Any]) -> bytes | None:
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, RecursionError):
        return None


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
documents = st.dictionaries(st.text(), st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                                                    | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20))


@settings(max_examples=300, deadline=None)
@given(documents, st.sampled_from([{}, {"indent": 1}, {"ensure_ascii": False}]))
def test_generated_documents_read_and_write_as_the_json_module(data: dict[str, Any], style: dict[str, Any]) -> None:
    body = json.dumps(data, **style).encode()
    loaded = load_object(body)
    assert loaded == reference_load(body) == data
    assert loaded is not None and dump_compact(loaded) == reference_dump(loaded)


def test_edge_cases_match_the_json_module() -> None:
    bodies = [
        b'{"a": 1}', b'  {"a": 1}  \n', b'{"a": 1} x', b'{"a": 1}{}', b"", b"   ", b"[1, 2]", b'"text"', b"null",
        b'{"a": NaN, "b": Infinity, "c": -Infinity}', b'{"a": 1e999}', b'{"s": "\\ud800"}', b'{"s": "\\u00e9\xc3\xa9"}',
        b'\xef\xbb\xbf{"bom": true}', '{"utf16": "\u00e9"}'.encode("utf-16"), '{"le": 1}'.encode("utf-16-le"),
        '{"utf32": 1}'.encode("utf-32"), b'{"bad": "\xff"}', b'{"a": 1, "a": 2}', b'{"ctrl": "a\tb"}',
        b"[" * 100_000 + b"]" * 100_000, b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"a": 1',
    ]
    for body in bodies:
        loaded = load_object(body)
        expected = reference_load(body)
        assert (loaded is None) == (expected is None), body[:40]
        if loaded is not None and expected is not None:
            assert json.dumps(loaded, sort_keys=True, allow_nan=True) == json.dumps(expected, sort_keys=True,
                                                                                      allow_nan=True), body[:40]
            assert dump_compact(loaded) == reference_dump(expected), body[:40]


def test_what_json_cannot_carry_is_none() -> None:
    assert dump_compact({"t": float("nan")}) is None and dump_compact({"t": float("inf")}) is None
    assert dump_compact({"s": "\ud800"}) is None  # a lone surrogate has no UTF-8
    deep: dict[str, Any] = {}
    for _ in range(100_000):
        deep = {"d": deep}
    assert dump_compact(deep) is None


def reference_edit(body: bytes, edit: Callable[[dict[str, Any]], bool]) -> bytes | None:
    data = reference_load(body)
    if data is None or not edit(data):
        return None
    return reference_dump(data)


def stamp(data: dict[str, Any]) -> bool:
    """An edit like a rewrite's: a model name, a float and an integer set."""
    data["model"] = "m-v2"
    data["temperature"] = 0.2
    data["max_tokens"] = 64
    return True


numbers = (st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.floats(min_value=-1e-3, max_value=1e-3))
edit_scalars = st.none() | st.booleans() | numbers | st.text()
edit_documents = st.dictionaries(st.text(), st.recursive(
    edit_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20))


@settings(max_examples=500, deadline=None)
@given(edit_documents, st.sampled_from([{}, {"ensure_ascii": False}, {"separators": (",", ":")}]),
       st.sampled_from([0.2, 1e-5, 1e-7, 5e-324, 1e16, 2**64, 2**64 - 1, -(2**63) - 1, "t"]))
def test_edit_object_writes_the_json_modules_bytes(data: dict[str, Any], style: dict[str, Any], added: object) -> None:
    """orjson parses and writes where it gives the same bytes; big integers (read as floats by orjson), floats
    below 1e-4 (written otherwise) and integers beyond 64 bits (refused) take the json way, with json's bytes."""
    body = json.dumps(data, **style).encode()

    def edit(d: dict[str, Any]) -> bool:
        d["added"] = added
        return stamp(d)

    assert edit_object(body, edit) == reference_edit(body, edit)


def test_edit_object_edge_cases_match_the_json_module() -> None:
    """What orjson refuses and json reads (NaN, a BOM, UTF-16, lone surrogates, 1e999, deep nesting) or reads
    otherwise (integers beyond 64 bits) gives json's answer: bytes, or None where json's cannot be JSON."""
    bodies = [
        b'{"a": 1}', b'  {"a": 1}  \n', b'{"a": 1} x', b'{"a": 1}{}', b"", b"[1, 2]", b'"text"', b"null", b"NaN",
        b'{"a": NaN}', b'{"a": 1e999}', b'{"a": -1e999}', b'{"s": "\\ud800"}', b'{"s": "\xed\xa0\x80"}',
        b'{"s": "\\ud83d\\ude00 \xf0\x9f\x98\x80"}', b'\xef\xbb\xbf{"bom": true}', '{"utf16": "\u00e9"}'.encode("utf-16"),
        '{"utf32": 1}'.encode("utf-32"), b'{"bad": "\xff"}', b'{"a": 1, "a": 2}', b'{"ctrl": "a\tb"}',
        b'{"c": "\\u0000\\u001e\\u007f\\u2028"}', b'{"n": 18446744073709551615}', b'{"n": 18446744073709551616}',
        b'{"n": -9223372036854775808}', b'{"n": -9223372036854775809}', b'{"n": ' + b"9" * 400 + b"}",
        b'{"f": 1e-5, "g": 0.00001, "h": 1E-7, "i": 1e16, "j": 1.5e300, "k": -0.0, "l": 5e-324}',
        b'{"text": "1e5 apples, .0000 and 10e-3"}', b'{"x": ' + b"[" * 300 + b"]" * 300 + b"}",
        b'{"x": ' + b"[" * 2000 + b"]" * 2000 + b"}", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ]
    for body in bodies:
        assert edit_object(body, stamp) == reference_edit(body, stamp), body[:60]


def test_edit_object_refused_edit_is_none() -> None:
    assert edit_object(b'{"a": 1}', lambda d: False) is None
    assert edit_object(b'{"a": NaN}', lambda d: False) is None


def test_edit_object_takes_one_pass_for_a_plain_request_and_two_where_orjson_would_part() -> None:
    """The edit runs once where orjson's bytes are json's (the chat request of bench/tap/rewrite.py's kind), and
    once more on json's parse where they would part: a body orjson refuses runs it only on json's."""
    calls: list[int] = []

    def counted(d: dict[str, Any]) -> bool:
        calls.append(1)
        return stamp(d)

    chat = json.dumps({"model": "chat", "stream": True, "max_tokens": 256, "temperature": 0.7, "messages": [
        {"role": "system", "content": "Be brief. Ünïcode kept."}, {"role": "user", "content": "Hello, 10 apples?"}]})
    for body, passes in ((chat.encode(), 1), (b'{"n": 18446744073709551616}', 2), (b'{"f": 1e-05}', 2),
                         (b'{"a": NaN}', 1), (b"\xef\xbb\xbf{}", 1)):
        calls.clear()
        assert edit_object(body, counted) == reference_edit(body, stamp)
        assert len(calls) == passes, body
