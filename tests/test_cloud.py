"""The SkyPilot tasks in cloud/: read by SkyPilot's own parser (`sky.Task.from_yaml`, in the
`.venv-cloud` that `make test` builds: skypilot pins a click that wandb refuses), and each task's
`run:` command run here, on the CPU against moto with tiny data, with the environment the task
sets (its `envs`, with the bucket pointed at the test's, and SkyPilot's node variables)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import sysconfig
import time
from collections import Counter

import pytest
import torch
from conftest import REPO, TRAIN_BASE, child_env, records

from dali_imagenet.run import exits

SKY_PYTHON = os.environ.get("DALI_IMAGENET_SKY_PYTHON", str(REPO / ".venv-cloud" / "bin" / "python"))
TASKS = ("shard", "train-l4", "train-multinode")
TINY = (
    "--device cpu --no-wandb --set arch=resnet10 --set width=16 --set image_size=32 --set min_image_size=0 "
    "--set val_image_size=32 --set batch_size=16 --set epochs=1 --set compile=false --set loader_threads=1 "
    "--set amp_dtype=float32"
)


PARSE = """
import asyncio, json, sys, sky
from sky import backends
from sky.jobs import recovery_strategy
from sky.utils import yaml_utils
def load(path, bucket=True):  # as `sky jobs launch path [--env BUCKET=given-bucket]` reads it
    with open(path) as f:
        text = f.read()
    config = yaml_utils.safe_load(text)
    config['_user_specified_yaml'] = text
    return sky.Task.from_yaml_config(config, env_overrides=[('BUCKET', 'given-bucket')] if bucket else None)
def refusal(path):
    try:
        load(path, bucket=False)
    except ValueError as error:
        return str(error)
    return None
def read(path):
    t = load(path)
    r = list(t.resources)[0]
    task = {'num_nodes': t.num_nodes, 'run': t.run, 'setup': t.setup, 'envs': dict(t.envs),
            'secrets': {k: v.get_secret_value() for k, v in t.secrets.items()}, 'accelerators': r.accelerators,
            'use_spot': r.use_spot, 'job_recovery': dict(r.job_recovery), 'version': sky.__version__,
            'without_bucket': refusal(path)}
    # SkyPilot's own recovery executor, as its jobs controller builds it, asked what it does on each code
    def executor():  # a fresh one per code: it counts restarts on errors
        return recovery_strategy.StrategyExecutor.make('c', backends.CloudVmRayBackend(), load(path), 1,
                                                       0, None, set(), asyncio.Lock(), asyncio.Condition())
    task['executor'] = type(executor()).__name__
    task['relaunches'] = {}
    for code in (75, 1, 74):
        answers = executor()
        task['relaunches'][code] = [answers.should_restart_on_failure([code]) for _ in range(4)]
    return task
