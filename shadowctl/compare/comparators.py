"""Output comparators: pure functions that score how much two model answers agree.

Every comparator returns a score in [0, 1]; a pair *agrees* under a comparator
when its score is at least the policy's threshold. The judge never sees scores,
only counts of agreeing pairs, for candidate-vs-primary and for the noise floor
baseline-vs-primary (see :class:`AgreementTally` and docs/outputs.md).

Notes on the less obvious choices:

- Text is normalised with Unicode NFKC, case folding and whitespace collapsing
  before every lexical comparison except ``exact``. Tokens are runs of word
  characters, except that each CJK, kana or Hangul character is a token of its
  own (those scripts do not separate words with spaces).
- ROUGE-L's longest common subsequence uses the bit-parallel algorithm (one
  big-integer step per token of one side), so two 10,000-token answers cost
  milliseconds, not the seconds a quadratic table would.
- ``json-valid`` and ``json-structure`` strip one surrounding Markdown code
  fence first (models often wrap JSON in one). Two answers that are both not
  JSON agree: the comparator asks "does the candidate keep the primary's
  format", not "is it JSON".
- ``semantic`` needs an embedding function that the caller loads from local
  files (an optional extra); this module never imports a model library.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shadowctl.compare.events import OutputEvent, ToolCall, Variant, trace_id
from shadowctl.compare.pairing import Pair
from shadowctl.errors import ShadowctlError
from shadowctl.policy.model import BaselineMode, Comparator, ComparatorName, Outputs, RedactionMode
from shadowctl.policy.status import ComparatorCounts, DisagreementRecord, OutputTally

MAX_DISAGREEMENTS = 5
"""Disagreeing candidate pairs a tally remembers (the last ones), for `shadowctl describe`."""

Embedder = Callable[[str], Sequence[float]]


class ComparatorUnavailable(ShadowctlError):
    """A comparator the policy names cannot run here (for example ``semantic`` without its extra)."""


# --------------------------------------------------------------------------- text helpers

_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+", re.UNICODE)
#: The same tokens for ASCII text, which is already lower case once normalised (a faster pattern).
_ASCII_TOKEN = re.compile(r"[a-z0-9]+")
_APOSTROPHE_CHARS = ("\u2019", "\u2018", "\u02bc")
_APOSTROPHES = str.maketrans(dict.fromkeys(_APOSTROPHE_CHARS, "'"))
_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n(.*?)\n?\s*```\s*$", re.DOTALL)
#: The first character of any JSON text after its leading whitespace (Python's json also takes NaN, Infinity).
_JSON_START = frozenset('{["-0123456789tfnNI')


@functools.lru_cache(maxsize=4096)
def normalize(text: str) -> str:
    """NFKC, case-folded, curly apostrophes straightened, whitespace collapsed to single spaces.

    ``" ".join(s.split())`` collapses exactly the characters the regex ``\\s+`` matches (both
    use ``str.isspace``) and is several times faster; ASCII text skips NFKC (a no-op there) and
    the apostrophe table.
    """
    if text.isascii():
        return " ".join(text.lower().split())
    folded = unicodedata.normalize("NFKC", text).casefold()
    if any(ch in folded for ch in _APOSTROPHE_CHARS):
        folded = folded.translate(_APOSTROPHES)
    return " ".join(folded.split())


@functools.lru_cache(maxsize=4096)
def tokens(text: str) -> tuple[str, ...]:
    """Normalised word tokens (CJK, kana and Hangul characters one by one); punctuation dropped.

    Cached (as :func:`normalize` is): every comparator of a pair reads the same two texts, and the
    primary's text recurs in its baseline pair.
    """
    norm = normalize(text)
    return tuple((_ASCII_TOKEN if norm.isascii() else _TOKEN).findall(norm))


# --------------------------------------------------------------------------- lexical scores


def exact(a: str, b: str) -> float:
    """1 when the texts are identical, byte for byte."""
    return 1.0 if a == b else 0.0


def normalized_exact(a: str, b: str) -> float:
    """1 when the texts are equal after :func:`normalize`."""
    return 1.0 if normalize(a) == normalize(b) else 0.0


def token_f1(a: str, b: str) -> float:
    """F1 of the token multisets (as in SQuAD); two empty answers score 1."""
    ta, tb = tokens(a), tokens(b)
    if not ta or not tb:
        return 1.0 if not ta and not tb else 0.0
    if ta == tb:
        return 1.0
    common, ma, mb = _middles(a, b)  # tokens of a shared prefix and suffix are common tokens
    if ma and mb:
        if len(ma) + len(mb) <= _FEW:
            rest = list(mb)
            for tok in ma:  # each token of one side takes one equal token of the other, while any is left
                if tok in rest:
                    rest.remove(tok)
                    common += 1
        else:
            counts = Counter(ma)
            for tok, n in Counter(mb).items():
                m = counts.get(tok)
                if m:
                    common += n if n < m else m
    if common == 0:
        return 0.0
    precision, recall = common / len(tb), common / len(ta)
    return 2 * precision * recall / (precision + recall)


def _trim(a: Sequence[str], b: Sequence[str]) -> tuple[int, Sequence[str], Sequence[str]]:
    """How many tokens a common prefix and a common suffix of `a` and `b` hold together (not overlapping), and
    what is left of each between them. Those tokens are common to any multiset intersection and to some
    longest common subsequence, so scores need only count the middles; answers that differ in a few words
    leave short middles."""
    n = min(len(a), len(b))
    start = 0
    while start < n and a[start] == b[start]:
        start += 1
    end = 0
    while end < n - start and a[-1 - end] == b[-1 - end]:
        end += 1
    shared = start + end
    if shared:
        a, b = a[start:len(a) - end], b[start:len(b) - end]
    return shared, a, b


_FEW = 16
"""Middles with at most this many tokens together are intersected without building two Counters."""


@functools.lru_cache(maxsize=256)
def _middles(a: str, b: str) -> tuple[int, Sequence[str], Sequence[str]]:
    """:func:`_trim` of the two texts' tokens, once per pair of texts (``token-f1`` and ``rouge-l`` both need it)."""
    return _trim(tokens(a), tokens(b))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (bit-parallel, after Allison-Dix and Hyyrö).

    A common prefix and suffix belong to a longest common subsequence, so they are counted first
    and only the differing middles go through the bit-parallel loop (two answers that differ in a
    few words cost almost nothing).
    """
    return _lcs_of_middles(*_trim(a, b))


def _lcs_of_middles(shared: int, a: Sequence[str], b: Sequence[str]) -> int:
    """:func:`lcs_length`, given what :func:`_trim` made of the two sequences."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return shared
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return shared + len(a) - v.bit_count()


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure (beta = 1) over tokens; two empty answers score 1."""
    ta, tb = tokens(a), tokens(b)
    if not ta or not tb:
        return 1.0 if not ta and not tb else 0.0
    lcs = _lcs_of_middles(*_middles(a, b))
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(tb), lcs / len(ta)
    return 2 * precision * recall / (precision + recall)


def length_ratio(a: str, b: str) -> float:
    """Shorter over longer token count; two empty answers score 1."""
    la, lb = len(tokens(a)), len(tokens(b))
    if la == lb:
        return 1.0
    return min(la, lb) / max(la, lb)


# --------------------------------------------------------------------------- JSON


def _strip_fence(text: str) -> str:
    m = _FENCE.match(text)
    return m.group(1) if m else text


def parse_json(text: str) -> tuple[bool, Any]:
    """(True, value) when the text, minus one surrounding code fence, is JSON; else (False, None)."""
    body = _strip_fence(text)
    head = body.lstrip()[:1]
    if not head or head not in _JSON_START:  # most answers are prose: skip the exception's cost
        return False, None
    try:
        return True, json.loads(body)
    except (ValueError, RecursionError):
        return False, None


@functools.lru_cache(maxsize=1024)
def _shape_of(text: str) -> frozenset[str] | None:
    ok, value = parse_json(text)
    return json_shape(value) if ok else None


def json_valid(a: str, b: str) -> float:
    """1 when both answers are JSON or both are not."""
    return 1.0 if (_shape_of(a) is None) == (_shape_of(b) is None) else 0.0


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def json_shape(value: Any) -> frozenset[str]:
    """The set of `path:type` facts of a JSON value (array positions collapsed to `[]`; values ignored)."""
    out: set[str] = set()
    stack: list[tuple[str, Any]] = [("$", value)]
    while stack:
        path, node = stack.pop()
        out.add(f"{path}:{_json_type(node)}")
        if isinstance(node, dict):
            stack.extend((f"{path}.{key}", child) for key, child in node.items())
        elif isinstance(node, list):
            stack.extend((f"{path}[]", child) for child in node)
    return frozenset(out)


def json_structure(a: str, b: str) -> float:
    """Jaccard similarity of the JSON shapes (keys and types); 1 when both are not JSON, 0 when one is."""
    sa, sb = _shape_of(a), _shape_of(b)
    if sa is None or sb is None:
        return 1.0 if sa is sb else 0.0
    return len(sa & sb) / len(sa | sb)


# --------------------------------------------------------------------------- refusal

#: Phrases that mark a refusal when they appear in the first 400 normalised characters of an answer.
REFUSAL_PHRASES: tuple[str, ...] = (
    "i can't help with",
    "i cannot help with",
    "i can't assist with",
    "i cannot assist with",
    "i can't provide",
    "i cannot provide",
    "i can't comply",
    "i cannot comply",
    "i won't be able to",
    "i'm unable to",
    "i am unable to",
    "i'm not able to",
    "i am not able to",
    "i must decline",
    "i'm sorry, but i can",
    "i am sorry, but i can",
    "as an ai language model, i can't",
    "as an ai language model, i cannot",
)


def trie_pattern(phrases: Iterable[str]) -> str:
    """A regular expression matching exactly the given phrases, as a trie (``i (?:am|can)...``) rather than one
    alternative per phrase: a search fails at most positions after a character or two instead of trying
    every phrase there (three times faster on a 400-character answer; the same matches)."""
    trie: dict[str, Any] = {}
    for phrase in phrases:
        node = trie
        for ch in phrase:
            node = node.setdefault(ch, {})
        node[""] = {}  # a phrase ends here

    def emit(node: dict[str, Any]) -> str:
        alternatives = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not alternatives:
            return ""
        ends = "" in node
        body = alternatives[0] if len(alternatives) == 1 and not ends else "(?:" + "|".join(alternatives) + ")"
        return body + "?" if ends else body

    return emit(trie)


_REFUSAL = re.compile(trie_pattern(REFUSAL_PHRASES))


@functools.lru_cache(maxsize=4096)
def is_refusal(text: str) -> bool:
    """Whether the answer opens with a refusal (see :data:`REFUSAL_PHRASES`)."""
    head = normalize(text[:2000])[:400]
    return _REFUSAL.search(head) is not None


def refusal(a: str, b: str) -> float:
    """1 when both answers refuse or neither does."""
    return 1.0 if is_refusal(a) == is_refusal(b) else 0.0


# --------------------------------------------------------------------------- tool calls


def sha256_text(text: str) -> str:
    """SHA-256 (hex) of a text's UTF-8 bytes (lone surrogates, which JSON can carry, kept as they are)."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def canonical_arguments(arguments: str) -> str:
    """Tool-call arguments as canonical JSON (sorted keys, no spaces), or as they are when not JSON."""
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):
        return arguments


