"""One writer per run: a lease object under the run's S3 prefix, held while the run lives.

The same task launched twice would make two live jobs resume and write one run. So a run with
`--s3` takes `<prefix>/lease.json` before it writes anything and holds it until it ends, renewing
it from a thread every third of `lease_s`. Every write of the lease is conditional on what was
read (`IfNoneMatch: *` to take a free one, `IfMatch` its ETag to renew or take over), so of two
jobs racing for it exactly one wins:

- held by another job and not expired: the run stops in one line, having written nothing;
- released (a run removes it on its way out, whatever its exit) or expired (the job died without
  a word: a kill, a lost machine): taken over;
- held by the same job: taken over at once. A SkyPilot managed job keeps `SKYPILOT_TASK_ID` over
  its recoveries (its controller sets it once, `sky/jobs/controller.py`), so its relaunch after a
  reclaim or a crash goes on without waiting for the expiry;
- a renewal that finds the lease taken over (this run stalled past its expiry and another job
  took it): `lost` says so, and the run stops at its next checkpoint (`RunOutputs.save`).

Expiry is judged on the wall clock of the machine that reads it (EC2's clocks are NTP-synced).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from dali_imagenet import s3
from dali_imagenet.errors import DaliImagenetError

log = logging.getLogger(__name__)

LEASE = "lease.json"


class LeaseHeld(DaliImagenetError):
    """Another job holds the run's S3 prefix; the message says which and until when."""


def job_id() -> str:
    """What identifies this job across its relaunches: SkyPilot's task id, else this process."""
    return os.environ.get("SKYPILOT_TASK_ID") or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _precondition_failed(error: Exception) -> bool:
    return s3.error_code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class Lease:
    def __init__(self, url: str, lease_s: float, job: str | None = None):
        self.url = url.rstrip("/")
        self.bucket, prefix = s3.split_s3_url(url)
        self.key = s3.join_key(prefix, LEASE)
        self.lease_s = lease_s
        self.job = job or job_id()
        self.etag: str | None = None
        self.lost: str | None = None  # why this run no longer holds its prefix
        self._client = s3.client()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.since = time.time()

    def acquire(self, timeout_s: float) -> Lease:
        """Takes the lease (see the module's text) or raises LeaseHeld; then renews it in a thread."""
        deadline = time.monotonic() + timeout_s
        while True:
            holder, etag = self._read(timeout_s)
            if holder is not None and not self._free(holder):
                raise LeaseHeld(self._held_line(holder))
            try:
                self._write(etag)
                break
            except Exception as error:  # noqa: BLE001 - botocore's types; a lost race is read again
                if not _precondition_failed(error) or time.monotonic() > deadline:
                    raise s3.S3Error(f"s3://{self.bucket}/{self.key}: cannot take the run's lease "
                                     f"({s3.reason(error)})") from None
                time.sleep(0.2)  # another job wrote it between our read and our write: read it again
        self._thread = threading.Thread(target=self._renew, name="s3-lease", daemon=True)
        self._thread.start()
        return self

    def _read(self, timeout_s: float) -> tuple[dict | None, str | None]:
        answer = s3.retrying(f"s3://{self.bucket}/{self.key}: cannot read the run's lease",
                             lambda: self._client.get_object(Bucket=self.bucket, Key=self.key), timeout_s)
        if answer is None:
            return None, None
        try:
            holder = json.loads(answer["Body"].read())
        except ValueError:
            holder = {}  # unreadable: treated as expired, and replaced
        return holder, answer["ETag"]

    def _free(self, holder: dict) -> bool:
        return holder.get("job") == self.job or float(holder.get("expires", 0)) < time.time()

    def _held_line(self, holder: dict) -> str:
        now = time.time()
        return (f"s3://{self.bucket}/{self.key}: another job is writing this run (job {holder.get('job')} on "
                f"{holder.get('host')}, since {_clock(holder.get('since'))}, renewed "
                f"{now - float(holder.get('renewed', now)):.0f} s ago, expires in "
                f"{float(holder.get('expires', now)) - now:.0f} s): stop it first (sky jobs cancel), or pass another "
                f"--s3; a job that died frees it within lease_seconds ({self.lease_s:g} s)")

    def _write(self, etag: str | None) -> None:
        """The lease as held now, conditional on S3 holding `etag` (None: nothing)."""
        now = time.time()
        body = json.dumps({"job": self.job, "host": socket.gethostname(), "pid": os.getpid(), "since": self.since,
                           "renewed": now, "expires": now + self.lease_s}).encode()
        unchanged = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        self.etag = self._client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                            ContentType="application/json", **unchanged)["ETag"]

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self._write(self.etag)
            except Exception as error:  # noqa: BLE001 - an outage: try again at the next interval
                if _precondition_failed(error):
                    holder, _ = self._read(10.0)
                    self.lost = (f"s3://{self.bucket}/{self.key}: this run's lease was taken over by job "
                                 f"{(holder or {}).get('job')} (it was not renewed within {self.lease_s:g} s): "
                                 f"another job writes this run now")
                    log.error(self.lost)
                    return
                log.warning("the run's lease at s3://%s/%s was not renewed (%s); trying again in %.0f s",
                            self.bucket, self.key, s3.reason(error, 160), self.lease_s / 3)

    def release(self) -> None:
        """Frees the prefix for the next job (a relaunch goes on at once): removes the lease if it
        is still this run's. Idempotent; a failure only leaves it to expire."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None
        if self.etag is None or self.lost:
            return
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as error:  # noqa: BLE001 - it expires by itself
            log.warning("the run's lease at s3://%s/%s was not removed (%s): it expires in %.0f s", self.bucket,
                        self.key, s3.reason(error, 160), self.lease_s)
        self.etag = None


def _clock(unix) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(unix))) if unix else "?"