print(json.dumps({path: read(path) for path in sys.argv[1:]}))
"""


@functools.cache  # one SkyPilot process for all the tasks, per test worker (its import takes seconds): tests only read
def parsed() -> dict:
    if not os.path.exists(SKY_PYTHON):
        pytest.fail(f"{SKY_PYTHON} is missing: `make test` builds it (make cloud-venv)")
    paths = [str(REPO / "cloud" / f"{name}.yaml") for name in TASKS]
    result = subprocess.run([SKY_PYTHON, "-c", PARSE, *paths], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    tasks = json.loads(result.stdout.strip().splitlines()[-1])
    return {name: tasks[path] for name, path in zip(TASKS, paths)}


def parse(name: str) -> dict:
    return parsed()[name]


@pytest.mark.parametrize("name", TASKS)
def test_skypilot_reads_the_task_and_relaunches_on_the_reclaim_code(name):
    task = parse(name)
    assert task["version"] == "0.14.1"
    assert task["use_spot"] is True and task["job_recovery"]["strategy"] == "EAGER_NEXT_REGION"
    assert task["executor"] == "EagerFailoverStrategyExecutor"  # terminates the instance under notice first
    # a machine without a GPU (the shard task's) says so: setup's driver check would stop it
    gpu = "" if task.get("accelerators") else "GPU=optional "
    assert task["setup"].strip() == f"{gpu}bash cloud/setup.sh" and task["envs"]["BUCKET"] == "given-bucket"
    assert not {"HF_TOKEN", "WANDB_API_KEY"} & set(task["envs"])  # tokens are secrets, never envs
    relaunches = {int(code): answers for code, answers in task["relaunches"].items()}
    assert relaunches[1] == [True, True, False, False]  # a crash: max_restarts_on_errors (2) more tries
    if name.startswith("train"):
        assert task["accelerators"] == {"L4": 1} and task["secrets"] == {"WANDB_API_KEY": ""}
        assert task["job_recovery"]["recover_on_exit_codes"] == [exits.RECLAIM]
        assert relaunches[exits.RECLAIM] == [True] * 4  # every reclaim relaunches, uncounted
        assert relaunches[exits.UPLOADS_PENDING] == [True, True, False, False]
        assert "--resume auto" in task["run"] and "--s3" in task["run"] and "--spot auto" in task["run"]
        assert "--device cuda" in task["run"]  # never the CPU by accident (test_cuda_check.py)
        assert "bash cloud/torch-for-driver.sh \"$python\"" in (REPO / "cloud" / "setup.sh").read_text()
        assert "basename \"$CONFIG\" .yaml" in task["run"]  # the default RUN prefix names the config
    else:
        assert task["secrets"] == {"HF_TOKEN": ""}
    assert task["num_nodes"] == (2 if name == "train-multinode" else 1)


@pytest.mark.parametrize("name", TASKS)
def test_a_launch_without_a_bucket_is_refused_by_skypilot(name):
    """`BUCKET` has no default: `sky jobs launch` without `--env BUCKET=...` stops at once, in
    SkyPilot's own words, instead of provisioning a machine whose write probe fails (three times)."""
    refusal = parse(name)["without_bucket"]
    assert refusal is not None and refusal.startswith("Environment variable 'BUCKET' is None"), refusal


def run_task(name: str, home, **envs) -> subprocess.CompletedProcess:
    """The task's `run:` in bash, as SkyPilot runs it: in the workdir (this checkout), with its envs."""
    task = parse(name)
    venv = home / "venv" / "bin"  # what the task's setup makes: ~/venv
    venv.mkdir(parents=True, exist_ok=True)
    for tool in ("python", "shard-imagenet"):  # wrappers: a symlink out of a venv loses the venv
        wrapper = venv / tool
        wrapper.write_text(f'#!/bin/sh\nexec {os.path.join(os.path.dirname(sys.executable), tool)} "$@"\n')
        wrapper.chmod(0o755)
    env = child_env(**{**task["envs"], **task["secrets"], **envs, "HOME": str(home)})
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", task["run"]], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    print(f"{name}'s run: exit {result.returncode} after {time.monotonic() - started:.1f} s")
    return result


@pytest.mark.skipif(torch.cuda.is_available() or os.path.exists("/proc/driver/nvidia/version"),
                    reason="CUDA or an NVIDIA driver is here")
def test_the_l4_task_on_a_machine_without_cuda_stops_in_one_line(tmp_path):
    """The task's `run:` as SkyPilot runs it, with its own envs and no TRAIN_ARGS: on a machine
    without a GPU, one line naming why, exit 1 within a minute; no staging, no step, no run folder."""
    home = tmp_path / "home"
    path = [p for p in os.environ["PATH"].split(os.pathsep) if p and not os.path.exists(os.path.join(p, "nvidia-smi"))]
    started = time.monotonic()
    result = run_task("train-l4", home, BUCKET="no-such-bucket", STAGE_DIR=str(tmp_path / "stage"),
                      PATH=os.pathsep.join(path))
    assert time.monotonic() - started < 60
    assert result.returncode == exits.ERROR, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: --device cuda: no NVIDIA driver on this machine (no nvidia-smi, no /proc/driver/nvidia/version): it "
        "has no usable GPU; train on a GPU machine, or --device cpu"]
    assert not (home / "run").exists() and not (tmp_path / "stage").exists() and "step" not in result.stdout