def arguments_key(call: ToolCall) -> str:
    """What two tool calls' arguments are compared by: the hash of their canonical JSON (equal exactly
    when the arguments are JSON-equal), taken from the event where a redacting tap already hashed them."""
    if call.arguments_hash is not None:
        return call.arguments_hash
    return sha256_text(canonical_arguments(call.arguments))


def _canonical_call(call: ToolCall) -> tuple[str, str]:
    return call.name, arguments_key(call)


def tool_calls(a: Sequence[ToolCall] | None, b: Sequence[ToolCall] | None) -> float:
    """Matching calls (same function, JSON-equal arguments, any order) over the larger count; none vs none is 1."""
    ca = Counter(_canonical_call(c) for c in a or ())
    cb = Counter(_canonical_call(c) for c in b or ())
    largest = max(sum(ca.values()), sum(cb.values()))
    if largest == 0:
        return 1.0
    return sum((ca & cb).values()) / largest


# --------------------------------------------------------------------------- semantic


def cosine01(u: Sequence[float], v: Sequence[float]) -> float:
    """Cosine similarity clipped to [0, 1] (opposite or orthogonal meanings both score 0)."""
    if len(u) != len(v):
        raise ValueError(f"embeddings differ in length ({len(u)} vs {len(v)})")
    dot = math.fsum(x * y for x, y in zip(u, v, strict=True))
    nu, nv = math.sqrt(math.fsum(x * x for x in u)), math.sqrt(math.fsum(y * y for y in v))
    if nu == 0.0 or nv == 0.0:
        return 1.0 if nu == nv else 0.0
    return min(1.0, max(0.0, dot / (nu * nv)))


