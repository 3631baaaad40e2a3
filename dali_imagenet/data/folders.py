"""Where a command writes, checked before it starts: never into what it reads, never over a folder
it did not write. Each tool names what it writes (`ours`: a test of a relative path); a folder
holding anything else is someone's, and `--overwrite` does not make it the tool's."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePath, PurePosixPath

from dali_imagenet.errors import UsageError


def overlap(output: str | Path, source: str | Path) -> str | None:
    """How `output` and `source` (local paths) overlap: "is", "lies inside" or "contains"; None
    when neither holds the other (symbolic links followed: a link into the source is the source)."""
    out, src = Path(output).resolve(), Path(source).resolve()
    return _how(out, src)


def url_overlap(output: str, source: str) -> str | None:
    """`overlap` for s3:// URLs: by whole key components (`s3://b/shards-q90` is beside
    `s3://b/shards`, not inside it)."""
    def key_path(url: str) -> PurePosixPath:
        return PurePosixPath(url.removeprefix("s3://").rstrip("/"))

    return _how(key_path(output), key_path(source))


def _how(out: PurePath, src: PurePath) -> str | None:
    if out == src:
        return "is"
    if out.is_relative_to(src):
        return "lies inside"
    if src.is_relative_to(out):
        return "contains"
    return None


def refuse_overlap(output: str | Path, source: str | Path, *, output_name: str, source_name: str) -> None:
    """One line, before any work, when the output is, lies inside or contains the input."""
    remote = str(output).startswith("s3://") or str(source).startswith("s3://")
    how = url_overlap(str(output), str(source)) if remote else overlap(output, source)
    if how:
        raise UsageError(f"{output_name} {output} {how} {source_name} {source}: a command never writes into what it "
                         f"reads; choose an output outside it")


def foreign_entries(folder: str | Path, ours: Callable[[str], bool], limit: int = 3) -> list[str]:
    """Up to `limit` paths (relative, '/'-separated) under `folder` that `ours` does not claim:
    files, and folders that `ours` does not claim as a whole (their contents are then not read)."""
    found: list[str] = []
    root = Path(folder)

    def walk(here: Path) -> None:
        for entry in sorted(here.iterdir()):
            name = entry.relative_to(root).as_posix()
            if len(found) >= limit:
                return
            if entry.is_dir() and not entry.is_symlink() and ours(name + "/"):
                walk(entry)
            elif not ours(name):
                found.append(name + ("/" if entry.is_dir() else ""))

    if root.is_dir():
        walk(root)
    return found


def check_output_folder(folder: str | Path, ours: Callable[[str], bool], *, what: str, marker: str) -> None:
    """`folder` may be written by a tool that writes `what`: it is missing, empty, or holds only
    what `ours` claims (the tool's own files, e.g. beside its `marker`). A file in its place, or
    a folder with anything else in it, is refused in one line naming one such entry."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: exists and is not a folder")
    foreign = foreign_entries(path, ours)
    if foreign:
        raise UsageError(f"{path}: holds {', '.join(foreign)}, which is not {what} (no {marker} claims it): "
                         f"choose an empty or new folder (--overwrite replaces only {what})")
