"""`shard-imagenet`: round trip, index files, odd files, determinism, resume, ImageFolder, S3, errors."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shard_tools.convert import Options, convert
from shard_tools.sample import draw_image, encode, hf_schema

WDS2IDX = Path(sys.executable).with_name("wds2idx")


def run_cli(*args, check=True, **kwargs):
    result = subprocess.run([sys.executable, "-m", "shard_tools.cli", *map(str, args), "--quiet"],
                            capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def source_rows(sample_dir: Path, split: str) -> dict[str, tuple[bytes, int]]:
    rows = {}
    for path in sorted((sample_dir / "data").glob(f"{split}-*.parquet")):
        table = pq.read_table(path)
        for image, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist()):
            rows[image["path"]] = (image["bytes"], label)
    return rows


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_with_webdataset(shards: list[Path]) -> list[dict]:
    import webdataset as wds

    dataset = wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False)
    return list(dataset)


def read_with_dali(shards: list[Path]) -> list[tuple[bytes, bytes, dict]]:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def reader():
        jpg, cls, meta = fn.readers.webdataset(
            paths=[str(s) for s in shards], index_paths=[str(s.with_suffix(".idx")) for s in shards],
            ext=["jpg", "cls", "json"], missing_component_behavior="error", name="reader")
        return jpg, cls, meta

    pipe = reader()
    pipe.build()
    size = pipe.reader_meta("reader")["epoch_size"]
    out = []
    while len(out) < size:
        jpgs, clss, metas = pipe.run()
        for i in range(len(jpgs)):
            out.append((jpgs.at(i).tobytes(), clss.at(i).tobytes(), json.loads(metas.at(i).tobytes())))
    return out[:size]


def test_round_trip_bytes_labels_and_readers(sample_dir, sample_shards):
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["classes"][:2] == ["red disc", "green square"]
    for split in ("train", "validation"):
        source = source_rows(sample_dir, split)
        info = manifest["splits"][split]
        assert info["read"] == len(source) == info["samples"] + info["rejected_count"]
        assert info["rejected_count"] == 0
        converted = {c["path"] for c in info["converted"]}
        shards = [sample_shards / s["name"] for s in info["shards"]]
        assert sum(s["samples"] for s in info["shards"]) == len(source)

        samples = read_with_webdataset(shards)
        assert len(samples) == len(source)
        seen = set()
        for sample in samples:
            meta = json.loads(sample["json"])
            data, label = source[meta["path"]]
            assert int(sample["cls"]) == label == meta["label"]
            assert meta["synset"] == f"s{label:08d}"  # the sample's paths carry the class id
            if meta["path"] in converted:
                assert Image.open(io.BytesIO(sample["jpg"])).mode == "RGB"
            else:
                assert sample["jpg"] == data, meta["path"]
            seen.add(meta["path"])
        assert seen == set(source)

        dali_samples = read_with_dali(shards)
        assert sorted(m["path"] for _, _, m in dali_samples) == sorted(source)
        for jpg, cls, meta in dali_samples:
            assert int(cls.decode()) == source[meta["path"]][1]
            if meta["path"] not in converted:
                assert jpg == source[meta["path"]][0]
    # The sample holds the real train split's odd files; they are converted and said so.
    reasons = sorted(c["reason"] for c in manifest["splits"]["train"]["converted"])
    assert reasons == ["CMYK JPEG converted to RGB", "L JPEG converted to RGB", "PNG bytes converted to JPEG"]


def test_index_files_equal_wds2idx(sample_shards, tmp_path):
    tars = sorted(sample_shards.rglob("*.tar"))
    assert len(tars) >= 4
    for tar in tars:
        reference = tmp_path / (tar.stem + ".idx")
        subprocess.run([WDS2IDX, tar, reference], check=True, capture_output=True)
        assert tar.with_suffix(".idx").read_text() == reference.read_text(), tar.name


def test_shards_are_shuffled_across_classes(sample_shards):
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]
    samples = read_with_webdataset([sample_shards / first["name"]])
    assert len({int(s["cls"]) for s in samples}) >= 4


def write_odd_parquet(folder: Path) -> dict[str, str]:
    """A train file with one of each odd file; returns path -> expected outcome."""
    rng = np.random.default_rng(1)
    good = encode(draw_image(0, rng), "jpeg", rng)
    cases = {
        "good.JPEG": (good, "pass"),
        "cmyk.JPEG": (encode(draw_image(1, rng), "cmyk", rng), "converted"),
        "gray.JPEG": (encode(draw_image(2, rng), "gray", rng), "converted"),
        "png.JPEG": (encode(draw_image(3, rng), "png", rng), "converted"),
        "truncated.JPEG": (good[: len(good) // 2], "rejected"),
        "empty.JPEG": (b"", "rejected"),
        "text.JPEG": (b"this is not an image", "rejected"),
    }
    folder.mkdir(parents=True)
    rows = {"image": [{"bytes": data, "path": name} for name, (data, _) in cases.items()],
            "label": [i % 4 for i in range(len(cases))]}
    import pyarrow as pa

    table = pa.Table.from_pydict(rows, schema=hf_schema(["a", "b", "c", "d"]))
    pq.write_table(table, folder / "train-00000-of-00001.parquet", row_group_size=3)
    return {name: outcome for name, (_, outcome) in cases.items()}


def test_odd_files_converted_or_rejected_and_accounted(tmp_path):
    expected = write_odd_parquet(tmp_path / "src" / "data")
    result = run_cli(tmp_path / "src", tmp_path / "out", "--shard-size", "4")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    info = manifest["splits"]["train"]
    rejected = {r["path"]: r["reason"] for r in info["rejected"]}
    converted = {c["path"] for c in info["converted"]}
    assert set(rejected) == {n for n, o in expected.items() if o == "rejected"}
    assert converted == {n for n, o in expected.items() if o == "converted"}
    assert "truncated" in rejected["truncated.JPEG"] or "undecodable" in rejected["truncated.JPEG"]
    assert rejected["empty.JPEG"] == "empty image"
    assert info["read"] == 7 and info["samples"] == 4 and info["rejected_count"] == 3
    assert "read = written + rejected: 7 = 4 + 3" in result.stdout
    for sample in read_with_webdataset(sorted((tmp_path / "out").rglob("*.tar"))):
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert (image.format, image.mode) == ("JPEG", "RGB")
        image.load()

    strict = run_cli(tmp_path / "src", tmp_path / "strict", "--strict", check=False)
    assert strict.returncode != 0
    lines = strict.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-00000-of-00001.parquet:row" in lines[0] and "Traceback" not in strict.stderr


def test_max_side_reencodes_only_large_images(sample_dir, tmp_path):
    manifest = convert(sample_dir, str(tmp_path / "out"), ("validation",), Options(shard_size=64, max_side=400),
                       progress=False)
    info = manifest["splits"]["validation"]
    source = source_rows(sample_dir, "validation")
    downscaled = {c["path"] for c in info["converted"]}
    assert downscaled and len(downscaled) < len(source)
    for sample in read_with_webdataset(sorted((tmp_path / "out").rglob("*.tar"))):
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert max(image.size) <= 400 and image.size == (meta["width"], meta["height"])
        original = Image.open(io.BytesIO(source[meta["path"]][0]))
        assert (meta["path"] in downscaled) == (max(original.size) > 400)
        if meta["path"] not in downscaled:
            assert sample["jpg"] == source[meta["path"]][0]


def test_deterministic_whatever_the_workers(sample_dir, tmp_path):
    run_cli(sample_dir, tmp_path / "a", "--shard-size", "8", "--workers", "1")
    run_cli(sample_dir, tmp_path / "b", "--shard-size", "8", "--workers", "2")
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert len(a) > 20 and a == b
    other_seed = run_cli(sample_dir, tmp_path / "c", "--shard-size", "8", "--seed", "1")
    assert other_seed.returncode == 0 and tree_digest(tmp_path / "c") != a


def test_resume_after_kill_equals_uninterrupted_run(sample_dir, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_cli(sample_dir, reference, "--shard-size", "4", "--workers", "1")
    process = subprocess.Popen([sys.executable, "-m", "shard_tools.cli", str(sample_dir), str(killed),
                                "--shard-size", "4", "--workers", "1", "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    manifest = killed / "manifest.json"
    while time.monotonic() < deadline and process.poll() is None:
        if (
            manifest.exists()
            and len(json.loads(manifest.read_text())["splits"].get("train", {}).get("chunks", [])) >= 2
        ):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = json.loads(manifest.read_text())
    assert partial["complete"] is False, "the run finished before it could be killed"
    # Damage one finished shard: resume must notice (sha256) and write it again.
    damaged = killed / partial["splits"]["train"]["shards"][0]["name"]
    damaged.write_bytes(damaged.read_bytes()[:-1024])

    result = run_cli(sample_dir, killed, "--shard-size", "4", "--workers", "1", "--resume")
    kept = int(result.stdout.split(" chunk(s) kept")[0].rsplit(" ", 1)[1])
    assert kept >= 1
    assert tree_digest(killed) == tree_digest(reference)


def test_existing_output_needs_resume_or_overwrite(sample_dir, sample_shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sample_shards, out)
    result = run_cli(sample_dir, out, check=False)
    assert result.returncode != 0 and "--resume" in result.stderr
    mismatch = run_cli(sample_dir, out, "--resume", "--shard-size", "3", check=False)
    assert mismatch.returncode != 0 and "cannot resume" in mismatch.stderr


def test_imagefolder_input(sample_dir, tmp_path):
    source = source_rows(sample_dir, "train")
    root = tmp_path / "folder"
    synset_of = {}
    for i, (path, (data, label)) in enumerate(sorted(source.items())[:40]):
        synset = f"n{label:08d}"
        synset_of[path] = synset
        (root / "train" / synset).mkdir(parents=True, exist_ok=True)
        (root / "train" / synset / f"{synset}_{i}.JPEG").write_bytes(data)
    (root / "val" / "n00000000").mkdir(parents=True)
    (root / "val" / "n00000000" / "v.JPEG").write_bytes(next(iter(source.values()))[0])
    run_cli(root, tmp_path / "out", "--shard-size", "16")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    synsets = sorted(set(synset_of.values()))
    assert manifest["source"]["kind"] == "imagefolder"
    assert manifest["synsets"] == synsets
    assert manifest["splits"]["train"]["samples"] == 40 and manifest["splits"]["validation"]["samples"] == 1
    for sample in read_with_webdataset(sorted((tmp_path / "out" / "train").glob("*.tar"))):
        meta = json.loads(sample["json"])
        folder = meta["path"].split("/")[1]
        assert int(sample["cls"]) == synsets.index(folder) and meta["synset"] == folder


def test_s3_output_and_resume(sample_dir, s3_bucket, tmp_path):
    from dali_imagenet.s3 import client

    url = f"s3://{s3_bucket}/imagenet/shards"
    convert(sample_dir, url, ("validation",), Options(shard_size=16), progress=False)
    s3 = client()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="imagenet/shards/")["Contents"]}
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="imagenet/shards/manifest.json")["Body"].read())
    shards = manifest["splits"]["validation"]["shards"]
    assert {f"imagenet/shards/{s['name']}" for s in shards} <= keys
    assert {f"imagenet/shards/{s['name'][:-4]}.idx" for s in shards} <= keys
    body = s3.get_object(Bucket=s3_bucket, Key=f"imagenet/shards/{shards[0]['name']}")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == shards[0]["sha256"]
    again = convert(sample_dir, url, ("validation",), Options(shard_size=16), resume=True, progress=False)
    assert again["stats"]["skipped_chunks"] == len(manifest["splits"]["validation"]["chunks"])
    assert again["stats"]["converted_now"] == 0


@pytest.mark.parametrize("case", ["missing", "no_parquet", "wrong_schema", "unwritable", "bad_s3_url", "s3_one_slash"])
def test_errors_are_one_line(case, sample_dir, tmp_path):
    import pyarrow as pa

    source, output = sample_dir, tmp_path / "out"
    if case == "missing":
        source = tmp_path / "nope"
    elif case == "no_parquet":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "wrong_schema":
        source = tmp_path / "bad"
        source.mkdir()
        pq.write_table(pa.table({"img": [b"x"], "y": [1]}), source / "train-00000-of-00001.parquet")
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("")
        output = blocker / "out"
    elif case == "bad_s3_url":
        output = "s3:///no-bucket"
    elif case == "s3_one_slash":
        output = "s3:/typo/shards"
    result = run_cli(source, output, check=False, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("Error: ")
    if case == "s3_one_slash":
        assert "s3://bucket/prefix" in lines[0] and not (tmp_path / "s3:").exists()


def test_s3_error_keeps_its_reason(sample_dir, s3_server):
    from dali_imagenet import make_loader
    from dali_imagenet.data.shards import ShardError

    result = run_cli(sample_dir, "s3://bad!bucket/x", check=False)
    line = result.stderr.strip()
    assert result.returncode != 0 and "\n" not in line
    # botocore's reason comes after its first line break ("Parameter validation failed:\nInvalid ...")
    assert "Invalid bucket name" in line, line
    with pytest.raises(ShardError, match="Invalid bucket name"):
        make_loader("s3://bad!bucket/x", "train", 8, device="cpu")


def test_timm_reads_the_shards_as_they_are(sample_shards):
    """timm's own webdataset reader finds every sample, with the right label, from `_info.json`."""
    from timm.data import create_dataset

    manifest = json.loads((sample_shards / "manifest.json").read_text())
    info = json.loads((sample_shards / "_info.json").read_text())
    expected = read_with_webdataset([sample_shards / s["name"] for s in manifest["splits"]["validation"]["shards"]])
    assert info["splits"]["validation"]["num_samples"] == len(expected) == 40
    dataset = create_dataset("wds/imagenet", root=str(sample_shards), split="validation", is_training=False)
    seen = [(image.size, int(target)) for image, target in dataset]
    assert len(seen) == len(dataset) == 40
    assert [t for _, t in seen] == [int(s["cls"]) for s in expected]
    assert all(size == Image.open(io.BytesIO(s["jpg"])).size for (size, _), s in zip(seen, expected))
