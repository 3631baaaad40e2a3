"""Shards on S3 copied to a local disk once per machine, so that DALI reads local files.

Read from `s3://`, DALI's webdataset reader makes one ranged GET per sample component, one after
another: ~2 GETs per sample and epoch (ImageNet, 40 epochs: ~100 M requests, ~$41), and at a real
bucket's ~10 ms to the first byte some 45 img/s. Staging fetches whole objects instead, many in
flight (boto3's transfer manager), then the loaders read the local copy:

- the small files first (every index, checked against its listing: size, the MD5 its ETag is,
  the manifest's sample count, fetched as `<name>.part` and renamed), then the tars in the order
  the run reads them (`run_order`). DALI opens every tar when its pipeline is built and keeps the
  inode, so a tar cannot arrive by rename while training: each is first a sparse placeholder of
  its final size under its own name, is downloaded into in place, checked (size and sha256 of what
  was written) and only then recorded as landed in `.staged.json`, which the loaders wait on
  (`Landing`); a landed tar is never written again. A file that fails, or that S3 fails to send,
  is fetched again in the same launch (a few tries, with a pause between), then named in one line;
- the objects go to the transfer manager a bounded window at a time, so a spot notice is heard
  within a fraction of a second whatever the number of objects (the transfers in flight are cancelled);
- `.staged.json` in the folder records what was verified (size, mtime, checksum): a second start
  on the same machine fetches only what is missing, changed or not landed (a placeholder); a
  relaunch on a new machine, whose local disk is new, stages again;
- `train.py` trains while the tars arrive (`local_data`: the indices and placeholders first, the
  tars in a thread of the machine's first process); `stage` (stage-shards, evaluate) returns when
  every file is there;
- the disk is checked before the first byte, in one line that says how much is needed;
- one process at a time per folder (a file lock): torchrun's processes on one machine stage once.

A timm-layout set (tars only, no manifest) is staged whole before training, each tar checked by
its size (their ETags are of multipart uploads: no MD5 to compare); its indices are then built
from the local copy (`shards.find_shards`).
"""
from __future__ import annotations

import fcntl
import functools
import glob
import json
import os
import shutil
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from dali_imagenet import s3
from dali_imagenet.atomic import write_atomic
from dali_imagenet.data.partition import epoch_shards, rank_pieces
from dali_imagenet.data.shardformat import (
    CLASSES_TSV,
    MANIFEST,
    STAGING_RECORD,
    TIMM_INFO,
    FormatError,
    file_digest,
    index_name,
    parse_index,
    parse_manifest,
    sha256_file,
    split_entry,
)
from dali_imagenet.data.shards import TIMM_SPLIT_NAMES, SplitShards, is_timm_tar
from dali_imagenet.errors import DaliImagenetError, Interrupted

RECORD = STAGING_RECORD
LOCK = ".staging.lock"
FAILED = ".staging.failed"  # the line that ended a staging under way, for every process that waits on it
PREPARED = ".staging.prepared"  # the launch whose indices and placeholders are in place (the local master's parent)
PART_SIZE = 64 * 2**20  # bytes per ranged GET of a large object: ~2 GETs for a 140 MB shard
IO_CHUNK = 256 * 2**10  # bytes per write to disk (s3transfer's default io_chunksize)
HEADROOM = 2**30  # bytes left free on the disk after staging (logs, checkpoints, the venv)
GETS_PER_SAMPLE = 2  # what streaming costs: DALI reads each sample's .jpg and .cls with a GET each
PART = ".part"  # a download's name until it is whole and checked (s3transfer's own temporary name is PART + .XXXXXXXX)
TRIES = 4  # fetches of one object (a failed or wrong copy is fetched again) before staging names it and stops
BACKOFF_S = 1.0  # seconds before the second try of an object, doubling for each further one
POLL_S = 0.1  # seconds between looks at the transfers (and calls of `interrupt()`)
VAL_AFTER = 4  # train tars staged before the validation split (what the first steps read)


class StagingError(DaliImagenetError):
    """Staging cannot go on (no room, an object that does not match its manifest); one line."""


