"""A local OpenAI-compatible endpoint for tests: a JSON reply helper and a server on a free port.

Each test module writes its own ``do_POST`` (what the fake answers is the point of the
test); this module holds what they share: writing a JSON response and serving a handler
class on 127.0.0.1 for the length of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import ThreadingHTTPServer


def send_json(handler, payload: dict, code: int = 200, headers: dict | None = None) -> None:
    """Write ``payload`` as the JSON response of ``handler`` (a BaseHTTPRequestHandler).
    A client that already hung up (a timeout test) is not an error."""
    data = json.dumps(payload).encode()
    try:
        handler.send_response(code)
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def chat_completion(*contents: str) -> dict:
    """A minimal /chat/completions response with one choice per content."""
    return {"choices": [{"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
                        for i, c in enumerate(contents)]}


def start(handler_cls, poll_interval: float = 0.5) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``handler_cls`` on a free local port in a daemon thread; returns the server and its ``…/v1`` base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def stop(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def serve(handler_cls, poll_interval: float = 0.5):
    """``with serve(Handler) as base_url:`` a running fake for the block."""
    server, url = start(handler_cls, poll_interval)
    try:
        yield url
    finally:
        stop(server)
