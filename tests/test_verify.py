"""One bad image never ends a run: `verify-shards` finds it, `--repair` drops it without touching
a tar, both loaders then read one sample fewer, and train.py, stopped by it, resumes and finishes."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env, records, train
from dali_imagenet import make_loader
from dali_imagenet.shardformat import index_existing_tar, parse_index
from dali_imagenet.shards import find_shards

VERIFY = [sys.executable, "-m", "shard_tools.verify"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wipe_a_jpeg_header(shards: Path, split: str = "train", shard: int = 2, sample: int = 3) -> tuple[Path, str]:
    """Zeroes the first 64 bytes of one sample's JPEG inside its tar (same size: only a decode sees it)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    tar = shards / manifest["splits"][split]["shards"][shard]["name"]
    samples = parse_index(tar.with_suffix(".idx").read_text())
    _, offset, _, name = next(c for c in samples[sample] if c[0] == "jpg")
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * 64)
    return tar, name[: -len(".jpg")]


@pytest.fixture
def damaged(sample_shards, tmp_path) -> tuple[Path, Path, str]:
    out = tmp_path / "shards"
    shutil.copytree(sample_shards, out)
    tar, key = wipe_a_jpeg_header(out)
    return out, tar, key


def verify(shards, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*VERIFY, str(shards), "--quiet", "--workers", "2", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_a_clean_set_verifies(sample_shards):
    result = verify(sample_shards)
    assert result.returncode == 0, result.stderr
    assert "train: checked 96 = good 96 + bad 0" in result.stdout
    assert "validation: checked 40 = good 40 + bad 0" in result.stdout
    assert "bad:" not in result.stdout


@pytest.mark.slow
def test_a_damaged_sample_is_found_dropped_and_the_run_finishes(damaged, tmp_path):
    shards, tar, key = damaged
    sets = ("epochs=2", "checkpoint_minutes=0", "mixup_alpha=0", "cutmix_alpha=0")  # a checkpoint after every step
    run = tmp_path / "run"
    stopped = train(shards, run, *sets, check=False)
    assert stopped.returncode == 1
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert f"{tar}: sample {key}.jpg is undecodable" in lines[0]
    assert f"verify-shards {shards} --repair" in lines[0]
    assert records(run)[-1]["event"] == "stopped" and "undecodable" in records(run)[-1]["reason"]
    checkpoint = torch.load(run / "last.pt", weights_only=True) if (run / "last.pt").exists() else None

    found = verify(shards)
    assert found.returncode == 1
    assert f"bad: {tar.relative_to(shards)}: sample {key}: undecodable" in found.stdout
    assert "train: checked 96 = good 95 + bad 1" in found.stdout
    assert f"verify-shards {shards} --repair" in found.stderr

    before = {p: sha256(p) for p in shards.rglob("*.tar")}
    repaired = verify(shards, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "repaired: 1 sample(s) dropped" in repaired.stdout
    assert {p: sha256(p) for p in shards.rglob("*.tar")} == before  # not a tar byte changed
    manifest = json.loads((shards / "manifest.json").read_text())
    info = manifest["splits"]["train"]
    assert info["samples"] == 95 and info["read"] == info["samples"] + info["rejected_count"]
    assert [r["key"] for r in info["rejected"]] == [key] and info["rejected"][0]["reason"].startswith("undecodable")
    assert "date" in info["rejected"][0]
    entry = next(s for s in info["shards"] if s["name"] == str(tar.relative_to(shards)))
    assert entry["samples"] == len(parse_index(tar.with_suffix(".idx").read_text())) == 15
    timm = json.loads((shards / "_info.json").read_text())["splits"]["train"]
    assert timm["num_samples"] == 95 and sum(timm["shard_lengths"]) == 95
    assert verify(shards).returncode == 0

    for backend in ("dali", "torchvision"):  # each reads every listed sample once: 95, and not the dropped one
        loader = make_loader(shards, "train", 16, device="cpu", image_size=32, backend=backend, train=False,
                             num_threads=1)
        assert sum(len(labels) for _, labels in loader) == 95, backend

    train(shards, run, *sets, extra=["--resume", "auto"])
    steps_per_epoch = 95 // 16
    final = [r for r in records(run) if r.get("event") == "finished"]
    assert len(final) == 1 and final[0]["step"] == 2 * steps_per_epoch  # the repaired epochs' count
    if checkpoint is not None:
        assert [r["step"] for r in records(run) if r.get("event") == "resumed"] == [checkpoint["state"]["step"]]


def test_a_repair_on_s3_rewrites_only_small_files(sample_dir, s3_bucket, tmp_path):
    from dali_imagenet.s3 import client
    from shard_tools.convert import Options, convert

    local = tmp_path / "local"
    convert(sample_dir, str(local), ("validation",), Options(shard_size=16), progress=False)
    tar, key = wipe_a_jpeg_header(local, "validation", shard=1, sample=0)
    for path in local.rglob("*"):
        if path.is_file():
            client().upload_file(str(path), s3_bucket, f"shards/{path.relative_to(local)}")
    etags = {o["Key"]: o["ETag"] for o in client().list_objects_v2(Bucket=s3_bucket, Prefix="shards/")["Contents"]}
    url = f"s3://{s3_bucket}/shards"
    assert verify(url).returncode == 1
    repaired = verify(url, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    after = {o["Key"]: o["ETag"] for o in client().list_objects_v2(Bucket=s3_bucket, Prefix="shards/")["Contents"]}
    changed = sorted(k for k in after if after[k] != etags[k])
    assert changed == sorted(["shards/_info.json", "shards/manifest.json",
                              f"shards/{tar.relative_to(local).with_suffix('.idx')}"])  # 3 small objects, no tar
    assert find_shards(url, "validation").samples == 39


def test_a_foreign_tar_indexes_only_its_samples(sample_shards, tmp_path):
    """A shard made elsewhere (the timm layout) with files that are no sample's: LICENSE (no
    extension), a dotfile, macOS's __MACOSX/: the index lists only the real samples."""
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    source = sample_shards / manifest["splits"]["validation"]["shards"][0]["name"]
    folder = tmp_path / "timm"
    folder.mkdir()
    foreign = folder / "imagenet1k-validation-0000.tar"
    with tarfile.open(source) as original, tarfile.open(foreign, "w") as out:
        for extra in ("LICENSE", ".DS_Store", "__MACOSX/._00000000.jpg"):
            data = b"not a sample"
            info = tarfile.TarInfo(extra)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        for member in original:
            out.addfile(member, original.extractfile(member))
    samples, skipped = index_existing_tar(foreign, tmp_path / "x.idx")
    assert (samples, skipped) == (manifest["splits"]["validation"]["shards"][0]["samples"], 3)
    shards = find_shards(folder, "validation", cache_dir=tmp_path / "cache")
    assert shards.samples == samples
    names = [s[0][3] for s in parse_index(Path(shards.indices[0]).read_text())]
    assert not [n for n in names if "LICENS" in n or "MACOSX" in n or n.startswith(".")]
    loader = make_loader(shards, "validation", 8, device="cpu", image_size=32, num_threads=1)
    assert sum(len(labels) for _, labels in loader) == samples


def test_verify_names_a_missing_folder_in_one_line(tmp_path):
    result = subprocess.run([*VERIFY, str(tmp_path / "nope")], capture_output=True, text=True, cwd=REPO,
                            env=child_env(), timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == f"Error: {tmp_path / 'nope'}: no such folder"