@dataclass(frozen=True)
class Wanted:
    """One object to have locally: its name under the prefix and how to know the copy is right."""
    name: str
    bytes: int
    check: str  # "sha256:<hex>" (the manifest's) or "etag:<etag>" (the listing's)
    samples: int | None = None  # an index: the sample count the manifest gives its shard
    etag: str | None = None  # the listing's (unquoted): s3transfer's GETs then need no HEAD, and ask for that version


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
            prepared = _prepare(url.rstrip("/"), folder, splits, workers, interrupt or (lambda: None), log,
                                manifest_now=False, progress=progress)
            staged = prepared.fetch_tars(None, progress, interrupt or (lambda: None))
            if prepared.manifest_text is not None:  # last: a folder with a manifest is a complete copy of its splits
                write_atomic(folder / MANIFEST, prepared.manifest_text.decode())
            return staged
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


@dataclass
class _Prepared:
    """A folder whose small files are staged and whose tars still to fetch are placeholders."""
    url: str
    folder: Path
    client: object
    tars: list[Wanted]  # to fetch, in place
    record: dict
    wanted: int  # files in all
    bytes_total: int
    bytes_needed: int  # of the files fetched, the small ones included
    fetched: int  # small files fetched
    started: float
    region: str | None
    workers: int
    manifest_text: bytes | None

    def fetch_tars(self, order: list[str] | None, progress: bool, interrupt) -> Staged:
        """Downloads the tars into their placeholders, `order` (names under the folder) first."""
        rank = {name: i for i, name in enumerate(order or [])}
        tars = sorted(self.tars, key=lambda w: rank.get(w.name, len(rank)))
        bucket, prefix = s3.split_s3_url(self.url)
        try:
            _fetch(self.client, bucket, prefix, self.folder, tars, self.record, self.workers, progress, interrupt)
        finally:  # what was verified, fetched or found intact, even if a stop or a failure cut it short
            _write_record(self.folder, self.record)
        return Staged(self.folder, self.wanted, self.fetched + len(self.tars), self.bytes_total, self.bytes_needed,
                      time.monotonic() - self.started, self.region)


def _prepare(url: str, folder: Path, splits, workers: int, interrupt, log, manifest_now: bool,
             progress: bool = False) -> _Prepared:
    """Lists the set, checks the disk, fetches the small files (renamed once checked) and makes
    every tar still to fetch a placeholder of its final size, recorded as pending (not landed).
    `manifest_now`: then writes the manifest, so that the folder can be read by `find_shards` and a
    DALI pipeline built on it (which reads only the indices) before the tars' bytes are there; the
    loaders must then wait on a `Landing`. Else the caller writes it once every tar has landed."""
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
    (folder / FAILED).unlink(missing_ok=True)
    _remove_partial_downloads(folder, wanted)
    record = _read_record(folder)
    to_fetch = [w for w in wanted if not _intact(folder, w, record)]
    need = sum(w.bytes for w in to_fetch)
    _check_room(folder, need, sum(w.bytes for w in wanted), splits)
    if to_fetch:
        log(f"staging {url} ({'+'.join(splits)}) into {folder}: {len(to_fetch)} of {len(wanted)} files, "
            f"{need / 1e9:.2f} GB to fetch" + (f" (bucket in {region})" if region else ""))
    # Tars of a manifest's set are written in place (placeholders); the rest (indices, a timm set's
    # tars, whose indices are built from them) arrive whole, by rename, before any loader is built.
    in_place = [w for w in to_fetch if manifest_text is not None and w.check.startswith("sha256:")]
    small = [w for w in to_fetch if w not in in_place]
    for item in in_place:
        record[item.name] = {"pending": True}
    _write_record(folder, record)
    for item in in_place:
        path = folder / item.name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
        if path.stat().st_size != item.bytes:  # sparse: takes no disk until written
            os.truncate(path, item.bytes)
    try:
        _fetch(client, bucket, prefix, folder, small, record, workers, progress and manifest_text is None, interrupt)
    finally:
        _write_record(folder, record)
    if manifest_text is not None:
        if manifest_now:  # the folder's indices are complete, its tars placeholders or landed
            write_atomic(folder / MANIFEST, manifest_text.decode())
        elif in_place:  # a manifest left from an earlier staging no longer says the copy is complete
            (folder / MANIFEST).unlink(missing_ok=True)
    return _Prepared(url, folder, client, in_place, record, len(wanted), sum(w.bytes for w in wanted), need,
                     len(small), started, region, workers, manifest_text)


