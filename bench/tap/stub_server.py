"""A minimal, fast OpenAI-style streaming server for the tap benchmarks: `python stub_server.py PORT`."""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

CHUNKS = [
    b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f" tok{i}"}}]}).encode() + b"\n\n"
    for i in range(16)
]
LAST = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'


TTFT_S = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
GAP_S = float(sys.argv[3]) / 1000 if len(sys.argv) > 3 else 0.0


async def chat(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if TTFT_S:
        await asyncio.sleep(TTFT_S)  # a model server computes before its first token
    for i, chunk in enumerate(CHUNKS):
        if GAP_S and i:
            await asyncio.sleep(GAP_S)  # ... and paces the tokens after it
        await response.write(chunk)
    await response.write(LAST)
    await response.write_eof()
    return response


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    # backlog: uvicorn's default (vLLM and most Python model servers run on uvicorn); aiohttp's own
    # default of 128 overflows when a few hundred connections open at once.
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, backlog=2048)


if __name__ == "__main__":
    main()
