"""Prompts for the load generator and answers for the simulated model servers (pure, seeded).

Why answers are built this way: agreement testing needs two *different*
server processes to give the same answer to the same prompt, without a shared
model. The reference answer is therefore a pure function of the prompt text
(seeded by its SHA-256), never of the model name, the server or the request id,
so a primary and a candidate agree unless a knob says otherwise. Natural LLM
non-determinism is imitated by :func:`perturb` (a few words swapped, so two
primary replicas disagree a little: the noise baseline), and a behaviour change
by :func:`drifted_answer` (a different answer altogether).

Tokens are whitespace-led words (``re.findall(r"\\s*\\S+")``): joining them gives
the text back exactly, so a streamed answer and a non-streamed one are equal.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Category = Literal["chat", "summarize", "code", "json", "long"]
CATEGORIES: tuple[Category, ...] = ("chat", "summarize", "code", "json", "long")

_TOKEN = re.compile(r"\s*\S+")

# ----------------------------------------------------------------------------- answer material

_CHAT = (
    "That depends mostly on how much traffic the service sees at peak.",
    "A good first step is to measure before changing anything.",
    "In most setups the default settings are a reasonable place to start.",
    "The short answer is yes, with a few caveats worth knowing.",
    "You can think of it as a queue that drains at a fixed rate.",
    "Most teams roll such a change out gradually and watch the error rate.",
    "The trade-off is between latency for each user and total throughput.",
    "If the numbers look wrong, check the units first.",
    "It helps to write the expected result down before running the test.",
    "There is no single right answer, but there are common patterns.",
    "Keep the old version running until the new one has proven itself.",
    "A smaller batch size lowers latency and usually lowers throughput too.",
    "Caching the result is often cheaper than computing it again.",
    "The documentation describes this under the configuration section.",
    "Retries hide short failures but can amplify long ones.",
    "Start with one replica and add more once the load is known.",
)
_SUMMARY = (
    "The text argues that gradual rollouts reduce the risk of outages.",
    "Its main point is that measurement should come before optimisation.",
    "The author describes three incidents and what each one taught the team.",
    "In short, the proposal trades a little latency for much lower cost.",
    "The article concludes that the migration was worth the effort.",
    "Key findings: error rates fell, and response times stayed flat.",
    "The report recommends monitoring tail latency, not only the median.",
    "It summarises the quarter as stable, with one notable regression.",
    "The passage explains why the old design could not scale further.",
    "Overall the document is a checklist for safe deployments.",
)
_CODE_INTRO = (
    "Here is a small function that does it:",
    "One way to write this in Python:",
    "A straightforward implementation looks like this:",
    "You can solve it with a short helper:",
)
_CODE_BODIES = (
    "def moving_average(values, window):\n    out = []\n    for i in range(len(values) - window + 1):\n"
    "        out.append(sum(values[i:i + window]) / window)\n    return out",
    "def is_palindrome(text):\n    cleaned = [c.lower() for c in text if c.isalnum()]\n    return cleaned == cleaned[::-1]",
    "def chunk(items, size):\n    return [items[i:i + size] for i in range(0, len(items), size)]",
    "def count_words(text):\n    counts = {}\n    for word in text.split():\n        counts[word] = counts.get(word, 0) + 1\n"
    "    return counts",
    "def retry(fn, attempts=3):\n    for attempt in range(attempts):\n        try:\n            return fn()\n"
    "        except Exception:\n            if attempt == attempts - 1:\n                raise",
    "def percentile(values, q):\n    ordered = sorted(values)\n    index = round(q * (len(ordered) - 1))\n"
    "    return ordered[index]",
)
_CODE_OUTRO = (
    "It runs in linear time.",
    "Add tests for the empty input before relying on it.",
    "The standard library has a faster variant for large inputs.",
    "Adjust the names to fit your code base.",
)
_SENTIMENTS = ("positive", "neutral", "negative", "mixed")
_TAGS = ("latency", "cost", "reliability", "billing", "support", "performance", "security", "usability")
_FILLER = (
    "usually", "often", "generally", "typically", "clearly", "simply", "really", "quite",
    "mostly", "likely", "indeed", "perhaps", "broadly", "roughly",
)
_SYNONYMS: Mapping[str, tuple[str, ...]] = {
    "good": ("fine", "sound", "solid"),
    "first": ("initial", "opening"),
    "small": ("little", "short", "compact"),
    "main": ("central", "chief", "primary"),
    "reduce": ("lower", "cut"),
    "change": ("update", "modification"),
    "common": ("usual", "frequent"),
    "cheaper": ("less costly", "more economical"),
    "describes": ("explains", "covers"),
    "short": ("brief", "quick"),
    "worth": ("deserving of", "justified by"),
    "most": ("many", "nearly all"),
    "start": ("begin", "kick off"),
}

# ----------------------------------------------------------------------------- prompt material

_CHAT_PROMPTS = (
    "How many replicas should I run for a service with bursty traffic?",
    "What is the difference between latency and throughput?",
    "Should I enable request batching on my inference server?",
    "Why does my p99 latency spike every few minutes?",
    "Explain canary deployments to a new engineer.",
    "Is it safe to retry POST requests?",
    "What does time to first token measure?",
    "How do I choose a timeout for an upstream call?",
    "When should I cache responses from a language model?",
    "What is a reasonable error budget for an internal API?",
)
_DOCS = (
    "Our team moved the recommendation service to a new cluster last month. The migration took three weeks, "
    "and during that time we ran both clusters in parallel. Error rates stayed below one percent and response "
    "times did not change in a way users noticed. Costs fell by about a fifth because the new nodes are cheaper.",
    "The incident began when a configuration change raised the batch size on every inference server at once. "
    "Tail latency tripled within minutes, the on-call engineer rolled the change back, and service recovered. "
    "The review concluded that changes of this kind must be rolled out gradually with automatic checks.",
    "Quarterly report: traffic grew by forty percent, mostly from the mobile application. Availability was "
    "99.95 percent. One regression in the search ranking model was caught during its canary phase and never "
    "reached all users. The team plans to add answer-quality checks to every rollout next quarter.",
)
_CODE_PROMPTS = (
    "Write a Python function that computes a moving average over a list.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write code that splits a list into chunks of a given size.",
    "Write a Python function that counts words in a text.",
    "Write a retry helper in Python.",
    "Write a Python function that returns a percentile of a list of numbers.",
)
_JSON_PROMPTS = (
    "Classify this customer message and answer in JSON with keys summary, sentiment, score, tags: "
    "'The dashboard is slow every morning and support has not replied.'",
    "Return JSON with keys summary, sentiment, score, tags for this review: "
    "'Setup was easy and the latency is great, but the bill surprised us.'",
    "Extract a JSON object (summary, sentiment, score, tags) from: "
    "'We lost two hours of data after the upgrade; please explain what happened.'",
    "Answer only with JSON (summary, sentiment, score, tags) about this ticket: "
    "'Login works again after yesterday's fix, thanks.'",
)


# ----------------------------------------------------------------------------- helpers


def prompt_seed(text: str, salt: str = "") -> int:
    """A stable 64-bit seed from a prompt (and a salt), the same in every process."""
    digest = hashlib.sha256((salt + "\x00" + text).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


def tokenize(text: str) -> list[str]:
    """Whitespace-led words; ``"".join(tokenize(t)) == t.rstrip()`` for any text ``t``."""
    return _TOKEN.findall(text)


def count_prompt_tokens(text: str) -> int:
    """A rough token count of a prompt (four characters a token, as BPE tokenizers average on English)."""
    return max(1, math.ceil(len(text) / 4))


def classify_prompt(text: str) -> Category:
    """The kind of answer a prompt asks for, from its wording (what the load generator sends)."""
    lowered = text.lower()
    if "json" in lowered:
        return "json"
    if "write" in lowered and ("code" in lowered or "function" in lowered or "python" in lowered or "helper" in lowered):
        return "code"
    if re.search(r"\bsummari[sz]e\b", lowered) or "summary of" in lowered or "tl;dr" in lowered:
        return "summarize"
    if len(text) > 2000:
        return "long"
    return "chat"


def _target_words(rng: random.Random, median: float, sigma: float) -> int:
    return max(3, round(median * math.exp(rng.gauss(0.0, sigma))))


def _sentences(rng: random.Random, pool: Sequence[str], words: int) -> str:
    picked: list[str] = []
    count = 0
    order = list(pool)
    while count < words:
        rng.shuffle(order)
        for sentence in order:
            picked.append(sentence)
            count += len(sentence.split())
            if count >= words:
                break
    return " ".join(picked)


def build_answer(text: str, *, median_words: float = 60.0, sigma: float = 0.5, salt: str = "") -> str:
    """The answer seeded by ``text`` (and ``salt``): same inputs, same answer, in any process."""
    rng = random.Random(prompt_seed(text, salt))
    category = classify_prompt(text)
    words = _target_words(rng, median_words, sigma)
    if category == "code":
        body = rng.choice(_CODE_BODIES)
        return f"{rng.choice(_CODE_INTRO)}\n```python\n{body}\n```\n{rng.choice(_CODE_OUTRO)}"
    if category == "json":
        obj: dict[str, Any] = {
            "summary": _sentences(rng, _SUMMARY, min(words, 25)),
            "sentiment": rng.choice(_SENTIMENTS),
            "score": round(rng.random(), 2),
            "tags": sorted(rng.sample(_TAGS, rng.randint(1, 3))),
        }
        return json.dumps(obj)
    pool = _SUMMARY if category == "summarize" else _CHAT
    if category == "long":
        words = max(words, int(median_words * 2))
    return _sentences(rng, pool, words)


def reference_answer(text: str, *, median_words: float = 60.0, sigma: float = 0.5) -> str:
    """The deterministic "reference" answer every server gives to ``text`` when no knob interferes."""
    return build_answer(text, median_words=median_words, sigma=sigma)


def drifted_answer(text: str, rng: random.Random, *, median_words: float = 60.0, sigma: float = 0.5) -> str:
    """A different answer to ``text`` (one of a few alternatives), never equal to the reference."""
    reference = reference_answer(text, median_words=median_words, sigma=sigma)
    for _ in range(4):
        answer = build_answer(text, median_words=median_words, sigma=sigma, salt=f"drift{rng.randrange(4)}")
        if answer != reference:
            return answer
    return reference + " " + rng.choice(_CHAT)


_OFF_TOPIC = (
    "meanwhile", "unrelated", "elsewhere", "somehow", "whatever", "anyway", "nevertheless", "sideways",
    "vaguely", "apparently", "presumably", "allegedly",
)


def degraded_answer(answer: str, quality: float, text: str) -> str:
    """``answer`` with the words a prompt of ``quality`` (0 to 1) gets wrong replaced by off-topic words.

    Word ``i`` (a token, :func:`tokenize`) is wrong when a number drawn from a hash of ``text`` and ``i`` is
    at or above ``quality``: the same inputs, the same answer in any process, and the wrong words of a
    better prompt are a subset of a worse prompt's (nested), so a better prompt's answer is closer to the
    reference on every request, never only on average. Punctuation and layout stay (only the token's
    non-space part changes)."""
    if quality >= 1.0:
        return answer
    out: list[str] = []
    for i, token in enumerate(tokenize(answer)):
        draw = prompt_seed(text, f"quality:{i}")
        if draw / 2**64 >= quality:
            lead = token[: len(token) - len(token.lstrip())]
            token = lead + _OFF_TOPIC[draw % len(_OFF_TOPIC)]
        out.append(token)
    return "".join(out)


def perturb(text: str, probability: float, rng: random.Random) -> str:
    """Swap each plain lowercase word for a synonym or drop in a filler word, each with ``probability``.

    Only purely alphabetic words change, so JSON stays valid and code keeps its
    punctuation (identifiers inside code may change, as a sampled model's might).
    """
    if probability <= 0.0:
        return text
    out: list[str] = []
    for token in tokenize(text):
        core = token.strip()
        if core.isalpha() and core.islower() and rng.random() < probability:
            lead = token[: len(token) - len(token.lstrip())]
            if core in _SYNONYMS:
                out.append(lead + rng.choice(_SYNONYMS[core]))
            else:
                out.append(f"{lead}{rng.choice(_FILLER)} {core}")
            continue
        out.append(token)
    return "".join(out)


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class PromptMix:
    """Relative weights of the request kinds the load generator sends."""

    chat: float = 0.45
    summarize: float = 0.15
    code: float = 0.15
    json: float = 0.15
    long: float = 0.10
    completions_share: float = 0.15
    """Share of requests sent to ``/v1/completions`` (the rest to ``/v1/chat/completions``)."""
    stream_share: float = 0.5
    max_tokens_choices: tuple[int, ...] = (16, 64, 128, 256, 512)
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None
    """The system prompt of every chat request (an application's, e.g. a prompt rollout's primary version);
    None: 30% of chat requests carry a generic one."""

    def __post_init__(self) -> None:
        weights = [self.chat, self.summarize, self.code, self.json, self.long]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError("prompt mix: weights must be >= 0 and not all 0")
        for name in ("completions_share", "stream_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"prompt mix: {name} must be within 0..1, got {value}")
        if not self.max_tokens_choices or any(n < 1 for n in self.max_tokens_choices):
            raise ValueError("prompt mix: max_tokens_choices must be positive integers")

    def weights(self) -> list[float]:
        return [self.chat, self.summarize, self.code, self.json, self.long]


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: kind, path, JSON body, and whether it streams."""

    category: Category
    path: str
    body: dict[str, Any]
    stream: bool

    @property
    def prompt_text(self) -> str:
        if "messages" in self.body:
            return "\n".join(str(m.get("content", "")) for m in self.body["messages"])
        return str(self.body.get("prompt", ""))


def _prompt_for(category: Category, rng: random.Random) -> str:
    if category == "chat":
        return rng.choice(_CHAT_PROMPTS)
    if category == "summarize":
        return "Summarize the following text in two sentences:\n\n" + rng.choice(_DOCS)
    if category == "code":
        return rng.choice(_CODE_PROMPTS)
    if category == "json":
        return rng.choice(_JSON_PROMPTS)
    docs = list(_DOCS)
    rng.shuffle(docs)
    context = "\n\n".join(docs * 4)  # a long context, several thousand characters
    return f"Here are some notes:\n\n{context}\n\nBased on the notes, {rng.choice(_CHAT_PROMPTS).lower()}"


def sample_request(rng: random.Random, mix: PromptMix | None = None, *, model: str = "sim") -> RequestSpec:
    """Draw one request from the mix (category, endpoint, streaming, ``max_tokens``)."""
    mix = mix or PromptMix()
    category: Category = rng.choices(CATEGORIES, weights=mix.weights())[0]
    text = _prompt_for(category, rng)
    stream = rng.random() < mix.stream_share
    max_tokens = rng.choice(mix.max_tokens_choices)
    body: dict[str, Any]
    if rng.random() < mix.completions_share:
        path = "/v1/completions"
        body = {"model": model, "prompt": text, "max_tokens": max_tokens}
    else:
        path = "/v1/chat/completions"
        messages: list[dict[str, str]] = []
        if mix.system_prompt is not None:
            messages.append({"role": "system", "content": mix.system_prompt})
        elif rng.random() < 0.3:
            messages.append({"role": "system", "content": "You are a concise assistant for platform engineers."})
        messages.append({"role": "user", "content": text})
        body = {"model": model, "messages": messages, "max_tokens": max_tokens}
        if category == "json" and rng.random() < 0.5:
            body["response_format"] = {"type": "json_object"}
    body["temperature"] = rng.choice((0.0, 0.2, 0.7))
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    body.update(mix.extra_body)
    return RequestSpec(category=category, path=path, body=body, stream=stream)
