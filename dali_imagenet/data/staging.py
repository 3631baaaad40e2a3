"""Shards on S3 copied to a local disk once per machine, so that DALI reads local files.

Read from `s3://`, DALI's webdataset reader makes one ranged GET per sample component, one after
another: ~2 GETs per sample and epoch (ImageNet, 40 epochs: ~100 M requests, ~$41), and at a real
bucket's ~10 ms to the first byte some 45 img/s. Staging fetches whole objects instead, many in
flight (boto3's transfer manager), then the loaders read the local copy:

- every tar is checked against the manifest (size and sha256), every index against its listing
  (size, and the MD5 its ETag is) and the manifest's sample count; a file that fails is fetched again;
- `.staged.json` in the folder records what was verified (size, mtime, checksum): a second start
  on the same machine fetches only what is missing or changed (a relaunch on a new machine, whose
  local disk is new, stages again);
- the disk is checked before the first byte, in one line that says how much is needed;
- one process at a time per folder (a file lock): torchrun's processes on one machine stage once.

A timm-layout set (tars only, no manifest) is staged the same way, each tar checked by size and
ETag; its indices are then built from the local copy (`shards.find_shards`).
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dali_imagenet import s3
from dali_imagenet.data.shardformat import (
    CLASSES_TSV,
    MANIFEST,
    TIMM_INFO,
    FormatError,
    file_digest,
    index_name,
    parse_index,
    parse_manifest,
    sha256_file,
    split_entry,
    write_text_atomic,
)
from dali_imagenet.data.shards import TIMM_SPLIT_NAMES, is_timm_tar
from dali_imagenet.errors import DaliImagenetError

RECORD = ".staged.json"
LOCK = ".staging.lock"
PART_SIZE = 64 * 2**20  # bytes per ranged GET of a large object: ~2 GETs for a 140 MB shard
HEADROOM = 2**30  # bytes left free on the disk after staging (logs, checkpoints, the venv)
GETS_PER_SAMPLE = 2  # what streaming costs: DALI reads each sample's .jpg and .cls with a GET each


class StagingError(DaliImagenetError):
    """Staging cannot go on (no room, an object that does not match its manifest); one line."""


@dataclass(frozen=True)
class Wanted:
    """One object to have locally: its name under the prefix and how to know the copy is right."""
    name: str
    bytes: int
    check: str  # "sha256:<hex>" (the manifest's) or "etag:<etag>" (the listing's)
    samples: int | None = None  # an index: the sample count the manifest gives its shard


@dataclass(frozen=True)
class Staged:
    """What `stage` did."""
    folder: Path
    files: int
    fetched: int
    bytes_total: int
    bytes_fetched: int
    seconds: float
    bucket_region: str | None

    def line(self, source: str) -> str:
        rate = self.bytes_fetched / 1e6 / max(self.seconds, 1e-9)
        kept = self.files - self.fetched
        return (f"staged {source} in {self.folder}: {self.bytes_total / 1e9:.2f} GB in {self.files} files; fetched "
                f"{self.fetched} ({self.bytes_fetched / 1e9:.2f} GB) in {self.seconds:.1f} s, {rate:.0f} MB/s"
                + (f"; {kept} already there" if kept else ""))


def default_folder(url: str) -> Path:
    """Where `train.py` stages `url` unless told (`--stage-dir`): `$DALI_IMAGENET_STAGE_DIR`, else a
    folder per bucket and prefix in the user's cache."""
    bucket, prefix = s3.split_s3_url(url)
    base = os.environ.get("DALI_IMAGENET_STAGE_DIR") or Path.home() / ".cache" / "dali_imagenet" / "staged"
    return Path(base) / bucket / (prefix or "_root")


