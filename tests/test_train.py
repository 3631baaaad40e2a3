"""train.py and evaluate.py as a user runs them: real processes, the DALI CPU loader, torchrun, S3.
The checks read what a run leaves behind (metrics.jsonl, checkpoints), not its console wording."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import EXACT, child_env, records, run_in_process, script, train, train_command

pytestmark = pytest.mark.slow  # each starts train.py (a few seconds of imports, then real training)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def ended(run_dir: Path) -> dict:
    """The run's closing record (finished or stopped)."""
    return [r for r in records(run_dir) if r.get("event") in ("finished", "stopped")][-1]


def test_loss_falls_and_evaluate_reads_the_checkpoint(trained_run, sample_shards):
    steps = [r for r in records(trained_run) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 19))  # 3 epochs x 6 steps, one record each (log_every=1)
    assert sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3])
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in steps)
    assert ended(trained_run)["event"] == "finished" and ended(trained_run)["step"] == 18
    for name in ("last.pt", "best.pt", "final_weights.pt", "config.yaml", "report.html"):
        assert (trained_run / name).is_file()
    validations = {r["step"]: r for r in records(trained_run) if "val_top1" in r}
    assert sorted(validations) == [6, 12, 18] and all(r["val_images"] == 40 for r in validations.values())
    evaluation = run_in_process(script("evaluate"), ["evaluate.py", "--checkpoint", trained_run / "best.pt", "--data",
                                                     sample_shards, "--dali", "--device", "cpu", "--weights", "raw",
                                                     "--json"])
    assert evaluation.returncode == 0, evaluation.stderr
    metrics = json.loads(evaluation.stdout.strip().splitlines()[-1])
    best_step = load(trained_run / "best.pt")["state"]["step"]
    assert metrics["images"] == 40 and metrics["top1"] > 100 / 8 * 2  # well above chance (12.5 %)
    assert metrics["top1"] == pytest.approx(validations[best_step]["val_top1"])  # the run's own number, re-measured


def same_weights(a: Path, b: Path) -> None:
    first, second = load(a / "last.pt"), load(b / "last.pt")
    assert first["model"].keys() == second["model"].keys()
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"]), "raw weights differ"
    assert all(torch.equal(first["ema"]["weights"][k], second["ema"]["weights"][k]) for k in first["ema"]["weights"])
    final_a, final_b = load(a / "final_weights.pt"), load(b / "final_weights.pt")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_mid_epoch_and_across_a_size_change_is_exact(straight_run, sample_shards, tmp_path):
    """Stopped inside epoch 1 (16 px), resumed and stopped again inside epoch 2 (32 px), resumed
    to the end (DALI's reader restored each time, not replayed): the same raw and EMA weights as
    training straight through."""
    split = tmp_path / "split"
    train(sample_shards, split, *EXACT, "max_steps=3")
    assert ended(split) == {**ended(split), "event": "stopped", "reason": "max_steps=3", "step": 3}
    state = load(split / "last.pt")["state"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 3)
    train(sample_shards, split, *EXACT, "max_steps=8", extra=["--resume", "auto"])
    train(sample_shards, split, *EXACT, extra=["--resume", "auto"])
    resumed = [r for r in records(split) if r.get("event") == "resumed"]
    assert [(r["step"], r["epoch"]) for r in resumed] == [(3, 0), (8, 1)] and resumed[0]["from"].endswith("last.pt")
    sizes = {r["step"]: r["image_size"] for r in records(straight_run) if "image_size" in r}
    assert sizes[1] == sizes[6] == 16 and sizes[7] == sizes[12] == 32
    same_weights(straight_run, split)  # 3 + 5 + 4 steps with two resumes = 12 straight steps, bit for bit
    val = [r for r in records(straight_run) if "val_top1" in r]
    assert len(val) == 2 and all("val_ema_top1" in r and r["images_seen"] == 16 * r["step"] for r in val)


POISON_RANK_1 = textwrap.dedent("""
    # Loaded by every Python process (PYTHONPATH): on rank 1 of a torchrun job only, the batches
    # turn NaN from the call numbered FROM on, as a bad image or an overflow would.
    import os
    if os.environ.get("RANK") == "1":
        import dali_imagenet.training.step as step
        body = step.TrainStep.body
        calls = [0]
        def poisoned(self, images, labels, draws, ema_weight):
            calls[0] += 1
            if calls[0] > FROM:
                images = images * float("nan")
            return body(self, images, labels, draws, ema_weight)
        step.TrainStep.body = poisoned
""")