SEMANTIC_HELP = (
    "comparator 'semantic' needs a local embedding model: install the extra "
    "(pip install 'shadowctl[semantic]'), put a sentence-transformers model on local disk and point "
    "SHADOWCTL_EMBEDDING_MODEL (or --embedding-model) at its directory; models are never downloaded at run time"
)


# --------------------------------------------------------------------------- redacted events

REFUSAL_CHARS = 2000
"""Characters of an answer :func:`is_refusal` reads: a redacted prefix at least this long decides it alike."""

_WHOLE_TEXT = frozenset({ComparatorName.normalized_exact, ComparatorName.json_valid, ComparatorName.json_structure})
_PREFIX_TEXT = frozenset({ComparatorName.token_f1, ComparatorName.rouge_l, ComparatorName.semantic,
                          ComparatorName.llm_judge})

RUNS_UNDER: Mapping[RedactionMode, Mapping[ComparatorName, str]] = {
    RedactionMode.none: {name: "on the whole texts" for name in ComparatorName},
    RedactionMode.truncate: {
        ComparatorName.exact: "on the answers' hashes",
        ComparatorName.normalized_exact: "only on answers no longer than maxChars",
        ComparatorName.token_f1: "on the first maxChars characters of each answer",
        ComparatorName.rouge_l: "on the first maxChars characters of each answer",
        ComparatorName.semantic: "on the first maxChars characters of each answer",
        ComparatorName.length_ratio: "on the word counts the taps recorded",
        ComparatorName.json_valid: "only on answers no longer than maxChars",
        ComparatorName.json_structure: "only on answers no longer than maxChars",
        ComparatorName.refusal: f"where maxChars is at least {REFUSAL_CHARS}, or on answers no longer than maxChars",
        ComparatorName.tool_calls: "on the arguments' hashes",
        ComparatorName.llm_judge: "on the first maxChars characters of each answer",
    },
    RedactionMode.hash: {
        ComparatorName.exact: "on the answers' hashes",
        ComparatorName.length_ratio: "on the word counts the taps recorded",
        ComparatorName.tool_calls: "on the arguments' hashes",
    },
    RedactionMode.drop: {ComparatorName.length_ratio: "on the word counts the taps recorded"},
}
"""Which comparators can run on events redacted by each mode, and on what (docs/outputs.md, "Redaction").
A comparator missing from a mode's entry cannot score any pair: its agreement is no data, never a pass."""


