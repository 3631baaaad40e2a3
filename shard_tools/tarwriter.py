"""A webdataset tar writer that writes DALI's index file as it goes, with no second pass.

Tar headers carry fixed metadata (mtime 0, uid/gid 0, mode 0644, no user names), so the same
samples in the same order always give the same bytes. The index is DALI's `wds2idx` format v1.2:
a line `v1.2 <samples>`, then per sample `<ext> <data offset> <size> <member name>` for each of
its components, in tar order.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

INDEX_VERSION = "v1.2"


class ShardWriter:
    """Writes one shard: `tar_path` and its DALI index `idx_path`.

    Use as a context manager; `add(key, {ext: bytes})` appends one sample. The files are written
    as given (callers pass temporary names and rename when complete).
    """

    def __init__(self, tar_path: str | Path, idx_path: str | Path):
        self.tar_path, self.idx_path = Path(tar_path), Path(idx_path)
        self._file = open(self.tar_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self._index_lines: list[str] = []
        self.samples = 0

    def add(self, key: str, components: dict[str, bytes]) -> None:
        if "." in key or "/" in key or " " in key:
            raise ValueError(f"sample key {key!r} must not contain '.', '/' or spaces")
        entries = []
        for ext, payload in components.items():
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(payload))
            # tarfile's offset is now past the data's 512-byte padding; the data starts right
            # before it. This holds for long names too (GNU long-name blocks precede the header).
            data_offset = self._tar.offset - _padded(len(payload))
            entries.append((ext, data_offset, len(payload), name))
        self._index_lines.append(index_line(entries))
        self.samples += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        with open(self.idx_path, "w") as idx:
            idx.write(f"{INDEX_VERSION} {self.samples}\n")
            idx.writelines(line + "\n" for line in self._index_lines)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def index_line(components: list[tuple[str, int, int, str]]) -> str:
    """One sample's line of a DALI index: `ext offset size name` for each component."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components)


def index_existing_tar(tar_path: str | Path, idx_path: str | Path) -> int:
    """Writes the DALI index of a tar made elsewhere (e.g. the public timm shards); returns samples.

    Same grouping as `wds2idx`: consecutive members with the same key (the name up to the
    basename's first dot) form one sample; non-regular members are skipped.
    """
    lines: list[str] = []
    current_key, components = None, []
    with tarfile.open(tar_path, "r:") as archive:
        for member in archive:
            if not member.isreg():
                continue
            base = member.name.rfind("/") + 1
            dot = member.name.find(".", base)
            key, ext = member.name[:dot], member.name[dot + 1:]
            if not key or key.endswith("/"):
                continue
            if key != current_key and components:
                lines.append(index_line(components))
                components = []
            current_key = key
            components.append((ext, member.offset_data, member.size, member.name))
    if components:
        lines.append(index_line(components))
    if not lines:
        raise ValueError(f"{tar_path}: no samples in this tar")
    tmp = Path(str(idx_path) + ".tmp")
    tmp.write_text(f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines))
    os.replace(tmp, idx_path)
    return len(lines)


def _padded(size: int) -> int:
    return (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
