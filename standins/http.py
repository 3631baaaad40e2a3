"""What the stand-in servers share: a keep-alive HTTP handler that routes every method to
`_route(method)`, replies with a body or JSON, and records each request it answered."""
from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub and its CDN serve

    def log_message(self, *args):
        pass

    def record(self, method: str, status: int) -> None:
        """Called for every reply (a test reads what was asked and answered)."""

    def _route(self, method: str) -> None:
        raise NotImplementedError

    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, method: str | None = None) -> None:
        method = method or self.command
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)
        self.record(method, status)

    def _json(self, value, status: int = 200, headers: dict | None = None, method: str | None = None) -> None:
        self._reply(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})},
                    method)
