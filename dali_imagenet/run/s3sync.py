"""Uploads run files to S3 from a background thread, so training never waits on (or dies of) S3.

`push(path)` queues a file; the newest request for a key wins (a newer checkpoint supersedes a
pending older one). The snapshot it uploads is staged in the run folder's own file system
(`staging`), so a checkpoint of hundreds of MB is a hard link, not a copy, and is removed once
uploaded or superseded (never while it is being uploaded). Failed uploads are retried with
exponential backoff until `close(timeout)`, which waits for the queue to drain and returns what
is still not in S3.

Uploads run in this module's one daemon thread, with boto3's transfer manager in that thread
(`use_threads=False`: no pool of its own), so nothing is left to run at interpreter shutdown:
after `close`'s deadline the thread only waits for its current request's timeout, and
`stuck()` tells the caller to leave with `os._exit`.

A checkpoint pushed with its `lineage` (run id and step) carries it as S3 metadata, and before it
is uploaded the one in S3 is looked at: if S3 holds another run's checkpoint, or a later step of
this run's, nothing more is uploaded to the prefix (another process writes there) and `close`
reports it. The upload is then conditional on S3 still holding what was looked at (`IfMatch` its
ETag, or `IfNoneMatch` when there was none): a write that slipped in between fails the upload, and
the retry looks again, so a checkpoint never goes back in time, whatever else writes the prefix.

An upload that S3 refuses for a reason no retry changes (403, no such bucket) is not retried:
`refused` says why, and the run stops at its next checkpoint (`RunOutputs.save`).
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dali_imagenet import s3

log = logging.getLogger(__name__)

STEP, RUN_ID = "step", "run-id"  # S3 object metadata of a checkpoint (x-amz-meta-step, x-amz-meta-run-id)


def _hardlink(source: Path, link: Path) -> bool:
    try:
        link.hardlink_to(source)
        return True
    except OSError:  # another file system, or none that supports links
        return False


def lineage_metadata(run_id: str, step: int) -> dict[str, str]:
    return {RUN_ID: run_id, STEP: str(step)}


def older_than(ours: dict[str, str], theirs: dict[str, str]) -> str | None:
    """Why uploading a checkpoint of lineage `ours` over one of lineage `theirs` (both S3
    metadata dicts) would go back in time, or None when it may go ahead."""
    their_run, our_run = theirs.get(RUN_ID, ""), ours.get(RUN_ID, "")
    if their_run and our_run and their_run != our_run:
        return f"it holds run {their_run}'s checkpoint, not this run's ({our_run})"
    if theirs.get(STEP, "").isdigit() and int(theirs[STEP]) > int(ours.get(STEP, 0)):
        return f"it holds step {theirs[STEP]}, later than this run's step {ours.get(STEP)}"
    return None


@dataclass(frozen=True)
class _Staged:
    path: Path
    metadata: dict[str, str] | None  # a checkpoint's lineage, checked against S3's before upload


class S3Sync:
    def __init__(self, url: str, staging: Path, max_backoff_s: float = 30.0):
        """`staging`: a folder on the same file system as the files pushed (hard links work there)."""
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = s3.split_s3_url(url)
        self.url = url.rstrip("/")
        self._client = s3.client()
        self._transfer = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20,
                                        use_threads=False)
        self._pending: dict[str, _Staged] = {}  # key -> staged snapshot
        self._in_flight: Path | None = None
        self.refused: str | None = None  # why nothing more goes to this prefix
        self.last_error: str | None = None
        self._lock = threading.Condition()
        self._closing = False
        self._abandoned = False
        self._max_backoff = max_backoff_s
        self._staging = Path(staging)
        self._staging.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="s3sync", daemon=True)
        self._thread.start()

    def push(
        self, path: str | Path, *, replaced_by_rename: bool = False, lineage: dict[str, str] | None = None
    ) -> None:
        """Queues `path` for upload as `<prefix>/<name>`. A snapshot is taken now, so the file may
        change right after: a hard link for files that are only ever replaced by rename
        (checkpoints: no copy of hundreds of MB), a copy for files appended in place."""
        path = Path(path)
        key = self.key(path.name)
        staged = self._staging / f"{key.replace('/', '_')}.{time.monotonic_ns()}"
        if not (replaced_by_rename and _hardlink(path, staged)):
            shutil.copyfile(path, staged)
        with self._lock:
            old = self._pending.pop(key, None)
            if old is not None and old.path != self._in_flight:  # the one in flight is the worker's to remove
                old.path.unlink(missing_ok=True)
            self._pending[key] = _Staged(staged, lineage)
            self._lock.notify()

    def key(self, name: str) -> str:
        """The key a file named `name` is uploaded to (as `pending` lists it)."""
        return s3.join_key(self.prefix, name)

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def _run(self) -> None:
        backoff = 1.0
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._lock.wait()
                if not self._pending or self._abandoned:
                    return
                key, item = next(iter(self._pending.items()))
                self._in_flight = item.path
            try:
                self._upload(key, item)
                backoff = 1.0
                uploaded = not self.refused
            except Exception as error:  # noqa: BLE001 - an outage, in botocore's many types: keep it queued
                self.last_error = s3.reason(error, 160)
                if s3.is_permanent(error):
                    self.refused = f"s3://{self.bucket}/{key}: S3 refuses the upload ({self.last_error})"
                    log.error(self.refused)
                else:
                    log.warning("S3 upload of s3://%s/%s failed (%s); retrying in %.0f s", self.bucket, key,
                                self.last_error, backoff)
                uploaded = False
            with self._lock:
                self._in_flight = None
                superseded = self._pending.get(key) is not item
                if uploaded and not superseded:
                    del self._pending[key]
                if self.refused:
                    return  # what is queued stays queued: close() reports it
                if uploaded or superseded:
                    item.path.unlink(missing_ok=True)
                if not uploaded and not self._abandoned:
                    self._lock.wait(backoff)  # close() cuts this short
                    backoff = min(self._max_backoff, backoff * 2)

    def _upload(self, key: str, item: _Staged) -> None:
        if item.metadata is None:
            self._client.upload_file(str(item.path), self.bucket, key, Config=self._transfer)
            return
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
            theirs, etag = head.get("Metadata", {}), head["ETag"]
        except Exception as error:  # noqa: BLE001
            if not s3.is_missing(error):
                raise
            theirs, etag = {}, None
        why = older_than(item.metadata, theirs)
        if why:
            self.refused = f"s3://{self.bucket}/{key}: not uploaded: {why} (another process writes this prefix?)"
            log.error(self.refused)
            return
        # One conditional PUT (up to 5 GB; the transfer manager's multipart uploads take no condition)
        unchanged = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        with open(item.path, "rb") as body:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=body, Metadata=item.metadata, **unchanged)

    def drain(self, deadline: float, give_up: Callable[[], bool] = lambda: False) -> list[str]:
        """Waits until nothing is queued, up to `deadline` (time.monotonic()) or until `give_up()`
        says to stop waiting, or S3 refused the prefix; returns the keys still queued. Uploads go on,
        a retry's backoff cut short as in `close` (the run is leaving: no waiting 30 s between tries)."""
        while time.monotonic() < deadline and not give_up() and not self.refused:
            with self._lock:
                if not self._pending:
                    return []
                self._lock.notify_all()
            time.sleep(0.05)
        return self.pending()

    def close(self, timeout_s: float, give_up: Callable[[], bool] = lambda: False) -> list[str]:
        """Waits up to `timeout_s` for the queue to drain (or until `give_up()` says to stop
        waiting); returns the keys still not uploaded (all that were queued, if the prefix was
        refused). The staging folder goes once empty."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        while self._thread.is_alive() and time.monotonic() < deadline and not give_up():
            self._thread.join(timeout=0.1)
            with self._lock:
                self._lock.notify_all()  # cut a backoff wait short: we are leaving
        with self._lock:
            self._abandoned = True  # past the deadline: the thread ends after its current request
            self._lock.notify_all()
        self._thread.join(timeout=0.5)
        pending = self.pending()
        if not pending:
            shutil.rmtree(self._staging, ignore_errors=True)
        return pending

    def stuck(self) -> bool:
        """True when `close` returned with a request still in flight (a dead endpoint's timeout)."""
        return self._thread.is_alive()
