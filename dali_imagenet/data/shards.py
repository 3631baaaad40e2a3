"""Finds a split's shards, their DALI index files and their sample counts, wherever the data is.

`data` can be
- a folder written by `shard-imagenet` (its `manifest.json` lists shards and counts),
- an `s3://bucket/prefix` holding the same (DALI reads s3:// tar and index paths itself),
- a folder or s3:// prefix of shards in the public `timm/imagenet-1k-wds` layout, with no index
  files: the indices are built once per shard version into a cache folder (DALI would otherwise
  scan every tar at start; on S3 that is one download of each tar, once), the same cache
  `verify-shards` fills.
Everything a loader needs to know before it reads an image (sample counts, classes) is here,
so no pipeline is built just to ask.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dali_imagenet import s3
from dali_imagenet.data.shardformat import (
    CLASSES_TSV,
    MANIFEST,
    STAGING_RECORD,
    FormatError,
    index_end,
    index_existing_tar,
    index_keys,
    index_name,
    index_sample_count,
    iter_components,
    parse_classes_tsv,
    parse_index,
    parse_manifest,
    split_entry,
)
from dali_imagenet.errors import DaliImagenetError


class ShardError(DaliImagenetError):
    """A shard or data folder cannot be read; the message names it."""


@dataclass(frozen=True)
class SplitShards:
    tars: tuple[str, ...]
    indices: tuple[str, ...]
    counts: tuple[int, ...]  # samples in each shard
    class_names: tuple[str, ...]
    root: str = ""  # the data folder or s3:// prefix they were found in (what `verify-shards` takes)
    layout: str = "manifest"  # "manifest" (shard-imagenet's) or "timm" (tars only, indices in the cache)
    unlabelled: int = 0  # samples with label -1 (ImageNet's test split); 0 where no manifest says
    split: str = ""

    def repair_hint(self) -> str:
        """What to run about a sample that does not decode (the loaders' one line ends with it)."""
        root = self.root or os.path.dirname(self.tars[0])
        if self.layout == "manifest":
            return f"drop it from the shards with: verify-shards {root} --repair --split {self.split}"
        return (f"list every such sample with: verify-shards {root} (a timm-layout set has no manifest to repair: "
                f"convert it with shard-imagenet)")

    def require_labels(self, purpose: str) -> None:
        """One line, if this split's samples carry no labels (-1): fine to predict, not to `purpose`."""
        if self.unlabelled:
            raise ShardError(f"{self.root}: split {self.split} has {self.unlabelled} unlabelled samples (label -1, "
                             f"as in ImageNet's test split): it cannot be used for {purpose}; predict on it with "
                             f"predict.py --data {self.root} --split {self.split}")

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def reordered(self, order) -> SplitShards:
        """The same shards in another order (a new order every epoch)."""
        return SplitShards(*(tuple(column[i] for i in order) for column in (self.tars, self.indices, self.counts)),
                           self.class_names, self.root, self.layout, self.unlabelled, self.split)


def find_shards(data: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None, *,
                staging: bool = False) -> SplitShards:
    """`staging`: the caller reads the folder while its tars are being staged (and waits for each,
    `staging.Landing`); otherwise a staged copy with tars not yet fetched is refused in one line."""
    data = str(data)
    if s3.is_s3(data):
        return _from_s3(data, split, cache_dir)
    root = Path(data)
    if not root.is_dir():
        raise ShardError(f"{root}: no such data folder")
    if not staging:
        _refuse_pending(root)
    if (root / MANIFEST).is_file():
        return _from_manifest((root / MANIFEST).read_text(), split, str(root), check_local=True)
    return _from_timm_layout(root, split, Path(cache_dir) if cache_dir else default_index_cache())


def _refuse_pending(root: Path) -> None:
    """A staging cut short (a reclaim, a kill) leaves zero-filled placeholders beside its manifest."""
    try:
        record = json.loads((root / STAGING_RECORD).read_text())
    except (OSError, ValueError):
        return
    pending = sorted(name for name, entry in record.items() if isinstance(entry, dict) and entry.get("pending"))
    if pending:
        raise ShardError(f"{root}: a staged copy not yet complete ({len(pending)} tars not fetched, e.g. "
                         f"{pending[0]}): train.py with the same --stage-dir fetches the rest, or stage-shards")


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
                       tuple(manifest["classes"]), base, unlabelled=info.get("unlabelled", 0), split=split)


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