def _write_record(folder: Path, record: dict) -> None:
    write_atomic(folder / RECORD, json.dumps(record, indent=0, sort_keys=True))


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
            wanted.append(Wanted(tar, shard["bytes"], f"sha256:{shard['sha256']}", etag=listing[tar][1]))
            wanted.append(Wanted(idx, listing[idx][0], f"etag:{listing[idx][1]}", samples=shard["samples"],
                                 etag=listing[idx][1]))
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
    return Wanted(name, size, f"etag:{etag}", etag=etag)


def _remove_partial_downloads(folder: Path, wanted: list[Wanted]) -> None:
    """A process killed mid-download leaves `<name>.part` and s3transfer's `<name>.part.<8 random
    characters>` (or, from before `.part`, `<name>.<8 characters>`), taking disk the staging needs."""
    for item in wanted:
        target = folder / item.name
        for partial in target.parent.glob(glob.escape(target.name) + ".*"):
            suffix = partial.name[len(target.name) + 1:]
            if suffix == PART[1:] or (suffix.startswith(PART[1:] + ".") and len(suffix) == len(PART) + 8) or (
                    len(suffix) == 8 and suffix.isalnum()):
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
    if seen and seen.get("pending"):  # a placeholder, perhaps half written: fetched again (never hashed)
        return False
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
    """Downloads `wanted` to `<name>.part`, verifies each as it lands (in a thread pool: hashing is
    off the GIL), renames it to its name and records it in `.staged.json`: a file under its own
    name is always whole and checked. At most `window` objects are with s3transfer at a time
    (its queues, 1,000 deep, would block the submission of a large set for minutes), so
    `interrupt()` is called every `POLL_S` whatever the number of objects. An object that fails
    (S3's answer, or a copy that is not the object) is fetched again after a pause, up to `TRIES`
    times, then named in one line; the others go on."""
    if not wanted:
        return
    from boto3.s3.transfer import TransferConfig, create_transfer_manager
    from tqdm import tqdm

    # "classic": the CRT manager boto3 may pick where awscrt is installed skips botocore's events (s3.usage would
    # count nothing) and max_concurrency (benchmarks.staging measured it apart: more CPU per GB)
    config = TransferConfig(max_concurrency=workers, multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                            io_chunksize=IO_CHUNK, preferred_transfer_client="classic")
    bar = tqdm(total=sum(w.bytes for w in wanted), unit="B", unit_scale=True, unit_divisor=1024, desc="staging",
               disable=not progress, file=sys.stderr, mininterval=1 if sys.stderr.isatty() else 30, smoothing=0.1)
    window = 4 * workers
    queue = deque((0.0, item) for item in wanted)  # (not before, in time.monotonic(); the object)
    tries: Counter = Counter()
    failures: list[str] = []
    in_flight: list = []  # (s3transfer future, item, its target: a path, or the open placeholder)
    checking: list = []  # (verification future, item)

    class Subscriber:  # s3transfer's subscriber interface
        def __init__(self, item: Wanted):
            self.item = item

        def on_queued(self, future, **_):  # the size and ETag we know: no HEAD per object (s3transfer needs both)
            future.meta.provide_transfer_size(self.item.bytes)
            if self.item.etag:
                future.meta.provide_object_etag(f'"{self.item.etag}"')

        def on_progress(self, future, bytes_transferred, **_):
            bar.update(bytes_transferred)

    def failed(item: Wanted, what: str) -> None:
        """Another try after a pause (1 s, 2 s, 4 s), or, after the last, one line."""
        tries[item.name] += 1
        if tries[item.name] < TRIES:
            queue.append((time.monotonic() + BACKOFF_S * 2 ** (tries[item.name] - 1), item))
        else:
            failures.append(f"{what} (after {TRIES} tries)")

    def recorded(item: Wanted) -> None:
        was_placeholder = placeholder(item)
        stat = (folder / item.name).stat()
        record[item.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "check": item.check}
        if was_placeholder:  # landed: what the loaders wait for, on every process of the machine
            _write_record(folder, record)

    def placeholder(item: Wanted) -> bool:
        return bool(record.get(item.name, {}).get("pending"))

    checks = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    try:
        with create_transfer_manager(client, config) as manager:
            while queue or in_flight or checking:
                interrupt()  # a spot notice during staging: leave, keeping what is finished
                now, later = time.monotonic(), deque()
                while queue and len(in_flight) + len(checking) < window:
                    not_before, item = queue.popleft()
                    if not_before > now:
                        later.append((not_before, item))
                        continue
                    if placeholder(item):  # written in place, at each part's offset (s3transfer seeks)
                        target = open(folder / item.name, "r+b", buffering=0)  # noqa: SIM115 - closed when it ends
                    else:
                        target = folder / (item.name + PART)
                        target.parent.mkdir(parents=True, exist_ok=True)
                    in_flight.append((manager.download(bucket, s3.join_key(prefix, item.name),
                                                       target if placeholder(item) else str(target),
                                                       subscribers=[Subscriber(item)]), item, target))
                queue.extendleft(reversed(later))
                still = []
                for transfer, item, target in in_flight:
                    if not transfer.done():
                        still.append((transfer, item, target))
                        continue
                    try:
                        transfer.result()
                    except Exception as error:  # botocore's many error types: S3's answer, on one line
                        failed(item, f"s3://{bucket}/{s3.join_key(prefix, item.name)}: cannot fetch "
                                     f"({s3.reason(error)})")
                        continue
                    finally:
                        if placeholder(item):
                            target.close()
                    etag_is_md5 = functools.partial(_etag_is_md5, client, bucket, s3.join_key(prefix, item.name))
                    checking.append((checks.submit(_land_in_place if placeholder(item) else _land, folder, item,
                                                   etag_is_md5), item))
                in_flight, still = still, []
                for check, item in checking:
                    if not check.done():
                        still.append((check, item))
                    elif problem := check.result():
                        bar.update(-item.bytes)
                        failed(item, problem)
                    else:
                        recorded(item)
                checking = still
                if in_flight or checking or queue:
                    time.sleep(POLL_S)
    finally:
        # Stopped early (the transfer manager has stopped its transfers): the checks under way
        # finish (a file each), those not started are dropped; so are the .part files of both,
        # and every file that landed is recorded.
        checks.shutdown(wait=True, cancel_futures=True)
        for _, item, target in in_flight:  # a placeholder stays, pending: the next start fetches it again
            if placeholder(item):
                target.close()
            else:
                (folder / (item.name + PART)).unlink(missing_ok=True)
        for check, item in checking:
            if check.cancelled():
                (folder / (item.name + PART)).unlink(missing_ok=True)
            elif check.exception() is None and check.result() is None:
                recorded(item)
        bar.close()
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise StagingError(failures[0] + more)