@pytest.mark.slow
def test_the_tasks_run_commands_work_end_to_end(sample_dir, sample_shards, s3_bucket, s3_latency, tmp_path):
    """Against S3 behind a real bucket's 10 ms a request: shard.yaml streams the (stand-in) Hub's
    parquet files into shards on S3, with nothing of the source on the instance's disk;
    train-l4.yaml stages them onto the machine's disk (each shard object fetched once), trains from
    the local copy to an S3 run prefix named after its config and exits 75 on a spot notice with
    the checkpoint in S3; a relaunch on the same machine fetches no shard again, finishes, and its
    cost record counts the run's S3 requests; train-multinode.yaml's `run:` under torchrun with two processes
    (SkyPilot's node variables, DDP over gloo): the replicas stay identical and every val image is
    counted once; a notice heard by rank 1 only stops both: torchrun exits 1, the task 75, the
    checkpoint in S3."""
    from dali_imagenet.s3 import client
    from standins.hub import StandInHub
    from standins.imds import NOTICE_HOOK, StandInIMDS

    hub = StandInHub(sample_dir)
    try:
        shard = run_task("shard", tmp_path / "shard-home", BUCKET=s3_bucket, HF_ENDPOINT=hub.url,
                         HF_TOKEN="hf_accepted", SHARD_ARGS="--shard-size 32 --quiet --workers 1")
    finally:
        hub.close()
    assert shard.returncode == 0, shard.stderr[-2000:]
    manifest = json.loads(client().get_object(Bucket=s3_bucket, Key="imagenet-shards/manifest.json")["Body"].read())
    assert manifest["complete"] and manifest["source"]["repo"] == "ILSVRC/imagenet-1k"
    assert not list((tmp_path / "shard-home").rglob("*.parquet"))

    shards = manifest["splits"]["train"]["shards"] + manifest["splits"]["validation"]["shards"]
    shard_files = {name.rsplit("/", 1)[-1] for s in shards for name in (s["name"], s["name"][:-4] + ".idx")}
    s3_latency.reset()
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NOTICE_HOOK)
    tiny = TINY + " --set spot_poll_seconds=0.2"
    imds = StandInIMDS()
    try:
        first = run_task("train-l4", tmp_path / "l4-home", BUCKET=s3_bucket, CONFIG="configs/cpu-demo.yaml",
                         TRAIN_ARGS=tiny, PYTHONPATH=str(hook), NOTICE_URL=imds.notice_url, NOTICE_AT="step",
                         NOTICE_STEP="1", AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url, AWS_EC2_METADATA_DISABLED="false")
        assert first.returncode == exits.RECLAIM, first.stderr[-2000:]
        assert client().head_object(Bucket=s3_bucket, Key="runs/cpu-demo/last.pt")["Metadata"]["step"] == "2"
        assert "staged s3://" in first.stdout and (tmp_path / "l4-home" / "shards" / "manifest.json").is_file()
        reads = Counter(r.key.rsplit("/", 1)[-1] for r in s3_latency.object_reads("imagenet-shards/"))
        assert {name: reads[name] for name in shard_files} == dict.fromkeys(shard_files, 1)  # not 2 a sample-epoch
        s3_latency.reset()
        again = run_task("train-l4", tmp_path / "l4-home", BUCKET=s3_bucket, CONFIG="configs/cpu-demo.yaml",
                         TRAIN_ARGS=tiny)
        assert again.returncode == 0, again.stderr[-2000:]
        assert not shard_files & {r.key.rsplit("/", 1)[-1] for r in s3_latency.object_reads("imagenet-shards/")}
        closing = records(tmp_path / "l4-home" / "run")[-1]
        data = closing["cost"]["data"]
        assert closing["event"] == "finished" and data["bucket_regions"] == {s3_bucket: "us-east-1"}
        assert data["get_requests"] > len(shard_files) and data["put_requests"] > 0 and data["dollars"] > 0
        assert data["gb_in"] * 1e9 > sum(s["bytes"] for s in shards)  # the staging's bytes, carried over the relaunch
        # SkyPilot's relaunch after the reclaim runs the same `run:` on a new machine: test_spot's notice
        # tests show that relaunch (an empty --out, --resume auto, S3) ending in the uninterrupted weights
        # local shards this time (train-l4 above read them from S3, 2 ranged GETs a sample from moto: slow)
        nodes = dict(BUCKET=s3_bucket, DATA=str(sample_shards), CONFIG="configs/cpu-demo.yaml",
                     TRAIN_ARGS=tiny.replace("epochs=1", "epochs=2"),
                     SKYPILOT_NODE_IPS="127.0.0.1\n", SKYPILOT_NUM_NODES="1", SKYPILOT_NODE_RANK="0",
                     SKYPILOT_NUM_GPUS_PER_NODE="2", MASTER_PORT="29533")
        imds.close()
        imds = StandInIMDS()  # another machine's IMDS, with no notice yet
        multi = run_task("train-multinode", tmp_path / "multi-home", **nodes, PYTHONPATH=str(hook),
                         NOTICE_URL=imds.notice_url, NOTICE_AT="step", NOTICE_STEP="3", NOTICE_RANK="1",
                         NOTICE_IMDS=imds.url)
    finally:
        imds.close()
    assert multi.returncode == exits.RECLAIM, multi.stderr[-3000:]
    assert "exitcode  : 75" in multi.stderr  # torchrun itself reported its workers' 75 as a failure (exit 1)
    # DDP over gloo, 2 ranks: epoch 1 (3 steps of a global batch of 32: each rank reads half) and
    # its validation, then rank 1's notice during step 4, the first of epoch 2: the ranks agree on it
    # after the next step (each step's flags are read a step later) and both stop after step 5
    history = records(tmp_path / "multi-home" / "run")
    stopped = history[-1]
    assert stopped["event"] == "stopped" and stopped["reason"] == "spot interruption notice on rank 1"
    assert stopped["exit_code"] == exits.RECLAIM and stopped["step"] == 5
    assert client().head_object(Bucket=s3_bucket, Key="runs/cpu-demo-multinode/last.pt")["Metadata"]["step"] == "5"
    assert len(stopped["replica_checksums"]) == 2 and stopped["replicas_identical"] is True
    assert history[0]["event"] == "started" and history[0]["world_size"] == 2
    val = [r for r in history if "val_images" in r]
    assert len(val) == 1 and val[0]["val_images"] == 40  # every validation image counted once across the ranks
    assert val[0]["images_seen"] == 3 * 32


