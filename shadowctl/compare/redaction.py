"""Redaction of an output event's texts (``spec.analysis.outputs.redaction``, ``shadowctl tap --redact``).

Output events carry what users asked and what the model answered: personal data, often. A redacted
event keeps what the comparators that can still run need, and the lengths and token counts always:

========  =====================================  ============================  ==========================
mode      prompt                                 answer                        tool-call arguments
========  =====================================  ============================  ==========================
none      the text                               the text                      the text
truncate  the first ``max_chars`` characters     the first ``max_chars``       SHA-256 of the canonical
                                                 characters, and the SHA-256   JSON
                                                 of the whole answer
hash      none (``prompt_hash`` stays)           the SHA-256 of the answer     SHA-256 of the canonical
                                                                               JSON
drop      none                                   none                          none (no tool calls)
========  =====================================  ============================  ==========================

Every redacted event also carries ``prompt_chars``, ``output_chars`` and ``output_words`` (the answer's
tokens as :func:`shadowctl.compare.comparators.tokens` counts them, which ``length-ratio`` compares).
What each comparator can do under each mode is :data:`shadowctl.compare.comparators.RUNS_UNDER`.

A plain SHA-256 hides a text from someone reading the broker or a dump; it does not hide a short
or guessable answer ("yes", a number) from someone who hashes guesses. Use ``drop`` where that matters.

Redacting twice never recovers anything: a mode weaker than what an event already had leaves it as it is
(the controller applies the policy's mode to every event it receives, whatever the tap did).
"""

from __future__ import annotations

from typing import Any

from shadowctl.compare.comparators import arguments_key, sha256_text, tokens
from shadowctl.compare.events import OutputEvent, ToolCall
from shadowctl.policy.model import RedactionMode

_STRENGTH = {None: 0, "none": 0, "truncate": 1, "hash": 2, "drop": 3}


def redact(event: OutputEvent, mode: RedactionMode, max_chars: int) -> OutputEvent:
    """The event with its texts redacted by ``mode`` (see the module docstring); the same event for none,
    or when it was already redacted as strictly or more."""
    if _STRENGTH[mode.value] <= _STRENGTH[event.redaction]:
        return event
    output = event.output
    whole = event.redaction is None
    update: dict[str, Any] = {"redaction": mode.value}
    if whole:  # the lengths, counts and hashes of the whole texts (a truncated event already has them)
        update["prompt_chars"] = len(event.prompt) if event.prompt is not None else None
        update["output_chars"] = len(output)
        update["output_words"] = len(tokens(output))
        update["output_hash"] = sha256_text(output)
    if mode is RedactionMode.truncate:
        update["prompt"] = event.prompt[:max_chars] if event.prompt is not None else None
        update["output"] = output[:max_chars]
    else:
        update["prompt"] = None
        update["output"] = ""
    if mode is RedactionMode.drop:
        update["output_hash"] = None
        update["tool_calls"] = None
    elif event.tool_calls:
        update["tool_calls"] = [ToolCall(name=c.name, arguments_hash=arguments_key(c)) for c in event.tool_calls]
    return event.model_copy(update=update)
