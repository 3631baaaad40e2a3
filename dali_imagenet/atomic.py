"""The one way this project replaces a file: a kill at any instant leaves the old file or the new
one, never half of one, and once the call returns the new one survives a power cut.

The content goes to a temporary file beside the final name (the same folder, so the same file
system: a rename there is atomic on POSIX), named `.NAME.tmp-PID` so that two processes never
share one; it is fsynced, renamed over NAME, and the folder is fsynced (the rename itself is then
on disk). A write that fails removes its temporary file and leaves the old NAME as it was; a
process killed mid-write leaves a `.NAME.tmp-PID` that `written_for` recognises.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_TEMPORARY = re.compile(r"\.(.+)\.tmp-\d+")


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def written_for(name: str) -> str | None:
    """The file name a temporary file (`.NAME.tmp-PID`, left by a killed write) was written for, or None."""
    found = _TEMPORARY.fullmatch(name)
    return found.group(1) if found else None


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields the temporary path for the caller to fill (write it, link to it, download into it);
    when the block ends, the file is fsynced and renamed over `path`, and the folder fsynced. An
    error in the block removes the temporary file and leaves `path` as it was."""
    path = Path(path)
    tmp = temporary_name(path)
    tmp.unlink(missing_ok=True)  # a killed write of an earlier process with this pid
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A file object for a writer that needs one (`torch.save`, a tar); `path` replaced as `replacing` does."""
    with replacing(path) as tmp, open(tmp, mode) as file:
        yield file


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """`data` (bytes, or text written as UTF-8) as the whole of `path`, replaced as `replacing` does."""
    with open_atomic(path, "wb") as file:
        file.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def fsync_folder(folder: str | Path) -> None:
    """Makes a rename in `folder` durable (the directory entry itself is flushed). A file system
    that cannot sync a folder (some network and FUSE mounts say EINVAL), or a folder this process
    may write but not open (EACCES), makes it as durable as it can: the rename has landed either way."""
    try:
        _fsync(folder)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EACCES, errno.EPERM):
            raise


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
