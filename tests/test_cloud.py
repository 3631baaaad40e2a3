"""The SkyPilot tasks in cloud/: read by SkyPilot's own parser (`sky.Task.from_yaml`, in the
`.venv-cloud` that `make test` builds: skypilot pins a click that wandb refuses), and each task's
`run:` command run here, on the CPU against moto with tiny data, with the environment the task
sets (its `envs`, with the bucket pointed at the test's, and SkyPilot's node variables)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, child_env, records

SKY_PYTHON = os.environ.get("DALI_IMAGENET_SKY_PYTHON", str(REPO / ".venv-cloud" / "bin" / "python"))
TASKS = ("shard", "train-l4", "train-multinode")
TINY = ("--device cpu --no-wandb --set arch=resnet18 --set image_size=32 --set min_image_size=0 --set val_image_size=32 "
        "--set batch_size=16 --set epochs=1 --set compile=false --set loader_threads=1 --set amp_dtype=float32")


def parse(name: str) -> dict:
    if not os.path.exists(SKY_PYTHON):
        pytest.fail(f"{SKY_PYTHON} is missing: `make test` builds it (make cloud-venv)")
    script = ("import json, sky; t = sky.Task.from_yaml(%r); r = list(t.resources)[0]; print(json.dumps({"
              "'num_nodes': t.num_nodes, 'run': t.run, 'setup': t.setup, 'envs': dict(t.envs), "
              "'accelerators': r.accelerators, 'use_spot': r.use_spot, 'job_recovery': r.job_recovery, "
              "'version': sky.__version__}))") % str(REPO / "cloud" / f"{name}.yaml")
    result = subprocess.run([SKY_PYTHON, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", TASKS)
def test_skypilot_reads_the_task(name):
    task = parse(name)
    assert task["use_spot"] is True and task["job_recovery"]["strategy"] == "FAILOVER"
    assert "pip install" in task["setup"] and "BUCKET" in task["envs"]
    if name.startswith("train"):
        assert task["accelerators"] == {"L4": 1}
        assert "--resume auto" in task["run"] and "--s3" in task["run"] and "--spot auto" in task["run"]
    assert task["num_nodes"] == (2 if name == "train-multinode" else 1)


def run_task(name: str, home, **envs) -> subprocess.CompletedProcess:
    """The task's `run:` in bash, as SkyPilot runs it: in the workdir (this checkout), with its envs."""
    task = parse(name)
    venv = home / "venv" / "bin"  # what the task's setup makes: ~/venv
    venv.mkdir(parents=True, exist_ok=True)
    for tool in ("python", "shard-imagenet"):  # wrappers: a symlink out of a venv loses the venv
        wrapper = venv / tool
        wrapper.write_text(f'#!/bin/sh\nexec {os.path.join(os.path.dirname(sys.executable), tool)} "$@"\n')
        wrapper.chmod(0o755)
    env = child_env(**{**task["envs"], **envs, "HOME": str(home)})
    return subprocess.run(["bash", "-c", task["run"]], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_the_tasks_run_commands_work_end_to_end(sample_dir, s3_bucket, tmp_path):
    """shard.yaml streams the (stand-in) Hub's parquet files into shards on S3, with nothing of the
    source on the instance's disk; train-l4.yaml trains from them to an S3 run prefix and, run
    again (a relaunch after a reclaim), resumes from S3; train-multinode.yaml trains with two
    processes on one node through SkyPilot's node variables."""
    from benchmarks.standin_hub import StandInHub
    from dali_imagenet.s3 import client

    hub = StandInHub(sample_dir)
    try:
        shard = run_task("shard", tmp_path / "shard-home", BUCKET=s3_bucket, HF_ENDPOINT=hub.url,
                         HF_TOKEN="hf_accepted", SHARD_ARGS="--shard-size 32 --quiet")
    finally:
        hub.close()
    assert shard.returncode == 0, shard.stderr[-2000:]
    manifest = json.loads(client().get_object(Bucket=s3_bucket, Key="imagenet-shards/manifest.json")["Body"].read())
    assert manifest["complete"] and manifest["source"]["repo"] == "ILSVRC/imagenet-1k"
    assert not list((tmp_path / "shard-home").rglob("*.parquet"))

    first = run_task("train-l4", tmp_path / "l4-home", BUCKET=s3_bucket, CONFIG="configs/cpu-demo.yaml",
                     TRAIN_ARGS=TINY.replace("epochs=1", "epochs=2 --set max_steps=2"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert client().head_object(Bucket=s3_bucket, Key="runs/r50-l4-16h/last.pt")
    # the relaunch after a reclaim: a new machine (an empty home) resumes from S3 and finishes
    relaunch = run_task("train-l4", tmp_path / "l4-home-2", BUCKET=s3_bucket, CONFIG="configs/cpu-demo.yaml",
                        TRAIN_ARGS=TINY.replace("epochs=1", "epochs=2"))
    assert relaunch.returncode == 0, relaunch.stderr[-2000:]
    events = [(r["event"], r["step"]) for r in records(tmp_path / "l4-home-2" / "run") if r.get("event") in
              ("resumed", "finished")]
    assert events == [("resumed", 2), ("finished", 2 * (96 // 16))]

    multi = run_task("train-multinode", tmp_path / "multi-home", BUCKET=s3_bucket, CONFIG="configs/cpu-demo.yaml",
                     TRAIN_ARGS=TINY, RUN=f"s3://{s3_bucket}/runs/multi", SKYPILOT_NODE_IPS="127.0.0.1\n",
                     SKYPILOT_NUM_NODES="1", SKYPILOT_NODE_RANK="0", SKYPILOT_NUM_GPUS_PER_NODE="1",
                     MASTER_PORT="29533")
    assert multi.returncode == 0, multi.stderr[-2000:]
    final = records(tmp_path / "multi-home" / "run")[-1]
    assert final["event"] == "finished" and final["step"] == 96 // 16