def test_local_disk_picks_the_instance_store_and_formats_it_only_when_blank(tmp_path):
    """cloud/local-disk.sh on a stand-in /sys/block (an EBS root volume, an instance store) with the
    disk tools replaced by stubs that log their calls: it mounts the instance store, formats it only
    when blkid finds nothing on it, never touches the EBS volume; a store mounted already (by the
    image) is used where it is; with no store, the root disk."""
    blocks, bin_dir, calls = tmp_path / "sys-block", tmp_path / "bin", tmp_path / "calls"
    for name, model in (("nvme0n1", "Amazon Elastic Block Store"), ("nvme1n1", "Amazon EC2 NVMe Instance Storage")):
        (blocks / name / "device").mkdir(parents=True)
        (blocks / name / "device" / "model").write_text(model + "\n")
    bin_dir.mkdir()
    mounted = '[ -n "$MOUNTED_AT" ] && echo "$MOUNTED_AT"'  # findmnt: where the store is mounted, if it is
    for tool, body in (("mountpoint", "exit 1"), ("findmnt", mounted), ("blkid", 'exit "${BLKID_EXIT:-2}"'),
                       ("mkfs.ext4", ""), ("mount", ""), ("chown", ""), ("mkdir", ""), ("df", "echo Size; echo 233G")):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n{body}\n')
        stub.chmod(0o755)

    def local_disk(**env):
        calls.write_text("")
        result = subprocess.run(["bash", str(REPO / "cloud" / "local-disk.sh")], capture_output=True, text=True,
                                env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SYS_BLOCK": str(blocks),
                                     "LOCAL_NVME_MOUNT": str(tmp_path / "nvme"), "HOME": str(tmp_path), "SUDO": "",
                                     **env})
        assert result.returncode == 0, result.stderr
        return result.stdout.strip(), calls.read_text().splitlines()

    folder, log = local_disk()  # a new instance: the store is blank
    assert folder == f"{tmp_path / 'nvme'}/shards"
    assert (
        "mkfs.ext4 -q -F -E nodiscard /dev/nvme1n1" in log
        and f"mount -o noatime /dev/nvme1n1 {tmp_path / 'nvme'}" in log
    )
    assert not [line for line in log if "nvme0n1" in line]  # the EBS volume: not formatted, not mounted
    folder, log = local_disk(BLKID_EXIT="0")  # a file system already there (the same machine, a second start)
    assert folder.endswith("nvme/shards") and not [line for line in log if line.startswith("mkfs")]
    dlami = tmp_path / "opt-dlami-nvme"  # a deep-learning AMI mounts the store itself
    dlami.mkdir()
    folder, log = local_disk(MOUNTED_AT=str(dlami))
    assert folder == f"{dlami}/shards"  # staged there, not on the 100 GB root disk
    assert "findmnt -rno TARGET -S /dev/nvme1n1" in log and not [c for c in log if c.startswith(("mkfs", "mount "))]
    (blocks / "nvme1n1").rename(blocks / "sda")  # no instance store: the root disk
    folder, log = local_disk()
    assert folder == f"{tmp_path}/shards" and not [line for line in log if line.startswith(("mkfs", "mount "))]