def cannot_run(name: ComparatorName, mode: RedactionMode) -> str | None:
    """Why comparator ``name`` cannot run on events redacted by ``mode`` (None: it can, at least on some pairs)."""
    if name in RUNS_UNDER[mode]:
        return None
    needs = "the answers' texts" if name is not ComparatorName.exact else "the answers' texts or hashes"
    return (f"comparator {name.value!r} needs {needs}, which redaction mode {mode.value!r} removes from the "
            f"output events (spec.analysis.outputs.redaction)")


def _whole(event: OutputEvent) -> bool:
    """Whether the event holds its whole answer (unredacted, or truncated where the answer was shorter)."""
    return event.redaction is None or (
        event.redaction == "truncate" and event.output_chars is not None and len(event.output) >= event.output_chars)


def _prefix(event: OutputEvent) -> float:
    """How many characters of the answer the event holds (infinite when whole, 0 without text)."""
    if _whole(event):
        return math.inf
    return len(event.output) if event.redaction == "truncate" else 0.0


def scorable(name: ComparatorName, a: OutputEvent, b: OutputEvent) -> bool:
    """Whether comparator ``name`` can score this pair, given what redaction left in the two events."""
    if a.redaction is None and b.redaction is None:
        return True
    if name is ComparatorName.exact:
        return a.redaction != "drop" and b.redaction != "drop"
    if name in _WHOLE_TEXT:
        return _whole(a) and _whole(b)
    if name in _PREFIX_TEXT:
        return min(_prefix(a), _prefix(b)) > 0
    if name is ComparatorName.refusal:
        return min(_prefix(a), _prefix(b)) >= REFUSAL_CHARS
    if name is ComparatorName.length_ratio:
        return (a.redaction is None or a.output_words is not None) and (b.redaction is None or b.output_words is not None)
    if name is ComparatorName.tool_calls:
        return a.redaction != "drop" and b.redaction != "drop"
    return False


