"""A cloud run's last edges (issue 33), each reproduced against a real S3 server (moto) behind a
proxy that can refuse writes or hold a request: S3 refusing writes found at start and mid-run, one
writer per run (a lease, conditional checkpoint writes), a prompt stop under torchrun whatever
`log_every` is, rank 0's flush waited for by the other ranks, a failure while finishing that
still flushes and names what is missing, and a spot watcher that says whether it watches."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import EXACT, REPO, child_env, records, train, train_command

from dali_imagenet.run import exits, spot
from dali_imagenet.run.lease import LEASE, Lease, LeaseHeld
from dali_imagenet.run.s3sync import S3Sync, lineage_metadata
from dali_imagenet.s3 import client

QUIET = ["--spot", "off"]


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_s3_refusing_writes_stops_the_run_before_its_first_step(sample_shards, s3_bucket, s3_proxy, tmp_path):
    s3_proxy.refuse_writes = True  # e.g. a role without s3:PutObject, or a bucket policy refusing the prefix
    result = train(sample_shards, tmp_path / "run", extra=["--s3", f"s3://{s3_bucket}/runs/a", *QUIET], check=False)
    assert result.returncode == exits.ERROR
    line = one_error_line(result)
    assert f"s3://{s3_bucket}/runs/a/.write-probe-" in line and "cannot write there" in line and "AccessDenied" in line
    assert "retried" not in line  # a refusal is not retried for minutes
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained


def test_s3_refusing_writes_mid_run_stops_it_at_the_next_checkpoint(sample_shards, s3_bucket, s3_proxy, tmp_path):
    """The writes work at start (the probe, the first checkpoint), then S3 refuses them: the run stops
    at a checkpoint soon after, exit 1 (not 75: a relaunch would not fix it), not hours later with 74."""
    first_checkpoint = []

    def refuse_after_the_first_checkpoint(request):
        if first_checkpoint:
            s3_proxy.refuse_writes = True
        if request.method == "PUT" and request.key.endswith("/last.pt"):
            first_checkpoint.append(request)

    s3_proxy.before_forward = refuse_after_the_first_checkpoint
    out = tmp_path / "run"
    result = train(sample_shards, out, "checkpoint_minutes=0", "epochs=3",
                   extra=["--s3", f"s3://{s3_bucket}/runs/b", *QUIET], check=False)
    assert result.returncode == exits.ERROR, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "S3 refuses the upload" in last and "AccessDenied" in last and str(out) in last
    closing = records(out)[-1]
    assert closing["event"] == "stopped" and closing["exit_code"] == exits.ERROR
    assert closing["step"] < 18  # 3 epochs of 6 steps: it did not train on for nothing
    assert closing["not_uploaded"]  # and says what S3 has not got


def test_a_checkpoint_never_goes_back_in_time_racing_another_writer(s3_bucket, tmp_path):
    """Two S3Syncs on one prefix; the first looks at S3 (nothing there), then the second uploads step 9
    before the first's PUT: the first's conditional PUT fails, its retry finds step 9 and refuses."""
    url = f"s3://{s3_bucket}/runs/race"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "last.pt").write_bytes(b"step 5")
    (tmp_path / "b" / "last.pt").write_bytes(b"step 9")
    first, second = S3Sync(url, tmp_path / "a-staging"), S3Sync(url, tmp_path / "b-staging")
    looked, overtaken = threading.Event(), threading.Event()
    head = first._client.head_object

    def look_then_stall(**kwargs):
        try:
            return head(**kwargs)
        finally:
            looked.set()
            overtaken.wait(30)

    first._client.head_object = look_then_stall
    first.push(tmp_path / "a" / "last.pt", replaced_by_rename=True, lineage=lineage_metadata("run-x", 5))
    assert looked.wait(30)
    second.push(tmp_path / "b" / "last.pt", replaced_by_rename=True, lineage=lineage_metadata("run-x", 9))
    assert second.close(30) == []
    overtaken.set()
    assert first.close(30) == ["runs/race/last.pt"]
    assert "later than this run's step 5" in first.refused
    held = client().get_object(Bucket=s3_bucket, Key="runs/race/last.pt")
    assert held["Body"].read() == b"step 9" and held["Metadata"]["step"] == "9"


def test_the_lease_one_job_at_a_time_its_relaunch_at_once_a_dead_one_after_expiry(s3_bucket, s3_server):
    url = f"s3://{s3_bucket}/runs/lease"
    crashed = Lease(url, lease_s=3, job="job-1").acquire(10)
    crashed._stop.set()  # the process died: no more renewals, no release
    with pytest.raises(LeaseHeld, match=r"another job is writing this run \(job job-1 on .*expires in [0-3] s\)"):
        Lease(url, lease_s=3, job="job-2").acquire(10)
    relaunch = Lease(url, lease_s=3, job="job-1").acquire(10)  # SkyPilot's relaunch of the same job: at once
    relaunch._stop.set()
    time.sleep(3.2)
    other = Lease(url, lease_s=3, job="job-2").acquire(10)  # expired: taken over
    # the stalled holder comes back and renews: it finds the lease taken over and says so
    relaunch._stop.clear()
    relaunch._thread = threading.Thread(target=relaunch._renew, daemon=True)
    relaunch._thread.start()
    deadline = time.monotonic() + 10
    while relaunch.lost is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert relaunch.lost and "taken over by job job-2" in relaunch.lost
    relaunch.release()  # not ours any more: left alone
    assert json.loads(client().get_object(Bucket=s3_bucket, Key=f"runs/lease/{LEASE}")["Body"].read())["job"] == "job-2"
    other.release()
    with pytest.raises(Exception, match="Not Found|404"):
        client().head_object(Bucket=s3_bucket, Key=f"runs/lease/{LEASE}")


SLOW_STEPS = textwrap.dedent("""
    # Loaded by the first job's train.py (PYTHONPATH): each train step takes 0.4 s longer, so that the
    # second job surely starts while the first still runs.
    import time
    import dali_imagenet.training.step as step
    call = step.TrainStep.__call__
    def slower(self, *args, **kwargs):
        time.sleep(0.4)
        return call(self, *args, **kwargs)
    step.TrainStep.__call__ = slower
