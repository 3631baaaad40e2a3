"""`shard-imagenet --reencode` (FFCV's ImageNet: every image at one quality, larger ones downscaled),
made from shards of ours, local or on S3, without their source: verify-shards passes on the new
set, train.py trains on it, and every image is at quality Q (its quantisation tables are PIL's
for Q) and within N px."""
from __future__ import annotations

import io
import json
import subprocess
import sys

from conftest import records, train, upload_folder
from PIL import Image

from dali_imagenet.data.shardformat import iter_components

QUALITY, MAX_SIDE = 80, 200


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "shard_tools.cli", *map(str, args), "--quiet"], capture_output=True,
                            text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stderr
    return result


def tables_of_quality(quality: int) -> dict:
    """The quantisation tables PIL (libjpeg's IJG tables, scaled) writes at `quality`."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 64, 32)).save(out, "JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue())).quantization


def jpegs(folder) -> list[tuple[str, bytes]]:
    return [item for tar in sorted(folder.rglob("*.tar")) for item in iter_components(tar, tar.with_suffix(".idx"))]


def test_reencode_from_shards_verifies_trains_and_every_image_is_at_q_within_n(sample_shards, tmp_path):
    out = tmp_path / "q80"
    cli(sample_shards, out, "--reencode", "--quality", QUALITY, "--max-side", MAX_SIDE, "--shard-size", 16)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["source"]["kind"] == "shards"
    assert manifest["source"]["shards"] == str(sample_shards)
    assert manifest["options"]["reencode"] is True and manifest["options"]["quality"] == QUALITY
    assert manifest["options"]["max_side"] == MAX_SIDE
    original = json.loads((sample_shards / "manifest.json").read_text())
    assert manifest["source"]["shards_options"] == original["options"]
    for split in ("train", "validation"):
        assert manifest["splits"][split]["samples"] == original["splits"][split]["samples"]
        assert manifest["splits"][split]["converted"] == []  # every image re-encoded: the options say it, not a list
    assert manifest["classes"] == original["classes"]

    new, old = jpegs(out), jpegs(sample_shards)
    assert len(new) == len(old) and sum(len(b) for _, b in new) < sum(len(b) for _, b in old)
    expected = tables_of_quality(QUALITY)
    assert expected != tables_of_quality(90)
    for name, data in new:
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= MAX_SIDE, name
        assert image.quantization == expected, name
        assert not image.info.get("progressive")

    verified = subprocess.run([sys.executable, "-m", "shard_tools.verify", str(out), "--quiet"], capture_output=True,
                              text=True, timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "bad" not in verified.stdout.replace("bad 0", "") and "train: checked" in verified.stdout

    run = tmp_path / "run"
    train(out, run, "epochs=1")
    assert any("loss" in r for r in records(run))
    labels_new = sorted(int(c) for tar in sorted((out / "train").glob("*.tar"))
                        for _, c in iter_components(tar, tar.with_suffix(".idx"), "cls"))
    labels_old = sorted(int(c) for tar in sorted((sample_shards / "train").glob("*.tar"))
                        for _, c in iter_components(tar, tar.with_suffix(".idx"), "cls"))
    assert labels_new == labels_old


def test_reencode_from_s3_shards_to_s3_and_resume(sample_shards, s3_bucket, tmp_path):
    from dali_imagenet.s3 import client

    upload_folder(sample_shards, s3_bucket, "imagenet-shards")
    source, target = f"s3://{s3_bucket}/imagenet-shards", f"s3://{s3_bucket}/imagenet-shards-q80"
    first = cli(source, target, "--reencode", "--quality", QUALITY, "--max-side", MAX_SIDE, "--split", "validation",
                "--shard-size", 8)
    s3 = client()
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="imagenet-shards-q80/manifest.json")["Body"].read())
    assert manifest["complete"] and manifest["source"]["shards"] == source and manifest["options"]["reencode"]
    shard = manifest["splits"]["validation"]["shards"][0]["name"]
    tar = s3.get_object(Bucket=s3_bucket, Key=f"imagenet-shards-q80/{shard}")["Body"].read()
    local = tmp_path / "one"
    local.mkdir()
    (local / "a.tar").write_bytes(tar)
    (local / "a.idx").write_bytes(
        s3.get_object(Bucket=s3_bucket, Key=f"imagenet-shards-q80/{shard[:-4]}.idx")["Body"].read())
    for _, data in iter_components(local / "a.tar", local / "a.idx"):
        image = Image.open(io.BytesIO(data))
        assert max(image.size) <= MAX_SIDE and image.quantization == tables_of_quality(QUALITY)
    again = cli(source, target, "--reencode", "--quality", QUALITY, "--max-side", MAX_SIDE, "--split", "validation",
                "--shard-size", 8, "--resume")
    chunks = len(manifest["splits"]["validation"]["chunks"])
    assert f"{chunks} chunk(s) kept from an earlier run" in again.stdout and "0 images in" in again.stdout, first.stdout
