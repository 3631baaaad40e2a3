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
from conftest import REPO, child_env, records, run_in_process, script, train

from dali_imagenet import make_loader
from dali_imagenet.data.shardformat import index_existing_tar, parse_index
from dali_imagenet.data.shards import find_shards

VERIFY = [sys.executable, "-m", "shard_tools.verify"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wipe_a_jpeg_header(shards: Path, split: str = "train", shard: int = 2, sample: int = 3,
                       into: Path | None = None) -> tuple[Path, str]:
    """Zeroes the first 64 bytes of one sample's JPEG inside its tar (same size: only a decode sees
    it); `into`: in that copy of the tar instead."""
    manifest = json.loads((shards / "manifest.json").read_text())
    tar = shards / manifest["splits"][split]["shards"][shard]["name"]
    samples = parse_index(tar.with_suffix(".idx").read_text())
    _, offset, _, name = next(c for c in samples[sample] if c[0] == "jpg")
    with open(into or tar, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * 64)
    return into or tar, name[: -len(".jpg")]


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


# ---- the real dataset's edges: an unlabelled test split, repair then resume, timm-layout sets

@pytest.fixture(scope="module")
def with_test_split(tmp_path_factory) -> tuple[Path, Path]:
    """The sample in the Hub's layout with a test split whose 16 labels are all -1, as ImageNet's
    100,000 are, and its shards (all three splits)."""
    from shard_tools.convert import Options, convert
    from shard_tools.sample import make_sample

    source = tmp_path_factory.mktemp("with-test")
    make_sample(source, 6, 3, seed=1, test_per_class=2)
    shards = tmp_path_factory.mktemp("with-test-shards") / "shards"
    convert(source, str(shards), ("train", "validation", "test"), Options(shard_size=8), progress=False)
    return source, shards


def test_an_unlabelled_test_split_is_a_kind_not_an_error(with_test_split, tmp_path):
    from dali_imagenet.data.shards import ShardError

    _, shards = with_test_split
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"]["test"]["unlabelled"] == 16 and manifest["splits"]["train"]["unlabelled"] == 0
    result = verify(shards)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test: checked 16 = good 16 + bad 0; 16 of the good are unlabelled" in result.stdout
    assert "train: checked 48 = good 48 + bad 0\n" in result.stdout and "bad:" not in result.stdout
    repaired = verify(shards, "--repair")  # nothing to drop: an unlabelled sample is not a bad one
    assert repaired.returncode == 0 and "repaired" not in repaired.stdout
    assert json.loads((shards / "manifest.json").read_text()) == manifest
    test = find_shards(shards, "test")
    assert test.unlabelled == 16 and find_shards(shards, "validation").unlabelled == 0
    with pytest.raises(ShardError) as refused:
        test.require_labels("scoring")
    assert "split test has 16 unlabelled samples (label -1" in str(refused.value)
    assert f"predict.py --data {shards} --split test" in str(refused.value)


@pytest.mark.slow
def test_evaluate_refuses_the_unlabelled_split_and_predict_reads_it(with_test_split, trained_run):
    _, shards = with_test_split
    evaluated = run_in_process(script("evaluate"), ["evaluate.py", "--checkpoint", trained_run / "best.pt", "--data",
                                                    shards, "--split", "test", "--dali", "--device", "cpu"])
    lines = evaluated.stderr.strip().splitlines()
    assert evaluated.returncode == 1 and len(lines) == 1 and "unlabelled samples" in lines[0], evaluated.stderr
    predicted = run_in_process(script("predict"), ["predict.py", "--checkpoint", trained_run / "best.pt", "--data",
                                                   shards, "--split", "test", "--json", "--device", "cpu"])
    assert predicted.returncode == 0, predicted.stderr
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(rows) == 16 and len({r["path"] for r in rows}) == 16
    assert all(".tar:" in r["path"] and len(r["top"]) == 5 for r in rows)


@pytest.mark.slow
def test_a_repaired_set_resumes_rewrites_the_damaged_tar_and_verifies_clean(with_test_split, tmp_path):
    """Damage after writing (a wiped JPEG header: the tar's sha256 changes), found and repaired;
    then `shard-imagenet --resume`: the damaged tar is rewritten from the source, every other tar is
    kept as it was, the count holds, and the set verifies clean, equal to a fresh conversion."""
    source, clean = with_test_split
    shards = tmp_path / "shards"
    shutil.copytree(clean, shards)
    tar, key = wipe_a_jpeg_header(shards, "train", shard=1, sample=2)
    assert verify(shards).returncode == 1
    stderr = verify(shards).stderr
    assert f"verify-shards {shards} --repair --split train" in stderr  # names the split with the bad sample
    assert verify(shards, "--repair", "--split", "train").returncode == 0
    others = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.rglob("*.tar") if p != tar}
    resumed = subprocess.run([sys.executable, "-m", "shard_tools.cli", str(source), str(shards), "--shard-size", "8",
                              "--resume", "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "read = written + rejected" in resumed.stdout
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.rglob("*.tar") if p != tar} == others
    assert sha256(tar) == sha256(clean / tar.relative_to(shards))  # rewritten from the source: the sample is back
    checked = verify(shards)
    assert checked.returncode == 0 and "train: checked 48 = good 48 + bad 0" in checked.stdout, checked.stdout
    assert json.loads((shards / "manifest.json").read_text())["splits"] == \
        json.loads((clean / "manifest.json").read_text())["splits"]


def test_a_repaired_set_whose_tars_are_intact_keeps_its_repair_on_resume(with_test_split, tmp_path):
    """A sample dropped by a repair while its tar is unchanged (here: a label the manifest's
    classes do not have, written in place of the digit): --resume keeps the tar, the shorter
    index and the repair's record, and the counts still add up."""
    from shard_tools.cli import main as shard_main  # noqa: F401 - the CLI is what a user runs
    source, clean = with_test_split
    shards = tmp_path / "shards"
    shutil.copytree(clean, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = manifest["splits"]["validation"]["shards"][0]
    name = parse_index((shards / entry["name"]).with_suffix(".idx").read_text())[0]
    _, offset, size, _ = next(c for c in name if c[0] == "cls")
    data = bytearray((shards / entry["name"]).read_bytes())
    data[offset:offset + size] = b"9" * size  # label 9 of 8 classes; same size, a new sha256 though
    (shards / entry["name"]).write_bytes(bytes(data))
    entry["sha256"] = sha256(shards / entry["name"])  # as if it had been written so: the tar is intact
    (shards / "manifest.json").write_text(json.dumps(manifest, indent=1))
    assert verify(shards, "--repair", "--split", "validation").returncode == 0
    resumed = subprocess.run([sys.executable, "-m", "shard_tools.cli", str(source), str(shards), "--shard-size", "8",
                              "--resume", "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = json.loads((shards / "manifest.json").read_text())["splits"]["validation"]
    assert (
        after["samples"] == 23
        and after["rejected_count"] == 1
        and after["rejected"][0]["by"] == "verify-shards --repair"
    )
    assert "sample" in resumed.stdout and "by verify-shards --repair" in resumed.stdout
    assert verify(shards).returncode == 0


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_timm_layout_set_is_verified_through_the_loaders_index_cache(where, sample_shards, s3_bucket, tmp_path):
    """A copy in timm's layout (tars only: no manifest, no .idx, e.g. timm/imagenet-1k-wds), with one
    damaged sample: verified with the same summary, the damage named, the indices cached where the
    loaders look (a second look reads no tar to index it again)."""
    timm = tmp_path / "timm"
    for tar in sample_shards.rglob("*.tar"):
        (timm / tar.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(tar, timm / tar.parent.name / tar.name)
    first = json.loads((sample_shards / "manifest.json").read_text())["splits"]["train"]["shards"][0]["name"]
    damaged = wipe_a_jpeg_header(sample_shards, "train", shard=0, sample=1, into=timm / first)
    shutil.copy(sample_shards / "classes.tsv", timm / "classes.tsv")
    root = str(timm)
    if where == "s3":
        from dali_imagenet.s3 import client

        for path in timm.rglob("*"):
            if path.is_file():
                client().upload_file(str(path), s3_bucket, f"timm/{path.relative_to(timm)}")
        root = f"s3://{s3_bucket}/timm"
    cache = tmp_path / "cache"
    result = subprocess.run([*VERIFY, root, "--quiet", "--workers", "2"], capture_output=True, text=True, cwd=REPO,
                            env=child_env(DALI_IMAGENET_CACHE=str(cache)), timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "train: checked 96 = good 95 + bad 1" in result.stdout
        and "validation: checked 40 = good 40 + bad 0" in result.stdout
    )
    assert f"sample {damaged[1]}: undecodable" in result.stdout and "a timm-layout set" in result.stdout
    assert "no manifest to record a repair in" in result.stderr
    cached = sorted(cache.rglob("*.idx"))
    assert len(cached) == len(list(sample_shards.rglob("*.tar")))
    shards = find_shards(root, "train", cache_dir=cache / "wds-index")  # the loaders find the same indices
    assert sorted(map(str, shards.indices)) == sorted(str(p) for p in cached if "-train-" in p.name)
    assert shards.layout == "timm" and shards.samples == 96


def test_the_baseline_names_the_sample_that_does_not_decode(damaged):
    from dali_imagenet.data.shards import ShardError

    shards, tar, key = damaged
    loader = make_loader(shards, "train", 16, device="cpu", image_size=32, backend="torchvision", num_threads=1,
                         train=False)
    with pytest.raises(ShardError) as error:
        for _ in loader:
            pass
    line = str(error.value)
    assert "\n" not in line and "Traceback" not in line, line
    assert line.startswith(f"{tar}: sample {key}.jpg is undecodable")
    assert f"verify-shards {shards} --repair --split train" in line
