"""The S3 helpers shared by the converter, the loader, the trainer and the report.

boto3's standard credential chain is used as is; `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`)
points it at another server, such as a local test server.
"""
from __future__ import annotations

import os
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


def client():
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # Bounded retries and timeouts: a dead endpoint must fail a call, not hang the caller.
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint or None, config=config)


def is_missing(error: Exception) -> bool:
    """True when S3 answered that the object (or the listing) is not there, and only then: a
    refused, throttled or unreachable request is not an answer."""
    from botocore.exceptions import ClientError

    return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def retrying(what: str, call, timeout_s: float, first_wait_s: float = 1.0):
    """`call()`, retried with exponential backoff on any error but "not there" (which is
    returned as None) for up to `timeout_s`; then S3Error naming `what` with botocore's reason."""
    try:
        # botocore raises many types; a missing key is an answer, not a failure
        return with_backoff(call, lambda error: not is_missing(error), timeout_s, first_wait_s)
    except Exception as error:
        if is_missing(error):
            return None
        raise S3Error(f"{what}: {reason(error)} (retried for {timeout_s:g} s)") from None


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
    head = retrying(f"{url}/{name}: cannot read", lambda: client().head_object(Bucket=bucket, Key=join_key(prefix, name)),
                    timeout_s)
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
