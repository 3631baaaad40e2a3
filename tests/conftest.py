"""Shared fixtures: the bundled sample (small), its shards, a real local S3 server, and one real
train.py run that every test needing only a finished run's files shares."""
from __future__ import annotations

import os

# One OpenMP thread in each test process and in every process a test starts. The suite runs two
# test processes on two cores, most of them training at once: with torch's default of a thread per
# core in each, their OpenMP pools spin against each other and a 2.5 s train.py run takes 8-13 s.
# Set before torch is imported anywhere: libgomp reads it once, when it loads.
os.environ["OMP_NUM_THREADS"] = "1"

import contextlib
import gc
import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shard_tools.convert import Options, convert
from shard_tools.sample import make_sample
from standins.s3 import S3Server

REPO = Path(__file__).resolve().parent.parent
# No instance metadata service here: the spot watcher's probe (and boto3's) must not leave this
# machine, in this process or any it starts. The spot tests point it at a stand-in on 127.0.0.1.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
TRAIN_PER_CLASS, VAL_PER_CLASS = 12, 5  # 96 train / 40 validation images in 8 classes


# train.py at test scale: ResNet-10 at width 16 (0.3M weights: a checkpoint is 4 MB, not 39) at 32 px, 6 steps
# an epoch on the sample's 96 train images. A timm arch sets width=64 back (timm's models have their own).
TRAIN_BASE = ["arch=resnet10", "width=16", "image_size=32", "val_image_size=32", "batch_size=16", "epochs=2",
              "warmup_epochs=0.5", "log_every=1", "loader_threads=1", "shuffle_buffer=32", "amp_dtype=float32",
              "lr=0.2"]


def train_command(data, out, *sets, extra=()) -> list[str]:
    args = [sys.executable, str(REPO / "train.py"), "--dali", "--data", str(data), "--out", str(out),
            "--device", "cpu", "--no-wandb"]
    for item in [*TRAIN_BASE, *sets]:
        args += ["--set", item]
    return args + list(extra)


def child_env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


@contextlib.contextmanager
def environment(values: dict | None):
    """`os.environ` as `values` (a child_env) for the block, as it was after it."""
    before = dict(os.environ)
    if values is not None:
        os.environ.clear()
        os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


