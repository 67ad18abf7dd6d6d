"""Parse and serialize a request body for a rewrite, as ``json.loads`` and ``json.dumps`` do, with less around them.

Why: a routed rewrite (the canary's share, rewritten) parses and serializes the user's own request before it is
forwarded, so its cost is latency. On a warm CPU that is about 10 us for a 1.3 KB chat request, but a tap serves
one request now and then, and between two of them the machine's other work evicts the interpreter's caches:
measured one call every 20 ms (bench/tap/rewrite.py's body, this 2-core machine), ``json.loads`` of even a
7-byte document took 37 us and the whole rewrite 73 us, most of it fixed cost per call rather than per byte.
Calling the C scanner and encoder of the standard ``json`` module directly (made once) leaves out the Python
layers around them (``loads`` -> ``JSONDecoder.decode`` -> ``raw_decode``; ``dumps`` -> a new ``JSONEncoder``
-> ``encode`` -> ``iterencode`` -> a new C encoder per call), which is most of what a cold call pays for them.

The results are the standard module's, byte for byte: the same encoding detection for bytes, the same grammar
(NaN and Infinity read, as ``json.loads`` reads them), the same output (compact separators, non-ASCII kept,
``allow_nan=False``); where the C accelerator is missing, the functions fall back to ``json`` itself. The one
difference is that the encoder does not look for circular references: a body parsed from JSON has none, and
what a rewrite adds to it is new values.

:func:`edit_object` (a routed rewrite: parse, edit, serialize) goes further: it parses and serializes with orjson
(Rust; called once every 20 ms on this 2-core machine, 27 us to parse bench/tap/rewrite.py's 1.3 KB body against
53 us for the C scanner, 20 us to serialize against 50 us; warm 0.9 and 0.2 us against 6.5 and 6.4), where that
gives the standard module's bytes, and goes the ``json`` way where it would not. Where they part (checked on
generated documents and edge cases, tests/test_tap_jsonbody.py):

- orjson refuses what ``json`` reads: NaN and Infinity, numbers that overflow to infinity, lone surrogates
  (``\\ud800``, or their bytes), a BOM, UTF-16 and UTF-32, nesting beyond 1,024 (beyond 255 when it serializes)
  and integers beyond 64 bits when it serializes: those bodies take the ``json`` way, whatever they end in.
- orjson reads integers beyond 64 bits as floats (``json``: exact integers), and it writes floats below 1e-4 in
  another form (``1e-7``, ``0.00001``; ``json``: ``1e-07``, ``1e-05``); every other finite float is written the
  same. Both show in orjson's output as a digit followed by a signed exponent, or as ``.0000``: such an output
  is dropped and the body goes the ``json`` way (so does a string that happens to hold ``1e-5`` or ``.0000``,
  which costs time, not bytes).
- orjson writes NaN and Infinity as ``null`` (``json``: refused): a body orjson read holds none, so only the edit
  could add one; :func:`edit_object` requires that it adds only values JSON can carry (the route setting's
  parameters are bounded: ``0 <= temperature <= 2``, ``0 < topP <= 1``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final

import orjson

try:
    import _json
except ImportError:  # an interpreter without the C accelerator: json itself
    _SCAN = _ENCODE = None
else:
    _SCAN = _json.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # reads the decoder's settings
    _ENCODE = _json.make_encoder(None, json.JSONEncoder().default, _json.encode_basestring, None, ":", ",", False,
                                 False, False)

_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")
"""What ``json`` skips around a document (its ``decoder.WHITESPACE``)."""


def _skip(text: str, at: int) -> int:
    """Where the whitespace that starts at `at` ends."""
    found = _WHITESPACE.match(text, at)
    return found.end() if found is not None else at


def load_object(body: bytes) -> dict[str, Any] | None:
    """The JSON object `body` holds (``json.loads(body)``), or None where it is not valid JSON or not an object."""
    try:
        if _SCAN is None:
            data = json.loads(body)
        else:
            text = body.decode(json.detect_encoding(body), "surrogatepass")
            data, end = _SCAN(text, _skip(text, 0))
            if _skip(text, end) != len(text):
                return None
    except (ValueError, RecursionError, StopIteration):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) else None


def dump_compact(data: dict[str, Any]) -> bytes | None:
    """``json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)`` as UTF-8, or None where
    JSON cannot carry a value (a float that is NaN or infinite) or the nesting is too deep."""
    try:
        if _ENCODE is None:
            return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        return "".join(_ENCODE(data, 0)).encode()
    except (ValueError, RecursionError):
        return None


_NUMBER_SHAPE: Final = bytes(ord("0") if chr(c).isdigit() and c < 128 else c if c in b"e+-." else ord(" ")
                             for c in range(256))
"""A byte for byte map of orjson's output to its digits (as ``0``), ``e``, signs and points, anything else a space."""


def _parts(out: bytes) -> bool:
    """Whether orjson's bytes `out` may not be ``json``'s: a float in exponent form (orjson always writes its sign;
    from 1e16 up, which includes any integer orjson read beyond 64 bits, or below 1e-4) or in decimal form below
    1e-4. Only floats below 1e-4 are written otherwise, and integers read as floats, but the rest costs nothing
    and a string holding ``1e-5``, ``2e+3`` or ``.0000`` goes the ``json`` way too: time, not bytes. The map
    (0.5 us for 1.3 KB) only where the output holds a sign at all (a hyphen in text, a negative number).
    Searches of two bytes or more cost about 0.7 us per KB here; of one byte, a fifth of that."""
    if b"-" not in out and b"+" not in out:  # one byte each: memchr
        return b".0000" in out
    shape = out.translate(_NUMBER_SHAPE)
    return b"0e-" in shape or b"0e+" in shape or b".0000" in shape


def edit_object(body: bytes, edit: Callable[[dict[str, Any]], bool]) -> bytes | None:
    """``dump_compact`` of the JSON object `body` holds after ``edit(data)`` changed it in place (``edit`` returns
    False: None); None where `body` is not a JSON object or the result cannot be JSON. The bytes are always the
    ``json`` module's; orjson makes them where it gives the same (see the module docstring). `edit` must add only
    values JSON can carry (no NaN or infinite floats: orjson would write them as ``null``); it may be called twice
    (on orjson's parse, then on ``json``'s) and must do the same both times, and its verdict must not depend on
    integers beyond 64 bits (orjson's parse holds them as floats; a rewrite's depends on texts only)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:  # NaN, a BOM, UTF-16, a lone surrogate, ... or not JSON: json decides
        pass
    else:
        if not isinstance(data, dict):
            return None  # valid JSON for both, and not an object
        if not edit(data):
            return None
        try:
            out = orjson.dumps(data)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits from the edit, nesting beyond 255, ...
            pass
        else:
            if not _parts(out):
                return out
    data = load_object(body)
    if data is None or not edit(data):
        return None
    return dump_compact(data)
