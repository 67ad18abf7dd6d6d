"""Read what went into and came out of an OpenAI-compatible request, without touching the bytes forwarded.

The proxy hands every upstream chunk to a :class:`ResponseAccumulator` *after*
forwarding it unchanged; the accumulator keeps its own copy, decoded if the
server compressed it. Server-Sent Events (an event may be split across chunks)
are parsed chunk by chunk only until the first output token, whose arrival is
the time to first token; after that, chunks are only appended, and parsed in
batches of :data:`PARSE_BATCH_BYTES` and at the end, which keeps the per-chunk
work on the streaming path to a copy. Only the first choice (``index`` 0) is
recorded when a request asks for several. Output text is capped so a runaway
generation cannot exhaust the sidecar's memory; the event then says
``truncated``.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from shadowctl.compare.events import Endpoint, ToolCall, Usage

_PATHS = {
    "/v1/chat/completions": Endpoint.chat,
    "/v1/completions": Endpoint.completions,
    "/v1/embeddings": Endpoint.embeddings,
}

#: Largest non-streamed response body kept for parsing (an embeddings batch can be large).
MAX_PARSED_BODY = 8 * 1024 * 1024

#: Stream bytes held after the first token before they are parsed (bounds memory per stream).
PARSE_BATCH_BYTES = 64 * 1024


def classify(method: str, path: str) -> Endpoint | None:
    """The API endpoint a request targets, or None for anything passed through unrecorded."""
    if method != "POST":
        return None
    return _PATHS.get(path.rstrip("/") or "/")


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The parts of a request body an output event records."""

    model: str | None
    prompt_hash: str
    prompt_text: str | None


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def parse_request(endpoint: Endpoint, body: bytes) -> RequestInfo:
    """Model, prompt hash and prompt text of a request body; a body that is not JSON hashes as raw bytes.

    The hash covers only the prompt (messages and tools, prompt, or input), not ``model``,
    ``temperature`` or ``seed``, so that a mirrored copy whose body the tap rewrote still
    hashes the same as the original.
    """
    try:
        data = json.loads(body) if body else {}
    except (ValueError, RecursionError):  # deep nesting: the decoder recurses per level
        data = None
    if not isinstance(data, dict):
        return RequestInfo(model=None, prompt_hash=hashlib.sha256(body).hexdigest(), prompt_text=None)
    model = _str(data.get("model"))
    if endpoint is Endpoint.chat:
        part: Any = {"messages": data.get("messages"), "tools": data.get("tools")}
        raw_messages = data.get("messages")
        messages: list[Any] = raw_messages if isinstance(raw_messages, list) else []
        text = "\n".join(
            f"{m.get('role', '')}: {_content_text(m.get('content'))}" for m in messages if isinstance(m, dict)
        )
    elif endpoint is Endpoint.completions:
        part = {"prompt": data.get("prompt")}
        prompt = data.get("prompt")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    else:
        part = {"input": data.get("input")}
        value = data.get("input")
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return RequestInfo(model=model, prompt_hash=hashlib.sha256(_canonical(part)).hexdigest(), prompt_text=text)


@dataclass(slots=True)
class ResponseInfo:
    """What came out of one request."""

    output: str = ""
    truncated: bool = False
    tool_calls: list[ToolCall] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    output_tokens: int | None = None
    error: str | None = None


def _usage(value: Any) -> Usage | None:
    if not isinstance(value, dict):
        return None

    def count(key: str) -> int | None:
        n = value.get(key)
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None

    return Usage(
        prompt_tokens=count("prompt_tokens"),
        completion_tokens=count("completion_tokens"),
        total_tokens=count("total_tokens"),
    )


MAX_TOOL_CALLS = 128
"""Tool calls kept per answer; a stream that names more indices is marked truncated."""


