"""The S3 helpers shared by the converter, the loader, the trainer and the report.

boto3's standard credential chain is used as is; `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`)
points it at another server, such as a local test server. Every client made here counts its
requests and bytes in `usage` (what a run's cost record prices: S3 bills per request).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from urllib.parse import urlparse

from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.retry import with_backoff


class S3Error(DaliImagenetError):
    """A malformed S3 URL, or S3 refusing a request; the message keeps botocore's reason."""


def is_s3(url: str | os.PathLike) -> bool:
    """True for `s3://...`; a near miss (`s3:/x`, `S3://x`) is an error, not a local folder named `s3:`."""
    text = str(url)
    if text.startswith("s3://"):
        return True
    if text.lower().startswith("s3:"):
        raise S3Error(f"{text}: not an S3 URL (expected s3://bucket/prefix)")
    return False


def split_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'); the prefix has no leading or trailing '/'."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.netloc.startswith("."):
        raise S3Error(f"{url}: not an S3 URL of the form s3://bucket/prefix")
    return parsed.netloc, parsed.path.strip("/")


def join_key(prefix: str, *parts: str) -> str:
    return "/".join(p.strip("/") for p in (prefix, *parts) if p.strip("/"))


def reason(error: Exception, limit: int = 300) -> str:
    """An S3 error's whole reason on one line: botocore puts the useful part after a newline
    ("Parameter validation failed:\nInvalid bucket name ...")."""
    return " ".join(str(error).split())[:limit]


# S3's price classes (S3 Standard): PUT, COPY, POST and LIST requests cost ~12x a GET or HEAD; DELETE is free.
PUT_CLASS = ("Put", "Copy", "List", "Create", "Complete", "UploadPart", "Post", "Restore")
FREE = ("Delete", "Abort")


class Usage:
    """The S3 requests and bytes of this process, by price class and bucket, counted by botocore's
    event hooks on every `client()`: each attempt counts (S3 bills retries too). Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._counts = {"get": 0, "put": 0, "free": 0}
            self._buckets: dict[str, dict] = {}

    def _bucket(self, name: str) -> dict:
        return self._buckets.setdefault(name, {"bytes_in": 0, "bytes_out": 0, "region": None})

    def on_send(self, request, operation: str) -> None:
        kind = "free" if operation.startswith(FREE) else "put" if operation.startswith(PUT_CLASS) else "get"
        sent = int(request.headers.get("Content-Length") or 0) if operation.startswith(("Put", "UploadPart")) else 0
        bucket = _bucket_of(request.url)
        with self._lock:
            self._counts[kind] += 1
            if bucket and sent:
                self._bucket(bucket)["bytes_out"] += sent

    def on_response(self, http_response, operation: str) -> None:
        bucket = _bucket_of(http_response.url) if http_response is not None else None
        if not bucket:
            return
        headers = http_response.headers
        received = int(headers.get("Content-Length") or 0) if operation == "GetObject" else 0
        with self._lock:
            entry = self._bucket(bucket)
            entry["bytes_in"] += received
            entry["region"] = headers.get("x-amz-bucket-region") or entry["region"]

    def snapshot(self) -> dict:
        """{"get": n, "put": n, "free": n, "buckets": {name: {bytes_in, bytes_out, region}}}, a plain copy."""
        with self._lock:
            return {**self._counts, "buckets": {name: dict(entry) for name, entry in self._buckets.items()}}

    def add(self, earlier: dict | None) -> None:
        """Counts `earlier` (a snapshot, e.g. a resumed run's) as if this process had made it."""
        with self._lock:
            for kind in self._counts:
                self._counts[kind] += (earlier or {}).get(kind, 0)
            for name, entry in (earlier or {}).get("buckets", {}).items():
                mine = self._bucket(name)
                mine["bytes_in"] += entry.get("bytes_in", 0)
                mine["bytes_out"] += entry.get("bytes_out", 0)
                mine["region"] = mine["region"] or entry.get("region")


usage = Usage()


def merged(snapshots: list[dict]) -> dict:
    """The sum of several processes' `Usage.snapshot()`s."""
    total = Usage()
    for snapshot in snapshots:
        total.add(snapshot)
    return total.snapshot()


def _bucket_of(url: str) -> str | None:
    """The bucket a request goes to: path-style (`host/bucket/key`, a local endpoint) or
    virtual-hosted (`bucket.s3...`)."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    if ".s3." in host or ".s3-" in host:
        return host.split(".s3", 1)[0]
    return parsed.path.lstrip("/").split("/", 1)[0] or None


def _count(client) -> None:
    events = client.meta.events

    def sent(request, event_name, **_):
        usage.on_send(request, event_name.rsplit(".", 1)[-1])

    def answered(http_response, model, **_):
        usage.on_response(http_response, model.name)

    events.register("before-send.s3", sent)
    events.register("after-call.s3", answered)


def client(max_connections: int = 10):
    """A boto3 S3 client whose requests `usage` counts; `max_connections` for many transfers in flight."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # Bounded retries and timeouts: a dead endpoint must fail a call, not hang the caller.
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                    max_pool_connections=max_connections)
    made = boto3.client("s3", endpoint_url=endpoint or None, config=config)
    _count(made)
    return made


