"""The shard format, in one place: what `shard-imagenet` writes and every reader reads.

    OUTPUT/manifest.json                      what was converted, the classes, every shard (below)
    OUTPUT/_info.json                         the same shard list as timm's webdataset reader wants it
    OUTPUT/classes.tsv                        index, synset, names
    OUTPUT/<split>/<name>-<split>-NNNNNN.tar  webdataset shard: <key>.jpg, <key>.cls, <key>.json
    OUTPUT/<split>/<name>-<split>-NNNNNN.idx  its DALI index (the format of DALI's `wds2idx`)

A DALI index is a line `v1.2 <samples>`, then one line per sample, in tar order, with
`<ext> <data offset> <size> <member name>` for each of its components. Tar headers carry fixed
metadata (mtime 0, uid/gid 0, mode 0644), so the same samples always give the same bytes.
Imports nothing but the standard library (and the error base): the converter and the loaders both build on it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from dali_imagenet.atomic import write_atomic
from dali_imagenet.errors import DaliImagenetError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
TIMM_INFO = "_info.json"
CLASSES_TSV = "classes.tsv"
# A staged copy's record (staging.py): {name: {bytes, mtime_ns, check}}: verified (a tar: landed);
# {"pending": true}: a placeholder not yet fetched (a staging while training, or one cut short)
STAGING_RECORD = ".staged.json"
INDEX_VERSION = "v1.2"


class FormatError(DaliImagenetError):
    """A manifest or index that is not what this module writes; the message names the file."""


def shard_name(prefix: str, split: str, number: int) -> str:
    return f"{split}/{prefix}-{split}-{number:06d}.tar"


def index_name(tar: str) -> str:
    """The DALI index beside a shard: `x.tar` -> `x.idx`."""
    return tar[: -len(".tar")] + ".idx" if tar.endswith(".tar") else tar + ".idx"


# ---- DALI index files

def index_line(components: list[tuple[str, int, int, str]]) -> str:
    """One sample's line: `ext offset size name` for each component."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components)


def index_text(lines: list[str]) -> str:
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def sample_key(member_name: str) -> str | None:
    """A tar member's sample key (the name up to its basename's first dot), or None for a file
    that is no sample's component: no extension (`LICENSE`), a dotfile, macOS's `__MACOSX/`."""
    base = member_name.rfind("/") + 1
    dot = member_name.find(".", base)
    if dot <= base or "__MACOSX" in member_name.split("/"):
        return None
    return member_name[:dot]


def index_keys(samples: list[list[tuple[str, int, int, str]]]) -> list[str]:
    """The sample keys of a parsed index, in tar order."""
    return [sample_key(sample[0][3]) or sample[0][3] for sample in samples]


def index_without(samples: list[list[tuple[str, int, int, str]]], drop: set[str]) -> str:
    """The index text of `samples` less the samples whose keys are in `drop` (the tar stays as it is)."""
    return index_text([index_line(s) for s, key in zip(samples, index_keys(samples)) if key not in drop])


