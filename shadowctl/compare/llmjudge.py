"""The llm-judge comparator's pure part: the judge prompt, the judge's answer, and two answers made one verdict.

A judge model reads the user's question and two answers, "A" and "B", and names the better one (or a
tie). Judge models prefer one position (often the first) when the answers are close: the comparator
therefore asks twice, once with the candidate as A and once with the candidate as B, and counts a win
or a loss only when both answers agree on it; two verdicts that disagree (position bias) are a tie.

What the judge is asked for is fixed here, not in the template: the reply must end with ``[[A]]``,
``[[B]]`` or ``[[C]]`` (a tie), the convention of MT-Bench's pairwise judge. A reply without one is
not a verdict: the pair is no data, never a pass. The template fills three placeholders,
``{question}``, ``{answer_a}`` and ``{answer_b}``, in one pass over the template only, so an answer
that contains a placeholder's text is not expanded again. Texts are cut to ``max_chars`` (the judge's
cost grows with them).
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping

from shadowctl.compare.events import OutputEvent
from shadowctl.errors import ShadowctlError

PLACEHOLDERS = ("{question}", "{answer_a}", "{answer_b}")

DEFAULT_JUDGE_PROMPT = """\
You are judging two answers to the same request from a user. Judge which answer serves the user
better: correct, complete, on topic and clear. Ignore the answers' order and length as such.

[The user's request]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Explain your judgement in one or two sentences, then end with exactly one verdict on its own line:
[[A]] if answer A is better, [[B]] if answer B is better, [[C]] if they are equally good.
"""
"""The default judge prompt template (docs/prompts.md shows how to version your own in a ConfigMap)."""

_PLACEHOLDER = re.compile(r"\{(question|answer_a|answer_b)\}")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


class TemplateError(ShadowctlError, ValueError):
    """A judge prompt template that lacks a placeholder (it could not show the judge both answers)."""


class Choice(str, enum.Enum):
    """What one judge reply says: answer A, answer B, or a tie."""

    a = "A"
    b = "B"
    tie = "C"


class Outcome(str, enum.Enum):
    """One pair's verdict for the candidate."""

    win = "win"
    tie = "tie"
    loss = "loss"

    @property
    def score(self) -> float:
        """1 for a win, 0.5 for a tie, 0 for a loss (a pair "agrees" at 0.5: the candidate won or tied)."""
        return {"win": 1.0, "tie": 0.5, "loss": 0.0}[self.value]


def check_template(template: str) -> str:
    """The template, if it holds every placeholder; TemplateError naming the missing ones otherwise."""
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise TemplateError(f"the judge prompt lacks {', '.join(missing)} (it needs {', '.join(PLACEHOLDERS)})")
    return template


def template_version(template: str) -> str:
    """A short, stable name of a template's text (the first 12 hex digits of its SHA-256)."""
    return hashlib.sha256(template.encode("utf-8", errors="surrogatepass")).hexdigest()[:12]


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + " [...]"


def render(template: str, question: str, answer_a: str, answer_b: str, *, max_chars: int) -> str:
    """The judge prompt: the template with its placeholders filled (each text cut to ``max_chars``)."""
    values: Mapping[str, str] = {"question": _cut(question, max_chars), "answer_a": _cut(answer_a, max_chars),
                                 "answer_b": _cut(answer_b, max_chars)}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def parse_choice(reply: str) -> Choice | None:
    """The verdict a judge's reply ends with (its last ``[[A]]``, ``[[B]]`` or ``[[C]]``); None without one."""
    found = _VERDICT.findall(reply)
    return Choice(found[-1]) if found else None


def for_candidate(choice: Choice, candidate_is_a: bool) -> Outcome:
    """One reply's verdict as the candidate's win, tie or loss."""
    if choice is Choice.tie:
        return Outcome.tie
    return Outcome.win if (choice is Choice.a) == candidate_is_a else Outcome.loss


def combine(candidate_first: Choice, candidate_second: Choice) -> Outcome:
    """The pair's verdict from the two orders: ``candidate_first`` was asked with the candidate as A,
    ``candidate_second`` with the candidate as B. A win or a loss needs both; a disagreement is a tie."""
    first, second = for_candidate(candidate_first, True), for_candidate(candidate_second, False)
    return first if first is second else Outcome.tie


def no_verdict_reason(judged: int, failed: int, last_error: str | None) -> str | None:
    """Why the comparator has no data when every pair the judge was asked about failed (None: it judged
    one, or was never asked): the verdict then says the judge is failing, not that no pairs came."""
    if failed == 0 or judged > 0:
        return None
    why = f"the judge model gave no verdict on any of the {failed} pair(s) it was asked about"
    return why + (f" (last error: {last_error})" if last_error else "")


def question_of(primary: OutputEvent) -> str:
    """The user's request as the judge sees it: the primary's prompt text as the tap recorded it."""
    return primary.prompt or ""