def _output_hash(event: OutputEvent) -> str:
    return event.output_hash if event.output_hash is not None else sha256_text(event.output)


def _words(event: OutputEvent) -> int:
    return event.output_words if event.redaction is not None and event.output_words is not None \
        else len(tokens(event.output))


def _texts(a: OutputEvent, b: OutputEvent) -> tuple[str, str]:
    """The two answers cut to the shorter of the prefixes the events hold (both whole: as they are)."""
    n = min(_prefix(a), _prefix(b))
    if n == math.inf:
        return a.output, b.output
    cut = int(n)
    return a.output[:cut], b.output[:cut]


# --------------------------------------------------------------------------- binding to a policy

_TEXT_SCORERS: dict[ComparatorName, Callable[[str, str], float]] = {
    ComparatorName.exact: exact,
    ComparatorName.normalized_exact: normalized_exact,
    ComparatorName.token_f1: token_f1,
    ComparatorName.rouge_l: rouge_l,
    ComparatorName.length_ratio: length_ratio,
    ComparatorName.json_valid: json_valid,
    ComparatorName.json_structure: json_structure,
    ComparatorName.refusal: refusal,
}


@dataclass(frozen=True, slots=True)
class BoundComparator:
    """A policy comparator ready to score pairs of events."""

    name: ComparatorName
    threshold: float
    critical: bool
    score: Callable[[OutputEvent, OutputEvent], float]
    slow: bool = False
    """Runs a model (milliseconds per pair, not microseconds): callers score it off their event loop."""
    text: Callable[[str, str], float] | None = None
    """The same score from the two answers' texts alone, where neither event is redacted (None: only ``score``):
    :func:`compare_pair` calls it directly, which saves the per-pair redaction checks."""

    def can_score(self, primary: OutputEvent, other: OutputEvent) -> bool:
        """Whether this comparator can score the pair (see :func:`scorable`: redacted events)."""
        return scorable(self.name, primary, other)


def _text_scorer(name: ComparatorName) -> Callable[[OutputEvent, OutputEvent], float]:
    fn = _TEXT_SCORERS[name]
    if name is ComparatorName.exact:
        def score(primary: OutputEvent, other: OutputEvent) -> float:
            if primary.redaction is None and other.redaction is None:
                return fn(primary.output, other.output)
            return 1.0 if _output_hash(primary) == _output_hash(other) else 0.0
    elif name is ComparatorName.length_ratio:
        def score(primary: OutputEvent, other: OutputEvent) -> float:
            la, lb = _words(primary), _words(other)
            return 1.0 if la == lb else min(la, lb) / max(la, lb)
    else:
        def score(primary: OutputEvent, other: OutputEvent) -> float:
            if primary.redaction is None and other.redaction is None:
                return fn(primary.output, other.output)
            return fn(*_texts(primary, other))

    return score


