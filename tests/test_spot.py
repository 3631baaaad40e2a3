"""A run on spot that loses nothing: EC2's interruption notice (a stand-in IMDSv2 on 127.0.0.1),
a resume from S3 on a fresh machine that continues the run's history, an S3 outage at resume that
stops the run without touching S3, and uploads that never hold up the step loop."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import EXACT, child_env, records, train, train_command
from dali_imagenet import spot


class StandInIMDS:
    """IMDSv2 as EC2 serves it, on 127.0.0.1: PUT a token, then GET meta-data with it (401
    without, or with an old one after `rotate()`); spot/instance-action is 404 until `notice()`."""

    def __init__(self, lifecycle: str = "spot"):
        self.tokens = {"token-1"}
        self.current = "token-1"
        self.noticed_at = None
        self.requests: list[str] = []
        self.lifecycle = lifecycle
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: str = "") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self):
                imds.requests.append(f"PUT {self.path}")
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._send(200, imds.current)
                else:
                    self._send(400)

            def do_GET(self):
                imds.requests.append(f"GET {self.path}")
                if self.headers.get("X-aws-ec2-metadata-token") not in {imds.current}:
                    return self._send(401)  # IMDSv2 only
                answers = {"/latest/meta-data/instance-type": "g6.xlarge",
                           "/latest/meta-data/instance-life-cycle": imds.lifecycle}
                if self.path == "/latest/meta-data/spot/instance-action" and imds.noticed_at:
                    return self._send(200, json.dumps({"action": "terminate", "time": "2026-12-01T12:00:00Z"}))
                if self.path in answers:
                    return self._send(200, answers[self.path])
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notice(self) -> None:
        self.noticed_at = time.time()

    def rotate(self) -> None:
        self.current = f"token-{len(self.tokens) + 1}"
        self.tokens.add(self.current)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def imds():
    server = StandInIMDS()
    yield server
    server.close()


def test_imds_off_or_absent_costs_at_most_a_short_timeout(monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert spot.endpoint() is None and spot.probe(spot.endpoint()) is None
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9/")
    assert spot.endpoint() == "http://127.0.0.1:9"
    with socket.socket() as silent:  # accepts connections, never answers: the worst case off the cloud
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        assert spot.probe(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=1.0) is None
        assert time.monotonic() - started < 1.5


def test_imdsv2_token_is_required_and_refreshed(imds):
    client = spot.probe(imds.url)
    assert client is not None and client.instance() == {"instance_type": "g6.xlarge", "lifecycle": "spot"}
    imds.rotate()  # the old token is refused (401): the client fetches a new one and retries
    assert client.get("spot/instance-action") == (404, "")
    assert imds.requests.count("PUT /latest/api/token") == 2
    imds.notice()
    status, body = client.get("spot/instance-action")
    assert status == 200 and json.loads(body)["action"] == "terminate"


def test_the_watcher_asks_to_stop_on_a_notice(imds):
    asked = []
    watcher = spot.SpotWatcher(spot.probe(imds.url), asked.append, log=lambda message: None, interval_s=0.05)
    time.sleep(0.2)
    assert asked == []
    imds.notice()
    deadline = time.monotonic() + 5
    while not asked and time.monotonic() < deadline:
        time.sleep(0.02)
    watcher.close()
    assert asked == [spot.NOTICE] and watcher.notice["action"] == "terminate"


# The shared straight run's recipe (conftest.EXACT): these extra knobs change no weight.
SETS = (*EXACT, "spot_poll_seconds=0.2", "s3_resume_timeout_s=2", "checkpoint_minutes=1000")


def s3_records(bucket: str, key: str) -> list[dict]:
    from dali_imagenet.s3 import client

    return [json.loads(line) for line in client().get_object(Bucket=bucket, Key=key)["Body"].read().splitlines()]


@pytest.mark.slow
def test_a_spot_notice_checkpoints_and_a_new_machine_finishes_the_run(sample_shards, straight_run, s3_bucket, imds,
                                                                      tmp_path):
    url = f"s3://{s3_bucket}/runs/spot"
    on_spot = child_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url, AWS_EC2_METADATA_DISABLED="false")
    process = subprocess.Popen(train_command(sample_shards, tmp_path / "first", *SETS, extra=["--s3", url]),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=on_spot)
    metrics = tmp_path / "first" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
        time.sleep(0.05)
    noticed_step = max(r["step"] for r in records(tmp_path / "first") if "loss" in r)
    imds.notice()
    stdout, stderr = process.communicate(timeout=120)
    exited = time.time()
    assert process.returncode == 0, stderr[-3000:]
    assert "spot interruption notice: stopping after this step" in stderr
    closing = records(tmp_path / "first")[-1]
    assert closing["event"] == "stopped" and closing["reason"] == spot.NOTICE
    assert closing["cost"]["lifecycle"] == "spot" and closing["cost"]["wall_hours"] > 0
    started = records(tmp_path / "first")[0]
    assert started["machine"]["instance_type"] == "g6.xlarge" and started["machine"]["lifecycle"] == "spot"
    from dali_imagenet.s3 import client

    uploaded = client().get_object(Bucket=s3_bucket, Key="runs/spot/last.pt")["Body"].read()
    step = torch.load(__import__("io").BytesIO(uploaded), weights_only=True)["state"]["step"]
    assert noticed_step <= step < noticed_step + 6  # stopped within a few steps of the notice
    print(f"notice -> exit 0 with the checkpoint in S3: {exited - imds.noticed_at:.1f} s (step {noticed_step} -> {step})")

    train(sample_shards, tmp_path / "second", *SETS, extra=["--resume", "auto", "--s3", url, "--spot", "off"])
    a = torch.load(straight_run / "final_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "second" / "final_weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "stopped on a notice + resumed elsewhere != straight"
    history = s3_records(s3_bucket, "runs/spot/metrics.jsonl")
    events = [r["event"] for r in history if r.get("event") not in (None, "note")]
    assert events == ["started", "stopped", "started", "resumed", "finished"]
    assert any(r.get("event") == "note" and "spot interruption notice" in r["message"] for r in history)
    assert [r["step"] for r in history if "loss" in r] == list(range(1, 13))  # every step of both parts, once
    assert [r["epoch"] for r in history if "val_top1" in r] == [1, 2]


@pytest.mark.slow
def test_s3_unreachable_at_resume_stops_and_changes_nothing(sample_shards, s3_bucket, tmp_path):
    from dali_imagenet.s3 import client

    url = f"s3://{s3_bucket}/runs/a"
    train(sample_shards, tmp_path / "a", "epochs=1", extra=["--s3", url])
    before = {o["Key"]: o["ETag"] for o in client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there once closed
    started = time.monotonic()
    result = train(sample_shards, tmp_path / "b", "epochs=2", "s3_resume_timeout_s=3", check=False,
                   extra=["--resume", "auto", "--s3", url], env=child_env(AWS_ENDPOINT_URL=dead))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {url}") and "Could not connect" in lines[0], lines
    assert time.monotonic() - started < 60
    assert not (tmp_path / "b").exists()  # nothing written locally
    assert {o["Key"]: o["ETag"] for o in client().list_objects_v2(Bucket=s3_bucket)["Contents"]} == before


def test_a_fresh_run_never_replaces_a_run_on_s3(sample_shards, s3_bucket, tmp_path):
    from dali_imagenet.s3 import client

    url = f"s3://{s3_bucket}/runs/held"
    client().put_object(Bucket=s3_bucket, Key="runs/held/last.pt", Body=b"a run's checkpoint")
    result = train(sample_shards, tmp_path / "run", check=False, extra=["--s3", url])
    assert result.returncode == 1 and f"{url} holds a run (last.pt)" in result.stderr
    assert client().get_object(Bucket=s3_bucket, Key="runs/held/last.pt")["Body"].read() == b"a run's checkpoint"
    assert not (tmp_path / "run").exists()


def test_a_large_upload_does_not_hold_up_the_steps(s3_bucket, tmp_path):
    """A 128 MB checkpoint goes to S3 (moto) from the background thread while the loop steps: steps
    keep running while it is in flight. The step times with and without the upload are printed."""
    from dali_imagenet.s3sync import S3Sync

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint = run_dir / "last.pt"
    checkpoint.write_bytes(os.urandom(128 * 2**20))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3))
    images = torch.randn(8, 3, 64, 64)

    def step() -> float:
        started = time.perf_counter()
        model(images).sum().backward()
        return time.perf_counter() - started

    quiet = [step() for _ in range(20)]
    sync = S3Sync(f"s3://{s3_bucket}/run", staging=run_dir / ".s3-staging")
    sync.push(checkpoint, replaced_by_rename=True)
    staged = next((run_dir / ".s3-staging").iterdir())
    assert staged.stat().st_ino == checkpoint.stat().st_ino  # a hard link: no copy on the step's thread
    during = []
    while sync.pending() and len(during) < 10_000:
        during.append(step())
    assert sync.close(120) == []
    assert len(during) >= 3  # the loop kept stepping while the upload was in flight
    assert not (run_dir / ".s3-staging").exists()  # staging removed once uploaded
    from dali_imagenet.s3 import client

    assert client().head_object(Bucket=s3_bucket, Key="run/last.pt")["ContentLength"] == 128 * 2**20
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"step {1e3 * median(quiet):.1f} ms without an upload, {1e3 * median(during):.1f} ms during it "
          f"({len(during)} steps while 128 MB went up)")