def stage(url: str, folder: str | os.PathLike, splits: tuple[str, ...], *, workers: int = 16, progress: bool = True,
          interrupt: Callable[[], None] | None = None, log=print) -> Staged:
    """Makes `folder` a local copy of `splits` of the shard set at `url` (see the module's text).
    `interrupt()` is called while waiting (for the lock, for the transfers) and may raise to stop:
    the transfers are cancelled (s3transfer waits for those in flight to stop), and every file
    already complete stays in place, recorded, for the next start."""
    folder = Path(folder)
    s3.split_s3_url(url)  # a bad URL is said before anything is made
    check_folder(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StagingError(f"{folder}: cannot make the staging folder ({error.strerror})") from None
    try:
        with _locked(folder / LOCK, interrupt):
            return _stage(url.rstrip("/"), folder, splits, workers, progress, interrupt or (lambda: None), log)
    except BaseException:
        for path in made:  # a failed first staging leaves no empty folders (the lock went with its holder)
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise


def check_folder(folder: Path) -> None:
    """A staging folder is new, empty, or a copy of a shard set (staging's record, a manifest, or
    timm-layout tars say so; a copy made by hand is checked file by file): never a file, a folder
    of someone else's files to merge into, or a place that cannot be written."""
    from dali_imagenet.data.folders import check_output_folder

    if folder.is_dir() and ((folder / RECORD).is_file() or (folder / MANIFEST).is_file()
                            or any(is_timm_tar(p.name, s) for p in folder.iterdir() for s in TIMM_SPLIT_NAMES)):
        return
    check_output_folder(folder, lambda name: name == LOCK, what="a staged copy of shards",
                        marker=f"{RECORD} or {MANIFEST}")


def _stage(url: str, folder: Path, splits, workers: int, progress: bool, interrupt, log) -> Staged:
    started = time.monotonic()
    bucket, prefix = s3.split_s3_url(url)
    client = s3.client(max_connections=workers + 4)
    listing = _list(client, bucket, prefix, url)
    region = _region(client, bucket)
    manifest_text = None
    if MANIFEST in listing:
        try:
            manifest_text = client.get_object(Bucket=bucket, Key=s3.join_key(prefix, MANIFEST))["Body"].read()
        except Exception as error:  # botocore's many error types: keep its reason, on one line
            raise StagingError(f"{url}/{MANIFEST}: cannot read ({s3.reason(error)})") from None
        wanted = _from_manifest(manifest_text, listing, splits, url)
    else:
        wanted = _from_timm_listing(url, listing, splits)
    _remove_partial_downloads(folder, wanted)
    record = _read_record(folder)
    to_fetch = [w for w in wanted if not _intact(folder, w, record)]
    need = sum(w.bytes for w in to_fetch)
    _check_room(folder, need, sum(w.bytes for w in wanted), splits)
    if to_fetch:
        log(f"staging {url} ({'+'.join(splits)}) into {folder}: {len(to_fetch)} of {len(wanted)} files, "
            f"{need / 1e9:.2f} GB to fetch" + (f" (bucket in {region})" if region else ""))
    try:
        _fetch(client, bucket, prefix, folder, to_fetch, record, workers, progress, interrupt)
    finally:  # what was verified, fetched or found intact, even if a stop or a failure cut it short
        write_text_atomic(folder / RECORD, json.dumps(record, indent=0, sort_keys=True))
    if manifest_text is not None:  # last: a folder with a manifest is a complete copy of its splits
        write_text_atomic(folder / MANIFEST, manifest_text.decode())
    return Staged(folder, len(wanted), len(to_fetch), sum(w.bytes for w in wanted), need, time.monotonic() - started,
                  region)


def _list(client, bucket: str, prefix: str, url: str) -> dict[str, tuple[int, str]]:
    """{name under the prefix: (size, ETag)} of every object (one LIST per 1,000 objects)."""
    folder = f"{prefix}/" if prefix else ""
    found = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            for item in page.get("Contents", []):
                found[item["Key"][len(folder):]] = (item["Size"], item["ETag"].strip('"'))
    except Exception as error:  # botocore's many error types: keep its reason, on one line
        raise StagingError(f"{url}: cannot list ({s3.reason(error)})") from None
    if not found:
        raise StagingError(f"{url}: no objects under this prefix")
    return found


def _region(client, bucket: str) -> str | None:
    """The bucket's region (a HEAD on the bucket; S3 names it in a header), for the cost record."""
    try:
        return client.head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPHeaders"].get("x-amz-bucket-region")
    except Exception:  # noqa: BLE001 - a region we cannot learn is only a missing line in the cost record
        return None


def _from_manifest(text: bytes, listing: dict, splits, url: str) -> list[Wanted]:
    where = f"{url}/{MANIFEST}"
    try:
        manifest = parse_manifest(text, where)
        entries = [split_entry(manifest, split, where) for split in splits]
    except FormatError as error:
        raise StagingError(str(error)) from None
    wanted = [_as_listed(name, listing) for name in (CLASSES_TSV, TIMM_INFO) if name in listing]
    for entry in entries:
        for shard in entry["shards"]:
            tar, idx = shard["name"], index_name(shard["name"])
            for name in (tar, idx):
                if name not in listing:
                    raise StagingError(f"{url}/{name}: listed in the manifest but not in S3")
            if listing[tar][0] != shard["bytes"]:
                raise StagingError(f"{url}/{tar}: {listing[tar][0]} bytes in S3, the manifest says {shard['bytes']}")
            wanted.append(Wanted(tar, shard["bytes"], f"sha256:{shard['sha256']}"))
            wanted.append(Wanted(idx, listing[idx][0], f"etag:{listing[idx][1]}", samples=shard["samples"]))
    return wanted


def _from_timm_listing(url: str, listing: dict, splits) -> list[Wanted]:
    wanted = [_as_listed(CLASSES_TSV, listing)] if CLASSES_TSV in listing else []
    for split in splits:
        names = sorted(name for name in listing if is_timm_tar(name, split))
        if not names:
            raise StagingError(f"{url}: no {MANIFEST} and no *-{TIMM_SPLIT_NAMES.get(split, (split,))[0]}-NNNN.tar "
                               f"shards (timm/imagenet-1k-wds layout)")
        wanted += [_as_listed(name, listing) for name in names]
    return wanted


def _as_listed(name: str, listing: dict) -> Wanted:
    """An object with no checksum of ours: its copy is checked against the listing's size and ETag."""
    size, etag = listing[name]
    return Wanted(name, size, f"etag:{etag}")


def _remove_partial_downloads(folder: Path, wanted: list[Wanted]) -> None:
    """s3transfer downloads to `<name>.<8 random characters>` and renames when complete: a process
    killed mid-download leaves those behind, taking disk the staging needs."""
    for item in wanted:
        target = folder / item.name
        for partial in target.parent.glob(glob.escape(target.name) + ".*"):
            suffix = partial.name[len(target.name) + 1:]
            if len(suffix) == 8 and suffix.isalnum():
                partial.unlink(missing_ok=True)


def _read_record(folder: Path) -> dict:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _intact(folder: Path, wanted: Wanted, record: dict) -> bool:
    """The local copy is the object `wanted` describes: recorded as verified and unchanged since
    (size, mtime), or, unrecorded (the record lost), of the right size and checksum."""
    path = folder / wanted.name
    try:
        stat = path.stat()
    except OSError:
        return False
    if stat.st_size != wanted.bytes:
        return False
    seen = record.get(wanted.name)
    if (
        seen
        and seen["check"] == wanted.check
        and seen["mtime_ns"] == stat.st_mtime_ns
        and seen["bytes"] == stat.st_size
    ):
        return True
    if not _checksum_matches(path, wanted.check):
        return False
    record[wanted.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "check": wanted.check}
    return True


def _check_room(folder: Path, need: int, total: int, splits) -> None:
    free = shutil.disk_usage(folder).free
    if need + HEADROOM > free:
        raise StagingError(
            f"{folder}: {'+'.join(splits)} needs {need / 1e9:.1f} GB more ({total / 1e9:.1f} GB in all) "
            f"but its disk has "
            f"{free / 1e9:.1f} GB free: stage on a larger disk (--stage-dir, the instance's NVMe) or ask for one of at "
            f"least {(total + HEADROOM) / 1e9 + 30:.0f} GB (SkyPilot: disk_size)"
        )


def _fetch(client, bucket: str, prefix: str, folder: Path, wanted: list[Wanted], record: dict, workers: int,
           progress: bool, interrupt) -> None:
    """Downloads `wanted` (atomically: s3transfer writes a temporary name and renames), verifies each
    as it lands (in a thread pool: hashing is off the GIL) and records it in `.staged.json`."""
    if not wanted:
        return
    from boto3.s3.transfer import TransferConfig, create_transfer_manager
    from tqdm import tqdm

    config = TransferConfig(max_concurrency=workers, multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)
    bar = tqdm(total=sum(w.bytes for w in wanted), unit="B", unit_scale=True, unit_divisor=1024, desc="staging",
               disable=not progress, file=sys.stderr, mininterval=1 if sys.stderr.isatty() else 30, smoothing=0.1)
    lock = threading.Lock()
    failures: list[str] = []

    class Progress:  # s3transfer's subscriber interface: bytes as they arrive
        def on_progress(self, future, bytes_transferred, **_):
            bar.update(bytes_transferred)

    def verify(item: Wanted) -> None:
        path = folder / item.name
        try:
            problem = _problem(path, item)
        except OSError as error:  # the disk, not the object: said as the file's problem
            problem = f"{path}: cannot be read back ({error.strerror or error})"
        with lock:
            if problem:
                failures.append(problem)
                path.unlink(missing_ok=True)
                return
            stat = path.stat()
            record[item.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "check": item.check}

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as checks, \
                create_transfer_manager(client, config) as manager:
            pending = []
            for item in wanted:
                (folder / item.name).parent.mkdir(parents=True, exist_ok=True)
                transfer = manager.download(bucket, s3.join_key(prefix, item.name), str(folder / item.name),
                                            subscribers=[Progress()])
                pending.append((transfer, item))
            verified = []
            while pending:
                interrupt()  # a spot notice during staging: leave, keeping what is finished
                still = []
                for transfer, item in pending:
                    if transfer.done():
                        try:
                            transfer.result()
                        except Exception as error:  # botocore's many error types: one line each
                            failures.append(f"s3://{bucket}/{s3.join_key(prefix, item.name)}: cannot fetch "
                                            f"({s3.reason(error)})")
                            continue
                        verified.append(checks.submit(verify, item))
                    else:
                        still.append((transfer, item))
                pending = still
                if pending:
                    time.sleep(0.2)
            for check in verified:
                check.result()
    finally:
        bar.close()
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise StagingError(failures[0] + more)


def _problem(path: Path, item: Wanted) -> str | None:
    """What is wrong with a fetched copy, or None."""
    size = path.stat().st_size
    if size != item.bytes:
        return f"{path}: {size} bytes fetched, {item.bytes} expected"
    if item.check.startswith("sha256:") and not _checksum_matches(path, item.check):
        return f"{path}: sha256 differs from the manifest's (the object in S3 is not the shard the manifest lists)"
    if _md5_etag(item.check) and not _checksum_matches(path, item.check):
        return f"{path}: MD5 differs from the object's ETag (changed in S3 while it was fetched?)"
    if item.samples is not None:
        try:
            samples = len(parse_index(path.read_text(), str(path)))
        except (FormatError, UnicodeDecodeError) as error:
            return str(error)
        if samples != item.samples:
            return f"{path}: lists {samples} samples, the manifest says {item.samples}"
    return None


def _md5_etag(check: str) -> str | None:
    """The MD5 an ETag is, where it is one (an object uploaded in one part, without SSE-KMS: no '-')."""
    etag = check[len("etag:"):] if check.startswith("etag:") else ""
    return etag if len(etag) == 32 and "-" not in etag else None


def _checksum_matches(path: Path, check: str) -> bool:
    """Whether the file has `check`'s sha256, or the MD5 its ETag is; False where neither can tell."""
    if check.startswith("sha256:"):
        return sha256_file(path) == check[len("sha256:"):]
    md5 = _md5_etag(check)
    return md5 is not None and file_digest(path, "md5") == md5


class _locked:
    """An exclusive lock on `path` (flock: released by the kernel if the process dies), waited for
    while calling `interrupt()`."""

    def __init__(self, path: Path, interrupt):
        self.path, self.interrupt = path, interrupt or (lambda: None)

    def __enter__(self):
        while True:
            self.file = open(self.path, "a")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.close()
                self.interrupt()
                time.sleep(0.2)
                continue
            try:  # the holder before us removes the file as it leaves: a lock on that one holds nothing
                if os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino:
                    return self
            except FileNotFoundError:
                pass
            self.file.close()

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)  # while still held: nothing is left behind, and no waiter keeps a stale one
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def streaming_line(url: str, samples: int, epochs: int, get_price_per_1000: float) -> str:
    """What reading `url` straight from S3 costs, said once when a user asks for it."""
    gets = GETS_PER_SAMPLE * samples
    return (
        f"streaming {url} from S3 (--stream): DALI makes ~{GETS_PER_SAMPLE} GETs per sample, one after another: "
        f"~{gets:,} GETs an epoch (${gets * get_price_per_1000 / 1000:,.2f}; "
        f"${gets * epochs * get_price_per_1000 / 1000:,.2f} "
        f"for {epochs} epochs) and ~1 / ({GETS_PER_SAMPLE} x S3's latency) images/s per reader (45 img/s at 10 ms): "
        f"staging (the default) reads each shard once per machine"
    )


def local_data(data: str, stage_dir: str | None, *, stream: bool, here: bool, interrupt) -> str:
    """What the loaders read: `data` itself, unless it is on S3 and not streamed: then its local
    copy in `stage_dir` (default `default_folder`), staged first, by one process per machine
    (`here`; the others wait for it and find it complete). `interrupt()` raises to stop staging
    (a spot notice) before anything is written."""
    if not s3.is_s3(data) or stream:
        return data
    folder = stage_dir or default_folder(data)
    say = (lambda line: print(line, flush=True)) if here else (lambda line: None)
    staged = stage(data, folder, ("train", "validation"), progress=here, interrupt=interrupt, log=say)
    say(staged.line(data))
    return str(folder)