def run_in_process(main, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """A script's `main()` in this process, as its `__main__` would run it (its argv, its stdout and
    stderr, its exit code, a SystemExit's message on stderr), without a new interpreter's seconds of
    imports: where the process boundary is not what a test is about."""
    out, err = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    with environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = [str(a) for a in argv]
        try:
            code = main() or 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
        finally:
            sys.argv = saved_argv
    gc.collect()  # the run's model, loaders and pipelines go now, not in the next test
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def script(name: str):
    """The main() of one of the repository's scripts (train.py, evaluate.py, predict.py, report.py)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module = importlib.import_module(name)
    if name == "train":
        return module.main

    def main():
        from dali_imagenet.errors import one_line_errors

        with one_line_errors():
            return module.main()
    return main


def train(data, out, *sets, extra=(), check=True, env=None, process=False) -> subprocess.CompletedProcess:
    """train.py as a user runs it: in this process (`run_in_process`), or with `process=True` in a
    process of its own (signals, a sitecustomize hook, what the interpreter does at exit)."""
    command = train_command(data, out, *sets, extra=extra)
    if process:
        result = subprocess.run(command, capture_output=True, text=True, env=env or child_env(), timeout=300)
    else:
        result = run_in_process(script("train"), command[1:], env)
    if check and result.returncode != 0:
        raise AssertionError(result.stdout + result.stderr)
    return result


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pytest_collection_modifyitems(config, items):
    import torch

    # The slow tests first (a stable sort: the same order in every xdist worker): with `-n`, the
    # long ones start early and the short ones fill the gaps, instead of one long test at the end.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    make_sample(root, TRAIN_PER_CLASS, VAL_PER_CLASS, seed=0)
    return root


@pytest.fixture(scope="session")
def sample_shards(sample_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    convert(sample_dir, str(out), ("train", "validation"), Options(shard_size=16), progress=False)
    return out


def built_once(tmp_path_factory, worker_id: str, name: str, build) -> Path:
    """`build(folder)` once per test run, however many xdist workers ask (a file lock in the run's
    own temporary folder, which the workers share); without xdist, once per session."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # pytest-N/, shared by this run's popen-gwK/ workers
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").exists():
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def worker_id(request) -> str:
    """xdist's worker id ("gw0", ...), or "master" without xdist (xdist provides this fixture too)."""
    workerinput = getattr(request.config, "workerinput", None)
    return workerinput["workerid"] if workerinput else "master"


@pytest.fixture(scope="session")
def trained_run(sample_shards, tmp_path_factory, worker_id) -> Path:
    """A finished 3-epoch run (no mixing, an EMA, val at 40 px): best.pt, last.pt, final weights,
    metrics.jsonl and report.html. Tests read it and never change it (copy it to change it)."""
    def build(folder: Path) -> None:
        train(sample_shards, folder / "run", "epochs=3", "mixup_alpha=0", "cutmix_alpha=0", "ema_decay=0.8",
              "val_image_size=40")

    return built_once(tmp_path_factory, worker_id, "trained", build) / "run"


# A run with every part a resume must restore: mixup, cutmix, drop path, an EMA, BlurPool, a size
# ramp (16 px in epoch 1, 32 px in epoch 2), flip TTA; deterministic, so a resume can be exact.
EXACT = ("epochs=2", "image_size=32", "min_image_size=16", "ramp_start_epoch=0", "ramp_end_epoch=1",
         "image_size_step=16", "ema_decay=0.9", "lr_schedule=linear", "min_lr=0", "deterministic=true",
         "blurpool=true", "val_image_size=40", "val_flip=true", "drop_path=0.2")


@pytest.fixture(scope="session")
def straight_run(sample_shards, tmp_path_factory, worker_id) -> Path:
    """EXACT, trained straight through: what a stopped and resumed run must equal bit for bit."""
    return built_once(tmp_path_factory, worker_id, "straight",
                      lambda folder: train(sample_shards, folder / "run", *EXACT)) / "run"


@pytest.fixture(scope="session")
def uneven_shards(sample_dir, tmp_path_factory) -> Path:
    """The 40 validation images in shards of unequal sizes (7, 7, 6, 6, 6, 4, 4)."""
    out = tmp_path_factory.mktemp("uneven")
    convert(sample_dir, str(out), ("validation",), Options(shard_size=7), progress=False)
    return out


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    from dali_imagenet.s3 import client

    name = "test-" + request.node.name.lower().replace("_", "-")[:40]
    client().create_bucket(Bucket=name)
    return name


def upload_folder(folder: Path, bucket: str, prefix: str) -> None:
    """Every file under `folder` to s3://bucket/prefix/, keeping the relative paths."""
    from dali_imagenet.s3 import client

    s3 = client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")


@contextlib.contextmanager
def proxy_before(s3_server, delay_ms: float):
    """A `LatencyProxy` in front of the S3 server, with `AWS_ENDPOINT_URL` pointing at it meanwhile
    (in this process, and so in the processes it starts)."""
    from standins.s3 import LatencyProxy

    proxy = LatencyProxy(s3_server.endpoint, delay_ms=delay_ms)
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    try:
        yield proxy
    finally:
        os.environ["AWS_ENDPOINT_URL"] = s3_server.endpoint
        proxy.close()


@pytest.fixture
def s3_latency(s3_server):
    """S3 behind a real bucket's 10 ms to the first byte, each request counted (`LatencyProxy`)."""
    with proxy_before(s3_server, 10) as proxy:
        yield proxy


@pytest.fixture
def s3_proxy(s3_server):
    """S3 behind a proxy that adds no latency but counts, refuses writes or holds requests when told."""
    with proxy_before(s3_server, 0) as proxy:
        yield proxy
