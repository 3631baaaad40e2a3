"""Shards on S3 staged to a local folder (`data.staging`), against a real S3 server behind a real
bucket's latency: each object fetched once per machine, checked against the manifest, fetched
again when the copy is wrong, resumed where it stopped, refused in one line when the disk is too
small; what the loaders then read is the local copy."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from conftest import upload_folder

from dali_imagenet.config import load_config
from dali_imagenet.data import staging
from dali_imagenet.data.shards import find_shards
from dali_imagenet.s3 import client

SPLITS = ("train", "validation")


def tar_reads(proxy, prefix: str) -> Counter:
    """Object GETs per shard file (ranged parts of one object count as one fetch of it)."""
    return Counter(r.key.rsplit("/", 1)[-1] for r in proxy.object_reads(prefix) if r.key.endswith((".tar", ".idx")))


def test_each_object_is_fetched_once_and_a_second_start_fetches_nothing(sample_shards, s3_bucket, s3_latency, tmp_path):
    upload_folder(sample_shards, s3_bucket, "shards")
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    files = [name for split in SPLITS for s in manifest["splits"][split]["shards"]
             for name in (s["name"], s["name"][:-4] + ".idx")]
    s3_latency.reset()
    local = tmp_path / "staged"
    done = staging.stage(f"s3://{s3_bucket}/shards", local, SPLITS, progress=False, log=lambda line: None)
    assert done.fetched == done.files == len(files) + 2  # + classes.tsv and _info.json
    assert tar_reads(s3_latency, "shards/") == Counter({name.rsplit("/", 1)[-1]: 1 for name in files})
    for split in SPLITS:  # the local copy is a shard folder like any other, byte for byte the original
        staged, original = find_shards(local, split), find_shards(sample_shards, split)
        assert staged.counts == original.counts and staged.class_names == original.class_names
        for tar in staged.tars:
            assert open(tar, "rb").read() == (sample_shards / tar.split("/staged/")[1]).read_bytes()

    s3_latency.reset()
    again = staging.stage(f"s3://{s3_bucket}/shards", local, SPLITS, progress=False, log=lambda line: None)
    assert again.fetched == 0 and tar_reads(s3_latency, "shards/") == Counter()
    assert [r.key for r in s3_latency.object_reads("shards/")] == ["shards/manifest.json"]  # and one listing


def test_a_wrong_or_missing_copy_is_fetched_again(sample_shards, s3_bucket, s3_server, tmp_path):
    upload_folder(sample_shards, s3_bucket, "shards")
    local = tmp_path / "staged"
    quiet = dict(progress=False, log=lambda line: None)
    staging.stage(f"s3://{s3_bucket}/shards", local, SPLITS, **quiet)
    tars = sorted(local.glob("train/*.tar"))
    corrupt, removed = tars[0], tars[1].with_suffix(".idx")
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: the sha256 tells
    corrupt.write_bytes(bytes(data))
    removed.unlink()
    partials = [tars[2].with_name(tars[2].name + suffix) for suffix in (".a1B2c3D4", ".part", ".part.a1B2c3D4")]
    for partial in partials:  # downloads cut short: s3transfer's name (before .part), staging's, s3transfer's
        partial.write_bytes(b"half a shard")
    again = staging.stage(f"s3://{s3_bucket}/shards", local, SPLITS, **quiet)
    assert not any(partial.exists() for partial in partials)
    assert again.fetched == 2
    assert corrupt.read_bytes() == (sample_shards / "train" / corrupt.name).read_bytes()
    assert removed.read_bytes() == (sample_shards / "train" / removed.name).read_bytes()
    # the record lost (a folder staged by hand, or a crash before it was written): the checksums decide
    (local / staging.RECORD).unlink()
    assert staging.stage(f"s3://{s3_bucket}/shards", local, SPLITS, **quiet).fetched == 0
    find_shards(local, "train")


def test_an_object_that_is_not_the_manifests_shard_stops_in_one_line(sample_shards, s3_bucket, s3_server, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(staging, "BACKOFF_S", 0.01)  # it is fetched again TRIES times, and is wrong each time
    upload_folder(sample_shards, s3_bucket, "shards")
    name = json.loads((sample_shards / "manifest.json").read_text())["splits"]["validation"]["shards"][0]["name"]
    other = bytearray((sample_shards / name).read_bytes())
    other[700] ^= 0xFF
    client().put_object(Bucket=s3_bucket, Key=f"shards/{name}", Body=bytes(other))
    with pytest.raises(
        staging.StagingError, match=f"{name.rsplit('/', 1)[-1]}: sha256 differs from the manifest.*after 4 tries"
    ) as error:
        staging.stage(f"s3://{s3_bucket}/shards", tmp_path / "staged", ("validation",), progress=False,
                      log=lambda line: None)
    assert "\n" not in str(error.value)
    record = json.loads((tmp_path / "staged" / staging.RECORD).read_text())
    assert record[name] == {"pending": True}  # a wrong copy is never recorded as landed: a loader would wait
    assert not (tmp_path / "staged" / "manifest.json").exists()  # not a complete copy
    assert not list((tmp_path / "staged").rglob("*.part*"))


def test_an_object_corrupt_on_the_first_read_is_staged_in_the_same_launch(sample_shards, s3_bucket, s3_proxy,
                                                                           tmp_path, monkeypatch):
    """A body damaged on its way (same length, S3's own headers): the copy fails its check, is
    fetched again after a pause, and lands; nothing else is fetched twice."""
    monkeypatch.setattr(staging, "BACKOFF_S", 0.01)
    upload_folder(sample_shards, s3_bucket, "shards")
    name = json.loads((sample_shards / "manifest.json").read_text())["splits"]["train"]["shards"][2]["name"]
    index = name[:-4] + ".idx"
    s3_proxy.reset()
    s3_proxy.corrupt_next |= {f"shards/{name}", f"shards/{index}"}
    local = tmp_path / "staged"
    done = staging.stage(f"s3://{s3_bucket}/shards", local, SPLITS, progress=False, log=lambda line: None)
    assert not s3_proxy.corrupt_next  # both were served damaged once
    assert done.fetched == done.files
    reads = tar_reads(s3_proxy, "shards/")
    assert reads[name.rsplit("/", 1)[-1]] == reads[index.rsplit("/", 1)[-1]] == 2 and set(reads.values()) == {1, 2}
    # No HEAD per object (s3transfer is given each listed size and ETag), but the one that asks S3
    # whether the damaged index's ETag is its MD5 (not under SSE-KMS): it is, so the copy was wrong.
    heads = [r.key for r in s3_proxy.requests if r.method == "HEAD" and r.key.startswith("shards/")]
    assert heads == [f"shards/{index}"], heads
    assert (local / name).read_bytes() == (sample_shards / name).read_bytes()
    assert (local / index).read_bytes() == (sample_shards / index).read_bytes()
    assert json.loads((local / staging.RECORD).read_text()).keys() >= {name, index}
    assert find_shards(local, "train").samples == 96


def test_a_notice_during_the_submission_of_more_objects_than_s3transfers_queues_hold_is_heard(s3_bucket, s3_latency,
                                                                                              tmp_path):
    """2,100 objects (s3transfer's queues hold 1,000; submitting them all would block until ~1,100
    had been fetched): the notice, given as soon as the first GETs go out, stops the staging while
    the first window is still in flight, not after the bulk."""
    from concurrent.futures import ThreadPoolExecutor

    from dali_imagenet.errors import Interrupted

    objects = 2100
    s3 = client(max_connections=16)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=s3_bucket, Key=f"timm/train/imagenet1k-train-{i:04d}.tar",
                                              Body=b"%d" % i), range(objects)))
    s3_latency.reset()

    def notice_once_fetching():
        if s3_latency.object_reads("timm/"):
            raise Interrupted("spot interruption notice")

    with pytest.raises(Interrupted):
        staging.stage(f"s3://{s3_bucket}/timm", tmp_path / "staged", ("train",), progress=False, log=lambda line: None,
                      interrupt=notice_once_fetching, workers=16)
    assert len(s3_latency.object_reads("timm/")) <= 4 * 16 + 16  # the first window (and a poll's worth), not ~1,100
    kept = json.loads((tmp_path / "staged" / staging.RECORD).read_text())
    assert all((tmp_path / "staged" / name).read_bytes() == b"%d" % int(name[-8:-4]) for name in kept)


@contextlib.contextmanager
def small_disk(folder, megabytes: float):
    """A tmpfs of `megabytes` mounted at `folder` (root only: CI runs as root)."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 2**20)}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small disk here ({mounted.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_disk_too_small_stops_in_one_line_before_any_download(sample_shards, s3_bucket, s3_latency, tmp_path):
    upload_folder(sample_shards, s3_bucket, "shards")
    total_mb = sum(p.stat().st_size for p in sample_shards.rglob("*") if p.suffix in (".tar", ".idx")) / 2**20
    headroom_mb = staging.HEADROOM / 2**20
    s3_latency.reset()
    with small_disk(tmp_path / "small", headroom_mb + total_mb / 2) as small:
        with pytest.raises(staging.StagingError, match=r"needs .* GB more .* ask for one of at least \d+ GB") as error:
            staging.stage(f"s3://{s3_bucket}/shards", small, SPLITS, progress=False, log=lambda line: None)
        assert "\n" not in str(error.value) and tar_reads(s3_latency, "shards/") == Counter()
        assert not list(small.rglob("*.tar"))
    with small_disk(tmp_path / "enough", headroom_mb + total_mb + 2) as enough:
        assert staging.stage(f"s3://{s3_bucket}/shards", enough, SPLITS, progress=False, log=lambda line: None).fetched


def test_processes_on_one_machine_stage_once(sample_shards, s3_bucket, s3_latency, tmp_path):
    """torchrun's local ranks all call `stage`: the lock makes the first fetch and the rest find it done."""
    upload_folder(sample_shards, s3_bucket, "shards")
    s3_latency.reset()
    results = []
    threads = [threading.Thread(target=lambda: results.append(staging.stage(
        f"s3://{s3_bucket}/shards", tmp_path / "staged", SPLITS, progress=False, log=lambda line: None)))
        for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.fetched for r in results)[:2] == [0, 0] and max(r.fetched for r in results) == results[0].files
    assert set(tar_reads(s3_latency, "shards/").values()) == {1}


def test_a_timm_layout_set_is_staged_and_indexed_locally(sample_shards, s3_bucket, s3_server, tmp_path):
    timm = tmp_path / "timm"
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    for split in SPLITS:
        (timm / split).mkdir(parents=True)
        for i, shard in enumerate(manifest["splits"][split]["shards"]):
            shutil.copy(sample_shards / shard["name"], timm / split / f"imagenet1k-{split}-{i:04d}.tar")
    (timm / "LICENSE").write_text("not a shard")
    upload_folder(timm, s3_bucket, "timm")
    local = tmp_path / "staged"
    done = staging.stage(f"s3://{s3_bucket}/timm", local, SPLITS, progress=False, log=lambda line: None)
    assert done.fetched == sum(len(manifest["splits"][s]["shards"]) for s in SPLITS)
    assert not (local / "LICENSE").exists()
    shards = find_shards(local, "validation", tmp_path / "cache")
    assert shards.layout == "timm" and shards.samples == 40 and all(t.startswith(str(local)) for t in shards.tars)
    assert staging.stage(f"s3://{s3_bucket}/timm", local, SPLITS, progress=False, log=lambda line: None).fetched == 0


def test_stage_shards_copies_what_evaluate_then_reads(sample_shards, s3_bucket, s3_server, tmp_path):
    from conftest import run_in_process

    from shard_tools.stage import main

    upload_folder(sample_shards, s3_bucket, "shards")
    result = run_in_process(main, ["stage-shards", f"s3://{s3_bucket}/shards", tmp_path / "local", "--split",
                                   "validation", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert "staged s3://" in result.stdout and "fetched" in result.stdout
    assert find_shards(tmp_path / "local", "validation").samples == 40
    assert not (tmp_path / "local" / "train").exists()  # only the split asked for
    bad = run_in_process(main, ["stage-shards", f"s3:/{s3_bucket}/shards", tmp_path / "other"])
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "not an S3 URL" in bad.stderr


def test_train_streams_only_when_asked_and_says_what_it_costs(sample_shards, s3_bucket, s3_server, tmp_path):
    """--stream: DALI reads s3:// itself; one line says what that costs, the cost record estimates
    its GETs (DALI's own S3 client is not boto3's: 2 a sample, each epoch and validation)."""
    from conftest import records, train

    upload_folder(sample_shards, s3_bucket, "shards")
    result = train(f"s3://{s3_bucket}/shards", tmp_path / "run", extra=["--stream", "--spot", "off",
                                                                          "--stage-dir", str(tmp_path / "unused")])
    assert "streaming s3://" in result.stderr and "GETs an epoch" in result.stderr
    assert not (tmp_path / "unused").exists()
    data = records(tmp_path / "run")[-1]["cost"]["data"]
    assert data["streamed_gets_estimated"] == 2 * (2 * 6 * 16 + 2 * 40)  # 2 epochs of 6 steps of 16, 2 validations
    assert data["dollars"] == pytest.approx((data["get_requests"] + data["streamed_gets_estimated"]) * 0.0004 / 1000
                                            + data["put_requests"] * 0.005 / 1000)


def test_a_stop_while_staging_keeps_what_finished_and_the_next_start_fetches_the_rest(sample_shards, s3_bucket,
                                                                                       s3_latency, tmp_path):
    """A spot notice while staging (train.py's `interrupt` raises): the transfers stop, every file that
    was complete is kept and recorded, none half-written; the next start fetches only the rest."""
    from dali_imagenet.errors import Interrupted

    upload_folder(sample_shards, s3_bucket, "shards")
    release = threading.Event()
    stalled = "validation/imagenet1k-validation-000000.tar"

    def stall_one(request):
        if request.method == "GET" and request.key.endswith(stalled):
            release.wait(5)  # a slow object: the stop waits for the transfers in flight, then cancels the rest

    s3_latency.before_forward = stall_one
    calls = []

    def notice_on_the_fifth_look():
        calls.append(1)
        if len(calls) >= 5:
            raise Interrupted("spot interruption notice")

    local = tmp_path / "staged"
    with pytest.raises(Interrupted):
        staging.stage(f"s3://{s3_bucket}/shards", local, SPLITS, progress=False, log=lambda line: None,
                      interrupt=notice_on_the_fifth_look)
    release.set()
    record = json.loads((local / staging.RECORD).read_text())
    kept = {name for name, seen in record.items() if "check" in seen}
    assert kept and record[stalled] == {"pending": True}  # the finished ones recorded, the stalled one not landed
    assert not [p for p in local.rglob("*") if p.is_file() and ".tar." in p.name]  # no .part left
    again = staging.stage(f"s3://{s3_bucket}/shards", local, SPLITS, progress=False, log=lambda line: None)
    assert 1 <= again.fetched < again.files and again.fetched == again.files - len(kept)
    assert find_shards(local, "validation").samples == 40


@pytest.mark.slow
def test_a_notice_while_train_py_stages_exits_75_and_the_relaunch_stages_and_ends_as_the_straight_run(
        sample_shards, straight_run, s3_bucket, s3_proxy, tmp_path):
    """EC2's notice (the stand-in IMDS) while train.py stages --data s3://: exit 75 before any
    step, the finished files recorded, the others pending; the relaunch on the same machine
    fetches only what had not landed and trains to the uninterrupted run's weights."""
    import time
    import urllib.request

    import torch
    from conftest import EXACT, child_env, records, train

    from dali_imagenet.run import exits, spot
    from standins.imds import StandInIMDS

    upload_folder(sample_shards, s3_bucket, "shards")
    imds = StandInIMDS()
    sets = (*EXACT, "spot_poll_seconds=0.2", "s3_resume_timeout_s=2", "checkpoint_minutes=1000")
    runs = f"s3://{s3_bucket}/runs/staged"
    given = []

    def notice_at_the_first_shard(request):
        if request.method == "GET" and request.key.endswith(".tar") and not given:
            given.append(time.time())
            urllib.request.urlopen(urllib.request.Request(imds.notice_url, data=b"", method="POST"), timeout=5).read()
            time.sleep(1.0)  # the watcher polls every 0.2 s: it has seen it before this shard lands

    s3_proxy.before_forward = notice_at_the_first_shard
    try:
        first = train(f"s3://{s3_bucket}/shards", tmp_path / "first", *sets, check=False,
                      extra=["--s3", runs, "--stage-dir", str(tmp_path / "machine-1")],
                      env=child_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url, AWS_EC2_METADATA_DISABLED="false"))
    finally:
        s3_proxy.before_forward = None
        imds.close()
    assert first.returncode == exits.RECLAIM, first.stderr[-3000:]
    # heard during the start-up (nothing trained) or by a loader waiting for that shard (the run then exists)
    assert (f"{spot.NOTICE}: stopped during start-up, nothing trained; exit 75" in first.stderr
            or "exit 75: continue with --resume auto" in first.stderr)
    record = json.loads((tmp_path / "machine-1" / staging.RECORD).read_text())
    tars = [name for name in record if name.endswith(".tar")]
    assert any(record[name] == {"pending": True} for name in tars)  # not landed: fetched again by the relaunch
    assert not list((tmp_path / "machine-1").rglob("*.part*"))  # nothing half-written left
    s3_proxy.reset()
    second = train(f"s3://{s3_bucket}/shards", tmp_path / "second", *sets,
                   extra=["--resume", "auto", "--s3", runs, "--spot", "off",
                          "--stage-dir", str(tmp_path / "machine-1")])
    assert "staged s3://" in second.stdout
    refetched = {r.key.rsplit("/", 1)[-1] for r in s3_proxy.object_reads("shards/") if r.key.endswith(".tar")}
    assert refetched == {name.rsplit("/", 1)[-1] for name in tars if record[name] == {"pending": True}}
    a = torch.load(straight_run / "final_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "second" / "final_weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "reclaimed while staging + relaunched != straight"
    assert [r["step"] for r in records(tmp_path / "second") if "loss" in r] == list(range(1, 13))


def test_the_plan_waits_only_for_what_the_first_step_reads():
    """A start waits for the indices, the validation split and the first train shards; a relaunch
    half-way through an epoch for the shards before that point too; never for the whole set."""
    from benchmarks.plan import IMAGENET_SHARDS_GB, IMAGENET_TRAIN, IMAGENET_VAL, first_step_gb

    cfg = load_config("configs/l4-16h.yaml", [])
    start = first_step_gb(cfg, IMAGENET_SHARDS_GB, IMAGENET_TRAIN, IMAGENET_VAL)
    val_gb = IMAGENET_SHARDS_GB * IMAGENET_VAL / (IMAGENET_TRAIN + IMAGENET_VAL)
    assert val_gb < start < val_gb + 1.5  # + ~0.2 GB of indices + 6 train shards of ~0.14 GB
    relaunch = first_step_gb(cfg, IMAGENET_SHARDS_GB, IMAGENET_TRAIN, IMAGENET_VAL, epoch_done=0.5)
    assert relaunch - start == pytest.approx((IMAGENET_SHARDS_GB - val_gb) / 2, rel=0.02)
    cfg = load_config("configs/l4-16h.yaml", ["shuffle_buffer=100000000"])  # a reader that reaches every shard
    assert first_step_gb(cfg, IMAGENET_SHARDS_GB, IMAGENET_TRAIN, IMAGENET_VAL) < IMAGENET_SHARDS_GB + 0.3


def test_the_plan_stages_at_the_slower_of_the_link_and_the_cpus():
    from benchmarks.plan import minutes_to_first_step

    minutes, bound = minutes_to_first_step(147, 2.5, vcpus=4, cpu_s_per_gb=2.5)
    assert minutes == pytest.approx(147 * 8 / 2.5 / 60) and bound.startswith("network")
    minutes, bound = minutes_to_first_step(147, 100, vcpus=4, cpu_s_per_gb=2.5)  # 12.5 GB/s of link, 1.6 of CPU
    assert minutes == pytest.approx(147 * 2.5 / 4 / 60) and bound == "CPU: 147.0 GB at 2.5 CPU-s/GB on 4 vCPUs"


def test_the_staging_benchmark_measures_each_client_and_the_notice(tmp_path):
    """`python -m benchmarks.staging` at toy sizes: a row per client it could run, and the notice's timing."""
    from conftest import REPO, child_env

    result = subprocess.run([sys.executable, "-m", "benchmarks.staging", "--clients", "s3transfer", "stage",
                             "--objects", "2", "--mb", "1", "--repeats", "1", "--notice-objects", "600"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    clients = {r["client"]: r for r in rows if r["stage"] == "staging-client"}
    assert set(clients) == {"s3transfer", "stage"}
    assert all(r["bytes"] == 2 * 2**20 and r["files"] == 2 and r["cpu_s_per_gb"] > 0 for r in clients.values())
    notice = next(r for r in rows if r["stage"] == "staging-notice")
    assert notice["gets_at_notice"] <= notice["gets_sent"] < 600 and notice["landed"] < 600
    assert "| s3transfer |" in result.stdout and "notice to exit while staging 600 objects" in result.stdout


@pytest.fixture(scope="module")
def fine_shards(sample_dir, tmp_path_factory):
    """The sample in shards of 4 images (24 train, 10 validation): at batch 4 and a shuffle buffer
    of 4, DALI's reader reaches 6 train shards before the first step, so most are read later."""
    from shard_tools.convert import Options, convert

    out = tmp_path_factory.mktemp("fine")
    convert(sample_dir, str(out), SPLITS, Options(shard_size=4), progress=False)
    return out


FINE = ("batch_size=4", "shuffle_buffer=4", "log_every=1", "checkpoint_minutes=0.0001", "s3_resume_timeout_s=2")


@pytest.fixture(scope="module")
def fine_local_run(fine_shards, tmp_path_factory):
    """EXACT on the local fine shards: what a run that stages while it trains must equal."""
    from conftest import EXACT, train

    out = tmp_path_factory.mktemp("fine-local") / "run"
    train(fine_shards, out, *EXACT, *FINE)
    return out


class LateShard:
    """The last tar the run reads, held by the proxy after half its body was sent (so half of it is
    on disk, not landed) until the run has made its first step and then stalled: its records have
    stopped growing for `quiet_s`. `then(run_dir)` is called at that moment, before the release."""

    def __init__(self, proxy, fine_shards, bucket: str, run_dir, then=lambda run_dir: None, quiet_s: float = 1.5):
        from dali_imagenet.config import TrainConfig  # the seed: the default in both runs

        train_split, val_split = find_shards(fine_shards, "train"), find_shards(fine_shards, "validation")
        order = staging.run_order(train_split, val_split, TrainConfig.seed, 0, 1, range(1))
        self.name = str(Path(order[-1]).relative_to(fine_shards))
        self.released, self.steps_at_release, self.on_disk = threading.Event(), None, None
        proxy.pause_midway[f"shards/{self.name}"] = self.released
        self._thread = threading.Thread(target=self._watch, args=(run_dir, then, quiet_s), daemon=True)
        self._thread.start()

    def _watch(self, run_dir, then, quiet_s):
        import time

        metrics, last, since, deadline = run_dir / "metrics.jsonl", None, time.monotonic(), time.monotonic() + 120
        while time.monotonic() < deadline:
            size = metrics.stat().st_size if metrics.exists() else 0
            steps = [json.loads(line) for line in metrics.read_text().splitlines()] if size else []
            if size != last:
                last, since = size, time.monotonic()
            elif any("loss" in r for r in steps) and time.monotonic() - since > quiet_s:
                self.steps_at_release = max(r["step"] for r in steps if "loss" in r)
                break
            time.sleep(0.1)
        self.on_disk = (run_dir.parent / "machine" / self.name).read_bytes()
        then(run_dir)
        time.sleep(0.5)
        self.released.set()

    def join(self):
        self._thread.join(timeout=130)


def test_a_run_trains_while_staging_waits_for_a_late_shard_and_ends_on_the_local_runs_weights(
        fine_shards, fine_local_run, s3_bucket, s3_latency, tmp_path, monkeypatch):
    """The task's run on s3:// behind latency and a capped link: its first step comes while a tar
    it reads later is half written (held midway by the proxy until the run has stepped and then
    stalled waiting for it), the wait is the meter's data wait, and the weights are the local run's."""
    import torch
    from conftest import EXACT, records, train

    upload_folder(fine_shards, s3_bucket, "shards")
    s3_latency.bytes_per_s = 4e6
    monkeypatch.setattr(staging, "IO_CHUNK", 16 * 2**10)  # the held tar's first half reaches the disk
    late = LateShard(s3_latency, fine_shards, s3_bucket, tmp_path / "run")
    try:
        result = train(f"s3://{s3_bucket}/shards", tmp_path / "run", *EXACT, *FINE,
                       extra=["--stage-dir", str(tmp_path / "machine")])
    finally:
        late.released.set()
        late.join()
    steps_per_epoch = 96 // 4
    assert late.steps_at_release is not None, "the run never stepped while the late shard was held"
    assert 1 <= late.steps_at_release < steps_per_epoch  # stepped before it landed, then waited for it
    real = (fine_shards / late.name).read_bytes()
    assert late.on_disk != real and late.on_disk[:1000] == real[:1000]  # half written meanwhile, not landed
    assert "(while training)" in result.stdout
    logged = records(tmp_path / "run")
    waits = [r["data_wait"] for r in logged if "data_wait" in r and r["step"] > late.steps_at_release]
    assert waits and waits[0] > 0.2, waits  # the step after the stall: mostly waiting for the shard
    assert next(r["epoch_data_wait"] for r in logged if "epoch_data_wait" in r) > 0
    a = torch.load(fine_local_run / "final_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "final_weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "staged while training != the run on the local shards"


def test_a_notice_while_a_run_waits_for_a_shard_exits_75_and_the_relaunch_ends_on_the_local_runs_weights(
        fine_shards, fine_local_run, s3_bucket, s3_latency, tmp_path):
    """EC2's notice while the run trains and waits for a shard still arriving: exit 75 with the
    steps so far checkpointed; the relaunch on the same machine fetches what had not landed,
    resumes mid-epoch and ends on the weights of the run on local shards."""
    import urllib.request

    import torch
    from conftest import EXACT, child_env, records, train

    from dali_imagenet.run import exits
    from standins.imds import StandInIMDS

    upload_folder(fine_shards, s3_bucket, "shards")
    s3_latency.bytes_per_s = 4e6
    imds = StandInIMDS()

    def notice(run_dir):
        urllib.request.urlopen(urllib.request.Request(imds.notice_url, data=b"", method="POST"), timeout=5).read()

    late = LateShard(s3_latency, fine_shards, s3_bucket, tmp_path / "run", then=notice)
    machine = ["--stage-dir", str(tmp_path / "machine")]
    try:
        first = train(f"s3://{s3_bucket}/shards", tmp_path / "run", *EXACT, *FINE, "spot_poll_seconds=0.2",
                      check=False, extra=machine,
                      env=child_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url, AWS_EC2_METADATA_DISABLED="false"))
    finally:
        late.released.set()
        late.join()
        imds.close()
    assert first.returncode == exits.RECLAIM, first.stdout[-2000:] + first.stderr[-3000:]
    assert 1 <= late.steps_at_release < 24
    record = json.loads((tmp_path / "machine" / staging.RECORD).read_text())
    assert record[late.name] == {"pending": True}
    stopped = [r for r in records(tmp_path / "run") if r.get("event") == "stopped"]
    assert stopped and stopped[0]["step"] == late.steps_at_release
    s3_latency.pause_midway.clear()
    s3_latency.reset()
    second = train(f"s3://{s3_bucket}/shards", tmp_path / "run", *EXACT, *FINE,
                   extra=[*machine, "--resume", "auto", "--spot", "off"])
    fetched = {r.key for r in s3_latency.object_reads("shards/") if r.key.endswith(".tar")}
    assert f"shards/{late.name}" in fetched and len(fetched) < 34  # only what had not landed
    assert "resum" in second.stdout.lower()
    a = torch.load(fine_local_run / "final_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "final_weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "reclaimed while staging-and-training + relaunched != local"


def test_a_shard_that_fails_while_the_run_trains_ends_it_in_one_line_not_a_hanging_loader(
        fine_shards, s3_bucket, s3_latency, tmp_path, monkeypatch):
    """The last tar the run reads is not the manifest's in S3: staging fetches it TRIES times, then
    the loader waiting for it raises staging's one line and the run exits 1."""
    from conftest import EXACT, records, train

    from dali_imagenet.config import TrainConfig

    monkeypatch.setattr(staging, "BACKOFF_S", 0.01)
    upload_folder(fine_shards, s3_bucket, "shards")
    order = staging.run_order(find_shards(fine_shards, "train"), find_shards(fine_shards, "validation"),
                              TrainConfig.seed, 0, 1, range(1))
    name = str(Path(order[-1]).relative_to(fine_shards))
    other = bytearray((fine_shards / name).read_bytes())
    other[700] ^= 0xFF
    client().put_object(Bucket=s3_bucket, Key=f"shards/{name}", Body=bytes(other))
    result = train(f"s3://{s3_bucket}/shards", tmp_path / "run", *EXACT, *FINE, check=False,
                   extra=["--stage-dir", str(tmp_path / "machine")])
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    line = f"{name.rsplit('/', 1)[-1]}: sha256 differs from the manifest's"
    assert line in result.stderr and "after 4 tries" in result.stderr
    assert len(s3_latency.object_reads(f"shards/{name}")) == staging.TRIES
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not any(r.get("event") == "finished" for r in records(tmp_path / "run"))


@pytest.mark.slow
def test_two_processes_on_one_machine_train_while_one_of_them_stages(fine_shards, s3_bucket,
                                                                      s3_latency, tmp_path):
    """torchrun, 2 CPU ranks, --data s3:// behind a capped link: rank 0 stages (each object fetched
    once), rank 1 waits for its indices and placeholders, both wait on the same record; the run
    ends as a 2-rank run on the local shards does."""
    import torch
    from conftest import EXACT, REPO, child_env, train_command

    upload_folder(fine_shards, s3_bucket, "shards")
    s3_latency.bytes_per_s = 4e6
    runs = {}
    for name, data in (("local", fine_shards), ("staged", f"s3://{s3_bucket}/shards")):
        command = train_command(data, tmp_path / name, *EXACT, *FINE, "batch_size=2",
                                extra=["--stage-dir", str(tmp_path / "machine")])
        runs[name] = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                     "--standalone", *command[1:]], capture_output=True, text=True,
                                    env=child_env(), cwd=REPO, timeout=300)
        assert runs[name].returncode == 0, runs[name].stdout[-2000:] + runs[name].stderr[-3000:]
    assert "(while training)" in runs["staged"].stdout
    reads = Counter(r.key for r in s3_latency.object_reads("shards/") if r.key.endswith((".tar", ".idx")))
    assert reads and set(reads.values()) == {1}
    a = torch.load(tmp_path / "local" / "final_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "staged" / "final_weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "2 ranks staged while training != 2 ranks on the local shards"


def test_a_staged_copy_cut_short_is_refused_except_by_the_run_that_stages_it(sample_shards, tmp_path):
    """A staging while training that was cut short (a reclaim, a kill) leaves its manifest beside
    zero-filled placeholders: any reader but a run waiting on its tars gets one line, not zeros."""
    import json
    import shutil

    from dali_imagenet.data.shardformat import STAGING_RECORD
    from dali_imagenet.data.shards import ShardError

    copy = tmp_path / "staged"
    shutil.copytree(sample_shards, copy)
    tar = find_shards(copy, "train").tars[0]
    name = Path(tar).relative_to(copy).as_posix()
    (copy / STAGING_RECORD).write_text(json.dumps({name: {"pending": True}}))
    with pytest.raises(ShardError, match=r"a staged copy not yet complete \(1 tars not fetched, e\.g\. .*--stage-dir"):
        find_shards(copy, "train")
    assert find_shards(copy, "train", staging=True).samples == find_shards(sample_shards, "train").samples