def parse_index(text: str, where: str = "index") -> list[list[tuple[str, int, int, str]]]:
    """Every sample's components as (ext, data offset, size, member name), in tar order."""
    lines = text.splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or not header[0].startswith("v") or not header[1].isdigit():
        raise FormatError(f"{where}: not a DALI webdataset index (first line {lines[0] if lines else ''!r})")
    samples = []
    for number, line in enumerate(lines[1:], 2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise FormatError(f"{where}: line {number} is not `ext offset size name` groups")
        try:
            samples.append([(e, int(o), int(s), n) for e, o, s, n in zip(*[iter(fields)] * 4)])
        except ValueError:
            raise FormatError(f"{where}: line {number} has a non-numeric offset or size") from None
    if len(samples) != int(header[1]):
        raise FormatError(f"{where}: header says {header[1]} samples, the file lists {len(samples)}")
    return samples


def index_sample_count(path: str | Path) -> int:
    """Samples in a shard, from its index's first line alone."""
    with open(path) as f:
        header = f.readline().split()
    if len(header) != 2 or not header[1].isdigit():
        raise FormatError(f"{path}: not a DALI webdataset index")
    return int(header[1])


def index_end(samples: list[list[tuple[str, int, int, str]]]) -> int:
    """The byte just past the last component's data: a shard shorter than this is truncated."""
    return max((offset + size for sample in samples for _, offset, size, _ in sample), default=0)


# ---- writing shards

class ShardWriter:
    """Writes one shard and its DALI index as it goes (no second pass over the tar).

    `add(key, {ext: bytes})` appends one sample; use as a context manager. The paths are written
    as given: callers pass temporary names and rename when complete.
    """

    def __init__(self, tar_path: str | Path, idx_path: str | Path):
        self.tar_path, self.idx_path = Path(tar_path), Path(idx_path)
        self._file = open(self.tar_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self._index_lines: list[str] = []
        self.samples = 0

    def add(self, key: str, components: dict[str, bytes]) -> None:
        if "." in key or "/" in key or " " in key:  # webdataset splits a member name at its first dot
            raise ValueError(f"sample key {key!r} must not contain '.', '/' or spaces")
        entries = []
        for ext, payload in components.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(payload))
            # tarfile's offset is now past the data's 512-byte padding; the data starts right
            # before it. This holds for long names too (GNU long-name blocks precede the header).
            entries.append((ext, self._tar.offset - _padded(len(payload)), len(payload), info.name))
        self._index_lines.append(index_line(entries))
        self.samples += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.idx_path.write_text(index_text(self._index_lines))

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _padded(size: int) -> int:
    return (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


def index_existing_tar(tar_path: str | Path, idx_path: str | Path) -> tuple[int, int]:
    """Writes the DALI index of a tar made elsewhere (e.g. the public timm shards); returns
    (samples, files skipped as no sample's: see `sample_key`).

    Grouped as `wds2idx` groups: consecutive members with the same key (the name up to the
    basename's first dot) form one sample; non-regular members are skipped.
    """
    lines: list[str] = []
    current_key, components = None, []
    skipped = 0
    with tarfile.open(tar_path, "r:") as archive:
        for member in archive:
            if not member.isreg():
                continue
            key = sample_key(member.name)
            if key is None:
                skipped += 1
                continue
            ext = member.name[len(key) + 1:]
            if key != current_key and components:
                lines.append(index_line(components))
                components = []
            current_key = key
            components.append((ext, member.offset_data, member.size, member.name))
    if components:
        lines.append(index_line(components))
    if not lines:
        raise FormatError(f"{tar_path}: no samples in this tar")
    write_atomic(idx_path, index_text(lines))
    return len(lines), skipped


def iter_components(tar: str | Path, idx: str | Path, ext: str = "jpg") -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of each sample's `ext` component in a local shard, read through its index."""
    samples = parse_index(Path(idx).read_text(), str(idx))
    with open(tar, "rb") as data:
        for sample in samples:
            for component_ext, offset, size, name in sample:
                if component_ext == ext:
                    data.seek(offset)
                    yield name, data.read(size)


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def file_digest(path: str | Path, algorithm: str, chunk: int = 1 << 22) -> str:
    """The hex digest of a file, read in chunks (hashlib lets other threads run meanwhile)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- the manifest

def parse_manifest(text: str | bytes, where: str) -> dict:
    """A finished manifest, checked for what the readers rely on."""
    try:
        manifest = json.loads(text)
    except ValueError:
        raise FormatError(f"{where}: not valid JSON") from None
    if not isinstance(manifest, dict) or "splits" not in manifest:
        raise FormatError(f"{where}: not a shard-imagenet manifest (no 'splits')")
    if manifest.get("version", MANIFEST_VERSION) > MANIFEST_VERSION:
        raise FormatError(f"{where}: manifest version {manifest['version']} is newer than this reader's "
                          f"{MANIFEST_VERSION}; update dali-imagenet")
    if not manifest.get("complete"):
        raise FormatError(f"{where}: the conversion did not finish (run shard-imagenet again with --resume)")
    if not manifest.get("classes"):
        raise FormatError(f"{where}: no class names (the source had no ClassLabel metadata)")
    for split, info in manifest["splits"].items():
        for shard in info.get("shards", []) if isinstance(info, dict) else ():
            name = str(shard.get("name", "")) if isinstance(shard, dict) else ""
            parts = PurePosixPath(name).parts
            if not name.endswith(".tar") or name.startswith("/") or ".." in parts or "\\" in name:
                # readers open these and a repair rewrites their indices: only files under the set's own folder
                raise FormatError(f"{where}: split {split!r} names shard {name!r}, not a .tar under the set's folder")
    return manifest


def split_entry(manifest: dict, split: str, where: str) -> dict:
    info = manifest["splits"].get(split)
    if info is None:
        raise FormatError(f"{where}: no split {split!r} (has {', '.join(manifest['splits']) or 'none'})")
    if not info.get("shards"):
        raise FormatError(f"{where}: split {split!r} has no shards")
    return info


def timm_info(manifest: dict, name: str = "imagenet-1k") -> dict:
    """`_info.json` for timm's webdataset reader (`timm.data.create_dataset("wds/...", root=OUTPUT)`):
    per split its name, sample count, shard paths relative to OUTPUT and samples per shard."""
    return {"name": name, "splits": {
        split: {"name": split, "num_samples": info["samples"],
                "filenames": [s["name"] for s in info["shards"]],
                "shard_lengths": [s["samples"] for s in info["shards"]]}
        for split, info in manifest["splits"].items()}}


def classes_tsv(class_names: list[str], synsets: list[str | None] | None) -> str:
    synsets = synsets or [None] * len(class_names)
    return "index\tsynset\tnames\n" + "".join(f"{i}\t{s or ''}\t{n}\n"
                                              for i, (s, n) in enumerate(zip(synsets, class_names)))


def parse_classes_tsv(text: str, where: str) -> list[str]:
    """Class names by index from a `classes.tsv` (the names column)."""
    names = []
    for number, line in enumerate(text.splitlines()[1:], 2):
        fields = line.split("\t")
        if len(fields) < 3 or not fields[0].isdigit() or int(fields[0]) != len(names):
            raise FormatError(f"{where}: line {number} is not `index<TAB>synset<TAB>names` in index order")
        names.append(fields[2])
    return names