def _from_s3(url: str, split: str, cache_dir=None) -> SplitShards:
    bucket, prefix = s3.split_s3_url(url)
    try:
        body = s3.client().get_object(Bucket=bucket, Key=s3.join_key(prefix, MANIFEST))["Body"].read()
    except Exception as error:
        if s3.is_missing(error):  # no manifest: the public timm layout, perhaps
            return _from_timm_layout(url.rstrip("/"), split, Path(cache_dir) if cache_dir else default_index_cache())
        raise ShardError(f"{url}/{MANIFEST}: cannot read ({s3.reason(error)})") from None
    return _from_manifest(body, split, url.rstrip("/"), check_local=False)


TIMM_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


@dataclass(frozen=True)
class TimmTar:
    """A shard of a timm-layout set (no manifest, no index beside it) and its index in the cache."""
    location: str  # a local path, or s3://bucket/key
    name: str  # relative to the set's root, e.g. imagenet1k-train-0003.tar
    index: Path  # in the index cache, keyed by what identifies this version of the tar

    @property
    def indexed(self) -> bool:
        return self.index.is_file()

    def make_index(self, local_tar: str | Path) -> int:
        """Indexes the tar (a local copy of it) into the cache; its sample count. Files that are
        no sample's (LICENSE, dotfiles) are left out, as DALI's wds2idx does."""
        self.index.parent.mkdir(parents=True, exist_ok=True)
        try:
            return index_existing_tar(local_tar, self.index)[0]
        except Exception as error:
            raise ShardError(f"{self.location}: cannot index this shard ({error})") from None


def is_timm_tar(name: str, split: str) -> bool:
    """Whether `name` (relative to a timm-layout set's root) is one of `split`'s tars:
    `*-<split>-NNNN.tar` at the root or in a `<split>/` folder."""
    names = TIMM_SPLIT_NAMES.get(split, (split,))
    folder, _, base = name.rpartition("/")
    return bool(re.search(rf"-(?:{'|'.join(names)})-\d+\.tar$", base)) and folder in ("", *names)


