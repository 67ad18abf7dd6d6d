"""shadowctl.tap.jsonbody reads and writes exactly what ``json.loads`` and ``json.dumps`` do (a rewrite's bytes).

Pure functions: compared with the standard module on generated documents and on the edge cases where the two
could part (encodings, a BOM, NaN, lone surrogates, trailing data, deep nesting, documents that are not objects).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shadowctl.tap.jsonbody import dump_compact, load_object


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
