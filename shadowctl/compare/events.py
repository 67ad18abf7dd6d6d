"""The output event a tap publishes for each model request (schema version 1).

Parsed strictly (``extra="forbid"``, JSON types only, no coercion) because the
events arrive from other pods over a broker anyone with credentials can write
to: a malformed or future-version event must be counted and skipped by the
source, never half-understood. The schema is documented in ``docs/outputs.md``
and emitted by :func:`event_json_schema`.
"""

from __future__ import annotations

import enum
import re
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shadowctl.errors import ShadowctlError

SCHEMA_VERSION: Final = "shadowctl.dev/output-event/v1"


class Variant(str, enum.Enum):
    """Which deployment answered: the one serving users, the one under test, or a second primary."""

    primary = "primary"
    candidate = "candidate"
    baseline = "baseline"


class Endpoint(str, enum.Enum):
    """The OpenAI-compatible endpoint the request went to."""

    chat = "chat"  # /v1/chat/completions
    completions = "completions"  # /v1/completions
    embeddings = "embeddings"  # /v1/embeddings


TRACEPARENT_PATTERN: Final = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
"""A W3C Trace Context ``traceparent``: version-trace_id-parent_id-flags, lower-case hex."""

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def parse_traceparent(value: str | bytes | None) -> str | None:
    """The W3C ``traceparent`` header as an event keeps it, or None where it is absent or invalid.

    As the Trace Context recommendation says: version ``ff``, an all-zero trace id or parent id, upper
    case, or a version-00 header with anything after its 55 characters are invalid (the header is then
    ignored, as a tracer would); a later version may append fields after a ``-``, which are dropped
    (the first four fields are the same in every version)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip(" \t")
    match = _TRACEPARENT.match(text)
    if match is None:
        return None
    version, trace, parent, _flags = match.groups()
    if version == "ff" or trace == "0" * 32 or parent == "0" * 16:
        return None
    rest = text[match.end():]
    if rest and (version == "00" or not rest.startswith("-")):
        return None
    return match.group(0)


def trace_id(traceparent: str) -> str:
    """The trace id (32 hex digits) of a valid ``traceparent``: what a tracing UI searches by."""
    return traceparent.split("-", 2)[1]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Usage(_Strict):
    """Token counts as the server reported them (OpenAI ``usage``)."""

    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)
    total_tokens: int | None = Field(default=None, ge=0)


SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"

Redacted = Literal["truncate", "hash", "drop"]
"""What a tap removed from an event's texts (the values of ``spec.analysis.outputs.redaction.mode`` other
than none; :mod:`shadowctl.compare.redaction`)."""


class ToolCall(_Strict):
    """One OpenAI tool call: the function name and its arguments (a JSON text, as the server sent it)."""

    name: str
    arguments: str = ""
    arguments_hash: str | None = Field(
        default=None, pattern=SHA256_PATTERN,
        description="Redacted events: SHA-256 (hex) of the arguments' canonical JSON, and arguments is empty. "
                    "Absent from the wire when not redacted.")


class OutputEvent(_Strict):
    """What went into one model request and what came out, as seen by one tap."""

    schema_: Literal["shadowctl.dev/output-event/v1"] = Field(default=SCHEMA_VERSION, alias="schema")
    request_id: str = Field(min_length=1, max_length=256)
    variant: Variant
    shadow: bool = Field(description="True for a mirrored copy (Host ends in -shadow, or x-shadowctl-shadow: 1).")
    service: str = Field(description="namespace/name of the service the tap fronts.")
    endpoint: Endpoint
    model: str | None = None
    stream: bool = False
    prompt_hash: str = Field(description="sha256 (hex) of the canonical JSON of the prompt part of the request.")
    prompt: str | None = Field(default=None, description="The prompt text, unless the tap redacts prompts.")
    output: str = ""
    truncated: bool = Field(default=False, description="The output was cut at the tap's size limit.")
    tool_calls: list[ToolCall] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    output_tokens: int | None = Field(default=None, ge=0, description="From usage, else counted stream chunks.")
    status: int = Field(
        ge=100, le=599,
        description="HTTP status the user got: the upstream's; 502 if it was unreachable or failed before "
                    "answering; 499 if the client left before the answer began.",
    )
    error: str | None = None
    started_at: float = Field(description="Unix time (s) the tap received the request.")
    ttft_s: float | None = Field(default=None, ge=0, description="Time to first token (streaming only).")
    e2e_s: float = Field(ge=0, description="Time from request received to last byte sent.")
    traceparent: str | None = Field(
        default=None, pattern=TRACEPARENT_PATTERN,
        description="The request's W3C traceparent header, where it had a valid one (the user's trace). "
                    "Absent from the wire when the request had none.",
    )
    redaction: Redacted | None = Field(
        default=None,
        description="What the tap removed from the texts (truncate, hash, drop); absent when it kept them whole.")
    prompt_chars: int | None = Field(default=None, ge=0, description="Redacted events: the prompt's length.")
    output_chars: int | None = Field(default=None, ge=0, description="Redacted events: the answer's length.")
    output_words: int | None = Field(
        default=None, ge=0, description="Redacted events: the answer's word tokens as the comparators count them.")
    output_hash: str | None = Field(
        default=None, pattern=SHA256_PATTERN,
        description="Redaction truncate or hash: SHA-256 (hex) of the whole answer's UTF-8 text.")

    @property
    def ok(self) -> bool:
        """The upstream answered with a 2xx status and the tap saw the whole answer."""
        return 200 <= self.status < 300 and self.error is None

    def to_json(self) -> bytes:
        """The wire form (compact JSON, keys by alias). ``traceparent`` and the redaction fields are left out
        when they are None, so such an event is what a tap before those fields wrote (docs/outputs.md,
        "Trace context", "Redaction")."""
        exclude: dict[str, Any] = {name: True for name in _OPTIONAL_ON_WIRE if getattr(self, name) is None}
        if self.tool_calls and any(c.arguments_hash is None for c in self.tool_calls):
            exclude["tool_calls"] = {i: {"arguments_hash"} for i, c in enumerate(self.tool_calls)
                                     if c.arguments_hash is None}
        return self.model_dump_json(by_alias=True, exclude_none=False, exclude=exclude or None).encode()


_OPTIONAL_ON_WIRE = ("traceparent", "redaction", "prompt_chars", "output_chars", "output_words", "output_hash")
"""Fields left out of the wire form when they are None: an event without them is what a tap before them
wrote, so a controller of that time still reads it (``extra="forbid"``)."""


class MalformedEvent(ShadowctlError, ValueError):
    """An MQTT payload that is not a valid version-1 output event (the reason is in the message)."""


def parse_event(payload: bytes | str) -> OutputEvent:
    """Parse one wire payload strictly; raise :class:`MalformedEvent` saying what is wrong."""
    try:
        return OutputEvent.model_validate_json(payload, strict=True, by_alias=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<event>"
        raise MalformedEvent(f"{where}: {first['msg']} ({exc.error_count()} error(s))") from exc


def event_json_schema() -> dict[str, Any]:
    """The JSON schema of the wire form (documented in docs/outputs.md)."""
    schema = OutputEvent.model_json_schema(by_alias=True)
    schema["$id"] = SCHEMA_VERSION
    return schema


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """`mqtt://host[:port]` or `mqtts://host[:port]` into (host, port, tls); ValueError saying what is wrong."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() not in ("mqtt", "mqtts"):
        raise ValueError(f"{url!r} is not a broker URL; write mqtt://host:1883 or mqtts://host:8883")
    tls = scheme.lower() == "mqtts"
    hostport = rest.rstrip("/")
    if not hostport or "/" in hostport or "@" in hostport:
        raise ValueError(f"{url!r}: expected only host[:port] after the scheme (credentials go in their own options)")
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise ValueError(f"{url!r}: the host is missing")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{url!r}: {port_text!r} is not a port (1-65535)")
        port = int(port_text)
    else:
        port = 8883 if tls else 1883
    return host, port, tls
