"""Prompt rewrites (issue 18): how a tap turns a request for the primary's prompt into one for the candidate's.

Pure functions over a parsed JSON request body (a ``dict``), shared by the tap (which applies them) and the
route setting's parser (which checks the texts before a tap routes by them). Two ways to apply a prompt version:

``replaceSystem``
    The primary's text is the system prompt the application sends today; the candidate's replaces it. A chat
    request whose system prompt (its leading ``system`` / ``developer`` messages, contents joined by a newline;
    none: the empty text) equals the primary's text gets its leading system messages replaced by one ``system``
    message holding the candidate's text (an empty candidate text: none). The primary's text is the guard: a
    request that carries another system prompt (another application, an older release of it) is not a request
    of this rollout and is not rewritten. A primary text of ``""`` matches requests without a system prompt,
    and the candidate's is then inserted.

``template``
    The primary's and the candidate's texts are templates around the user's input with one placeholder,
    ``{{input}}``: the application renders the primary's template today, e.g. ``Summarize:\\n\\n{{input}}``.
    Every ``user`` message (chat) or the ``prompt`` (completions) must be the primary's template rendered
    around some input (its text before and after the placeholder, matched literally); the tap takes the input
    back out and renders the candidate's template around it. The syntax is deliberately not a template
    language: the only placeholder is ``{{input}}`` (exactly once in the primary's template, at least once in
    the candidate's), any other ``{{`` is refused, and rendering is string concatenation: nothing in a
    template is evaluated, so a prompt from a ConfigMap cannot run code or read variables in the tap.

A request the rewrite cannot apply to returns None: the tap then sends no copy, and a live request stays with
the primary (counted ``not_rewritable``).
"""

from __future__ import annotations

import hashlib
from typing import Final

from shadowctl.policy.prompts import PromptApply

PLACEHOLDER: Final = "{{input}}"
MAX_PROMPT_BYTES: Final = 32 * 1024
"""A prompt text (system prompt or template) the route setting carries: at most this many bytes of UTF-8 each,
so one retained setting with both versions stays under 70 KiB."""
SYSTEM_ROLES: Final = frozenset({"system", "developer"})


def prompt_problem(text: str, apply: PromptApply, *, primary: bool) -> str | None:
    """What is wrong with a prompt text, or None."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_PROMPT_BYTES:
        return f"{size} bytes of UTF-8, above the {MAX_PROMPT_BYTES}-byte bound"
    if "\x00" in text:
        return "it contains a NUL character"
    if apply is PromptApply.template:
        n = text.count(PLACEHOLDER)
        if text.replace(PLACEHOLDER, "").find("{{") >= 0:
            return f"the only placeholder a template may hold is {PLACEHOLDER} (found another '{{{{')"
        if primary and n != 1:
            return f"the primary's template must hold {PLACEHOLDER} exactly once (it holds it {n} times)"
        if not primary and n < 1:
            return f"the candidate's template must hold {PLACEHOLDER}"
    return None


def prompt_digest(apply: PromptApply, primary: str, candidate: str) -> str:
    """The first 16 hex digits of SHA-256 over how and both texts: one prompt candidate's identity."""
    h = hashlib.sha256()
    for part in (apply.value, primary, candidate):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


def _system_prefix(messages: list[object]) -> tuple[int, str | None]:
    """How many leading messages are system messages, and their contents joined (None: one is not a string)."""
    n, parts = 0, []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in SYSTEM_ROLES:
            break
        content = m.get("content")
        if not isinstance(content, str):
            return n, None
        parts.append(content)
        n += 1
    return n, "\n".join(parts)


def replace_system(data: dict[str, object], primary: str, candidate: str) -> bool:
    """Replace the request's system prompt (see the module docstring) in place; False where it does not apply."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        return False
    n, current = _system_prefix(messages)
    if current is None or current != primary:
        return False
    new: list[object] = [{"role": "system", "content": candidate}] if candidate else []
    data["messages"] = new + messages[n:]
    return True


def extract_input(template: str, text: str) -> str | None:
    """The input the primary's `template` was rendered around to give `text`, or None when it was not."""
    before, _, after = template.partition(PLACEHOLDER)
    if len(text) < len(before) + len(after) or not text.startswith(before) or not text.endswith(after):
        return None
    return text[len(before):len(text) - len(after)]


def render(template: str, value: str) -> str:
    """`template` with every ``{{input}}`` replaced by `value` (plain concatenation; nothing is evaluated)."""
    return value.join(template.split(PLACEHOLDER))


def retemplate(data: dict[str, object], primary: str, candidate: str) -> bool:
    """Render the candidate's template around the input of every user message (or of ``prompt``) in place;
    False where one of them is not the primary's template rendered."""
    messages = data.get("messages")
    if isinstance(messages, list):
        rendered: list[object] = []
        seen = False
        for m in messages:
            if isinstance(m, dict) and m.get("role") == "user":
                content = m.get("content")
                value = extract_input(primary, content) if isinstance(content, str) else None
                if value is None:
                    return False
                m = {**m, "content": render(candidate, value)}
                seen = True
            rendered.append(m)
        if not seen:
            return False
        data["messages"] = rendered
        return True
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        value = extract_input(primary, prompt)
        if value is None:
            return False
        data["prompt"] = render(candidate, value)
        return True
    return False


def apply_prompt(data: dict[str, object], apply: PromptApply, primary: str, candidate: str) -> bool:
    """Apply one prompt rewrite to a parsed body in place; False where it does not apply (body maybe touched)."""
    if apply is PromptApply.replace_system:
        return replace_system(data, primary, candidate)
    return retemplate(data, primary, candidate)