def _land(folder: Path, item: Wanted, etag_is_md5: Callable[[], bool]) -> str | None:
    """Checks a fetched `<name>.part` and renames it to its name (atomic: a reader sees the whole
    file or none); what is wrong with it otherwise (the part removed), or None."""
    part, path = folder / (item.name + PART), folder / item.name
    try:
        problem = _problem(part, item, path, etag_is_md5)
    except OSError as error:  # the disk, not the object: said as the file's problem
        problem = f"{path}: cannot be read back ({error.strerror or error})"
    if problem:
        part.unlink(missing_ok=True)
        return problem
    os.replace(part, path)
    return None


def _land_in_place(folder: Path, item: Wanted, etag_is_md5: Callable[[], bool]) -> str | None:
    """Checks a tar written into its placeholder, from the disk (fsync first: what a reader will
    see); what is wrong with it (it stays pending and is written again), or None."""
    path = folder / item.name
    try:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        return _problem(path, item, path, etag_is_md5)
    except OSError as error:  # the disk, not the object: said as the file's problem
        return f"{path}: cannot be read back ({error.strerror or error})"


def _problem(path: Path, item: Wanted, name: Path, etag_is_md5: Callable[[], bool]) -> str | None:
    """What is wrong with a fetched copy at `path` of the file `name`, or None. `etag_is_md5()`
    asks S3, where a one-part ETag is not the copy's MD5, whether it was made from the bytes."""
    size = path.stat().st_size
    if size != item.bytes:
        return f"{name}: {size} bytes fetched, {item.bytes} expected"
    if item.check.startswith("sha256:") and not _checksum_matches(path, item.check):
        return f"{name}: sha256 differs from the manifest's (the object in S3 is not the shard the manifest lists)"
    if _md5_etag(item.check) and not _checksum_matches(path, item.check) and etag_is_md5():
        return f"{name}: MD5 differs from the object's ETag (changed in S3 while it was fetched?)"
    if item.samples is not None:
        try:
            samples = len(parse_index(path.read_text(), str(name)))
        except (FormatError, UnicodeDecodeError) as error:
            return str(error)
        if samples != item.samples:
            return f"{name}: lists {samples} samples, the manifest says {item.samples}"
    return None


