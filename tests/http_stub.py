"""A tiny threaded HTTP server for tests: it answers every GET/POST with a fixed body and records
the request headers. Threaded because some callers (the CLI through CliRunner) block the test's loop."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROMETHEUS_VECTOR_1 = json.dumps(
    {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "1"]}]}}
).encode()


@contextlib.contextmanager
def serving(body: Callable[[], bytes] | bytes, content_type: str = "application/json") -> Iterator[dict[str, Any]]:
    """Yield ``{"url", "host", "headers"}``; ``headers`` collects each request's headers (lower-case keys)."""
    state: dict[str, Any] = {"headers": []}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state["headers"].append({k.lower(): v for k, v in self.headers.items()})
            payload = body() if callable(body) else body
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = _answer
        do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["host"] = f"127.0.0.1:{server.server_address[1]}"
    state["url"] = f"http://{state['host']}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
