"""Finds a split's shards, their DALI index files and their sample counts, wherever the data is.

`data` can be
- a folder written by `shard-imagenet` (its `manifest.json` lists shards and counts),
- an `s3://bucket/prefix` holding the same (DALI reads s3:// tar and index paths itself),
- a folder of shards in the public `timm/imagenet-1k-wds` layout, with no index files: the
  indices are built once into a cache folder (DALI would otherwise scan every tar at start).
Everything a loader needs to know before it reads an image (sample counts, classes) is here,
so no pipeline is built just to ask.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from dali_imagenet import s3
from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.shardformat import (CLASSES_TSV, MANIFEST, FormatError, index_end, index_existing_tar,
                                       index_name, index_sample_count, iter_components, parse_classes_tsv,
                                       parse_index, parse_manifest, split_entry)


class ShardError(DaliImagenetError):
    """A shard or data folder cannot be read; the message names it."""


@dataclass(frozen=True)
class SplitShards:
    tars: tuple[str, ...]
    indices: tuple[str, ...]
    counts: tuple[int, ...]  # samples in each shard
    class_names: tuple[str, ...]
    root: str = ""  # the data folder or s3:// prefix they were found in (what `verify-shards` takes)

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def reordered(self, order) -> "SplitShards":
        """The same shards in another order (a new order every epoch)."""
        return SplitShards(*(tuple(column[i] for i in order) for column in (self.tars, self.indices, self.counts)),
                           self.class_names, self.root)


def find_shards(data: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None) -> SplitShards:
    data = str(data)
    if s3.is_s3(data):
        return _from_s3(data, split)
    root = Path(data)
    if not root.is_dir():
        raise ShardError(f"{root}: no such data folder")
    if (root / MANIFEST).is_file():
        return _from_manifest((root / MANIFEST).read_text(), split, str(root), check_local=True)
    return _from_timm_layout(root, split, Path(cache_dir) if cache_dir else _default_cache())


def _from_manifest(text: str | bytes, split: str, base: str, check_local: bool) -> SplitShards:
    where = f"{base}/{MANIFEST}"
    try:
        manifest = parse_manifest(text, where)
        info = split_entry(manifest, split, where)
    except FormatError as error:
        raise ShardError(str(error)) from None
    tars = tuple(f"{base}/{s['name']}" for s in info["shards"])
    if check_local:
        for shard, tar in zip(info["shards"], tars):
            _check_local_shard(Path(tar), Path(index_name(tar)), shard["bytes"], shard["samples"])
    return SplitShards(tars, tuple(map(index_name, tars)), tuple(s["samples"] for s in info["shards"]),
                       tuple(manifest["classes"]), base)


def _check_local_shard(tar: Path, idx: Path, expected_bytes: int | None, expected_samples: int) -> None:
    """Catches a truncated tar or a missing index before DALI would fail (or read garbage) mid-epoch."""
    if not tar.is_file():
        raise ShardError(f"{tar}: shard is missing")
    if not idx.is_file():
        raise ShardError(f"{idx}: index file is missing for shard {tar.name}")
    size = tar.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise ShardError(f"{tar}: shard is {size} bytes, the manifest says {expected_bytes} (truncated or replaced?)")
    try:
        samples = parse_index(idx.read_text(), str(idx))
    except FormatError as error:
        raise ShardError(str(error)) from None
    if len(samples) != expected_samples:
        raise ShardError(f"{idx}: lists {len(samples)} samples, the manifest says {expected_samples} (an interrupted "
                         f"`verify-shards --repair`? run it again)")
    end = index_end(samples)
    if end > size:
        raise ShardError(f"{tar}: shard is truncated ({size} bytes, its index points to byte {end})")


def _from_s3(url: str, split: str) -> SplitShards:
    bucket, prefix = s3.split_s3_url(url)
    try:
        body = s3.client().get_object(Bucket=bucket, Key=s3.join_key(prefix, MANIFEST))["Body"].read()
    except Exception as error:
        raise ShardError(f"{url}/{MANIFEST}: cannot read ({s3.reason(error)})") from None
    return _from_manifest(body, split, url.rstrip("/"), check_local=False)


TIMM_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val")}


def _from_timm_layout(root: Path, split: str, cache: Path) -> SplitShards:
    names = TIMM_SPLIT_NAMES.get(split, (split,))
    pattern = re.compile(rf"-(?:{'|'.join(names)})-\d+\.tar$")
    tars = sorted(p for folder in (root, *(root / n for n in names)) if folder.is_dir()
                  for p in folder.glob("*.tar") if pattern.search(p.name))
    if not tars:
        raise ShardError(f"{root}: no {MANIFEST} and no *-{names[0]}-NNNN.tar shards (timm/imagenet-1k-wds layout)")
    indices, counts = [], []
    for tar in tars:
        stat = tar.stat()
        # Keyed by path, size and mtime: a replaced shard gets a new index.
        tag = hashlib.sha256(f"{tar.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        idx = cache / f"{tar.stem}-{tag}.idx"
        if not idx.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            try:
                index_existing_tar(tar, idx)  # files that are no sample's (LICENSE, dotfiles) are left out
            except Exception as error:
                raise ShardError(f"{tar}: cannot index this shard ({error})") from None
        indices.append(str(idx))
        counts.append(index_sample_count(idx))
    classes_file = root / CLASSES_TSV
    if classes_file.is_file():
        try:
            class_names = parse_classes_tsv(classes_file.read_text(), str(classes_file))
        except FormatError as error:
            raise ShardError(str(error)) from None
    else:  # the public shards carry no class list: they are ImageNet-1K's
        from dali_imagenet.classes import imagenet1k

        class_names = [names for _, names in imagenet1k()]
    return SplitShards(tuple(map(str, tars)), tuple(indices), tuple(counts), tuple(class_names), str(root))


def _default_cache() -> Path:
    return Path(os.environ.get("DALI_IMAGENET_CACHE", Path.home() / ".cache" / "dali_imagenet")) / "wds-index"


def find_undecodable(shards: SplitShards, time_limit_s: float = 60.0) -> str | None:
    """Names the first sample whose JPEG does not decode completely, scanning local shards for at
    most `time_limit_s`: DALI's decoder errors do not say which file failed."""
    import io

    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must fail, not decode to grey rows
    deadline = time.monotonic() + time_limit_s
    for tar, idx in zip(shards.tars, shards.indices):
        if s3.is_s3(tar):
            return None
        for name, jpeg in iter_components(tar, idx, "jpg"):
            try:
                Image.open(io.BytesIO(jpeg)).load()
            except Exception as error:  # PIL raises many types for bad data
                reason = str(error).splitlines()[0].split(" <_io.BytesIO")[0][:120]  # PIL names its buffer
                return f"{tar}: sample {name} is undecodable ({reason})"
            if time.monotonic() > deadline:
                return None
    return None