def _md5_etag(check: str) -> str | None:
    """The MD5 an ETag may be: an object uploaded in one part (no '-'), unless S3 encrypted it with
    SSE-KMS or SSE-C (`_etag_is_md5`: then its ETag is not the MD5 of the bytes, and only the size
    and an index's sample count check the copy)."""
    etag = check[len("etag:"):] if check.startswith("etag:") else ""
    return etag if len(etag) == 32 and "-" not in etag else None


def _etag_is_md5(client, bucket: str, key: str) -> bool:
    """Whether S3 made this one-part object's ETag from its bytes: not under SSE-KMS or SSE-C (one
    HEAD, asked only when the MD5 differs; an error counts as yes: the copy then fails its check)."""
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception:  # noqa: BLE001 - botocore's many types: the mismatch stands
        return True
    return head.get("ServerSideEncryption") not in ("aws:kms", "aws:kms:dsse") and "SSECustomerAlgorithm" not in head


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


def run_order(train: SplitShards, validation: SplitShards, seed: int, epoch: int, world_size: int,
              ranks: range) -> list[str]:
    """The tars (paths) in the order a run starting at `epoch` reads them on a machine holding
    `ranks`: each rank's share of the epoch's shard order, round-robin (every rank's first shards
    first), the validation split after the first `VAL_AFTER` of them, then every other tar in the
    epoch's order (later epochs read the shards of other ranks too)."""
    ordered = epoch_shards(train, seed, epoch)
    shares = [[tar for tar, _, _ in rank_pieces(ordered, world_size, rank)] for rank in ranks]
    first = [tar for round_ in zip_longest(*shares) for tar in round_ if tar is not None]
    order = list(dict.fromkeys([*first[:VAL_AFTER], *validation.tars, *first, *ordered.tars]))
    return order