def _tool_scorer(primary: OutputEvent, other: OutputEvent) -> float:
    return tool_calls(primary.tool_calls, other.tool_calls)


def _semantic_scorer(embed: Embedder) -> Callable[[OutputEvent, OutputEvent], float]:
    def score(primary: OutputEvent, other: OutputEvent) -> float:
        a, b = _texts(primary, other)
        if a == b:
            return 1.0
        return cosine01(embed(a), embed(b))

    return score


ASYNC_COMPARATORS = frozenset({ComparatorName.llm_judge})
"""Comparators that ask a remote model per pair: the output source hands them pairs
(shadowctl.sources.llmjudge), and they are not bound here."""


def build_comparators(specs: Iterable[Comparator], *, embedder: Embedder | None = None) -> list[BoundComparator]:
    """Bind the policy's comparators that score a pair here and now (not :data:`ASYNC_COMPARATORS`); raise
    :class:`ComparatorUnavailable` for ``semantic`` without an embedder."""
    out: list[BoundComparator] = []
    for spec in specs:
        if spec.name in ASYNC_COMPARATORS:
            continue
        if spec.name is ComparatorName.semantic:
            if embedder is None:
                raise ComparatorUnavailable(SEMANTIC_HELP)
            fn = _semantic_scorer(embedder)
        elif spec.name is ComparatorName.tool_calls:
            fn = _tool_scorer
        else:
            fn = _text_scorer(spec.name)
        out.append(BoundComparator(name=spec.name, threshold=spec.threshold, critical=spec.critical, score=fn,
                                   slow=spec.name is ComparatorName.semantic, text=_TEXT_SCORERS.get(spec.name)))
    return out


@dataclass(frozen=True, slots=True)
class PairResult:
    """The scores of one pair, comparator by comparator."""

    request_id: str
    variant: Variant
    scores: Mapping[ComparatorName, float]
    agrees: Mapping[ComparatorName, bool]
    trace_id: str | None = None
    """The user's trace: from the primary's traceparent, else the other answer's (the mirror copy's)."""
    redacted: tuple[ComparatorName, ...] = ()
    """Comparators that could not score this pair: redaction removed what they read."""


def compare_pair(pair: Pair, comparators: Sequence[BoundComparator]) -> PairResult | None:
    """Score a pair. None when the primary itself failed (nothing to agree with).

    A failed candidate or baseline answer (non-2xx, or cut off) disagrees under every comparator:
    an error is not an answer that agrees with the primary's. A comparator that cannot score the pair
    because redaction removed what it reads (:func:`scorable`) is left out of the result and named in
    ``redacted``: the pair counts neither for nor against it.
    """
    primary, other = pair.primary, pair.other
    if not primary.ok:
        return None
    other_ok = other.ok
    scores: dict[ComparatorName, float] = {}
    agrees: dict[ComparatorName, bool] = {}
    redacted: list[ComparatorName] = []
    if primary.redaction is None and other.redaction is None:  # every comparator can score: no checks
        a, b = primary.output, other.output
        for comp in comparators:
            if other_ok:
                text = comp.text
                value = text(a, b) if text is not None else comp.score(primary, other)
                if not 0.0 < value <= 1.0:  # clamped as below (NaN and -0.0 to 0.0); most scores are in range
                    value = min(1.0, max(0.0, value))
            else:
                value = 0.0
            scores[comp.name] = value
            agrees[comp.name] = value >= comp.threshold
    else:
        for comp in comparators:
            if not comp.can_score(primary, other):
                redacted.append(comp.name)
                continue
            value = min(1.0, max(0.0, comp.score(primary, other))) if other_ok else 0.0
            scores[comp.name] = value
            agrees[comp.name] = value >= comp.threshold
    traceparent = primary.traceparent or other.traceparent
    return PairResult(request_id=pair.request_id, variant=pair.variant, scores=scores, agrees=agrees,
                      trace_id=trace_id(traceparent) if traceparent else None, redacted=tuple(redacted))


