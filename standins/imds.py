"""EC2's instance metadata service (IMDSv2) as EC2 serves it, on 127.0.0.1, for the spot tests.

PUT /latest/api/token gives a token; GETs of /latest/meta-data/... need it (401 without, or with an
old one after `rotate()`); spot/instance-action is 404 until a notice exists, then EC2's JSON.
`POST /control/notice` gives the notice from inside the run under test (`install_notice_hook`
places it at an exact point of a run); `malformed(n)` answers the next n requests with bytes
that are not HTTP, as a broken proxy or a half-dead IMDS would.
"""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RECLAIM_AT = "2026-12-01T12:00:00Z"

def install_notice_hook(env=os.environ, patch=setattr) -> None:
    """Gives the notice (POST to $NOTICE_URL) at the phase $NOTICE_AT names, then waits for the
    watcher to see it (spot_poll_seconds is 0.2 in the tests): `patch(owner, name, value)` swaps
    the functions that mark the phase (pytest's monkeypatch.setattr in this process; setattr in a
    train.py started with NOTICE_HOOK as its sitecustomize). $NOTICE_RANK: under torchrun, only
    that rank's machine is reclaimed (the others see no IMDS)."""
    import dali_imagenet.data.dali_loader as dali_loader
    import dali_imagenet.run.checkpoint as checkpoint
    import dali_imagenet.training.evaluation as evaluation
    import dali_imagenet.training.step as steps

    def notice():
        urllib.request.urlopen(urllib.request.Request(env["NOTICE_URL"], data=b"", method="POST"), timeout=5).read()
        time.sleep(1.0)

    phase, notice_step = env.get("NOTICE_AT", ""), int(env.get("NOTICE_STEP", "0"))
    if env.get("NOTICE_RANK") is not None:
        if env.get("RANK") == env["NOTICE_RANK"]:
            env.update(AWS_EC2_METADATA_SERVICE_ENDPOINT=env["NOTICE_IMDS"], AWS_EC2_METADATA_DISABLED="false")
        else:
            phase = ""
    if phase == "step":  # while global step NOTICE_STEP (0-based) trains
        call = steps.TrainStep.__call__

        def at_step(self, images, labels, *, step, lr):
            if step == notice_step:
                notice()
            return call(self, images, labels, step=step, lr=lr)
        patch(steps.TrainStep, "__call__", at_step)
    elif phase == "validation":  # during the first validation batch
        predict, seen = evaluation.predict_logits, []

        def during_validation(model, images, flip=False):
            if not seen:
                seen.append(1)
                notice()
            return predict(model, images, flip)
        patch(evaluation, "predict_logits", during_validation)
    elif phase == "epoch_end":  # after the epoch's last step, before its checkpoint and validation
        finish = checkpoint.TrainState.finish_epoch

        def at_epoch_end(self, validate):
            if self.epoch == 0:
                notice()
            return finish(self, validate)
        patch(checkpoint.TrainState, "finish_epoch", at_epoch_end)
    elif phase == "staging":  # as train.py starts staging s3:// data onto the machine's disk
        import dali_imagenet.data.staging as staging

        prepare = staging._prepare  # what both stage() and train.py's staging-while-training start with

        def staging_then_notice(*args, **kwargs):
            notice()
            return prepare(*args, **kwargs)
        patch(staging, "_prepare", staging_then_notice)
    elif phase == "startup":  # while the first DALI pipeline (the validation one) is built, before any step
        build, built = dali_loader.DaliLoader.__init__, []

        def building(self, *args, **kwargs):
            if not built:
                built.append(1)
                notice()
            return build(self, *args, **kwargs)
        patch(dali_loader.DaliLoader, "__init__", building)


# A sitecustomize for a train.py process (or torchrun's) that installs the hook from its environment.
NOTICE_HOOK = (f"import os, sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
               f"import standins.imds\nstandins.imds.install_notice_hook()\n")


class StandInIMDS:
    def __init__(self, lifecycle: str = "spot", launched: float | None = None):
        """`launched`: when EC2 launched the instance (Unix time; the identity document's pendingTime)."""
        self.launched = time.time() if launched is None else launched
        self.instance_id = f"i-{os.urandom(9).hex()[:17]}"  # a new machine each time
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
                           "/latest/meta-data/instance-life-cycle": imds.lifecycle,
                           "/latest/meta-data/placement/region": "us-east-1",
                           "/latest/meta-data/placement/availability-zone": "us-east-1a",
                           "/latest/dynamic/instance-identity/document": json.dumps(imds.identity(), indent=2)}
                if self.path == "/latest/meta-data/spot/instance-action" and imds.noticed_at:
                    return self._send(200, json.dumps({"action": "terminate", "time": RECLAIM_AT}))
                if self.path in answers:
                    return self._send(200, answers[self.path])
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.notice_url = f"{self.url}/control/notice"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def identity(self) -> dict:
        """The instance identity document, as EC2 writes it (the fields the run reads, and a few more)."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.launched))
        return {"accountId": "123456789012", "architecture": "x86_64", "availabilityZone": "us-east-1a",
                "imageId": "ami-0123456789abcdef0", "instanceId": self.instance_id, "instanceType": "g6.xlarge",
                "pendingTime": stamp, "privateIp": "10.0.0.12", "region": "us-east-1", "version": "2017-09-30"}

    def notice(self) -> None:
        self.noticed_at = self.noticed_at or time.time()

    def malformed(self, count: int) -> None:
        self._malformed = count

    def rotate(self) -> None:
        self.current = f"token-{len(self.tokens) + 1}"
        self.tokens.add(self.current)

    def close(self) -> None:
        self.server.shutdown()
