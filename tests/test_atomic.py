"""The one atomic write (`dali_imagenet.atomic`): a reader sees the old file or the new one, the new
one is on disk (file and folder fsynced) when the call returns, and a failed or killed write leaves
the old file as it was."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dali_imagenet import atomic
from dali_imagenet.run import run_folder
from shard_tools.convert import written_by_us


def fsynced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on, from now on (the real fsync still runs)."""
    synced, real = [], os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


def test_a_write_replaces_the_file_and_syncs_it_and_its_folder(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    path.write_text("old")
    synced = fsynced(monkeypatch)
    assert atomic.write_atomic(path, "new ünïcode") == path
    assert path.read_text(encoding="utf-8") == "new ünïcode"
    # the temporary file's data, then the folder that holds the rename
    assert synced == [str(tmp_path / f".record.json.tmp-{os.getpid()}"), str(tmp_path)]
    atomic.write_atomic(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    path.write_bytes(b"the old checkpoint")
    synced = fsynced(monkeypatch)
    with pytest.raises(KeyboardInterrupt), atomic.open_atomic(path) as file:
        file.write(b"half of a new one")
        raise KeyboardInterrupt  # stopped while writing
    assert path.read_bytes() == b"the old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert synced == []  # nothing was renamed


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "inside").write_text("x")
    with pytest.raises(OSError):  # a non-empty folder where the file should go: the rename fails
        atomic.write_atomic(folder, "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (folder / "inside").read_text() == "x"


def test_a_killed_write_leaves_the_old_file_and_a_temporary_the_run_folder_cleans(tmp_path):
    """A real process killed (SIGKILL: no cleanup runs) in the middle of a write."""
    last = tmp_path / run_folder.LAST
    last.write_bytes(b"the old checkpoint")
    (tmp_path / ".notes.txt.tmp-1").write_text("not a run file's")
    killed = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from dali_imagenet.atomic import open_atomic\n"
        "with open_atomic(sys.argv[1]) as f:\n"
        "    f.write(b'half of a new one'); f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(last)])
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert last.read_bytes() == b"the old checkpoint"
    left = tmp_path / f".{run_folder.LAST}.tmp-{killed.pid}"
    assert left.read_bytes() == b"half of a new one" and atomic.written_for(left.name) == run_folder.LAST
    run_folder.clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.tmp-1", run_folder.LAST]


def test_replacing_takes_a_file_made_any_way(tmp_path):
    """`run_folder.mark_best`'s way: the temporary is a hard link to last.pt."""
    (tmp_path / run_folder.LAST).write_bytes(b"step 5")
    (tmp_path / run_folder.BEST).write_bytes(b"step 2")
    assert run_folder.mark_best(tmp_path) == tmp_path / run_folder.BEST
    assert (tmp_path / run_folder.BEST).read_bytes() == b"step 5"
    assert os.path.samefile(tmp_path / run_folder.BEST, tmp_path / run_folder.LAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_folder.BEST, run_folder.LAST]


def test_temporary_names_say_what_they_were_written_for():
    assert atomic.temporary_name(Path("/a/manifest.json")) == Path(f"/a/.manifest.json.tmp-{os.getpid()}")
    assert atomic.written_for(".manifest.json.tmp-123") == "manifest.json"
    assert atomic.written_for("manifest.json.tmp") is None and atomic.written_for(".x.tmp-") is None
    # shard-imagenet resumes into an output a killed write of its manifest left such a file in
    assert written_by_us(".manifest.json.tmp-123") and written_by_us("manifest.json.tmp")
    assert not written_by_us(".notes.txt.tmp-123")