def test_a_nan_on_one_rank_stops_every_rank_with_the_same_line(sample_shards, tmp_path):
    """Rank 1's loss turns NaN at its second step; rank 0's is still finite there. Both must agree,
    stop at once with the same one line and exit 1, and write no checkpoint after it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(POISON_RANK_1.replace("FROM", "1"))
    out = tmp_path / "ddp"
    # the check at each log step; the one before a checkpoint: test_nan_loss_stops_with_the_step_named[1000]
    args = train_command(sample_shards, out, "epochs=2", "log_every=1")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             "--log-dir", str(tmp_path / "logs"), "--redirects", "3", *args[1:]],
                            capture_output=True, text=True, env=child_env(PYTHONPATH=str(hook)), timeout=240)
    seconds = time.monotonic() - started
    assert result.returncode != 0
    per_rank = sorted((tmp_path / "logs").rglob("stderr.log"))
    assert len(per_rank) == 2
    lines = [path.read_text().strip().splitlines() for path in per_rank]
    for rank_lines in lines:
        assert rank_lines[-1] == f"error: loss is NaN or inf at step 2; stopping with the last good checkpoint " \
                                 f"({out / 'last.pt'}) untouched", rank_lines[-5:]
        assert not any("Traceback" in line for line in rank_lines)
    assert seconds < 120  # not an NCCL/gloo timeout
    assert not (out / "last.pt").exists()  # nothing saved from a NaN model
    assert ended(out) == {**ended(out), "event": "stopped", "step": 2}


def test_sigterm_checkpoints_and_resume_auto_continues(sample_shards, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(sample_shards, out, "epochs=50"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=child_env())
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-2000:]  # a scheduler's SIGTERM: checkpointed, relaunch me
    step = load(out / "last.pt")["state"]["step"]
    assert ended(out) == {**ended(out), "event": "stopped", "reason": "SIGTERM", "step": step}
    assert 2 <= step < 50 * 6
    assert not list(out.glob(".*tmp*"))
    train(sample_shards, out, "epochs=50", f"max_steps={step + 2}", extra=["--resume", "auto"])
    assert [r["step"] for r in records(out) if r.get("event") == "resumed"] == [step]
    assert load(out / "last.pt")["state"]["step"] == step + 2


def test_s3_upload_resume_from_s3_and_no_secrets(sample_shards, s3_bucket, tmp_path):
    from dali_imagenet.s3 import client

    secret, wandb_key = "sekrit-9f8e7d6c5b4a", "wandbkey0123456789abcdef0123456789abcdef"
    run_env = child_env(AWS_SECRET_ACCESS_KEY=secret, WANDB_API_KEY=wandb_key, WANDB_MODE="offline",
                        WANDB_DATA_DIR=str(tmp_path / "wandb-data"))
    url = f"s3://{s3_bucket}/runs/a"
    args = ["--s3", url]
    result = subprocess.run(train_command(sample_shards, tmp_path / "a", "epochs=2", "max_steps=6",
                                          extra=["--wandb", *args]), capture_output=True, text=True, env=run_env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    keys = {o["Key"] for o in client().list_objects_v2(Bucket=s3_bucket, Prefix="runs/a/")["Contents"]}
    assert {f"runs/a/{n}" for n in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "report.html")} <= keys
    uploaded = client().get_object(Bucket=s3_bucket, Key="runs/a/metrics.jsonl")["Body"].read()
    assert uploaded == (tmp_path / "a" / "metrics.jsonl").read_bytes()  # the closing record made it too
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and wandb_key.encode() not in data, path
    assert list((tmp_path / "a").rglob("*.wandb")), "W&B offline run files were not written"

    train(sample_shards, tmp_path / "b", "epochs=2", extra=["--resume", "auto", "--wandb", *args], env=run_env)
    assert [r["step"] for r in records(tmp_path / "b") if r.get("event") == "resumed"] == [6]
    assert load(tmp_path / "b" / "last.pt")["state"]["step"] == 12
    assert client().head_object(Bucket=s3_bucket, Key="runs/a/final_weights.pt")
    # W&B (offline) got what the report shows: the per-class table, the confusions, the examples with
    # their images and Grad-CAMs, and the page as an artifact.
    files = next((tmp_path / "b" / "wandb").glob("offline-run-*"))
    tables = {
        p.name.rsplit("_", 2)[0]: json.loads(p.read_text())
        for p in (files / "files" / "media" / "table" / "val").glob("*.table.json")
    }
    assert set(tables) == {"per_class", "confusions", "examples"}
    assert len(tables["per_class"]["data"]) == 8 and tables["per_class"]["columns"][-1] == "top-1 %"
    examples = tables["examples"]
    assert examples["columns"][:2] == ["key", "image"] and len(examples["data"]) == 24
    assert sum(row[-1] is not None for row in examples["data"]) == 8  # the heat maps
    log = next(files.glob("*.wandb")).read_bytes()
    assert b"report.html" in log and b"media/images/" in log


@pytest.mark.parametrize("log_every", [1, 1000])  # 1000: caught by the check before the checkpoint at max_steps
def test_nan_loss_stops_with_the_step_named(sample_shards, tmp_path, log_every):
    result = train(sample_shards, tmp_path / "run", "lr=1e30", "mixup_alpha=0", "cutmix_alpha=0",
                   f"log_every={log_every}", "max_steps=4", check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: loss is NaN or inf at step ") and "Traceback" not in result.stderr
    bad_step = int(lines[-1].split("at step ")[1].split(";")[0])
    assert 1 <= bad_step <= 4
    assert ended(tmp_path / "run") == {**ended(tmp_path / "run"), "event": "stopped", "step": bad_step}
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing written after the loss went bad


def test_evaluate_reads_a_plain_torchvision_state_dict(sample_shards, tmp_path):
    """evaluate.py's top-1 for a torchvision model equals the same model's top-1 computed here with
    torchvision's own preprocessing on the decoded validation JPEGs."""
    import torchvision
    import webdataset as wds

    from dali_imagenet.data.preprocess import val_transform

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=8).eval()
    weights = tmp_path / "resnet18-torchvision.pth"
    torch.save(model.state_dict(), weights)
    result = run_in_process(script("evaluate"), ["evaluate.py", "--checkpoint", weights, "--arch", "resnet18", "--data",
                                                 sample_shards, "--device", "cpu", "--image-size", "32", "--json"])
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    tars = [str(sample_shards / s["name"]) for s in manifest["splits"]["validation"]["shards"]]
    transform = val_transform(32)
    correct = 0
    with torch.no_grad():
        for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("torchrgb8"):
            correct += int(model(transform(sample["jpg"])[None]).argmax()) == int(sample["cls"])
    assert metrics["images"] == 40 and metrics["arch"] == "resnet18" and metrics["weights"] == "state dict"
    assert metrics["top1"] == pytest.approx(100 * correct / 40)