def is_missing(error: Exception) -> bool:
    """True when S3 answered that the object (or the listing) is not there, and only then: a
    refused, throttled or unreachable request is not an answer."""
    return error_code(error) in ("404", "NoSuchKey", "NotFound")


# Answers that no retry changes: the credentials may not do this, or the bucket is not there.
PERMANENT = ("AccessDenied", "403", "NoSuchBucket", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
             "InvalidBucketName", "AccountProblem", "InvalidObjectState", "KMS.AccessDeniedException")


def error_code(error: Exception) -> str | None:
    from botocore.exceptions import ClientError

    return error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else None


def is_permanent(error: Exception) -> bool:
    """True when S3 refused for a reason that retrying cannot fix (403, no such bucket, bad keys)."""
    return error_code(error) in PERMANENT


def retrying(what: str, call, timeout_s: float, first_wait_s: float = 1.0):
    """`call()`, retried with exponential backoff on any error but "not there" (which is returned
    as None) and a refusal no retry changes, for up to `timeout_s`; then S3Error naming `what`
    with botocore's reason."""
    try:
        # botocore raises many types; a missing key is an answer, not a failure
        return with_backoff(call, lambda error: not is_missing(error) and not is_permanent(error), timeout_s,
                            first_wait_s)
    except Exception as error:
        if is_missing(error):
            return None
        tried = "" if is_permanent(error) else f" (retried for {timeout_s:g} s)"
        raise S3Error(f"{what}: {reason(error)}{tried}") from None


def probe_writes(url: str, timeout_s: float) -> None:
    """Proves that this process can write, read and remove objects under `url` (a small object,
    written, read back and removed), or raises S3Error in one line: a run finds a bucket that
    refuses its uploads before it trains, not hours later."""
    import uuid

    bucket, prefix = split_s3_url(url)
    key = join_key(prefix, f".write-probe-{uuid.uuid4().hex[:12]}")
    body = f"dali-imagenet write probe {key}".encode()
    where = f"s3://{bucket}/{key}"
    retrying(f"{where}: cannot write there", lambda: client().put_object(Bucket=bucket, Key=key, Body=body), timeout_s)
    read = retrying(f"{where}: cannot read back what was written",
                    lambda: client().get_object(Bucket=bucket, Key=key)["Body"].read(), timeout_s)
    if read != body:
        raise S3Error(f"{where}: read back {len(read or b'')} bytes that differ from the {len(body)} written")
    retrying(f"{where}: cannot remove it (the run's --overwrite needs to)",
             lambda: client().delete_object(Bucket=bucket, Key=key), timeout_s)


def run_files_at(url: str, names: tuple[str, ...], timeout_s: float) -> list[str]:
    """Which of `names` exist under the prefix `url` (one listing, retried like `retrying`)."""
    bucket, prefix = split_s3_url(url)
    folder = prefix + "/" if prefix else ""
    listing = retrying(f"{url}: cannot list", lambda: client().list_objects_v2(Bucket=bucket, Prefix=folder), timeout_s)
    keys = {obj["Key"] for obj in (listing or {}).get("Contents", [])}
    return [name for name in names if join_key(prefix, name) in keys]


def metadata(url: str, name: str, timeout_s: float) -> dict[str, str] | None:
    """The user metadata (`x-amz-meta-*`) of `<url>/<name>`, or None when S3 says it is not
    there; any other failure is retried for `timeout_s`, then S3Error."""
    bucket, prefix = split_s3_url(url)
    head = retrying(
        f"{url}/{name}: cannot read", lambda: client().head_object(Bucket=bucket, Key=join_key(prefix, name)), timeout_s
    )
    return None if head is None else dict(head.get("Metadata", {}))


def download(url: str, name: str, dest, timeout_s: float = 0.0) -> bool:
    """Fetches `<url>/<name>` to `dest`, atomically (a temporary name, then a rename). False when
    S3 says the object is not there; any other failure is retried for `timeout_s`, then S3Error."""
    bucket, prefix = split_s3_url(url)
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.download")

    def fetch():
        client().download_file(bucket, join_key(prefix, name), str(tmp))
        return True

    try:
        found = retrying(f"{url}/{name}: cannot download", fetch, timeout_s)
    except S3Error:
        tmp.unlink(missing_ok=True)
        raise
    if not found:
        tmp.unlink(missing_ok=True)
        return False
    tmp.replace(dest)
    return True


def delete(url: str, names: list[str]) -> None:
    bucket, prefix = split_s3_url(url)
    if names:
        client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": join_key(prefix, n)} for n in names]})


def upload_page(path: Path, url: str) -> str:
    """Puts an HTML page at `<url>/index.html` as text/html, the way an S3 static website serves it."""
    bucket, prefix = split_s3_url(url)
    key = join_key(prefix, "index.html")
    try:
        client().put_object(Bucket=bucket, Key=key, Body=Path(path).read_bytes(),
                            ContentType="text/html; charset=utf-8")
    except Exception as error:  # botocore's many error types: keep its reason, on one line
        raise S3Error(f"s3://{bucket}/{key}: upload failed ({reason(error)})") from None
    return f"s3://{bucket}/{key}"
