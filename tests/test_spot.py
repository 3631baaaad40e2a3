"""A run on spot that loses nothing and that SkyPilot brings back: EC2's interruption notice (a
stand-in IMDSv2 on 127.0.0.1) at a train step, during validation and at an epoch's end, each
ending in the reclaim exit code with the checkpoint in S3 and a resume on a new machine equal to
an uninterrupted run; every other way out (S3 gone, a NaN, a data error) flushed to S3 with a
non-zero code; and a resume that never goes back in time."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import EXACT, REPO, child_env, records, train, train_command

from dali_imagenet.run import exits, spot
from standins.imds import RECLAIM_AT, StandInIMDS, install_notice_hook


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
    assert client is not None and client.instance() == {  # when EC2 launched it: the identity document's pendingTime
        "instance_type": "g6.xlarge", "lifecycle": "spot", "region": "us-east-1", "zone": "us-east-1a",
        "instance_id": imds.instance_id, "pending_time": float(int(imds.launched))}
    imds.rotate()  # the old token is refused (401): the client fetches a new one and retries
    assert client.get("spot/instance-action") == (404, "")
    assert imds.requests.count("PUT /latest/api/token") == 2
    imds.notice()
    status, body = client.get("spot/instance-action")
    assert status == 200 and json.loads(body)["action"] == "terminate"


def wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_malformed_reply_is_logged_once_and_the_notice_after_it_still_acted_on(imds):
    asked, notes = [], []
    watcher = spot.SpotWatcher(spot.probe(imds.url), asked.append, log=notes.append, interval_s=0.05)
    imds.malformed(6)  # several polls in a row get bytes that are not HTTP (http.client.BadStatusLine)
    wait_for(lambda: imds._malformed == 0)
    wait_for(lambda: any("answers again" in n for n in notes))
    imds.notice()
    wait_for(lambda: asked)
    watcher.close()
    failures = [n for n in notes if "poll failed" in n]
    assert len(failures) == 1 and "BadStatusLine" in failures[0], notes  # logged once, not once a poll
    assert asked == [spot.NOTICE] and watcher.notice["time"] == RECLAIM_AT
    timing = watcher.timing()
    assert timing["reclaim_at"] == "2026-12-01T12:00:00.000Z" and timing["since_notice_s"] >= 0
    assert not watcher._thread.is_alive()  # close() joins the thread


def test_exit_codes_for_each_way_a_run_stops():
    assert exits.for_stop(None) == exits.COMPLETE
    assert exits.for_stop("max_steps=3") == exits.for_stop("max_minutes=5") == exits.COMPLETE
    assert exits.for_stop(spot.NOTICE) == exits.for_stop("SIGTERM") == exits.RECLAIM
    assert exits.for_stop(f"{spot.NOTICE} on rank 1") == exits.RECLAIM
    assert exits.for_stop("SIGINT") == exits.for_stop("SIGINT on rank 3") == exits.INTERRUPTED
    assert (
        exits.with_uploads(exits.COMPLETE, ["k"]) == exits.with_uploads(exits.RECLAIM, ["k"]) == exits.UPLOADS_PENDING
    )
    assert (
        exits.with_uploads(exits.ERROR, ["k"]) == exits.ERROR and exits.with_uploads(exits.RECLAIM, []) == exits.RECLAIM
    )
    assert exits.RECLAIM not in (0, 1, 2, 130, 137, 143) and exits.UPLOADS_PENDING not in (0, 1, 2, 130, 137, 143)


# The shared straight run's recipe (conftest.EXACT): these extra knobs change no weight.
SETS = (*EXACT, "spot_poll_seconds=0.2", "s3_resume_timeout_s=2", "checkpoint_minutes=1000")


def s3_records(bucket: str, key: str) -> list[dict]:
    from dali_imagenet.s3 import client

    return [json.loads(line) for line in client().get_object(Bucket=bucket, Key=key)["Body"].read().splitlines()]


def s3_checkpoint(bucket: str, key: str) -> dict:
    from dali_imagenet.s3 import client

    return torch.load(io.BytesIO(client().get_object(Bucket=bucket, Key=key)["Body"].read()), weights_only=True)


# phase -> (extra env for the hook, the step of the checkpoint the run must leave in S3)
PHASES = {"step": ({"NOTICE_STEP": "3"}, 4),  # the 4th step trains while the notice comes: stop after it
          "validation": ({}, 6),  # epoch 1 is 6 steps: its end checkpoint, written before validation
          "epoch_end": ({}, 6)}


def stopped_by_a_notice(phase: str, env: dict, shards, url: str, imds, out, monkeypatch):
    """train.py (SETS, --s3 `url`) on a spot machine whose notice the hook gives at `phase`: it
    must exit 75 within 60 s of the notice. Returns its result and those seconds."""
    hooks = dict(NOTICE_URL=imds.notice_url, NOTICE_AT=phase, **env)
    on_spot = child_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url, AWS_EC2_METADATA_DISABLED="false", **hooks)
    install_notice_hook(hooks, monkeypatch.setattr)
    result = train(shards, out, *SETS, extra=["--s3", url], env=on_spot, check=False)
    monkeypatch.undo()
    seconds = time.time() - imds.noticed_at if imds.noticed_at else float("inf")
    assert result.returncode == exits.RECLAIM, result.stderr[-3000:]
    assert seconds < 60
    return result, seconds


def relaunch_ends_as_the_straight_run(shards, straight_run, url: str, out) -> None:
    """SkyPilot's relaunch: the same command on a new machine (an empty --out), --resume auto from S3."""
    train(shards, out, *SETS, extra=["--resume", "auto", "--s3", url, "--spot", "off"])
    a = torch.load(straight_run / "final_weights.pt", weights_only=True)
    b = torch.load(out / "final_weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "stopped on a notice + relaunched != straight"


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_a_notice_at_any_moment_exits_75_with_the_checkpoint_in_s3_and_a_new_machine_finishes(
        phase, sample_shards, straight_run, s3_bucket, imds, tmp_path, monkeypatch):
    """train.py in this process, the notice placed by the hook (monkeypatch); test_cloud gives one to
    a train.py process of its own, through the task's `run:`."""
    url = f"s3://{s3_bucket}/runs/{phase}"
    env, step = PHASES[phase]
    first, seconds = stopped_by_a_notice(phase, env, sample_shards, url, imds, tmp_path / "first", monkeypatch)
    assert f"{spot.NOTICE}: stopping" in first.stderr and "exit 75: continue with --resume auto" in first.stderr
    closing = records(tmp_path / "first")[-1]
    assert closing["event"] == "stopped" and closing["reason"] == spot.NOTICE and closing["exit_code"] == 75
    assert (
        closing["notice"]["reclaim_at"].startswith("2026-12-01T12:00:00") and closing["notice"]["since_notice_s"] < 60
    )
    assert closing["cost"]["lifecycle"] == "spot" and closing["checkpoint_step"] == step
    uploaded = s3_checkpoint(s3_bucket, f"runs/{phase}/last.pt")
    assert uploaded["state"]["step"] == step
    assert uploaded["state"]["validation_due"] == (1 if phase != "step" else 0)
    assert s3_records(s3_bucket, f"runs/{phase}/metrics.jsonl")[-1] == closing  # the closing record is in S3 too
    print(f"{phase}: notice -> exit 75 with the checkpoint in S3: {seconds:.1f} s (step {step})")
    relaunch_ends_as_the_straight_run(sample_shards, straight_run, url, tmp_path / "second")
    launches = records(tmp_path / "second")[-1]["launches"]  # the reclaimed launch and the relaunch, each priced
    assert [(x["exit_code"], x["instance"].get("lifecycle")) for x in launches] == [(75, "spot"), (0, None)]
    assert launches[0]["phases_s"]["training"] > 0 and launches[1]["phases_s"]["resume"] > 0
    history = s3_records(s3_bucket, f"runs/{phase}/metrics.jsonl")
    events = [r["event"] for r in history if r.get("event") not in (None, "note")]
    assert events == ["started", "stopped", "started", "resumed", "finished"]
    assert any(r.get("event") == "note" and spot.NOTICE in r["message"] for r in history)
    assert [r["step"] for r in history if "loss" in r] == list(range(1, 13))  # every step of both parts, once
    assert [r["epoch"] for r in history if "val_top1" in r] == [1, 2]  # one validation per epoch
    assert [v["epoch"] for v in torch.load(tmp_path / "second" / "last.pt", weights_only=True)["state"]["history"]] == [
        1,
        2,
    ]


@pytest.mark.slow
def test_a_notice_at_start_up_exits_75_before_any_step_and_the_relaunch_starts_clean(
        sample_shards, straight_run, s3_bucket, imds, tmp_path, monkeypatch):
    """The notice while the first pipeline is built, before any step: nothing trained, nothing to
    checkpoint; exit 75 with the closing record in S3, and the relaunch (--resume auto at a prefix
    that holds a run without a checkpoint) trains from the start to the straight run's weights."""
    url = f"s3://{s3_bucket}/runs/startup"
    _, seconds = stopped_by_a_notice("startup", {}, sample_shards, url, imds, tmp_path / "first", monkeypatch)
    closing = s3_records(s3_bucket, "runs/startup/metrics.jsonl")[-1]
    assert closing["event"] == "stopped" and closing["reason"] == spot.NOTICE and closing["step"] == 0
    assert closing["checkpoint_step"] is None and closing["exit_code"] == exits.RECLAIM
    assert not (tmp_path / "first" / "last.pt").exists() and not any("loss" in r for r in records(tmp_path / "first"))
    print(f"startup: notice -> exit 75: {seconds:.1f} s (nothing trained)")
    relaunch_ends_as_the_straight_run(sample_shards, straight_run, url, tmp_path / "second")
    assert s3_checkpoint(s3_bucket, "runs/startup/last.pt")["state"]["step"] == 12
    launches = records(tmp_path / "second")[-1]["launches"]
    assert [x["exit_code"] for x in launches] == [75, 0] and launches[0]["phases_s"]["training"] == 0


@pytest.mark.slow
def test_s3_unreachable_at_resume_stops_and_changes_nothing(sample_shards, trained_run, s3_bucket, tmp_path):
    from dali_imagenet.s3 import client

    url = f"s3://{s3_bucket}/runs/a"
    for path in trained_run.iterdir():  # a run's files at the prefix, as a run uploads them
        if path.is_file():
            client().upload_file(str(path), s3_bucket, f"runs/a/{path.name}")
    before = {o["Key"]: o["ETag"] for o in client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there once closed
    started = time.monotonic()
    result = train(sample_shards, tmp_path / "b", "epochs=1", "s3_resume_timeout_s=3", check=False,
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


def test_a_corrupt_checkpoint_in_s3_is_refused_and_s3_left_as_it_is(sample_shards, s3_bucket, tmp_path):
    from dali_imagenet.s3 import client

    url = f"s3://{s3_bucket}/runs/corrupt"
    for name, body in (("last.pt", b"\x80half a checkpoint"), ("best.pt", b"never read"), ("metrics.jsonl", b"{}\n")):
        client().put_object(Bucket=s3_bucket, Key=f"runs/corrupt/{name}", Body=body)
    before = {o["Key"]: o["ETag"] for o in client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    result = train(sample_shards, tmp_path / "run", check=False, extra=["--resume", "auto", "--s3", url])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"error: {url}/last.pt: not a checkpoint") and "S3 is left as it is" in lines[0]
    assert {o["Key"]: o["ETag"] for o in client().list_objects_v2(Bucket=s3_bucket)["Contents"]} == before
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()


def test_the_newer_checkpoint_wins_and_other_runs_or_configs_are_refused(s3_bucket, tmp_path):
    """resume.choose on one machine, with real checkpoint files and S3 (moto): by step within one
    run, whichever side is newer; two runs, or another config, refused in one line."""
    from dali_imagenet.config import TrainConfig, to_dict
    from dali_imagenet.run import checkpoint as ckpt
    from dali_imagenet.run import resume
    from dali_imagenet.run.run_folder import RunError
    from dali_imagenet.run.s3sync import S3Sync, lineage_metadata
    from dali_imagenet.s3 import client

    config = TrainConfig(epochs=3)

    def checkpoint(folder, step: int, run_id: str = "run-a", **changes) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {"step": step, "run_id": run_id, "epoch": 0, "batch_in_epoch": step}
        ckpt.save_atomic({"model": {}, "optimizer": {}, "scaler": {}, "state": state,
                          "config": {**to_dict(config), **changes}}, folder / "last.pt")

    def upload(step: int, run_id: str = "run-a", **changes) -> None:
        checkpoint(tmp_path / "s3-side", step, run_id, **changes)
        sync = S3Sync(url, staging=tmp_path / "staging")
        sync.push(tmp_path / "s3-side" / "last.pt", replaced_by_rename=True, lineage=lineage_metadata(run_id, step))
        assert sync.close(30) == []

    url = f"s3://{s3_bucket}/runs/choose"
    local = tmp_path / "machine"
    upload(10)
    checkpoint(local, 4)  # a stale folder on a machine that comes back: S3's newer lineage wins
    assert resume.choose(local, url, 5, config) is False
    assert ckpt.load_training(local / "last.pt")["state"]["step"] == 10
    checkpoint(local, 12)  # this machine trained on after S3's: S3 must catch up, nothing is fetched
    assert resume.choose(local, url, 5, config) is True
    assert ckpt.load_training(local / "last.pt")["state"]["step"] == 12
    checkpoint(local, 12, run_id="run-b")
    with pytest.raises(RunError, match="belong to different runs"):
        resume.choose(local, url, 5, config)
    (local / "last.pt").unlink()
    upload(11, lr=0.5)  # S3 holds a run of another config: refused before anything is fetched
    with pytest.raises(RunError) as refused:
        resume.choose(local, url, 5, config)
    assert "a run of another config (lr 0.5 -> 0.1)" in str(refused.value) and not (local / "last.pt").exists()
    upload(11, log_every=7, max_steps=99)  # how a run logs or is cut short may change on resume
    assert resume.choose(local, url, 5, config) is False and (local / "last.pt").exists()
    # an older lineage is never uploaded over a newer one: the uploader looks first and refuses
    checkpoint(tmp_path / "old", 3)
    sync = S3Sync(url, staging=tmp_path / "staging")
    sync.push(tmp_path / "old" / "last.pt", replaced_by_rename=True, lineage=lineage_metadata("run-a", 3))
    assert sync.close(30) == ["runs/choose/last.pt"] and "later than this run's step 3" in sync.refused
    assert client().head_object(Bucket=s3_bucket, Key="runs/choose/last.pt")["Metadata"]["step"] == "11"


def test_a_push_never_removes_the_file_being_uploaded(s3_bucket, tmp_path, monkeypatch):
    """A newer push of a key while its older snapshot is uploading keeps the older one until the
    upload ends; then both land in order and the staging folder is empty."""
    from dali_imagenet.run.s3sync import S3Sync
    from dali_imagenet.s3 import client

    sync = S3Sync(f"s3://{s3_bucket}/race", staging=tmp_path / "staging")
    uploading, release, seen = __import__("threading").Event(), __import__("threading").Event(), []
    real = sync._client.upload_file

    def slow_upload(filename, *args, **kwargs):
        seen.append(open(filename, "rb").read())
        uploading.set()
        release.wait(10)
        return real(filename, *args, **kwargs)

    monkeypatch.setattr(sync._client, "upload_file", slow_upload)
    (tmp_path / "metrics.jsonl").write_text("one\n")
    sync.push(tmp_path / "metrics.jsonl")
    assert uploading.wait(10)
    (tmp_path / "metrics.jsonl").write_text("one\ntwo\n")
    sync.push(tmp_path / "metrics.jsonl")  # supersedes while the first is in flight
    release.set()
    assert sync.close(30) == []
    assert seen == [b"one\n", b"one\ntwo\n"]  # the first upload read its whole file: it was not removed
    assert client().get_object(Bucket=s3_bucket, Key="race/metrics.jsonl")["Body"].read() == b"one\ntwo\n"
    assert not (tmp_path / "staging").exists()


@pytest.fixture
def silent_s3(tmp_path, monkeypatch):
    """An S3Sync to an endpoint that accepts connections and never answers (with credentials of its
    own: without any, boto3 would fail at once, before any request), one file queued."""
    from dali_imagenet.run.s3sync import S3Sync

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        for key, value in (("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}"),
                           ("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                           ("AWS_DEFAULT_REGION", "us-east-1")):
            monkeypatch.setenv(key, value)
        sync = S3Sync("s3://nobody/run", staging=tmp_path / "staging")
        (tmp_path / "config.yaml").write_text("a: 1\n")
        sync.push(tmp_path / "config.yaml")
        yield sync


def test_close_past_its_deadline_returns_and_leaves_no_thread_working(silent_s3):
    """S3 that never answers: close() returns within its deadline (plus one short join) naming the
    key, and `stuck()` says whether a request is still in its timeout (the caller then os._exits)."""
    started = time.monotonic()
    assert silent_s3.close(1.0) == ["run/config.yaml"]
    assert time.monotonic() - started < 2.5
    assert silent_s3.stuck()  # its request is waiting on a server that never answers


def test_ctrl_c_while_leaving_stops_the_upload_wait_and_sigterm_changes_nothing(silent_s3):
    """On the way out (the uploads' wait, up to s3_flush_timeout_s), SIGTERM (torchrun's to the
    ranks of a run that ended) is ignored, and a Ctrl-C cuts the wait short: close() returns at
    once naming what is not in S3, and the run exits 74 saying so (measured with a train.py
    process whose S3 went away: 1.4 s after the Ctrl-C instead of the whole 60 s timeout)."""
    import signal

    from dali_imagenet.run.interrupts import StopRequest

    request = StopRequest(announce=False)
    try:
        request.leaving()
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.reason is None and not request.hurry
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt in the middle of the closing record
        assert request.reason is None and request.hurry
    finally:
        request.restore()
    started = time.monotonic()
    assert silent_s3.close(60.0, give_up=lambda: request.hurry) == ["run/config.yaml"]
    assert time.monotonic() - started < 2.0


@pytest.mark.slow
def test_s3_gone_at_the_end_is_not_success(sample_shards, tmp_path, s3_server):
    """S3 goes away mid-run: training goes on, but the run exits 74 with one line naming the
    files not uploaded, within the flush timeout, and no thread outlives the interpreter."""
    from conftest import S3Server

    from dali_imagenet.s3 import client

    server = S3Server()
    server.start()
    run_env = child_env(AWS_ENDPOINT_URL=server.endpoint)
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        client().create_bucket(Bucket="outage")
    finally:
        os.environ["AWS_ENDPOINT_URL"] = s3_server.endpoint
    process = subprocess.Popen(train_command(sample_shards, tmp_path / "run", "epochs=2", "s3_flush_timeout_s=3")
                               + ["--s3", "s3://outage/run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=run_env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "run" / "last.pt").exists():
        time.sleep(0.05)
    server.stop()  # S3 goes away mid-run
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == exits.UPLOADS_PENDING, stderr[-2000:]
    assert [r["event"] for r in records(tmp_path / "run") if r.get("event") in ("finished", "stopped")] == ["finished"]
    line = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "not uploaded to s3://outage/run" in line[0] and "final_weights.pt" in line[0]
    assert "metrics.jsonl" in line[0] and str(tmp_path / "run") in line[0]
    assert "interpreter shutdown" not in stderr and "Traceback" not in stderr


def poison_from_step(first_bad: int, monkeypatch) -> None:
    """From (0-based) step `first_bad` on, the batches are NaN, as an overflow would make them."""
    from dali_imagenet.training.step import TrainStep

    body = TrainStep.body

    def poisoned(self, images, labels, draws, ema_weight):
        if int(self.step_number) >= first_bad:
            images = images * float("nan")
        return body(self, images, labels, draws, ema_weight)
    monkeypatch.setattr(TrainStep, "body", poisoned)


@pytest.mark.slow
@pytest.mark.parametrize("way_out", ["nan", "data_error"])
def test_a_nan_or_a_data_error_leaves_the_stopped_record_and_the_last_good_checkpoint_in_s3(
        way_out, sample_shards, s3_bucket, tmp_path, monkeypatch):
    import shutil

    from test_verify import wipe_a_jpeg_header

    from dali_imagenet.s3 import client

    url = f"s3://{s3_bucket}/runs/{way_out}"
    shards = sample_shards
    if way_out == "nan":
        poison_from_step(7, monkeypatch)  # the 8th step's loss is NaN
        sets = ("epochs=2", "mixup_alpha=0", "cutmix_alpha=0")
    else:
        shards = tmp_path / "shards"
        shutil.copytree(sample_shards, shards)
        wipe_a_jpeg_header(shards)
        sets = ("epochs=2", "checkpoint_minutes=0")  # a checkpoint after every step
    result = train(shards, tmp_path / "run", *sets, extra=["--s3", url], check=False)
    assert result.returncode == exits.ERROR
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.stderr
    local = records(tmp_path / "run")
    assert s3_records(s3_bucket, f"runs/{way_out}/metrics.jsonl") == local  # the whole log, closing record too
    assert local[-1]["event"] == "stopped"
    assert ("NaN" in local[-1]["reason"]) if way_out == "nan" else ("undecodable" in local[-1]["reason"])
    in_s3 = s3_checkpoint(s3_bucket, f"runs/{way_out}/last.pt")
    on_disk = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert in_s3["state"]["step"] == on_disk["state"]["step"] == local[-1]["checkpoint_step"] >= 1
    if way_out == "nan":
        assert in_s3["state"]["step"] == 6 and local[-1]["step"] == 8  # the epoch end; NaN seen at step 8
    assert "report.html" in {o["Key"].split("/")[-1] for o in
                             client().list_objects_v2(Bucket=s3_bucket, Prefix=f"runs/{way_out}/")["Contents"]}


def test_a_large_upload_does_not_hold_up_the_steps(s3_bucket, tmp_path):
    """A 128 MB checkpoint goes to S3 (moto) from the background thread while the loop steps: steps
    keep running while it is in flight. The step times with and without the upload are printed."""
    from dali_imagenet.run.s3sync import S3Sync

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


@pytest.mark.slow
def test_a_data_error_on_one_rank_stops_both_with_a_line_each(sample_shards, s3_bucket, tmp_path):
    """torchrun, 2 CPU ranks (gloo): one sample that only one rank reads does not decode. That rank
    names it; the other says which rank stopped the run; both exit within seconds (no collective
    timeout, no gloo traceback), and rank 0 leaves the stopped record and checkpoint in S3."""
    import shutil

    from test_verify import wipe_a_jpeg_header

    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    tar, key = wipe_a_jpeg_header(shards)
    out, url = tmp_path / "ddp", f"s3://{s3_bucket}/runs/ddp"
    args = train_command(shards, out, "epochs=2", "checkpoint_minutes=0", extra=["--s3", url])
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             "--log-dir", str(tmp_path / "logs"), "--redirects", "3", *args[1:]],
                            capture_output=True, text=True, env=child_env(), timeout=240, cwd=REPO)
    seconds = time.monotonic() - started
    assert result.returncode != 0
    last_lines = [path.read_text().strip().splitlines()[-1] for path in sorted((tmp_path / "logs").rglob("stderr.log"))]
    assert len(last_lines) == 2, last_lines
    failing = [line for line in last_lines if f"sample {key}.jpg is undecodable" in line and "stopping:" not in line]
    other = [line for line in last_lines if line.startswith("error: stopping: rank ")]
    assert len(failing) == 1 and len(other) == 1, last_lines
    assert failing[0].startswith("error: ") and key in other[0]
    assert not any("Traceback" in p.read_text() for p in (tmp_path / "logs").rglob("stderr.log"))
    assert seconds < 90, seconds
    closing = s3_records(s3_bucket, "runs/ddp/metrics.jsonl")[-1]
    assert closing["event"] == "stopped" and "undecodable" in closing["reason"]
    print(f"one rank's data error: both ranks out in {seconds:.1f} s (torchrun start included)")


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_stop_request_cuts_a_replay_short(sample_shards, backend):
    """A resume whose reader state no longer fits the shards (after a repair) decodes and drops
    the epoch's earlier batches: a stop asked for meanwhile is acted on between those batches."""
    from dali_imagenet import make_loader
    from dali_imagenet.errors import Interrupted

    asked_at = []

    def interrupt(batch: int) -> None:
        asked_at.append(batch)
        if batch == 1:
            raise Interrupted(spot.NOTICE)

    loader = make_loader(sample_shards, "train", 16, device="cpu", image_size=32, backend=backend, num_threads=1,
                         resume={"batch": 4, "samples": 95, "dali": None}, interrupt=interrupt)
    with pytest.raises(Interrupted):
        next(iter(loader))
    assert asked_at == [0, 1]
    # DALI: asked before each batch is read; the baseline: as each batch arrives from its workers
    assert loader.batches_read == (1 if backend == "dali" else 2)
