"""Uploads run files to S3 from a background thread, so training never waits on (or dies of) S3.

`push(path)` queues a file; the newest request for a key wins (a newer checkpoint supersedes a
pending older one). The snapshot it uploads is staged in the run folder's own file system
(`staging`), so a checkpoint of hundreds of MB is a hard link, not a copy; boto3's transfer
manager uploads it (multipart, parallel parts, its own retries), and the staged file is removed
once uploaded. Failed uploads are retried with exponential backoff for as long as the run lives;
`close(timeout)` waits for the queue to drain and returns what is still pending.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from dali_imagenet import s3

log = logging.getLogger(__name__)


def _hardlink(source: Path, link: Path) -> bool:
    try:
        link.hardlink_to(source)
        return True
    except OSError:  # another file system, or none that supports links
        return False


class S3Sync:
    def __init__(self, url: str, staging: Path, max_backoff_s: float = 30.0):
        """`staging`: a folder on the same file system as the files pushed (hard links work there)."""
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = s3.split_s3_url(url)
        self.url = url.rstrip("/")
        self._client = s3.client()
        self._transfer = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20,
                                        max_concurrency=4)
        self._pending: dict[str, Path] = {}  # key -> staged snapshot
        self._lock = threading.Condition()
        self._closing = False
        self._max_backoff = max_backoff_s
        self._staging = Path(staging)
        self._staging.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="s3sync", daemon=True)
        self._thread.start()

    def push(self, path: str | Path, *, replaced_by_rename: bool = False) -> None:
        """Queues `path` for upload as `<prefix>/<name>`. A snapshot is taken now, so the file may
        change right after: a hard link for files that are only ever replaced by rename
        (checkpoints: no copy of hundreds of MB), a copy for files appended in place."""
        path = Path(path)
        key = s3.join_key(self.prefix, path.name)
        staged = self._staging / f"{key.replace('/', '_')}.{time.monotonic_ns()}"
        if not (replaced_by_rename and _hardlink(path, staged)):
            shutil.copyfile(path, staged)
        with self._lock:
            old = self._pending.pop(key, None)
            if old is not None:
                old.unlink(missing_ok=True)
            self._pending[key] = staged
            self._lock.notify()

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def _run(self) -> None:
        backoff = 1.0
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._lock.wait()
                if not self._pending:
                    return
                key, staged = next(iter(self._pending.items()))
            try:
                self._client.upload_file(str(staged), self.bucket, key, Config=self._transfer)
            except Exception as error:  # an outage: warn, keep the file queued, retry later
                log.warning("S3 upload of s3://%s/%s failed (%s); retrying in %.0f s", self.bucket, key,
                            s3.reason(error, 160), backoff)
                with self._lock:
                    self._lock.wait(backoff)
                backoff = min(self._max_backoff, backoff * 2)
                continue
            backoff = 1.0
            with self._lock:
                if self._pending.get(key) is staged:
                    del self._pending[key]
                staged.unlink(missing_ok=True)

    def close(self, timeout_s: float) -> list[str]:
        """Waits up to `timeout_s` for the queue to drain; returns the keys still not uploaded."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(timeout=0.2)
            with self._lock:
                self._lock.notify_all()  # cut a backoff wait short: we are leaving
        pending = self.pending()
        if not pending:
            shutil.rmtree(self._staging, ignore_errors=True)
        return pending
