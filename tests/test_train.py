"""train.py and evaluate.py as a user runs them: real processes, the DALI CPU loader, torchrun, S3."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, S3Server

BASE = ["arch=resnet18", "image_size=32", "val_image_size=32", "batch_size=16", "epochs=2", "warmup_epochs=0.5",
        "log_every=1", "loader_threads=1", "shuffle_buffer=32", "amp_dtype=float32", "lr=0.2"]


def command(data, out, *sets, extra=()):
    args = [sys.executable, str(REPO / "train.py"), "--dali", "--data", str(data), "--out", str(out),
            "--device", "cpu", "--no-wandb"]
    for item in [*BASE, *sets]:
        args += ["--set", item]
    return args + list(extra)


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", **extra}


def train(data, out, *sets, extra=(), check=True, **kwargs):
    result = subprocess.run(command(data, out, *sets, extra=extra), capture_output=True, text=True,
                            env=kwargs.pop("env", env()), timeout=300, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(result.stdout + result.stderr)
    return result


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_evaluate_reads_the_checkpoint(sample_shards, tmp_path):
    out = tmp_path / "run"
    result = train(sample_shards, out, "mixup_alpha=0", "cutmix_alpha=0", "epochs=3")
    assert "img/s" in result.stdout and "val top-1" in result.stdout
    steps = [r for r in records(out) if "loss" in r]
    assert len(steps) == 18
    assert sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3])
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in steps)
    for name in ("last.pt", "best.pt", "final_weights.pt", "config.yaml"):
        assert (out / name).is_file()
    evaluation = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(out / "best.pt"),
                                 "--data", str(sample_shards), "--dali", "--device", "cpu", "--json"],
                                capture_output=True, text=True, env=env(), check=True)
    metrics = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert metrics["images"] == 40 and metrics["top1"] > 100 / 8 * 2  # well above chance (12.5 %)
    best = max(r["val_top1"] for r in records(out) if "val_top1" in r)
    assert metrics["top1"] == pytest.approx(best)


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "final_weights.pt", weights_only=True)


def test_resume_mid_epoch_gives_identical_weights(sample_shards, tmp_path):
    sets = ("epochs=1", "drop_path=0.2", "deterministic=true")  # 6 steps; mixup, cutmix and drop path on
    train(sample_shards, tmp_path / "straight", *sets)
    stopped = train(sample_shards, tmp_path / "split", *sets, "max_steps=3")
    assert "stopped (max_steps=3) at step 3" in stopped.stdout
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (state["state"]["step"], state["state"]["epoch"], state["state"]["batch_in_epoch"]) == (3, 0, 3)
    resumed = train(sample_shards, tmp_path / "split", *sets, extra=["--resume", "auto"])
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "3 steps + resume + 3 steps differ from 6 straight steps"


def test_torchrun_two_processes_keep_identical_weights(sample_shards, tmp_path):
    out = tmp_path / "ddp"
    args = command(sample_shards, out, "epochs=1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", *args[1:]], capture_output=True, text=True, env=env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = records(out)[-1]
    assert final["event"] == "finished" and len(final["replica_checksums"]) == 2
    assert final["replicas_identical"] is True
    val = [r for r in records(out) if "val_images" in r]
    assert val[-1]["val_images"] == 40  # every validation image counted once across the two ranks
    assert "2 process(es)" in result.stdout and "global batch 32" in result.stdout


def test_sigterm_checkpoints_and_resume_auto_continues(sample_shards, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(command(sample_shards, out, "epochs=50"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env())
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "stopped (SIGTERM)" in stdout
    state = torch.load(out / "last.pt", weights_only=True)
    step = state["state"]["step"]
    assert 2 <= step < 50 * 6
    assert not list(out.glob(".*tmp*"))
    resumed = train(sample_shards, out, "epochs=50", f"max_steps={step + 2}", extra=["--resume", "auto"])
    assert f"at step {step}" in resumed.stdout
    assert torch.load(out / "last.pt", weights_only=True)["state"]["step"] == step + 2


def test_s3_upload_resume_from_s3_and_no_secrets(sample_shards, s3_bucket, tmp_path):
    from dali_imagenet.s3 import client

    secret, wandb_key = "sekrit-9f8e7d6c5b4a", "wandbkey0123456789abcdef0123456789abcdef"
    run_env = env(AWS_SECRET_ACCESS_KEY=secret, WANDB_API_KEY=wandb_key, WANDB_MODE="offline")
    url = f"s3://{s3_bucket}/runs/a"
    args = ["--s3", url]
    result = subprocess.run(command(sample_shards, tmp_path / "a", "epochs=1", extra=["--wandb", *args]),
                            capture_output=True, text=True, env=run_env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "uploaded to" in result.stdout
    keys = {o["Key"] for o in client().list_objects_v2(Bucket=s3_bucket, Prefix="runs/a/")["Contents"]}
    assert {f"runs/a/{n}" for n in ("last.pt", "best.pt", "final_weights.pt", "metrics.jsonl", "config.yaml")} <= keys
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and wandb_key.encode() not in data, path
    assert list((tmp_path / "a").rglob("*.wandb")), "W&B offline run files were not written"

    fresh = train(sample_shards, tmp_path / "b", "epochs=2", extra=["--resume", "auto", *args], env=run_env)
    assert "resumed from" in fresh.stdout and "at step 6" in fresh.stdout
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state"]["step"] == 12


def test_training_survives_an_s3_outage(sample_shards, tmp_path, s3_server):
    from dali_imagenet.s3 import client

    server = S3Server()
    server.start()
    run_env = env(AWS_ENDPOINT_URL=server.endpoint)
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        client().create_bucket(Bucket="outage")
    finally:
        os.environ["AWS_ENDPOINT_URL"] = s3_server.endpoint
    process = subprocess.Popen(command(sample_shards, tmp_path / "run", "epochs=4", "s3_flush_timeout_s=3")
                               + ["--s3", "s3://outage/run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=run_env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "run" / "last.pt").exists():
        time.sleep(0.05)
    server.stop()  # S3 goes away mid-run
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert "finished at step 24" in stdout
    assert "still pending at exit" in stderr


@pytest.mark.parametrize("log_every", [1, 1000])  # 1000: caught by the check before the checkpoint at max_steps
def test_nan_loss_stops_with_the_step_named(sample_shards, tmp_path, log_every):
    result = train(sample_shards, tmp_path / "run", "lr=1e30", "mixup_alpha=0", "cutmix_alpha=0",
                   f"log_every={log_every}", "max_steps=4", check=False)
    assert result.returncode == 1
    assert "loss is NaN or inf at step" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing written after the loss went bad


@pytest.mark.parametrize("item, message", [("no_such_key=1", "unknown key 'no_such_key'"),
                                           ("batch_size=abc", "batch_size: expected int"),
                                           ("nesterov=maybe", "nesterov: expected true or false"),
                                           ("arch=vgg", "arch must be")])
def test_bad_set_is_one_line(sample_shards, tmp_path, item, message):
    result = train(sample_shards, tmp_path / "run", item, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_evaluate_reads_a_plain_torchvision_state_dict(sample_shards, tmp_path):
    import torchvision

    weights = tmp_path / "resnet18-torchvision.pth"
    torch.save(torchvision.models.resnet18(num_classes=8).state_dict(), weights)
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(weights), "--arch",
                             "resnet18", "--data", str(sample_shards), "--dali", "--device", "cpu", "--image-size",
                             "32", "--json"], capture_output=True, text=True, env=env())
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["images"] == 40 and metrics["arch"] == "resnet18" and 0 <= metrics["top1"] <= 100
    bad = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(weights), "--arch",
                          "resnet50", "--data", str(sample_shards), "--device", "cpu"], capture_output=True, text=True,
                         env=env())
    assert bad.returncode != 0 and "does not fit resnet50" in bad.stderr and "Traceback" not in bad.stderr


def test_a_finished_run_is_never_overwritten_unless_asked(sample_shards, tmp_path):
    out = tmp_path / "run"
    train(sample_shards, out, "epochs=1")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = train(sample_shards, out, "epochs=1", check=False)
    assert again.returncode == 1
    line = again.stderr.strip().splitlines()
    assert len(line) == 1 and str(out) in line[0] and "--resume auto" in line[0] and "--overwrite" in line[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # not a byte changed
    train(sample_shards, out, "epochs=1", "lr=0.05", extra=["--overwrite"])
    assert "lr: 0.05" in (out / "config.yaml").read_text()
    assert len([r for r in records(out) if r.get("event") == "finished"]) == 1  # the old metrics are gone


@pytest.mark.parametrize("case", ["bad_data", "bad_resume", "garbage_checkpoint", "cuda_graph_on_cpu"])
def test_a_failed_start_leaves_no_run_folder(sample_shards, tmp_path, case):
    out, data, extra = tmp_path / "run", sample_shards, []
    if case == "bad_data":
        data = tmp_path / "no-such-shards"
    elif case == "bad_resume":
        extra = ["--resume", str(tmp_path / "missing.pt")]
    elif case == "garbage_checkpoint":
        garbage = tmp_path / "garbage.pt"
        garbage.write_bytes(b"i" * 105)
        extra = ["--resume", str(garbage)]
    sets = ["cuda_graph=true"] if case == "cuda_graph_on_cpu" else []
    result = train(data, out, *sets, extra=extra, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not out.exists()
    if case == "garbage_checkpoint":
        assert f"{garbage}: not a checkpoint" in lines[0]
    if case == "bad_resume":
        assert "missing.pt: no such file" in lines[0]
    if case == "cuda_graph_on_cpu":
        assert "cuda_graph needs a GPU" in lines[0]


def test_resume_across_a_size_change_with_ema_is_exact(sample_shards, tmp_path):
    """The size ramp 16 -> 32 px changes size between epochs 0 and 1; stopping inside epoch 1 and
    resuming (DALI's reader restored, not replayed) gives the same raw and EMA weights as
    training straight through."""
    sets = ("epochs=2", "image_size=32", "min_image_size=16", "ramp_start_epoch=0", "ramp_end_epoch=1",
            "image_size_step=16", "ema_decay=0.9", "lr_schedule=linear", "min_lr=0", "deterministic=true",
            "blurpool=true", "val_image_size=40", "val_flip=true")
    train(sample_shards, tmp_path / "straight", *sets)
    train(sample_shards, tmp_path / "split", *sets, "max_steps=8")
    resumed = train(sample_shards, tmp_path / "split", *sets, extra=["--resume", "auto"])
    assert "at step 8 (epoch 2, batch 2)" in resumed.stdout
    sizes = {r["step"]: r["image_size"] for r in records(tmp_path / "straight") if "image_size" in r}
    assert sizes[1] == sizes[6] == 16 and sizes[7] == sizes[12] == 32
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["weights"][k], b["ema"]["weights"][k]) for k in a["ema"]["weights"])
    val = [r for r in records(tmp_path / "straight") if "val_top1" in r]
    assert len(val) == 2 and all("val_ema_top1" in r and r["images_seen"] == 16 * r["step"] for r in val)