# --------------------------------------------------------------------------- tally


@dataclass(frozen=True, slots=True)
class AgreementTally:
    """Agreement counts per comparator; immutable, every update returns a new tally."""

    counts: Mapping[str, ComparatorCounts] = field(default_factory=dict)
    skipped_primary_failed: int = 0
    disagreements: tuple[DisagreementRecord, ...] = ()
    """The last :data:`MAX_DISAGREEMENTS` candidate pairs that disagreed under some comparator, oldest first."""

    def add(self, result: PairResult | None) -> AgreementTally:
        """The tally with one more pair result (None: a pair whose primary failed)."""
        if result is None:
            return replace(self, skipped_primary_failed=self.skipped_primary_failed + 1)
        return self.add_many([result])

    def add_many(self, results: Iterable[PairResult | None]) -> AgreementTally:
        """The tally with many pair results (cheaper than one :meth:`add` per result)."""
        builder = TallyBuilder(self)
        for result in results:
            builder.add(result)
        return builder.tally()

    def to_record(self, phase_started_at: float | None = None) -> OutputTally:
        """The tally as `.status.outputs` stores it, for the phase that started at `phase_started_at`."""
        return OutputTally(
            comparators=dict(sorted(self.counts.items())),
            skipped_primary_failed=self.skipped_primary_failed,
            phase_started_at=phase_started_at,
            disagreements=list(self.disagreements),
        )

    @classmethod
    def from_record(cls, record: OutputTally) -> AgreementTally:
        """Inverse of :meth:`to_record` (a tally kept in a policy's status across restarts)."""
        return cls(counts=dict(record.comparators), skipped_primary_failed=record.skipped_primary_failed,
                   disagreements=tuple(record.disagreements[-MAX_DISAGREEMENTS:]))


def _counts(row: list[int]) -> ComparatorCounts:
    return ComparatorCounts(candidate_pairs=row[0], candidate_agree=row[1], baseline_pairs=row[2],
                            baseline_agree=row[3], redacted_pairs=row[4])


class TallyBuilder:
    """A mutable :class:`AgreementTally` for a stream of pair results (one add per pair, no copying).

    :meth:`tally` returns the frozen tally, cached until the next :meth:`add`.
    """

    __slots__ = ("_by_name", "_frozen", "_last", "_rows", "_skipped")

    def __init__(self, start: AgreementTally | None = None) -> None:
        start = start if start is not None else AgreementTally()
        self._rows: dict[str, list[int]] = {
            name: [t.candidate_pairs, t.candidate_agree, t.baseline_pairs, t.baseline_agree, t.redacted_pairs]
            for name, t in start.counts.items()
        }
        self._by_name: dict[ComparatorName, list[int]] = {}
        """The same rows by comparator (a comparator's ``.value`` costs a Python call per read)."""
        self._skipped = start.skipped_primary_failed
        # Disagreeing pair results are kept as they are and made records only in tally(): most are pushed out
        # of the last MAX_DISAGREEMENTS before anyone reads them.
        self._last: deque[DisagreementRecord | PairResult] = deque(start.disagreements, maxlen=MAX_DISAGREEMENTS)
        self._frozen: AgreementTally | None = start

    def _row(self, name: ComparatorName) -> list[int]:
        row = self._by_name.get(name)
        if row is None:
            row = self._by_name[name] = self._rows.setdefault(name.value, [0, 0, 0, 0, 0])
        return row

    def add(self, result: PairResult | None) -> None:
        """Count one pair result (None: a pair whose primary failed)."""
        self._frozen = None
        if result is None:
            self._skipped += 1
            return
        candidate = result.variant is Variant.candidate
        offset = 0 if candidate else 2
        rows = self._by_name
        if candidate:
            for name in result.redacted:
                self._row(name)[4] += 1
        disagrees = False
        for name, agrees in result.agrees.items():
            row = rows.get(name)
            if row is None:
                row = self._row(name)
            row[offset] += 1
            if agrees:
                row[offset + 1] += 1
            else:
                disagrees = True
        if candidate and disagrees:
            self._last.append(result)

    def tally(self) -> AgreementTally:
        """The counts so far, frozen."""
        if self._frozen is None:
            self._frozen = AgreementTally(
                counts={name: _counts(row) for name, row in self._rows.items()},
                skipped_primary_failed=self._skipped,
                disagreements=tuple(_disagreement(item) for item in self._last),
            )
        return self._frozen