@dataclass(slots=True)
class _ToolDraft:
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ResponseAccumulator:
    """Collects one response's output from its raw (possibly compressed, possibly SSE) chunks."""

    def __init__(
        self, endpoint: Endpoint, *, event_stream: bool, content_encoding: str | None, max_chars: int
    ) -> None:
        self.endpoint = endpoint
        self.event_stream = event_stream
        self.max_chars = max_chars
        self._decoder: Any = None
        self._error: str | None = None
        encoding = (content_encoding or "identity").strip().lower()
        if encoding == "gzip":
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding not in ("identity", ""):
            self._error = f"content-encoding {encoding!r} is not decoded by the tap"
        self._buffer = bytearray()
        self._body = bytearray()
        self._body_overflow = False
        self._text: list[str] = []
        self._chars = 0
        self._truncated = False
        self._tools: dict[int, _ToolDraft] = {}
        self._finish: str | None = None
        self._usage: Usage | None = None
        self._chunks_with_tokens = 0

    def feed(self, chunk: bytes) -> bool:
        """Take one raw chunk; True when it carried the response's first output token (for TTFT)."""
        if self._error is not None:
            return False
        if self._decoder is not None:
            try:
                chunk = self._decoder.decompress(chunk)
            except zlib.error as exc:
                self._error = f"cannot decode the response body: {exc}"
                return False
        if not self.event_stream:
            if len(self._body) + len(chunk) > MAX_PARSED_BODY:
                self._body_overflow = True
                self._body.clear()
            elif not self._body_overflow:
                self._body.extend(chunk)
            return False
        self._buffer.extend(chunk)
        if self._chunks_with_tokens:  # the first token is known: parse later, in batches
            if len(self._buffer) >= PARSE_BATCH_BYTES:
                self._parse_events()
            return False
        self._parse_events()
        return self._chunks_with_tokens > 0

    def _parse_events(self) -> None:
        """Parse every complete event in the buffer; keep the incomplete tail."""
        buf = self._buffer
        if b"\r" in buf:  # CRLF or CR line ends: the general, event-by-event path
            while True:
                end, sep = self._event_end()
                if end < 0:
                    break
                raw = bytes(buf[:end])
                del buf[: end + sep]
                self._sse_event(raw)
        else:  # LF only (what servers send): split the complete part in one go
            end = buf.rfind(b"\n\n")
            if end >= 0:
                block = bytes(buf[:end])
                del buf[: end + 2]
                for raw in block.split(b"\n\n"):
                    if raw.startswith(b"data:") and b"\n" not in raw:  # the usual one-line event
                        self._sse_data(raw[5:].lstrip(b" "))
                    else:
                        self._sse_event(raw)
        if len(buf) > MAX_PARSED_BODY:  # a stream that never separates events
            self._error = "event stream without event separators"
            buf.clear()

    def _event_end(self) -> tuple[int, int]:
        buf = self._buffer
        candidates = [(buf.find(sep), len(sep)) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r")]
        found = [c for c in candidates if c[0] >= 0]
        return min(found) if found else (-1, 0)

    def _sse_event(self, raw: bytes) -> None:
        lines = raw.replace(b"\r\n", b"\n").split(b"\n")
        self._sse_data(b"\n".join(line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:")))

    def _sse_data(self, data: bytes) -> None:
        if not data or data.strip() == b"[DONE]":
            return
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            return
        if isinstance(obj, dict):
            self._chunk(obj)

    def _take(self, text: str) -> str:
        """The part of ``text`` within the ``max_chars`` budget that output and tool calls share."""
        room = self.max_chars - self._chars
        if len(text) > room:
            text = text[:max(room, 0)]
            self._truncated = True
        self._chars += len(text)
        return text

    def _append(self, text: str) -> None:
        if text and (kept := self._take(text)):
            self._text.append(kept)

    def _chunk(self, obj: dict[str, Any]) -> None:
        if "usage" in obj and obj["usage"] is not None:
            self._usage = _usage(obj["usage"])
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            carried = False
            if self.endpoint is Endpoint.chat:
                delta = _dict(choice.get("delta"))
                content = delta.get("content")
                if isinstance(content, str) and content:
                    self._append(content)
                    carried = True
                calls = delta.get("tool_calls")
                for call in calls if isinstance(calls, list) else ():
                    if isinstance(call, dict):
                        carried = self._tool_delta(call) or carried
            else:
                text = choice.get("text")
                if isinstance(text, str) and text:
                    self._append(text)
                    carried = True
            if carried:
                self._chunks_with_tokens += 1
            if isinstance(choice.get("finish_reason"), str):
                self._finish = choice["finish_reason"]

    def _tool_delta(self, call: dict[str, Any]) -> bool:
        index = call.get("index", 0)
        index = index if isinstance(index, int) and not isinstance(index, bool) else 0
        if index not in self._tools and len(self._tools) >= MAX_TOOL_CALLS:
            self._truncated = True
            return False
        draft = self._tools.setdefault(index, _ToolDraft())
        fn = _dict(call.get("function"))
        name = _str(fn.get("name"))
        if name:
            draft.name += self._take(name)
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            draft.arguments.append(self._take(args))
            return True
        return False

    def _parse_body(self) -> None:
        if self._body_overflow or not self._body:
            return
        try:
            obj = json.loads(bytes(self._body))
        except (ValueError, RecursionError):
            return
        if not isinstance(obj, dict):
            return
        self._usage = _usage(obj.get("usage"))
        choices = obj.get("choices")
        if self.endpoint is Endpoint.embeddings or not isinstance(choices, list):
            return
        first = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), None)
        if first is None:
            return
        if isinstance(first.get("finish_reason"), str):
            self._finish = first["finish_reason"]
        if self.endpoint is Endpoint.chat:
            message = _dict(first.get("message"))
            self._append(_content_text(message.get("content")))
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                for i, call in enumerate(calls):
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        draft = self._tools.setdefault(i, _ToolDraft())
                        draft.name = _str(fn.get("name")) or ""
                        args = fn.get("arguments")
                        draft.arguments = [args if isinstance(args, str) else json.dumps(args)]
        else:
            text = first.get("text")
            self._append(text if isinstance(text, str) else "")

    def finish(self) -> ResponseInfo:
        """The output collected so far (call once the upstream body has ended)."""
        if self.event_stream:
            self._parse_events()  # what is left (after a decoding error: what was decoded)
        elif self._error is None:
            self._parse_body()
        tools = (
            [ToolCall(name=d.name, arguments="".join(d.arguments)) for _, d in sorted(self._tools.items())]
            if self._tools
            else None
        )
        if self._usage is not None and self._usage.completion_tokens is not None:
            tokens: int | None = self._usage.completion_tokens
        elif self.event_stream:
            tokens = self._chunks_with_tokens
        else:
            tokens = None
        return ResponseInfo(
            output="".join(self._text),
            truncated=self._truncated,
            tool_calls=tools,
            finish_reason=self._finish,
            usage=self._usage,
            output_tokens=tokens,
            error=self._error,
        )
