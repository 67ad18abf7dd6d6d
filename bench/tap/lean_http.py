"""A lean HTTP/1.1 load client and streaming stub server for the tap overhead benchmark.

Why: on a 2-core machine the measuring instrument shares the cores with the tap. The aiohttp
client and stub used about 47% and 27% of a core at 200 streams, CPU the tap then did not have;
that measures the machine, not the tap. These are asyncio Protocols that do nothing per chunk but
frame it (the stub) or find its end (the client), so nearly all the CPU is left to the code under
test. Both run the same way for direct and tap runs; only the URL differs.

Server: ``python lean_http.py serve PORT TTFT_MS GAP_MS``: every POST gets a 200 text/event-stream
answer, chunked, of 16 token events and a final event, the first after TTFT_MS, the others GAP_MS
apart (keep-alive; the request body is read by Content-Length). The first token event also says how
long the stub held the request (``"held_ns"``: from the read that completed it to the write of that
event), so that a client can take the model server's own time out of its time to first byte: its
timers fire up to a millisecond late (the event loop sleeps in whole milliseconds), noise that is
larger than the tap's cost being measured (bench/tap/rewrite.py). ``time.perf_counter`` is the
system's monotonic clock on Linux, the same in every process.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

CHUNKS = [
    b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f" tok{i}"}}]}).encode() + b"\n\n"
    for i in range(16)
]
LAST = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# 16 token events, the last one sent together with the final event and the end of the body; the first one is
# framed when it is sent (it carries the time held).
FRAMES = [_frame(c) for c in CHUNKS[:-1]] + [_frame(CHUNKS[-1]) + _frame(LAST) + b"0\r\n\r\n"]
FIRST = b'data: {"held_ns":%d,' + CHUNKS[0][len(b"data: {"):]


class StubProtocol(asyncio.Protocol):
    """One connection of the stub model server."""

    def __init__(self, ttft_s: float, gap_s: float) -> None:
        self.ttft_s = ttft_s
        self.gap_s = gap_s
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        arrived = time.perf_counter_ns()
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15:].split(b"\r\n", 1)[0])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self._answer(arrived)

    def _answer(self, arrived: int) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        self.transport.write(HEAD)
        loop.call_later(self.ttft_s, self._send_first, arrived)
        for i, frame in enumerate(FRAMES[1:], 1):
            loop.call_later(self.ttft_s + i * self.gap_s, self._send, frame)

    def _send_first(self, arrived: int) -> None:
        self._send(_frame(FIRST % (time.perf_counter_ns() - arrived)))

    def _send(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)


async def serve(port: int, ttft_ms: float, gap_ms: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubProtocol(ttft_ms / 1000, gap_ms / 1000), "127.0.0.1", port,
                                      backlog=2048)
    async with server:
        await server.serve_forever()


class ClientProtocol(asyncio.Protocol):
    """One keep-alive connection: send a request, note the first body byte, find the chunked end; ``held_s``:
    the time the stub says it held the request (None: the answer did not say)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.first: asyncio.Future[float] | None = None
        self.done: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.buf = b""
        self.head_of_body = b""  # the body's first bytes, where the stub's held_ns is
        self.in_body = False
        self.need = -1  # bytes of the current chunk still to come (+2 for its CRLF); -1: a size line is next

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.first, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("connection lost"))

    def request(self, raw: bytes) -> tuple[asyncio.Future[float], asyncio.Future[None]]:
        loop = asyncio.get_running_loop()
        self.first, self.done = loop.create_future(), loop.create_future()
        self._reset()
        assert self.transport is not None
        self.transport.write(raw)
        return self.first, self.done

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buf += data
        if not self.in_body:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.buf = self.buf[end + 4:]
            self.in_body = True
        if self.buf and self.first is not None and not self.first.done():
            self.first.set_result(now)
        if len(self.head_of_body) < 64:
            self.head_of_body += self.buf[:64]
        while self.buf:
            if self.need < 0:
                line_end = self.buf.find(b"\r\n")
                if line_end < 0:
                    return
                size = int(self.buf[:line_end].split(b";", 1)[0], 16)
                self.buf = self.buf[line_end + 2:]
                if size == 0:  # last chunk (no trailers are sent by the stub or the tap)
                    self.buf = b""
                    if self.done is not None and not self.done.done():
                        self.done.set_result(None)
                    return
                self.need = size + 2
            take = min(self.need, len(self.buf))
            self.buf = self.buf[take:]
            self.need -= take
            if self.need == 0:
                self.need = -1


    @property
    def held_s(self) -> float | None:
        at = self.head_of_body.find(b'"held_ns":')
        if at < 0:
            return None
        digits = self.head_of_body[at + 10:].split(b",", 1)[0]
        return int(digits) / 1e9 if digits.isdigit() else None


async def open_client(port: int) -> ClientProtocol:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(ClientProtocol, "127.0.0.1", port)
    return protocol


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "serve":
        raise SystemExit("usage: lean_http.py serve PORT TTFT_MS GAP_MS")
    asyncio.run(serve(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