def machine_ranks(rank: int, local_rank: int) -> range:
    """The ranks on this machine (torchrun's LOCAL_WORLD_SIZE of them, from this one's rank)."""
    first = rank - local_rank
    return range(first, first + int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class Landing:
    """What the loaders wait on while the tars arrive: `wait(tars)` returns once each has landed
    (recorded in `.staged.json` as whole and checked), calling `interrupt()` between looks (a
    spot notice leaves at once) and raising the staging's one line if it failed. Seconds waited
    are returned, for the run's data wait."""

    def __init__(self, folder: Path, interrupt, background: _Background | None = None):
        self.folder, self.interrupt, self.background = Path(folder), interrupt or (lambda: None), background
        self._landed: set[str] = set()
        self._seen = None  # the record's (inode, mtime_ns, size) when last read

    def landed(self, tars) -> bool:
        """Whether every one of `tars` has landed already (no waiting)."""
        self._read()
        return all(os.path.relpath(tar, self.folder) in self._landed for tar in tars)

    def wait(self, tars) -> float:
        names = [os.path.relpath(tar, self.folder) for tar in tars]
        if all(name in self._landed for name in names):
            return 0.0
        started = time.perf_counter()
        while True:
            self._read()
            missing = [name for name in names if name not in self._landed]
            if not missing:
                return time.perf_counter() - started
            self.interrupt()
            self._raise_if_failed(missing)
            time.sleep(POLL_S)

    def _read(self) -> None:
        try:
            stat = (self.folder / RECORD).stat()
        except OSError:
            return
        if (stat.st_ino, stat.st_mtime_ns, stat.st_size) != self._seen:  # each write is a new file (a rename)
            self._seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            self._landed = {name for name, seen in _read_record(self.folder).items() if "check" in seen}

    def _raise_if_failed(self, missing: list[str]) -> None:
        try:
            raise StagingError((self.folder / FAILED).read_text().strip())
        except OSError:
            pass
        if self.background is not None and self.background.order is not None and not self.background.is_alive():
            raise StagingError(self.background.error or f"{self.folder / missing[0]}: staging stopped before it "
                                                        f"landed")


class _Background(threading.Thread):
    """The tars fetched in the machine's first process while it trains; a failure is kept (and
    written to `FAILED` for the other processes), a stop request ends it quietly."""

    def __init__(self, prepared: _Prepared, url: str, interrupt, log):
        super().__init__(name="staging", daemon=True)
        self.prepared, self.url, self.interrupt, self.log = prepared, url, interrupt, log
        self.order: list[str] | None = None
        self.error: str | None = None

    def begin(self, order: list[str]) -> None:
        self.order = [os.path.relpath(tar, self.prepared.folder) for tar in order]
        self.start()

    def run(self) -> None:
        try:
            with _locked(self.prepared.folder / LOCK, self.interrupt):
                staged = self.prepared.fetch_tars(self.order, False, self.interrupt)
            self.log(staged.line(self.url) + " (while training)")
        except Interrupted:
            pass
        except Exception as error:  # noqa: BLE001 - any failure ends the run in one line, not a hanging loader
            self.error = str(error) if isinstance(error, DaliImagenetError) else f"staging failed: {error!r}"
            write_atomic(self.prepared.folder / FAILED, self.error + "\n")


class Staging:
    """What `local_data` hands `train.py`: the folder the loaders read and the `Landing` they wait
    on (None: nothing left to wait for); `begin(order)` starts the tars' download (the local
    master's; a no-op elsewhere) once the run knows its starting epoch."""

    def __init__(self, data: str, landing: Landing | None = None, background: _Background | None = None):
        self.data, self.landing, self.background = data, landing, background

    def begin(self, order: list[str]) -> None:
        if self.background is not None and not self.background.is_alive() and self.background.order is None:
            self.background.begin(order)


def local_data(data: str, stage_dir: str | None, *, stream: bool, here: bool, interrupt) -> Staging:
    """What the loaders read: `data` itself, unless it is on S3 and not streamed: then its local
    copy in `stage_dir` (default `default_folder`). One process per machine (`here`) stages: the
    small files and the tars' placeholders now, the tars in the background after `begin`; the
    others wait until that launch's indices and placeholders are in place. A timm-layout set
    (whose indices are built from its tars) is staged whole first. `interrupt()` raises to stop
    (a spot notice)."""
    if not s3.is_s3(data) or stream:
        return Staging(data)
    folder = Path(stage_dir or default_folder(data))
    s3.split_s3_url(data)  # a bad URL is said before anything is made
    launch = str(os.getppid())  # torchrun's agent: the same for every process of this launch on this machine
    if not here:  # (the folder is the stager's to check: it may be writing its record right now)
        while not _prepared_by(folder, launch):
            interrupt()
            time.sleep(POLL_S)
        return Staging(str(folder), Landing(folder, interrupt))
    check_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StagingError(f"{folder}: cannot make the staging folder ({error.strerror})") from None
    say = lambda line: print(line, flush=True)  # noqa: E731
    with _locked(folder / LOCK, interrupt):
        prepared = _prepare(data.rstrip("/"), folder, ("train", "validation"), 16, interrupt, say, manifest_now=True,
                            progress=True)
        write_atomic(folder / PREPARED, launch)  # (a timm-layout set was fetched whole: its tars are not in place)
    if not prepared.tars:
        say(Staged(folder, prepared.wanted, prepared.fetched, prepared.bytes_total, prepared.bytes_needed,
                   time.monotonic() - prepared.started, prepared.region).line(data))
        return Staging(str(folder))
    background = _Background(prepared, data, interrupt, say)
    return Staging(str(folder), Landing(folder, interrupt, background), background)


def _prepared_by(folder: Path, launch: str) -> bool:
    try:
        return (folder / PREPARED).read_text() == launch
    except OSError:
        return False
