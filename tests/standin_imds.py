"""EC2's instance metadata service (IMDSv2) as EC2 serves it, on 127.0.0.1, for the spot tests.

PUT /latest/api/token gives a token; GETs of /latest/meta-data/... need it (401 without, or with an
old one after `rotate()`); spot/instance-action is 404 until a notice exists, then EC2's JSON.
`POST /control/notice` gives the notice from inside the process under test (a sitecustomize hook
that places it at an exact point of a run); `malformed(n)` answers the next n requests with bytes
that are not HTTP, as a broken proxy or a half-dead IMDS would.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RECLAIM_AT = "2026-12-01T12:00:00Z"

# Loaded by train.py through PYTHONPATH: gives the notice (POST to $NOTICE_URL) at the phase
# $NOTICE_AT names, then waits for the watcher to see it (spot_poll_seconds is 0.2 in the tests).
NOTICE_HOOK = """
import os, time, urllib.request

def _notice():
    urllib.request.urlopen(urllib.request.Request(os.environ["NOTICE_URL"], data=b"", method="POST"), timeout=5).read()
    time.sleep(1.0)

_phase, _step = os.environ.get("NOTICE_AT", ""), int(os.environ.get("NOTICE_STEP", "0"))
if os.environ.get("NOTICE_RANK") is not None:  # under torchrun: only that rank's machine is reclaimed
    if os.environ.get("RANK") == os.environ["NOTICE_RANK"]:
        os.environ.update(AWS_EC2_METADATA_SERVICE_ENDPOINT=os.environ["NOTICE_IMDS"], AWS_EC2_METADATA_DISABLED="false")
    else:
        _phase = ""
if _phase == "step":  # while global step NOTICE_STEP (0-based) trains
    import dali_imagenet.step as _s
    _call = _s.TrainStep.__call__
    def _at_step(self, images, labels, *, step, lr):
        if step == _step:
            _notice()
        return _call(self, images, labels, step=step, lr=lr)
    _s.TrainStep.__call__ = _at_step
elif _phase == "validation":  # during the first validation batch
    import dali_imagenet.evaluation as _e
    _predict, _seen = _e.predict_logits, []
    def _during_validation(model, images, flip=False):
        if not _seen:
            _seen.append(1)
            _notice()
        return _predict(model, images, flip)
    _e.predict_logits = _during_validation
elif _phase == "epoch_end":  # after the epoch's last step, before its checkpoint and validation
    import dali_imagenet.checkpoint as _c
    _finish = _c.TrainState.finish_epoch
    def _at_epoch_end(self, validate):
        if self.epoch == 0:
            _notice()
        return _finish(self, validate)
    _c.TrainState.finish_epoch = _at_epoch_end
"""


class StandInIMDS:
    def __init__(self, lifecycle: str = "spot"):
        self.tokens = {"token-1"}
        self.current = "token-1"
        self.noticed_at = None
        self.requests: list[str] = []
        self.lifecycle = lifecycle
        self._malformed = 0
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: str = "") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def _garbled(self) -> bool:
                if imds._malformed <= 0:
                    return False
                imds._malformed -= 1
                self.wfile.write(b"\x00\x01 not http at all\r\n\r\n")  # http.client: BadStatusLine
                self.close_connection = True
                return True

            def do_PUT(self):
                imds.requests.append(f"PUT {self.path}")
                if self._garbled():
                    return
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._send(200, imds.current)
                else:
                    self._send(400)

            def do_POST(self):
                if self.path == "/control/notice":
                    imds.notice()
                    return self._send(200, "ok")
                self._send(404)

            def do_GET(self):
                imds.requests.append(f"GET {self.path}")
                if self._garbled():
                    return
                if self.headers.get("X-aws-ec2-metadata-token") not in {imds.current}:
                    return self._send(401)  # IMDSv2 only
                answers = {"/latest/meta-data/instance-type": "g6.xlarge",
                           "/latest/meta-data/instance-life-cycle": imds.lifecycle}
                if self.path == "/latest/meta-data/spot/instance-action" and imds.noticed_at:
                    return self._send(200, json.dumps({"action": "terminate", "time": RECLAIM_AT}))
                if self.path in answers:
                    return self._send(200, answers[self.path])
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.notice_url = f"{self.url}/control/notice"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notice(self) -> None:
        self.noticed_at = self.noticed_at or time.time()

    def malformed(self, count: int) -> None:
        self._malformed = count

    def rotate(self) -> None:
        self.current = f"token-{len(self.tokens) + 1}"
        self.tokens.add(self.current)

    def close(self) -> None:
        self.server.shutdown()