def machine(home, imds, **envs) -> dict:
    """A new machine as SkyPilot leaves it before the task's `setup:`: an empty HOME with uv at
    ~/.local/bin (SkyPilot installs it on every cluster; here the uv from PyPI that the test venv
    holds), its own instance metadata service; the task's envs with the test's values. How the
    setup avoids downloading ~5 GB of wheels here (never in user docs): uv finds this machine's
    python3.11 (UV_PYTHON_PREFERENCE=only-system, no downloads: the interpreter the tests run on,
    first on PATH), every distribution the test venv holds is excluded from the install
    (UV_EXCLUDE) and reached through PYTHONPATH instead, and the project is built without isolation
    and offline: uv still makes the venv, resolves and installs the project, editable, into it."""
    from importlib import metadata

    home.mkdir()
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "uv").symlink_to(REPO / ".venv" / "bin" / "uv")
    interpreter = home.parent / "python-here"
    if not interpreter.exists():
        interpreter.mkdir()
        (interpreter / "python3.11").symlink_to(getattr(sys, "_base_executable", sys.executable))
    excluded = home.parent / "installed-already.txt"
    names = sorted({d.metadata["Name"] for d in metadata.distributions()} - {"dali-imagenet"})
    excluded.write_text("\n".join(names) + "\n")
    site = sysconfig.get_paths()["purelib"]
    driver = home.parent / "driver"  # an NVIDIA driver new enough for the pinned torch (setup checks it)
    if not driver.exists():
        driver.mkdir()
        (driver / "nvidia-smi").write_text("#!/bin/sh\necho 580.95.05\n")
        (driver / "nvidia-smi").chmod(0o755)
    return child_env(**{
        **parse("train-l4")["envs"], **envs, "HOME": str(home),
        "PATH": f"{home / '.local' / 'bin'}:{interpreter}:{driver}:{os.environ['PATH']}",
        "PYTHONPATH": f"{REPO}:{site}", "UV_PYTHON_PREFERENCE": "only-system", "UV_PYTHON_DOWNLOADS": "never",
        "UV_EXCLUDE": str(excluded), "UV_NO_BUILD_ISOLATION": "1", "UV_OFFLINE": "1",
        "UV_CACHE_DIR": str(home.parent / "uv-cache"), "SYS_BLOCK": str(home.parent / "no-instance-store"),
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url, "AWS_EC2_METADATA_DISABLED": "false"})