def _disagreement(item: DisagreementRecord | PairResult) -> DisagreementRecord:
    """A disagreeing candidate pair as `.status.outputs` records it (a record already: as it is)."""
    if isinstance(item, DisagreementRecord):
        return item
    return DisagreementRecord(request_id=item.request_id, trace_id=item.trace_id,
                              comparators=[name.value for name, agrees in item.agrees.items() if not agrees])


@dataclass(frozen=True, slots=True)
class AgreementInput:
    """What the judge needs for one comparator: two proportions and the relative margin.

    Pass when candidate_agree/candidate_pairs >= min_relative_agreement * baseline rate, where the
    baseline rate is baseline_agree/baseline_pairs (mode primary-replica) or ``fixed_baseline``
    (mode fixed, then baseline_pairs is 0). A rate with 0 pairs is no data, never a pass.
    """

    comparator: str
    critical: bool
    candidate_agree: int
    candidate_pairs: int
    baseline_agree: int
    baseline_pairs: int
    fixed_baseline: float | None
    min_relative_agreement: float
    redacted_pairs: int = 0
    """Candidate pairs this comparator could not score because their events were redacted."""
    unavailable: str | None = None
    """Why this comparator cannot run at all under the policy's redaction (its agreement is then no data)."""
    min_win_or_tie: float | None = None
    """A model judge's verdicts (llm-judge): pass when the candidate wins or ties at least this share of its
    pairs, fail when it loses more than half; judged against :data:`EVEN_MATCH`, not the baseline."""

    def no_data_reason(self) -> str | None:
        """Why the candidate's agreement is no data, where redaction is the reason (else None)."""
        if self.unavailable is not None:
            return self.unavailable
        if self.candidate_pairs == 0 and self.redacted_pairs:
            return (f"comparator {self.comparator!r} could not score any of {self.redacted_pairs} candidate pairs: "
                    f"their output events are redacted (the taps' --redact) and lack what it reads")
        return None


EVEN_MATCH = 0.5
"""The share of pairs a candidate as good as the primary wins or ties at least (it loses as often as it wins)."""


def judge_inputs(tally: AgreementTally, outputs: Outputs) -> list[AgreementInput]:
    """The numbers the controller hands the judge, one entry per comparator of the policy."""
    fixed = outputs.baseline.agreement if outputs.baseline.mode is BaselineMode.fixed else None
    out: list[AgreementInput] = []
    for spec in outputs.comparators:
        t = tally.counts.get(spec.name.value, ComparatorCounts())
        if spec.judge is not None:  # a model judge: its win-or-tie share against an even match
            out.append(AgreementInput(
                comparator=spec.name.value, critical=spec.critical, candidate_agree=t.candidate_agree,
                candidate_pairs=t.candidate_pairs, baseline_agree=0, baseline_pairs=0, fixed_baseline=EVEN_MATCH,
                min_relative_agreement=outputs.min_relative_agreement, redacted_pairs=t.redacted_pairs,
                unavailable=cannot_run(spec.name, outputs.redaction.mode), min_win_or_tie=spec.judge.min_win_or_tie))
            continue
        out.append(
            AgreementInput(
                comparator=spec.name.value,
                critical=spec.critical,
                candidate_agree=t.candidate_agree,
                candidate_pairs=t.candidate_pairs,
                baseline_agree=0 if fixed is not None else t.baseline_agree,
                baseline_pairs=0 if fixed is not None else t.baseline_pairs,
                fixed_baseline=fixed,
                min_relative_agreement=outputs.min_relative_agreement,
                redacted_pairs=t.redacted_pairs,
                unavailable=cannot_run(spec.name, outputs.redaction.mode),
            )
        )
    return out