""")


def wait_for_lease(bucket: str, key: str, job: subprocess.Popen) -> None:
    """Until the job running in `job` holds its lease (it has passed its start-up checks)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            client().head_object(Bucket=bucket, Key=key)
            return
        except Exception:  # noqa: BLE001 - not there yet
            assert job.poll() is None, "the job ended before it took its lease"
            time.sleep(0.2)
    raise AssertionError(f"no lease at s3://{bucket}/{key} after 90 s")


@pytest.mark.slow
def test_a_second_job_on_a_live_run_is_refused_and_the_first_finishes_as_the_straight_run(
        sample_shards, straight_run, s3_bucket, s3_server, tmp_path):
    url = f"s3://{s3_bucket}/runs/twice"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_STEPS)
    first = subprocess.Popen(train_command(sample_shards, tmp_path / "first", *EXACT,
                                           extra=["--s3", url, "--resume", "auto", *QUIET]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=child_env(PYTHONPATH=str(hook), SKYPILOT_TASK_ID="sky-1-first"))
    wait_for_lease(s3_bucket, f"runs/twice/{LEASE}", first)
    second = train(sample_shards, tmp_path / "second", *EXACT, extra=["--s3", url, "--resume", "auto", *QUIET],
                   check=False, env=child_env(SKYPILOT_TASK_ID="sky-2-second"))
    line = one_error_line(second)
    assert f"{url}/{LEASE}: another job is writing this run (job sky-1-first" in line and "sky jobs cancel" in line
    assert not (tmp_path / "second").exists()
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    a = torch.load(straight_run / "final_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "first" / "final_weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "the first job's run was changed by the second"
    with pytest.raises(Exception, match="Not Found|404"):  # released at its end: a relaunch goes on at once
        client().head_object(Bucket=s3_bucket, Key=f"runs/twice/{LEASE}")


def test_a_failure_while_finishing_still_flushes_and_names_what_is_missing(sample_shards, s3_bucket, s3_server,
                                                                           tmp_path, monkeypatch):
    import dali_imagenet.run.outputs as outputs

    save_atomic = outputs.save_atomic

    def no_final_weights(obj, path):
        if Path(path).name == "final_weights.pt":
            raise OSError(28, "No space left on device")
        return save_atomic(obj, path)

    monkeypatch.setattr(outputs, "save_atomic", no_final_weights)
    out = tmp_path / "run"
    result = train(sample_shards, out, "epochs=1", extra=["--s3", f"s3://{s3_bucket}/runs/c", *QUIET], check=False)
    assert result.returncode == exits.UPLOADS_PENDING
    assert "uploaded to" not in result.stdout
    assert "warning: writing final_weights.pt failed (OSError: [Errno 28] No space left on device)" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 file(s) not uploaded") and "final_weights.pt (not written)" in last
    closing = records(out)[-1]
    assert closing["event"] == "finished" and closing["exit_code"] == exits.UPLOADS_PENDING
    assert closing["not_uploaded"] == ["final_weights.pt (not written)"]
    for name in ("last.pt", "metrics.jsonl", "report.html"):  # everything else was flushed all the same
        client().head_object(Bucket=s3_bucket, Key=f"runs/c/{name}")
    # The closing record is written once, after the uploads it names: S3's copy says the same as the run folder's.
    in_s3 = client().get_object(Bucket=s3_bucket, Key="runs/c/metrics.jsonl")["Body"].read().decode()
    assert in_s3 == (out / "metrics.jsonl").read_text()
    assert sum('"event": "finished"' in line for line in in_s3.splitlines()) == 1
    # without S3 too: a run whose final weights are missing is not complete
    alone = train(sample_shards, tmp_path / "alone", "epochs=1", extra=QUIET, check=False)
    assert alone.returncode == exits.UPLOADS_PENDING
    assert alone.stderr.strip().splitlines()[-1].startswith("error: 1 file(s) not written: final_weights.pt")


def test_an_upload_late_after_the_closing_record_leaves_it_as_written(sample_shards, s3_bucket, s3_proxy, tmp_path):
    """The page's upload is held past s3_flush_timeout_s, after the closing record's went up: the
    record (exit 0, nothing missing when it was written) stays as S3 has it, in the run folder too;
    the process says what is missing in its last line and exits 74."""
    release = threading.Event()

    def hold_the_page(request):
        if request.method == "PUT" and request.key.endswith("/report.html"):
            release.wait(30)

    s3_proxy.before_forward = hold_the_page
    out = tmp_path / "run"
    try:
        result = train(sample_shards, out, "epochs=1", "s3_flush_timeout_s=3",
                       extra=["--s3", f"s3://{s3_bucket}/runs/late", *QUIET], check=False, process=True)
    finally:
        release.set()
    assert result.returncode == exits.UPLOADS_PENDING, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 file(s) not uploaded") and "runs/late/report.html" in last
    in_s3 = client().get_object(Bucket=s3_bucket, Key="runs/late/metrics.jsonl")["Body"].read().decode()
    assert in_s3 == (out / "metrics.jsonl").read_text()  # written once: not amended after S3 took it
    closing = json.loads(in_s3.splitlines()[-1])
    assert closing["event"] == "finished" and closing["exit_code"] == exits.COMPLETE and "not_uploaded" not in closing


def torchrun(args: list[str], tmp_path: Path, env: dict, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             "--log-dir", str(tmp_path / "logs"), "--redirects", "3", *args[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, **popen)


@pytest.mark.slow
def test_two_processes_stop_within_a_step_of_a_notice_whatever_log_every_is(sample_shards, s3_bucket, tmp_path):
    """torchrun, 2 CPU ranks, log_every=1000 (no log step in the run): rank 1's machine gets the notice
    while step 2 trains; both ranks stop a step later with the checkpoint in S3 and exit 75, not at
    the epoch's end (step 6)."""
    from standins.imds import NOTICE_HOOK, StandInIMDS

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NOTICE_HOOK)
    imds = StandInIMDS()
    url = f"s3://{s3_bucket}/runs/ddp-notice"
    code_file = tmp_path / "exit-code"
    try:
        run = torchrun(train_command(sample_shards, tmp_path / "ddp", "epochs=2", "batch_size=8", "log_every=1000",
                                     "spot_poll_seconds=0.2", extra=["--s3", url, "--spot", "auto"]), tmp_path,
                       child_env(PYTHONPATH=str(hook), NOTICE_URL=imds.notice_url, NOTICE_AT="step", NOTICE_STEP="1",
                                 NOTICE_RANK="1", NOTICE_IMDS=imds.url, DALI_IMAGENET_EXIT_CODE_FILE=str(code_file)))
        run.communicate(timeout=240)
        seconds = time.time() - imds.noticed_at
    finally:
        imds.close()
    assert int(code_file.read_text()) == exits.RECLAIM
    stopped = records(tmp_path / "ddp")[-1]
    assert stopped["event"] == "stopped" and stopped["reason"] == "spot interruption notice on rank 1"
    assert stopped["step"] == 3, stopped  # noticed during step 2 (1-based), posted after it, agreed after step 3
    assert json.loads(client().get_object(Bucket=s3_bucket, Key="runs/ddp-notice/metrics.jsonl")["Body"].read()
                      .splitlines()[-1])["step"] == 3
    assert seconds < 30
    print(f"two processes, log_every=1000: notice to exit 75 in {seconds:.1f} s")


ALL_RANKS_NAN = textwrap.dedent("""
    # Loaded by both ranks (PYTHONPATH): the batches turn NaN from the second call on, on every rank.
    import dali_imagenet.training.step as step
    body = step.TrainStep.body
    calls = [0]
    def poisoned(self, images, labels, draws, ema_weight):
        calls[0] += 1
        if calls[0] > 1:
            images = images * float("nan")
        return body(self, images, labels, draws, ema_weight)
    step.TrainStep.body = poisoned
""")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_the_other_ranks_wait_for_rank_0s_flush(sample_shards, s3_bucket, s3_proxy, tmp_path):
    """A NaN on every rank at once: each stops by itself. torchrun ends every worker as soon as one
    exits, so rank 1 must not leave while rank 0 uploads: with rank 0's last upload held at the
    proxy, both workers are still alive; released, it lands and both exit 1."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(ALL_RANKS_NAN)
    held, release = threading.Event(), threading.Event()

    def hold_the_report(request):
        if request.method == "PUT" and request.key.endswith("/report.html"):
            held.set()
            release.wait(60)

    s3_proxy.before_forward = hold_the_report
    code_file = tmp_path / "exit-code"
    run = torchrun(train_command(sample_shards, tmp_path / "ddp", "epochs=2", "log_every=1",
                                 extra=["--s3", f"s3://{s3_bucket}/runs/ddp-nan", *QUIET]), tmp_path,
                   child_env(PYTHONPATH=str(hook), DALI_IMAGENET_EXIT_CODE_FILE=str(code_file)))
    try:
        assert held.wait(180), "rank 0 never uploaded its report"
        time.sleep(2.0)  # rank 1 has long since stopped: it must be waiting, not gone
        workers = children(run.pid)
        assert len(workers) == 2 and all(Path(f"/proc/{w}").exists() for w in workers), workers
    finally:
        release.set()
    run.communicate(timeout=120)
    assert int(code_file.read_text()) == exits.ERROR
    closing = json.loads(client().get_object(Bucket=s3_bucket, Key="runs/ddp-nan/metrics.jsonl")["Body"].read()
                         .splitlines()[-1])
    assert closing["event"] == "stopped" and closing["reason"].startswith("loss NaN or inf")
    client().head_object(Bucket=s3_bucket, Key="runs/ddp-nan/report.html")
    logs = "".join(p.read_text() for p in (tmp_path / "logs").rglob("stderr.log"))
    assert "Traceback" not in logs


def test_spot_auto_says_whether_it_watches_and_why_not(monkeypatch):
    from standins.imds import StandInIMDS

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert spot.connect("auto") == (None, "spot notice: not watched (AWS_EC2_METADATA_DISABLED=true; --spot on to "
                                          "insist)")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "false")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    imds, line = spot.connect("auto")
    assert imds is None and line.startswith("spot notice: not watched: no instance metadata service answered at "
                                            "http://127.0.0.1:9 within 1 s")
    server = StandInIMDS()
    try:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", server.url)
        imds, line = spot.connect("auto")
        assert imds is not None and line == f"spot notice: watched at {server.url}"
        # a watcher whose log call raises still passes the notice on, first
        asked = []

        def broken_log(message):
            raise OSError("the log's disk is full")

        watcher = spot.SpotWatcher(imds, asked.append, log=broken_log, interval_s=0.05)
        server.notice()
        deadline = time.monotonic() + 5
        while not asked and time.monotonic() < deadline:
            time.sleep(0.05)
        watcher.close()
        assert asked == [spot.NOTICE]
    finally:
        server.close()


def test_a_sigkilled_process_leaves_its_lease_to_its_own_relaunch(sample_shards, s3_bucket, s3_server, tmp_path):
    """The same job relaunched after a crash (SIGKILL: nothing released) goes on at once."""
    url = f"s3://{s3_bucket}/runs/crash"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_STEPS)
    job = child_env(PYTHONPATH=str(hook), SKYPILOT_TASK_ID="sky-7")
    first = subprocess.Popen(train_command(sample_shards, tmp_path / "first", "epochs=1",
                                           extra=["--s3", url, "--resume", "auto", *QUIET]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=job)
    wait_for_lease(s3_bucket, f"runs/crash/{LEASE}", first)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    relaunch = train(sample_shards, tmp_path / "relaunch", "epochs=1", extra=["--s3", url, "--resume", "auto", *QUIET],
                     env=child_env(SKYPILOT_TASK_ID="sky-7"), check=False)
    assert relaunch.returncode == 0, relaunch.stderr[-2000:]
    with pytest.raises(Exception, match="Not Found|404"):  # and released it at its end
        client().head_object(Bucket=s3_bucket, Key=f"runs/crash/{LEASE}")


@pytest.mark.slow
def test_under_torchrun_refused_writes_stop_both_ranks_at_start_without_waiting(sample_shards, s3_bucket, s3_proxy,
                                                                                 tmp_path):
    """Rank 0 finds at start that S3 refuses writes: it has nothing to flush, so rank 1 does not wait
    out the flush timeout for it; both leave with a line each."""
    s3_proxy.refuse_writes = True
    code_file = tmp_path / "exit-code"
    started = time.monotonic()
    run = torchrun(train_command(sample_shards, tmp_path / "ddp", extra=["--s3", f"s3://{s3_bucket}/runs/d", *QUIET]),
                   tmp_path, child_env(DALI_IMAGENET_EXIT_CODE_FILE=str(code_file)))
    run.communicate(timeout=240)
    seconds = time.monotonic() - started
    assert int(code_file.read_text()) == exits.ERROR
    last = sorted(p.read_text().strip().splitlines()[-1] for p in (tmp_path / "logs").rglob("stderr.log"))
    assert len(last) == 2 and all("cannot write there" in line for line in last), last
    assert seconds < 60, seconds  # not s3_flush_timeout_s (90 s) + 15 s