def launch(home, imds, timeline: list, **envs) -> subprocess.CompletedProcess:
    """One launch of train-l4.yaml: the task's `setup:`, then its `run:`, as SkyPilot runs them (bash,
    in the workdir) on the machine `home`; the seconds from the machine's start to the run's exit
    go to `timeline`."""
    task, env = parse("train-l4"), machine(home, imds, **envs)
    setup = subprocess.run(["bash", "-c", task["setup"]], cwd=REPO, capture_output=True, text=True, env=env,
                           timeout=300)
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    lines = [line for line in setup.stdout.splitlines() if line.startswith("[setup ")]
    ready = lines[-1].split("] ", 1)[1]
    assert "on Python 3.11" in lines[0] and ready.startswith(f"ready: {home / 'venv'} (Python 3.11"), lines
    assert (home / "venv" / "bin" / "python").exists() and (home / ".dali-imagenet-setup.json").is_file()
    env["PYTHONPATH"] = f"{home.parent / 'hook'}:{env['PYTHONPATH']}"  # the notice at the phase NOTICE_AT names
    run = subprocess.run(["bash", "-c", task["run"]], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    timeline.append(time.time() - imds.launched)
    return run


@pytest.mark.slow
def test_a_launch_rehearsed_reclaimed_while_staging_and_while_training_ends_as_the_straight_run(
        sample_shards, straight_run, s3_bucket, s3_latency, tmp_path):
    """train-l4.yaml as SkyPilot launches it, three times over (each a new machine: an empty HOME, a
    new instance metadata service), against S3 behind a real bucket's 10 ms: setup builds the venv
    with uv on Python 3.11; the first run stages and is reclaimed while staging (exit 75, nothing
    trained); the second stages again, trains and is reclaimed mid-epoch (75, its checkpoint in S3);
    the third resumes and finishes with the uninterrupted run's weights. Its closing record counts
    the three launches, each split into its phases, the machine's time before the process included,
    each priced at what EC2's price history (the S3 server's EC2) says."""
    from conftest import EXACT, upload_folder

    from dali_imagenet.run import spot
    from dali_imagenet.run.launches import PHASES
    from dali_imagenet.s3 import client
    from standins.imds import NOTICE_HOOK, StandInIMDS

    upload_folder(sample_shards, s3_bucket, "imagenet-shards")
    # moto's EC2 loads its tables at its first request (seconds on a busy machine; EC2 itself answers at once)
    import boto3

    boto3.client("ec2", region_name="us-east-1").describe_spot_price_history(InstanceTypes=["g6.xlarge"])
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(NOTICE_HOOK)
    (tmp_path / "no-instance-store").mkdir()
    config = tmp_path / "rehearsal.yaml"  # the straight run's recipe: the defaults and the sets below
    config.write_text("epochs: 2\n")
    args = "--device cpu --no-wandb " + " ".join(f"--set {s}" for s in (*TRAIN_BASE, *EXACT, "spot_poll_seconds=0.2",
                                                                           "s3_resume_timeout_s=5"))
    common = dict(BUCKET=s3_bucket, CONFIG=str(config), TRAIN_ARGS=args)
    timeline, runs = [], f"runs/{config.stem}"
    imds = StandInIMDS()
    try:
        first = launch(tmp_path / "machine-1", imds, timeline, NOTICE_URL=imds.notice_url, NOTICE_AT="staging",
                       **common)
    finally:
        imds.close()
    assert first.returncode == exits.RECLAIM, first.stderr[-3000:]
    assert "stopped during start-up, nothing trained; exit 75" in first.stderr
    assert not client().list_objects_v2(Bucket=s3_bucket, Prefix=f"{runs}/last.pt").get("KeyCount")
    imds = StandInIMDS()
    try:
        second = launch(tmp_path / "machine-2", imds, timeline, NOTICE_URL=imds.notice_url, NOTICE_AT="step",
                        NOTICE_STEP="3", **common)
    finally:
        imds.close()
    assert second.returncode == exits.RECLAIM, second.stderr[-3000:]
    assert client().head_object(Bucket=s3_bucket, Key=f"{runs}/last.pt")["Metadata"]["step"] == "4"
    imds = StandInIMDS()
    try:
        third = launch(tmp_path / "machine-3", imds, timeline, **common)
    finally:
        imds.close()
    assert third.returncode == 0, third.stderr[-3000:]
    run = tmp_path / "machine-3" / "run"
    a = torch.load(straight_run / "final_weights.pt", weights_only=True)
    b = torch.load(run / "final_weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "reclaimed twice and relaunched != straight"

    closing = records(run)[-1]
    launches = closing["launches"]
    assert closing["event"] == "finished" and closing["cost"]["launches"] == 3 == len(launches)
    assert [(x["exit_code"], x["reason"]) for x in launches] == [(75, spot.NOTICE), (75, spot.NOTICE), (0, None)]
    for x, seconds in zip(launches, timeline):
        phases = x["phases_s"]
        assert x["instance"]["zone"] == "us-east-1a" and x["instance"]["lifecycle"] == "spot"
        assert x["price_source"] == "EC2 spot price history (g6.xlarge, us-east-1a)"  # moto's EC2 answers it
        assert phases["setup"] > 0 and phases["start"] > 0 and phases["leaving"] > 0, sorted(phases.items())
        # the machine's whole time from EC2's launch (to its second) up to the launch's record, which
        # leaves out only what follows it: the report, the last uploads, the interpreter's exit
        assert seconds - 10 < x["seconds"] <= seconds + 1, (x, seconds)
    assert launches[0]["phases_s"]["staging"] > 0 and launches[0]["phases_s"]["training"] == 0
    assert launches[1]["phases_s"]["staging"] > 0 and launches[1]["phases_s"]["compile"] > 0
    assert launches[1]["phases_s"]["training"] > 0 and launches[2]["phases_s"]["resume"] > 0
    assert closing["cost"]["wall_hours"] * 3600 == pytest.approx(sum(x["seconds"] for x in launches))
    stored = json.loads(client().get_object(Bucket=s3_bucket, Key=f"{runs}/launches.json")["Body"].read())
    assert stored == launches
    page = (run / "report.html").read_text()
    assert "<h2>Launches</h2>" in page and "3 launches" in page
    print("\nlaunch  " + "  ".join(f"{p:>12}" for p in (*PHASES, "total s")))
    for x in launches:
        print(f"{x['launch']:>6}  " + "  ".join(f"{s:>12.1f}" for s in (*map(x["phases_s"].get, PHASES), x["seconds"])))


def test_setup_fails_in_one_line_without_uv_or_when_the_install_fails(tmp_path):
    """cloud/setup.sh's two ways to fail, each one line on stderr naming what failed: no uv (not on
    PATH, none at ~/.local/bin), and an install uv cannot do (here: offline, with nothing cached,
    torch cannot be had), with uv's own error and where the whole log is."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PATH": "/usr/bin:/bin"}
    alone = subprocess.run(["bash", "cloud/setup.sh"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert alone.returncode == 1 and alone.stderr.strip().splitlines() == [
        "setup failed: no uv on PATH or at ~/.local/bin/uv (SkyPilot installs it on every machine it starts; "
        "elsewhere: pip install uv)"]
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "uv").symlink_to(REPO / ".venv" / "bin" / "uv")
    python = tmp_path / "python-here"
    python.mkdir()
    (python / "python3.11").symlink_to(getattr(sys, "_base_executable", sys.executable))
    offline = subprocess.run(["bash", "cloud/setup.sh"], cwd=REPO, capture_output=True, text=True, timeout=120, env={
        **env, "PATH": f"{python}:/usr/bin:/bin", "UV_PYTHON_PREFERENCE": "only-system", "UV_PYTHON_DOWNLOADS": "never",
        "UV_OFFLINE": "1", "UV_CACHE_DIR": str(tmp_path / "empty-cache")})
    assert offline.returncode == 1 and "[setup " in offline.stdout and "the venv: done" in offline.stdout
    (line,) = offline.stderr.strip().splitlines()
    assert line.startswith("setup failed: torch (torch==") and "(exit 1): error: " in line, line
    assert "torch" in line.split("error: ", 1)[1] and line.endswith(f"(full log: {home}/.dali-imagenet-setup.log)")