def timm_tars(root: str, split: str, cache: Path) -> list[TimmTar]:
    """The split's tars of a timm-layout set (`*-<split>-NNNN.tar` at the root or in `<split>/`),
    local or under an s3:// prefix, each with its index's place in the cache: keyed by path, size
    and mtime locally, by URL, size and ETag on S3, so a replaced shard gets a new index."""
    names = TIMM_SPLIT_NAMES.get(split, (split,))
    found: list[tuple[str, str, str]] = []  # (location, name, identity)
    if s3.is_s3(root):
        bucket, prefix = s3.split_s3_url(root)
        folder = f"{prefix}/" if prefix else ""
        pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"][len(folder):]
                    if is_timm_tar(name, split):
                        found.append((f"s3://{bucket}/{item['Key']}", name, f"{item['Size']}:{item['ETag']}"))
        except Exception as error:
            raise ShardError(f"{root}: cannot list ({s3.reason(error)})") from None
    else:
        base = Path(root)
        for path in sorted(p for folder in (base, *(base / n for n in names)) if folder.is_dir()
                           for p in folder.glob("*.tar") if is_timm_tar(p.name, split)):
            stat = path.stat()
            found.append(
                (str(path), str(path.relative_to(base)), f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
            )
    tars = []
    for location, name, identity in sorted(found, key=lambda item: item[1]):
        tag = hashlib.sha256(f"{location}:{identity}".encode()).hexdigest()[:16]
        tars.append(TimmTar(location, name, cache / f"{Path(name).stem}-{tag}.idx"))
    return tars


def timm_classes(root: str) -> tuple[str, ...]:
    """The set's classes.tsv if it has one, else ImageNet-1K's (the public shards carry none)."""
    text = None
    if s3.is_s3(root):
        bucket, prefix = s3.split_s3_url(root)
        try:
            text = s3.client().get_object(Bucket=bucket, Key=s3.join_key(prefix, CLASSES_TSV))["Body"].read().decode()
        except Exception as error:
            if not s3.is_missing(error):
                raise ShardError(f"{root}/{CLASSES_TSV}: cannot read ({s3.reason(error)})") from None
    elif (Path(root) / CLASSES_TSV).is_file():
        text = (Path(root) / CLASSES_TSV).read_text()
    if text is None:
        from dali_imagenet.data.classes import imagenet1k

        return tuple(names for _, names in imagenet1k())
    try:
        return tuple(parse_classes_tsv(text, f"{root}/{CLASSES_TSV}"))
    except FormatError as error:
        raise ShardError(str(error)) from None


def _from_timm_layout(root: Path | str, split: str, cache: Path) -> SplitShards:
    tars = timm_tars(str(root), split, cache)
    if not tars:
        raise ShardError(f"{root}: no {MANIFEST} and no *-{TIMM_SPLIT_NAMES.get(split, (split,))[0]}-NNNN.tar shards "
                         f"(timm/imagenet-1k-wds layout)")
    for tar in tars:
        if not tar.indexed:  # once per shard version: DALI would otherwise scan every tar at every start
            if s3.is_s3(tar.location):
                with tempfile.TemporaryDirectory(prefix="dali-imagenet-index-") as folder:
                    local = Path(folder) / "shard.tar"
                    s3.download(*tar.location.rsplit("/", 1), local)
                    tar.make_index(local)
            else:
                tar.make_index(tar.location)
    return SplitShards(tuple(t.location for t in tars), tuple(str(t.index) for t in tars),
                       tuple(index_sample_count(t.index) for t in tars), timm_classes(str(root)), str(root), "timm",
                       split=split)


def default_index_cache() -> Path:
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


def _index_text(location: str) -> str:
    if not s3.is_s3(location):
        return Path(location).read_text()
    bucket, key = s3.split_s3_url(location)
    try:
        return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except Exception as error:
        raise ShardError(f"{location}: cannot read ({s3.reason(error)})") from None


def sample_locations(shards: SplitShards) -> list[tuple[str, str, dict[str, tuple[int, int]]]]:
    """(tar, key, {ext: (offset, size)}) of every sample, in the reading order of an unshuffled
    loader (validation): shard by shard, as each index lists them."""
    rows = []
    for tar, idx in zip(shards.tars, shards.indices):
        try:
            samples = parse_index(_index_text(idx), idx)
        except FormatError as error:
            raise ShardError(str(error)) from None
        for key, sample in zip(index_keys(samples), samples):
            rows.append((tar, key, {ext: (offset, size) for ext, offset, size, _ in sample}))
    return rows


def read_components(shards: SplitShards, keys: list[str], ext: str = "jpg") -> dict[str, bytes]:
    """The `ext` bytes of the samples `keys` names, and only those bytes: a seek per sample in a
    local tar, a ranged GET per sample on S3."""
    wanted = set(keys)
    found = {}
    for tar, key, components in sample_locations(shards):
        if key not in wanted or ext not in components:
            continue
        offset, size = components[ext]
        if s3.is_s3(tar):
            bucket, object_key = s3.split_s3_url(tar)
            try:
                found[key] = s3.client().get_object(Bucket=bucket, Key=object_key,
                                                    Range=f"bytes={offset}-{offset + size - 1}")["Body"].read()
            except Exception as error:
                raise ShardError(f"{tar}: cannot read sample {key} ({s3.reason(error)})") from None
        else:
            with open(tar, "rb") as data:
                data.seek(offset)
                found[key] = data.read(size)
    return found