def test_a_finished_run_is_never_overwritten_unless_asked(trained_run, sample_shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = train(sample_shards, out, "epochs=1", check=False)
    assert again.returncode == 1
    line = again.stderr.strip().splitlines()
    assert len(line) == 1 and str(out) in line[0] and "--resume auto" in line[0] and "--overwrite" in line[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # not a byte changed
    train(sample_shards, out, "epochs=1", "lr=0.05", extra=["--overwrite"])
    assert "lr: 0.05" in (out / "config.yaml").read_text()
    assert [r["event"] for r in records(out) if "event" in r] == ["started", "finished"]  # the old metrics are gone


@pytest.mark.parametrize("case", ["bad_data", "bad_resume", "garbage_checkpoint", "cuda_graph_on_cpu", "bad_set",
                                  "batch_too_large"])
def test_a_failed_start_leaves_no_run_folder(sample_shards, tmp_path, case):
    out, data, extra, sets = tmp_path / "run", sample_shards, [], []
    if case == "bad_data":
        data = tmp_path / "no-such-shards"
    elif case == "bad_resume":
        extra = ["--resume", str(tmp_path / "missing.pt")]
    elif case == "garbage_checkpoint":
        garbage = tmp_path / "garbage.pt"
        garbage.write_bytes(b"i" * 105)
        extra = ["--resume", str(garbage)]
    elif case == "cuda_graph_on_cpu":
        sets = ["cuda_graph=true"]
    elif case == "batch_too_large":  # refused where the run's loaders are described, before the run folder
        sets = ["batch_size=100"]
    else:
        sets = ["nesterov=maybe"]
    result = train(data, out, *sets, extra=extra, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ")
    assert not out.exists()
    expected = {"bad_data": "no-such-shards: no such data folder", "bad_resume": "missing.pt: no such file",
                "garbage_checkpoint": f"{tmp_path / 'garbage.pt'}: not a checkpoint",
                "cuda_graph_on_cpu": "cuda_graph needs a GPU", "bad_set": "nesterov: expected true or false",
                "batch_too_large": "batch size 100 is larger than the 96 train samples each of 1 rank(s)"}
    assert expected[case] in lines[0]


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors(sample_shards, tmp_path, monkeypatch):
    """A ValueError raised inside the training loop is a bug, not a user error: the traceback
    stays. DALI_IMAGENET_DEBUG=1 shows the traceback of a user error too."""
    from dali_imagenet.training import schedule

    def broken(self, step):
        raise ValueError("a bug in the schedule")
    monkeypatch.setattr(schedule.LRSchedule, "at", broken)
    result = train(sample_shards, tmp_path / "run", check=False)
    monkeypatch.undo()
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: a bug in the schedule" in result.stderr
    assert "in train_one_epoch" in result.stderr
    debug = train(tmp_path / "no-such-shards", tmp_path / "run2", check=False, env=child_env(DALI_IMAGENET_DEBUG="1"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ShardError" in debug.stderr
