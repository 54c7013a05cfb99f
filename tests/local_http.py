"""One local HTTP endpoint for the tests of API judges: 127.0.0.1 on a free port, one thread,
every POST recorded and answered by a `respond(handler, request)` callable."""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any, Callable


class LocalServer:
    """`with LocalServer(respond) as server:` serves POSTs at `server.url` until the block ends;
    `respond` writes each answer itself (so tests can misbehave on the wire: echo headers,
    trickle bytes, hold requests). `server.requests` holds path, headers and JSON body of each."""

    def __init__(self, respond: Callable[[http.server.BaseHTTPRequestHandler, dict], None]) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                request = {"path": self.path, "headers": dict(self.headers), "body": body}
                outer.requests.append(request)
                try:
                    respond(self, request)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send_json(handler: http.server.BaseHTTPRequestHandler, payload: Any, status: int = 200,
              headers: dict[str, str] | None = None) -> None:
    """Answer with `payload` (bytes as they are, anything else as JSON)."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
