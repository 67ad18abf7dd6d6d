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
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

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
