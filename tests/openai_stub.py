"""An OpenAI-compatible model server for the tap's tests (aiohttp, on a free port).

It answers /v1/chat/completions, /v1/completions and /v1/embeddings, streamed
(SSE) or not, with a configurable answer; ``/status/<code>`` answers that code;
``/echo`` returns the request's headers. A streamed answer can be held after its
first chunk until a test sets :attr:`OpenAIStub.release`, which proves that the
proxy forwards chunks as they arrive. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class OpenAIStub:
    answer: str = "Paris is the capital of France."
    model: str = "stub-model"
    hold_after_first_chunk: bool = False
    tool_call: dict[str, Any] | None = None
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def chunks(self, kind: str) -> list[bytes]:
        """The exact SSE byte chunks a streamed answer sends (one word per chunk)."""
        words = self.answer.split(" ")
        parts = [w if i == 0 else " " + w for i, w in enumerate(words)]
        out: list[bytes] = []
        if kind == "chat":
            out.append(self._sse({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}))
            for p in parts:
                out.append(self._sse({"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}))
            if self.tool_call is not None:
                args = json.dumps(self.tool_call["arguments"])
                half = len(args) // 2
                out.append(self._sse({"choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "id": "c1", "type": "function",
                     "function": {"name": self.tool_call["name"], "arguments": args[:half]}}]}}]}))
                out.append(self._sse({"choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "function": {"arguments": args[half:]}}]}}]}))
            out.append(self._sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 7, "completion_tokens": len(parts),
                                            "total_tokens": 7 + len(parts)}}))
        else:
            for p in parts:
                out.append(self._sse({"choices": [{"index": 0, "text": p, "finish_reason": None}]}))
            out.append(self._sse({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}))
        out.append(b"data: [DONE]\n\n")
        return out

    def _sse(self, obj: dict[str, Any]) -> bytes:
        obj = {"id": "cmpl-1", "object": "chunk", "model": self.model, **obj}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    def body(self, kind: str) -> bytes:
        """The exact non-streamed JSON body."""
        usage = {"prompt_tokens": 7, "completion_tokens": len(self.answer.split()), "total_tokens": 0}
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": self.answer}
            if self.tool_call is not None:
                message["tool_calls"] = [{"id": "c1", "type": "function", "function": {
                    "name": self.tool_call["name"], "arguments": json.dumps(self.tool_call["arguments"])}}]
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
        elif kind == "completions":
            choice = {"index": 0, "text": self.answer, "finish_reason": "stop"}
        else:
            return json.dumps({"object": "list", "data": [{"embedding": [0.1, 0.2], "index": 0}],
                               "usage": {"prompt_tokens": 3, "total_tokens": 3}}).encode()
        return json.dumps({"id": "cmpl-1", "model": self.model, "choices": [choice], "usage": usage}).encode()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, CIMultiDict(request.headers), body))
        path = request.path
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            return web.Response(status=code, body=b'{"error":"as asked"}', content_type="application/json",
                                headers={"X-Stub": "status"})
        if path == "/echo":
            return web.json_response({"headers": dict(request.headers), "body": body.decode()},
                                     headers={"X-Multi": "a", "Set-Cookie": "x=1"})
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                "/v1/embeddings": "embeddings"}.get(path)
        if kind is None:
            return web.Response(status=404, text="no such path")
        try:
            data = json.loads(body) if body else {}
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):  # as an OpenAI-compatible server answers a body it cannot read
            return web.json_response({"error": {"message": "invalid JSON body", "type": "BadRequestError"}},
                                     status=400)
        if data.get("stream") and kind != "embeddings":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Stub": "sse"})
            await response.prepare(request)
            for i, chunk in enumerate(self.chunks(kind)):
                await response.write(chunk)
                if i == 0 and self.hold_after_first_chunk:
                    await self.release.wait()
            await response.write_eof()
            self.finished.set()
            return response
        self.finished.set()
        return web.Response(body=self.body(kind), content_type="application/json", headers={"X-Stub": "json"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = getattr(site, "_server", None)
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
