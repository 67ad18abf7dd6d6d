"""Whether a regular expression is one Prometheus can use (RE2 syntax), checked when a policy loads.

``spec.analysis.variants.X.pod`` is a regular expression that goes into PromQL as it is (quoted). The
metric source asks Prometheus for many rollouts in one query, and joins their pod patterns into one
``=~`` matcher; a pattern Prometheus's RE2 cannot compile fails that whole query, so one policy's
pattern would leave every rollout in the batch without data. So the constructs RE2 does not have are
refused here, with what to write instead, before the policy is accepted.

What RE2 lacks (https://github.com/google/re2/wiki/Syntax): lookahead and lookbehind, backreferences,
atomic groups, possessive quantifiers, conditionals, inline comments, ``\\Z`` and ``\\G``. A pattern free
of those is also compiled by Python's ``re`` where both share the syntax, which finds unbalanced
parentheses and brackets, a bad repetition and the like; patterns using what only RE2 has (``\\pL``,
``\\z``, ``\\Q...\\E``, ``[[:alpha:]]``) are left to Prometheus.
"""

from __future__ import annotations

import re
import warnings

_GROUPS = (
    ("(?=", "lookahead"), ("(?!", "negative lookahead"), ("(?<=", "lookbehind"),
    ("(?<!", "negative lookbehind"), ("(?>", "atomic group"), ("(?(", "conditional group"),
    ("(?P=", "backreference"), ("(?#", "inline comment"),
)
_COUNTED = re.compile(r"\{\d+(,\d*)?\}$")
_RE2_ONLY = ("\\p", "\\P", "\\z", "\\C", "\\Q", "[:")


def re2_problem(pattern: str) -> str | None:
    """What in ``pattern`` RE2 (Prometheus) cannot compile, or None."""
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1:i + 2]
            if not in_class and nxt.isdigit() and nxt != "0":
                return f"backreference \\{nxt} at {i} (RE2 has none)"
            if nxt in ("Z", "G") and not in_class:
                return f"\\{nxt} at {i} (RE2 has none; the pattern is anchored at both ends already)"
            i += 2
            continue
        if in_class:
            if pattern.startswith("[:", i):  # a POSIX class such as [:alpha:] inside brackets
                end = pattern.find(":]", i + 2)
                i = end + 2 if end >= 0 else i + 1
                continue
            if ch == "]":
                in_class = False
            i += 1
            continue
        if ch == "[":
            in_class = True
            i += 1
            if pattern.startswith("^", i):
                i += 1
            if pattern.startswith("]", i):  # a ']' first in the class is a literal
                i += 1
            continue
        for opener, what in _GROUPS:
            if pattern.startswith(opener, i):
                return f"{what} {opener!r} at {i} (RE2 has none)"
        repeat = ch in "*+?" and not (ch == "?" and pattern[i - 1:i] == "(")
        if ch == "}" and _COUNTED.search(pattern, 0, i + 1):
            repeat = True
        if repeat and pattern.startswith("+", i + 1):
            return f"possessive quantifier {pattern[i:i + 2]!r} at {i} (RE2 has none)"
        i += 1
    if any(token in pattern for token in _RE2_ONLY):
        return None  # RE2 syntax Python's re does not read: Prometheus is the judge
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "possible nested set" and the like: RE2 reads those fine
        try:
            re.compile(pattern)
        except re.error as exc:
            return f"not a regular expression: {exc}"
    return None
