"""Finds a split's shards and their DALI index files, wherever the data is.

`data` can be
- a folder written by `shard-imagenet` (its `manifest.json` lists shards and counts),
- an `s3://bucket/prefix` holding the same (DALI reads s3:// tar and index paths itself),
- a folder of shards in the public `timm/imagenet-1k-wds` layout, with no index files: the
  indices are built once into a cache folder (DALI would otherwise scan every tar at start).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dali_imagenet import s3

MANIFEST = "manifest.json"


class ShardError(Exception):
    """A shard or data folder cannot be read; the message names it."""


@dataclass(frozen=True)
class SplitShards:
    tars: list[str]
    indices: list[str]
    samples: int
    num_classes: int


def find_shards(data: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None) -> SplitShards:
    data = str(data)
    if s3.is_s3(data):
        return _from_s3(data, split)
    root = Path(data)
    if not root.is_dir():
        raise ShardError(f"{root}: no such data folder")
    if (root / MANIFEST).is_file():
        return _from_manifest(json.loads((root / MANIFEST).read_text()), split, str(root), check_local=True)
    return _from_timm_layout(root, split, Path(cache_dir) if cache_dir else _default_cache())


def _from_manifest(manifest: dict, split: str, base: str, check_local: bool) -> SplitShards:
    where = f"{base}/{MANIFEST}"
    if not manifest.get("complete"):
        raise ShardError(f"{where}: the conversion did not finish (run shard-imagenet again with --resume)")
    info = manifest.get("splits", {}).get(split)
    if info is None:
        raise ShardError(f"{where}: no split {split!r} (has {', '.join(manifest.get('splits', {}))})")
    tars = [f"{base}/{s['name']}" for s in info["shards"]]
    indices = [t[: -len(".tar")] + ".idx" for t in tars]
    if check_local:
        for shard, tar, idx in zip(info["shards"], tars, indices):
            _check_local_shard(Path(tar), Path(idx), shard["bytes"])
    if not manifest.get("classes"):
        raise ShardError(f"{where}: no class names (the source had no ClassLabel metadata)")
    return SplitShards(tars, indices, info["samples"], len(manifest["classes"]))


def _check_local_shard(tar: Path, idx: Path, expected_bytes: int | None) -> None:
    """Catches a truncated tar or a missing index before DALI would fail (or read garbage) mid-epoch."""
    if not tar.is_file():
        raise ShardError(f"{tar}: shard is missing")
    if not idx.is_file():
        raise ShardError(f"{idx}: index file is missing for shard {tar.name}")
    size = tar.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise ShardError(f"{tar}: shard is {size} bytes, the manifest says {expected_bytes} (truncated or replaced?)")
    last = idx.read_text().rstrip("\n").rsplit("\n", 1)[-1].split()
    try:
        end = max(int(last[i + 1]) + int(last[i + 2]) for i in range(0, len(last), 4))
    except (ValueError, IndexError):
        raise ShardError(f"{idx}: not a DALI webdataset index") from None
    if end > size:
        raise ShardError(f"{tar}: shard is truncated ({size} bytes, its index points to byte {end})")


def _from_s3(url: str, split: str) -> SplitShards:
    bucket, prefix = s3.split_s3_url(url)
    try:
        body = s3.client().get_object(Bucket=bucket, Key=s3.join_key(prefix, MANIFEST))["Body"].read()
    except Exception as error:
        raise ShardError(f"{url}/{MANIFEST}: cannot read ({str(error).splitlines()[0][:200]})") from None
    return _from_manifest(json.loads(body), split, url.rstrip("/"), check_local=False)


TIMM_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val")}


def _from_timm_layout(root: Path, split: str, cache: Path) -> SplitShards:
    from shard_tools.tarwriter import index_existing_tar

    names = TIMM_SPLIT_NAMES.get(split, (split,))
    pattern = re.compile(rf"-(?:{'|'.join(names)})-\d+\.tar$")
    tars = sorted(p for folder in (root, *(root / n for n in names)) if folder.is_dir()
                  for p in folder.glob("*.tar") if pattern.search(p.name))
    if not tars:
        raise ShardError(f"{root}: no {MANIFEST} and no *-{names[0]}-NNNN.tar shards (timm/imagenet-1k-wds layout)")
    indices, samples = [], 0
    for tar in tars:
        stat = tar.stat()
        # Keyed by path, size and mtime: a replaced shard gets a new index.
        tag = hashlib.sha256(f"{tar.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        idx = cache / f"{tar.stem}-{tag}.idx"
        if not idx.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            try:
                index_existing_tar(tar, idx)
            except Exception as error:
                raise ShardError(f"{tar}: cannot index this shard ({error})") from None
        indices.append(str(idx))
        samples += int(idx.read_text().split("\n", 1)[0].split()[1])
    classes_file = root / "classes.tsv"
    num_classes = 1000 if not classes_file.is_file() else len(classes_file.read_text().splitlines()) - 1
    return SplitShards([str(t) for t in tars], indices, samples, num_classes)


def _default_cache() -> Path:
    return Path(os.environ.get("DALI_IMAGENET_CACHE", Path.home() / ".cache" / "dali_imagenet")) / "wds-index"


def find_undecodable(shards: SplitShards, time_limit_s: float = 60.0) -> str | None:
    """Names the first sample whose JPEG does not decode, scanning local shards for at most
    `time_limit_s`: DALI's decoder errors do not say which file failed."""
    import time

    from shard_tools.images import Rejected, prepare_image

    deadline = time.monotonic() + time_limit_s
    for tar, idx in zip(shards.tars, shards.indices):
        if s3.is_s3(tar):
            return None
        with open(tar, "rb") as data:
            for line in Path(idx).read_text().splitlines()[1:]:
                fields = line.split()
                for ext, offset, size, name in zip(*[iter(fields)] * 4):
                    if ext != "jpg":
                        continue
                    data.seek(int(offset))
                    try:
                        prepare_image(data.read(int(size)))
                    except Rejected as why:
                        return f"{tar}: sample {name} is {why}"
                if time.monotonic() > deadline:
                    return None
    return None
