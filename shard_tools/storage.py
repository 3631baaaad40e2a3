"""Where shards go: a local folder or an `s3://bucket/prefix`.

Shards are always written to a local temporary file first. Locally they are then renamed into
place (a reader never sees half a shard); on S3 they are uploaded (multipart for large files)
with their sha256 in the object metadata, so `--resume` can verify them without a download.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

from dali_imagenet import s3
from dali_imagenet.atomic import write_atomic
from dali_imagenet.data.shardformat import sha256_file
from dali_imagenet.errors import DaliImagenetError


class OutputError(DaliImagenetError):
    """The output cannot be used; the message is one line."""


class LocalOutput:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise OutputError(f"{self.root}: cannot write here ({error.strerror})") from None

    def staging_dir(self, split: str) -> Path:
        folder = self.root / split
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def publish(self, local: Path, name: str, sha256: str) -> None:
        os.replace(local, self.root / name)

    def verify(self, name: str, size: int, sha256: str) -> bool:
        path = self.root / name
        return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read_text(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text() if path.is_file() else None

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.root / name, text)


class S3Output:
    def __init__(self, url: str):
        try:
            self.bucket, self.prefix = s3.split_s3_url(url)
        except s3.S3Error as error:
            raise OutputError(str(error)) from None
        self.url = url
        self.client = s3.client()
        self._staging = Path(tempfile.mkdtemp(prefix="shard-imagenet-"))
        # Removed when this output is done with (or at exit): shards are uploaded from here, one at a time.
        weakref.finalize(self, shutil.rmtree, str(self._staging), True)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as error:
            raise OutputError(
                f"{url}: bucket {self.bucket!r} is not reachable or not writable ({s3.reason(error)})"
            ) from None

    def __getstate__(self):  # workers make their own client
        state = dict(self.__dict__)
        state.pop("client")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.client = s3.client()

    def _key(self, name: str) -> str:
        return s3.join_key(self.prefix, name)

    def staging_dir(self, split: str) -> Path:
        folder = self._staging / split
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def publish(self, local: Path, name: str, sha256: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(name), ExtraArgs={"Metadata": {"sha256": sha256}})
        local.unlink()

    def verify(self, name: str, size: int, sha256: str) -> bool:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except self.client.exceptions.ClientError:
            return False
        return head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha256

    def exists(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except self.client.exceptions.ClientError:
            return False

    def read_text(self, name: str) -> str | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
        except self.client.exceptions.NoSuchKey:
            return None
        return body.read().decode()

    def write_text(self, name: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=text.encode())


def open_output(url: str) -> LocalOutput | S3Output:
    try:
        remote = s3.is_s3(url)
    except s3.S3Error as error:  # s3:/typo: a near miss, not a local folder named "s3:"
        raise OutputError(str(error)) from None
    return S3Output(url) if remote else LocalOutput(url)
