"""A stand-in S3 for tests and benchmarks: moto's server as a process on 127.0.0.1 (`S3Server`),
and a real bucket's latency in front of it (`LatencyProxy`: an HTTP proxy that waits `delay_ms`
before passing each request on, and counts what it passed: method, key, byte range).

A local S3 server (moto) answers a ranged GET in ~3 ms here (boto3 included); S3 takes ~10-20 ms
to the first byte of each request. That difference is what makes per-sample reads slow, so a
test or benchmark about S3 speed or request counts puts this in front of its server:

    server = S3Server(); server.start()
    proxy = LatencyProxy(server.endpoint, delay_ms=10)           # then AWS_ENDPOINT_URL=proxy.url
    ...; proxy.object_reads("imagenet-shards/train/"); proxy.close()

Requests are path-style (`/bucket/key`), as boto3 and DALI send them to an IP address. Bodies
are passed through as they come (streamed, in both directions); keep-alive is kept on the
client's side. For the tests of a bucket that misbehaves: `refuse_writes` answers every write
(PUT, POST, DELETE) with S3's 403 AccessDenied, as a bucket policy or an IAM role without
s3:PutObject does; `before_forward(request)` is called before each request goes on (it may wait);
`corrupt_next` holds keys whose next GET gets its body's first byte changed (same length, the
same headers but S3's `x-amz-checksum-*`: an object stored without checksums, whose damage only
the client's own checks can tell; botocore would otherwise catch it and retry by itself), once each. `bytes_per_s` caps
the bodies sent, all connections together (a slow link); `pause_midway[key]` (a threading.Event)
holds a GET of that key after half its body was sent, until the event is set (a download that
arrives late, half of it already written).
"""
from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
CHUNK = 1 << 16


class S3Server:
    """moto's S3 server as a real process on 127.0.0.1; can be stopped and started again."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@dataclass(frozen=True)
class Request:
    method: str
    bucket: str
    key: str
    range: str | None  # the Range header of a ranged GET


class LatencyProxy:
    def __init__(self, upstream: str, delay_ms: float = 0.0):
        target = urlparse(upstream)
        self.delay_s = delay_ms / 1000
        self.requests: list[Request] = []
        self.refuse_writes = False
        self.before_forward = None  # Callable[[Request], None]
        self.corrupt_next: set[str] = set()
        self.bytes_per_s: float | None = None
        self.pause_midway: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._link_free = 0.0  # time.monotonic() when the capped link has sent what was given to it
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                body = self._body()
                path = urlparse(self.path).path
                bucket, _, key = unquote(path).lstrip("/").partition("/")
                request = Request(self.command, bucket, key, self.headers.get("Range"))
                with proxy._lock:
                    proxy.requests.append(request)
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)  # S3's time to the first byte
                if proxy.before_forward is not None:
                    proxy.before_forward(request)
                if proxy.refuse_writes and self.command in ("PUT", "POST", "DELETE"):
                    self._refuse()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                upstream_connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                try:
                    upstream_connection.request(self.command, self.path, body=body, headers=headers)
                    response = upstream_connection.getresponse()
                    self.send_response(response.status, response.reason)
                    length = response.getheader("Content-Length")
                    payload = None if length is not None or self.command == "HEAD" else response.read()
                    damage = self.command == "GET" and response.status in (200, 206) and proxy._take_corrupt(key)
                    for name, value in response.getheaders():
                        if name.lower() not in HOP_BY_HOP and not (
                            payload is not None and name.lower() == "content-length"
                        ) and not (  # a damaged body is one of an object stored without checksums: only ours see it
                            damage and name.lower().startswith("x-amz-checksum-")
                        ):
                            self.send_header(name, value)
                    if payload is not None:
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    if payload is not None:
                        self.wfile.write(_damaged(payload) if damage else payload)
                        return
                    pause = proxy.pause_midway.get(key) if self.command == "GET" else None
                    half, sent = int(length or 0) // 2, 0
                    while block := response.read(CHUNK if pause is None else min(CHUNK, max(half - sent, 1))):
                        proxy._pace(len(block))
                        self.wfile.write(_damaged(block) if damage else block)
                        damage, sent = False, sent + len(block)
                        if pause is not None and sent >= half:
                            self.wfile.flush()
                            pause.wait(timeout=120)
                            pause = None
                finally:
                    upstream_connection.close()

            def _refuse(self) -> None:
                body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                        b'<Message>Access Denied</Message><RequestId>standin</RequestId></Error>')
                self.send_response(403, "Forbidden")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = self.headers.get("Content-Length")
                return self.rfile.read(int(length)) if length else None

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _pace(self, size: int) -> None:
        """Waits until the capped link has room for `size` more bytes (one queue for every connection)."""
        if not self.bytes_per_s:
            return
        with self._lock:
            self._link_free = max(time.monotonic(), self._link_free) + size / self.bytes_per_s
            until = self._link_free
        time.sleep(max(0.0, until - time.monotonic()))

    def _take_corrupt(self, key: str) -> bool:
        with self._lock:
            if key in self.corrupt_next:
                self.corrupt_next.discard(key)
                return True
            return False

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def object_reads(self, prefix: str = "") -> list[Request]:
        """The GETs of objects (not listings) whose key starts with `prefix`."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.key and r.key.startswith(prefix)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _damaged(block: bytes) -> bytes:
    return bytes([block[0] ^ 0xFF]) + block[1:] if block else block
