"""The simulated model server as a deterministic judge model (comparator llm-judge, docs/prompts.md).

A judge prompt laid out as :data:`shadowctl.compare.llmjudge.DEFAULT_JUDGE_PROMPT` is (the sections
``[The user's request]``, ``[Answer A]``, ``[Answer B]``) is answered with a verdict instead of an answer.
The quality signal: every simulated server answers a prompt with its reference answer
(:func:`shadowctl.sim.prompts.reference_answer`) unless a knob or an adapter changes it, so an answer's
quality is its token F1 against the reference answer of the user's request, a pure function of the texts.
Two answers within ``tie_margin`` of each other are a tie (``[[C]]``); a judge with ``position_bias``
names answer A instead, as real judge models do when answers are close, which is what asking twice in
swapped order cancels.

The request is read back from the tap's prompt text (``role: content`` lines, joined by newlines): each
line loses its role prefix, as the simulated servers join the messages' contents. Answers longer than the
comparator's ``maxAnswerChars`` arrive cut (`` [...]``); the cut mark is removed before scoring.

With ``skip_system`` the judge scores against the reference answer of the request's part after its
system prompt (from its first ``user:`` line on), as a server with a ``prompt_quality`` table answers
(:class:`shadowctl.sim.modelserver.SimModelServer`): in a prompt rollout the system prompt is what
changes, and the better prompt is the one whose answer is closer to that reference.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from shadowctl.sim.prompts import reference_answer

_SECTIONS = re.compile(
    r"\[The user's request\]\n(?P<question>.*?)\n\n\[Answer A\]\n(?P<a>.*?)\n\n\[Answer B\]\n(?P<b>.*?)\n\nExplain your judgement",
    re.DOTALL)
_ROLE = re.compile(r"^(system|user|assistant|developer|tool): ", re.MULTILINE)
_CUT = " [...]"
_WORD = re.compile(r"\w+")
_FIRST_USER = re.compile(r"^user: ", re.MULTILINE)


def token_f1(a: str, b: str) -> float:
    """F1 of the two texts' lower-case word multisets (the simulator's own: it stands beside the product's
    comparators and does not import them); two empty texts score 1."""
    ta, tb = Counter(_WORD.findall(a.lower())), Counter(_WORD.findall(b.lower()))
    if not ta or not tb:
        return 1.0 if not ta and not tb else 0.0
    common = sum((ta & tb).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(tb.values()), common / sum(ta.values())
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class SimJudge:
    """How the simulated judge decides: answers whose qualities differ by less than ``tie_margin`` tie,
    unless ``position_bias`` (then answer A wins them)."""

    tie_margin: float = 0.05
    position_bias: bool = False
    median_words: float = 60.0
    sigma: float = 0.5
    """The answer-length knobs of the servers being judged (their reference answers depend on them)."""
    skip_system: bool = False
    """Score against the reference answer of the request after its system prompt (see the module docstring)."""

    def quality(self, question: str, answer: str) -> float:
        """Token F1 of ``answer`` against the reference answer of ``question`` (0 to 1)."""
        if self.skip_system:
            first = _FIRST_USER.search(question)
            question = question[first.start():] if first is not None else question
        text = _ROLE.sub("", question)
        if answer.endswith(_CUT):
            answer = answer[: -len(_CUT)]
        return token_f1(answer, reference_answer(text, median_words=self.median_words, sigma=self.sigma))

    def reply(self, prompt: str) -> str | None:
        """The verdict for a judge prompt (None: ``prompt`` is not one; answer it as a model would)."""
        m = _SECTIONS.search(prompt)
        if m is None:
            return None
        qa, qb = self.quality(m["question"], m["a"]), self.quality(m["question"], m["b"])
        if abs(qa - qb) < self.tie_margin:
            mark = "A" if self.position_bias else "C"
        else:
            mark = "A" if qa > qb else "B"
        return f"Answer A scores {qa:.2f} and answer B {qb:.2f} against what the request asks for.\n[[{mark}]]"


def is_judge_prompt(text: str) -> bool:
    """Whether ``text`` is laid out as the default judge prompt."""
    return _SECTIONS.search(text) is not None
