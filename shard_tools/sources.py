"""Input datasets: the Hugging Face hub's parquet files (a local copy, or read from the Hub by byte
range: `shard_tools.hub`), an ImageFolder tree, or shards this tool wrote (a folder or an s3://
prefix with a complete manifest.json: re-encoded into a new set without the Hub).

A source is cut into *units* that can be read independently and cheaply: a parquet row group
(~100 rows in the hub's files, so memory stays bounded), one ImageFolder file or one shard (the
samples its index lists). Rows are numbered
in a canonical order (sorted files, row groups, rows) so that every run sees the same input.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq

from dali_imagenet import s3
from dali_imagenet.data.classes import imagenet1k
from dali_imagenet.data.shardformat import MANIFEST, FormatError, index_name, parse_index, parse_manifest
from dali_imagenet.errors import DaliImagenetError
from shard_tools import hub

SPLITS = ("train", "validation", "test")
IMAGEFOLDER_SPLIT_DIRS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}
PARQUET_NAME = re.compile(r"^(?P<split>train|validation|test)[-_].*\.parquet$")
SYNSET_IN_PATH = re.compile(r"(?:^|[_/])([a-z]\d{8})(?:[._/]|$)")


class SourceError(DaliImagenetError):
    """Bad input; the message is one line naming the file and what is wrong."""


@dataclass(frozen=True)
class Unit:
    file: str  # a local path, or hf://datasets/OWNER/NAME@SHA/PATH
    row_group: int | None  # None: the whole file is one image (ImageFolder)
    rows: int
    first_index: int  # canonical index of the unit's first row within its split
    label: int | None = None  # ImageFolder: from the class folder
    file_row: int = 0  # parquet: index of the unit's first row within its file
    shard: bool = False  # `file` is a shard (a local path or s3:// URL) with its index beside it


@dataclass
class Record:
    index: int  # canonical row index within the split
    path: str  # the source's name for the image (hub: image.path; ImageFolder: relative path)
    label: int | None
    data: bytes | None
    origin: str  # where the row is, for error messages: file[:row]


@dataclass
class SplitSource:
    name: str
    units: list[Unit]
    rows: int


@dataclass
class Source:
    kind: str  # "parquet" | "imagefolder" | "hub" | "shards"
    root: Path | str  # a folder, or the hf:// URL
    splits: dict[str, SplitSource]
    class_names: list[str]
    synsets: list[str | None]
    fingerprint: str
    details: dict = field(default_factory=dict)  # recorded in the manifest (the Hub: repo, commit, files)
    footers: dict = field(default_factory=dict)  # the Hub: each file's parquet footer, read once, for the workers


def imagenet_classes() -> dict[str, tuple[int, str]]:
    """synset -> (index, names) for the 1000 ImageNet-1K classes."""
    return {synset: (index, names) for index, (synset, names) in enumerate(imagenet1k())}


def open_source(source: str | Path, splits: tuple[str, ...]) -> Source:
    """A folder of parquet files or an ImageFolder tree, a Hub dataset (hf://datasets/OWNER/NAME),
    or shards of ours (a folder or s3:// prefix holding manifest.json)."""
    if hub.is_hub(str(source)):
        return _open_hub(str(source), splits)
    if s3.is_s3(str(source)) or (Path(source) / MANIFEST).is_file():
        return _open_shards(str(source).rstrip("/"), splits)
    root = Path(source)
    if not root.exists():
        raise SourceError(f"{root}: no such file or folder")
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder (give the folder that holds the parquet files or train/ and val/)")
    parquet_dir = root / "data" if any((root / "data").glob("*.parquet")) else root
    if any(parquet_dir.glob("*.parquet")):
        files = [ParquetInput(str(p), p.name, p.stat().st_size) for p in sorted(parquet_dir.glob("*.parquet"))]
        return _open_parquet(parquet_dir, _by_split(parquet_dir, files, splits), _local_footer)
    if any((root / d).is_dir() for names in IMAGEFOLDER_SPLIT_DIRS.values() for d in names):
        return _open_imagefolder(root, splits)
    raise SourceError(f"{root}: holds no parquet files (data/*.parquet) and no ImageFolder tree (train/<class>/*.JPEG)")


@dataclass(frozen=True)
class ParquetInput:
    location: str  # a local path, or hf://datasets/OWNER/NAME@SHA/PATH
    name: str  # the file name: train-00000-of-00294.parquet
    size: int  # bytes


def _open_hub(url: str, splits: tuple[str, ...]) -> Source:
    dataset = hub.open_dataset(url)
    files = [ParquetInput(f.location, PurePosixPath(f.path).name, f.size) for f in dataset.files]
    if not files:
        raise SourceError(f"{url}: holds no parquet files (looked in data/ and the top folder at commit {dataset.sha})")
    by_split = _by_split(url, files, splits)
    wanted = [f.location for split_files in by_split.values() for f in split_files]
    footers = dict(zip(wanted, hub.read_footers(wanted)))
    source = _open_parquet(url, by_split, lambda f: footers[f.location], kind="hub")
    source.details = dataset.describe()
    source.footers = footers
    return source


def _local_footer(file: ParquetInput) -> pq.FileMetaData:
    try:
        return pq.read_metadata(file.location)
    except Exception as error:
        raise SourceError(f"{file.location}: not a readable parquet file ({error})") from None


def _by_split(where: str | Path, files: list[ParquetInput], splits: tuple[str, ...]) -> dict[str, list[ParquetInput]]:
    by_split: dict[str, list[ParquetInput]] = {s: [] for s in SPLITS}
    for file in files:
        match = PARQUET_NAME.match(file.name)
        if match is None:
            raise SourceError(
                f"{file.location}: name does not start with train-, validation- or test- as the hub's files do"
            )
        by_split[match["split"]].append(file)
    wanted = {s: by_split[s] for s in splits if by_split[s]}
    if not wanted:
        raise SourceError(f"{where}: no parquet files for split(s) {', '.join(splits)}")
    return wanted


def _open_parquet(root: Path | str, files_by_split: dict[str, list[ParquetInput]], read_footer,
                  kind: str = "parquet") -> Source:
    """Units (row groups) and the fingerprint, from each file's footer: the same for a local copy
    and the Hub (name, size and rows of each file), so either gives the same shards."""
    class_names: list[str] | None = None
    fingerprint = hashlib.sha256()
    split_sources = {}
    for split, files in files_by_split.items():
        units, rows = [], 0
        for file in files:
            meta = read_footer(file)
            names = _check_schema(file.location, meta.schema.to_arrow_schema())
            if names is not None:
                if class_names is not None and names != class_names:
                    raise SourceError(f"{file.location}: its ClassLabel names differ from the other files'")
                class_names = names
            file_row = 0
            for group in range(meta.num_row_groups):
                group_rows = meta.row_group(group).num_rows
                units.append(Unit(file.location, group, group_rows, rows, file_row=file_row))
                rows += group_rows
                file_row += group_rows
            fingerprint.update(json.dumps([split, file.name, file.size, meta.num_rows]).encode())
        split_sources[split] = SplitSource(split, units, rows)
    known = imagenet_classes()
    if class_names is None:  # a plain pyarrow file without the hub's metadata
        class_names, synsets = [], []
    elif len(class_names) == len(known):
        synsets = sorted(known)
    else:
        synsets = [None] * len(class_names)
    return Source(kind, root, split_sources, class_names, synsets, fingerprint.hexdigest())


def _check_schema(path: str, schema) -> list[str] | None:
    if "image" not in schema.names or "label" not in schema.names:
        raise SourceError(
            f"{path}: wrong schema, expected columns image {{bytes, path}} and label, found {schema.names}"
        )
    image_type = schema.field("image").type
    fields = (
        [image_type.field(i).name for i in range(image_type.num_fields)] if hasattr(image_type, "num_fields") else []
    )
    if "bytes" not in fields:
        raise SourceError(f"{path}: wrong schema, column image is {image_type}, expected struct<bytes, path>")
    metadata = (schema.metadata or {}).get(b"huggingface")
    if metadata is None:
        return None
    try:
        label = json.loads(metadata)["info"]["features"]["label"]
        return list(label["names"]) if label.get("_type") == "ClassLabel" else None
    except (ValueError, KeyError, TypeError):
        raise SourceError(f"{path}: the 'huggingface' schema metadata is not valid JSON with info.features") from None


def _open_imagefolder(root: Path, splits: tuple[str, ...]) -> Source:
    split_dirs = {}
    for split in SPLITS:
        for name in IMAGEFOLDER_SPLIT_DIRS[split]:
            if (root / name).is_dir():
                split_dirs[split] = root / name
                break
    # Class index = sorted class-folder order over all splits, so labels agree between splits.
    synsets = sorted({d.name for folder in split_dirs.values() for d in folder.iterdir() if d.is_dir()})
    if not synsets:
        raise SourceError(f"{root}: the ImageFolder tree has no class folders (expected train/<class>/*.JPEG)")
    label_of = {s: i for i, s in enumerate(synsets)}
    fingerprint = hashlib.sha256()
    split_sources = {}
    for split in splits:
        folder = split_dirs.get(split)
        if folder is None:
            continue
        units = []
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            for file in sorted(p for p in class_dir.rglob("*") if p.is_file()):
                units.append(Unit(str(file), None, 1, len(units), label_of[class_dir.name]))
                fingerprint.update(json.dumps([split, str(file.relative_to(root)), file.stat().st_size]).encode())
        split_sources[split] = SplitSource(split, units, len(units))
    if not split_sources:
        raise SourceError(f"{root}: no folder for split(s) {', '.join(splits)} (expected train/, val/ or test/)")
    known = imagenet_classes()
    names = [known[s][1] if s in known else s for s in synsets]
    return Source("imagefolder", root, split_sources, names, list(synsets), fingerprint.hexdigest())


def _read_bytes(location: str) -> bytes:
    """A local file or an s3:// object, whole."""
    if not s3.is_s3(location):
        try:
            return Path(location).read_bytes()
        except OSError as error:
            raise SourceError(f"{location}: unreadable ({error.strerror})") from None
    bucket, key = s3.split_s3_url(location)
    try:
        return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:  # botocore's many error types: one line with S3's reason
        raise SourceError(f"{location}: cannot read it from S3 ({s3.reason(error)})") from None


def _open_shards(url: str, splits: tuple[str, ...]) -> Source:
    """Shards this tool wrote: one unit per shard, its samples in index order. The new set's
    manifest records which set (and its manifest's options and source) it was made from."""
    where = f"{url}/{MANIFEST}"
    try:
        manifest = parse_manifest(_read_bytes(where), where)
    except FormatError as error:
        raise SourceError(str(error)) from None
    fingerprint = hashlib.sha256()
    split_sources = {}
    for split in splits:
        info = manifest.get("splits", {}).get(split)
        if not info:
            continue
        units = []
        first = 0
        for entry in sorted(info["shards"], key=lambda s: s["name"]):
            units.append(Unit(f"{url}/{entry['name']}", None, entry["samples"], first, shard=True))
            first += entry["samples"]
            fingerprint.update(json.dumps([split, entry["name"], entry["samples"], entry["sha256"]]).encode())
        split_sources[split] = SplitSource(split, units, first)
    if not split_sources:
        raise SourceError(f"{where}: no split {', '.join(splits)} in this shard set")
    details = {"shards": url, "shards_options": manifest.get("options"), "shards_source": manifest.get("source")}
    return Source("shards", url, split_sources, list(manifest["classes"]), list(manifest.get("synsets") or []),
                  fingerprint.hexdigest(), details)


def _read_shard(unit: Unit) -> list[Record]:
    """The samples a shard's index lists (a sample `verify-shards --repair` dropped stays out)."""
    tar = _read_bytes(unit.file)
    samples = parse_index(_read_bytes(index_name(unit.file)).decode(), index_name(unit.file))
    name = PurePosixPath(unit.file).name
    records = []
    for offset, sample in enumerate(samples):
        parts = {ext: tar[start:start + size] for ext, start, size, _ in sample}
        key = sample[0][3].split(".", 1)[0] if sample else str(offset)
        try:
            label = int(parts["cls"])
            meta = json.loads(parts["json"]) if "json" in parts else {}
        except (KeyError, ValueError):
            raise SourceError(f"{unit.file}: sample {key} has no readable .cls / .json") from None
        records.append(Record(unit.first_index + offset, meta.get("path") or key, label, parts.get("jpg"),
                              f"{name}:{key}"))
    return records


def read_unit(unit: Unit, root: Path | str) -> tuple[list[Record], int]:
    """All rows of one unit, with their bytes, and the bytes fetched from the Hub for it (0 for a
    local file or a shard). Memory: one row group (~10 MB in the hub's files), or one shard."""
    if unit.shard:
        return _read_shard(unit), 0
    if unit.row_group is None:
        data = Path(unit.file).read_bytes()
        return [Record(unit.first_index, str(Path(unit.file).relative_to(root)), unit.label, data, unit.file)], 0
    fetched = 0
    if hub.is_hub(unit.file):
        table, fetched = hub.read_row_group(unit.file, unit.row_group, ["image", "label"])
    else:
        try:
            table = pq.ParquetFile(unit.file).read_row_group(unit.row_group, columns=["image", "label"])
        except Exception as error:
            raise SourceError(f"{unit.file}: row group {unit.row_group} unreadable ({error})") from None
    records = []
    for offset, (image, label) in enumerate(zip(table.column("image").to_pylist(), table.column("label").to_pylist())):
        image = image or {}
        records.append(Record(unit.first_index + offset, image.get("path") or "", label, image.get("bytes"),
                              f"{PurePosixPath(unit.file).name}:row {unit.file_row + offset}"))
    return records, fetched


def synset_from_path(path: str) -> str | None:
    match = SYNSET_IN_PATH.search(path)
    return match.group(1) if match else None
