"""`verify-shards SHARDS`: decode every sample as the loaders will, and drop the bad ones (`--repair`).

    verify-shards SHARDS [--split S] [--repair] [--workers N]      # SHARDS: a folder or s3://bucket/prefix

Each sample's JPEG must decode completely and be what every decoder reads (`images.prepare_image`,
the rules `shard-imagenet` applies when it writes: a baseline RGB JPEG), its `.cls` an integer
label of one of the manifest's classes, or -1 (unlabelled, as ImageNet's test split: counted
apart, never dropped), and each shard's index must list as many samples as the manifest says.
Every bad sample is reported (shard, key, reason), then a summary per split: `checked = good +
bad`. A set in timm's layout (tars only, no manifest) is checked through the loaders' index
cache (`shards.timm_tars`), each shard indexed from the copy being checked; it cannot be repaired.

`--repair` removes the bad samples from the dataset without rewriting a tar: each affected shard's
DALI index is rewritten without them, and the manifest (counts, and a `rejected` entry with the
reason and date for each) and timm's `_info.json` follow. Both loaders read through the index, so
the tar bytes (and their sha256) stay as they are: on S3 a repair rewrites one small `.idx`
object per affected shard, the manifest and `_info.json`. New index files are written before the
manifest that counts them; a repair cut short is finished by running it again.

Exit status: 0 when every sample is good or the bad ones were dropped, 1 when bad samples remain.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
from tqdm import tqdm

from dali_imagenet import s3
from dali_imagenet.atomic import write_atomic
from dali_imagenet.data.shardformat import (
    MANIFEST,
    TIMM_INFO,
    index_keys,
    index_name,
    index_sample_count,
    index_without,
    parse_index,
    parse_manifest,
    sample_key,
    sha256_file,
    timm_info,
)
from dali_imagenet.data.shards import TIMM_SPLIT_NAMES, TimmTar, default_index_cache, timm_classes, timm_tars
from dali_imagenet.errors import DaliImagenetError, debug
from shard_tools.images import Rejected, prepare_image


class VerifyError(DaliImagenetError):
    """The shard set cannot be verified (no manifest, an unreadable shard); one line naming it."""


@dataclass(frozen=True)
class Bad:
    split: str
    shard: str  # its name in the manifest, e.g. train/imagenet1k-train-000003.tar
    key: str
    reason: str
    unlabelled: bool = False  # the sample carried label -1 (counted out of the split's unlabelled on repair)
    tar_bytes: int | None = None  # a truncated tar's size now (the manifest takes it on repair)


UNLABELLED = "unlabelled"  # check_sample's word for a sample that decodes but carries label -1


def check_sample(components: dict[str, bytes], num_classes: int) -> str | None:
    """Why a sample cannot be used, `UNLABELLED` for one that decodes but carries label -1 (as all
    of ImageNet's test split does: fine to predict on, not to train or score), or None."""
    jpeg = components.get("jpg")
    if jpeg is None:
        return "no .jpg component"
    try:
        prepared = prepare_image(jpeg)
    except Rejected as why:
        return re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(why))  # PIL names the buffer it read
    if prepared.converted:  # shard-imagenet would have re-encoded it; a loader may mis-decode it
        return f"not a baseline RGB JPEG (shard-imagenet would have re-encoded it: {prepared.converted})"
    text = components.get("cls", b"").strip()
    if text == b"-1":
        return UNLABELLED
    if not text.isdigit():
        return f"label {text[:20]!r} is not a class index"
    if int(text) >= num_classes:
        return f"label {int(text)} outside 0..{num_classes - 1}"
    return None


@dataclass(frozen=True)
class Checked:
    samples: int
    bad: list[Bad]
    unlabelled: int
    bytes: int


TRUNCATED = "truncated"  # a tar shorter than the manifest says: repairable (what is left is checked sample by sample)
UNREPAIRABLE = "cannot be repaired"  # in a whole-shard reason: no repair makes it trainable; the reason says what does


def verify_shard(tar: str, idx: str, name: str, split: str, expected: int | None, num_classes: int,
                 expected_bytes: int | None = None, sha256: str | None = None, repaired: bool = False) -> Checked:
    """What one local shard holds, read through its index (`expected`: the manifest's count;
    `expected_bytes`, `sha256`: the manifest's for the tar; `repaired`: a repair already dropped
    samples of it, so its bytes may differ from the manifest's)."""
    redo = "rewrite it with shard-imagenet SOURCE SHARDS --resume (or fetch it again)"
    if not Path(tar).is_file():
        return Checked(0, [Bad(split, name, "*", f"the tar is missing: {UNREPAIRABLE}; {redo}")], 0, 0)
    try:
        samples = parse_index(Path(idx).read_text(), idx)
    except (OSError, DaliImagenetError) as error:
        raise VerifyError(f"{idx}: cannot read the index ({error})") from None
    bad, unlabelled = [], 0
    size = os.path.getsize(tar)
    if expected is not None and len(samples) != expected:
        bad.append(Bad(split, name, "*", f"the index lists {len(samples)} samples, the manifest says {expected}"))
    if expected_bytes is not None and size != expected_bytes:
        if size > expected_bytes:
            bad.append(Bad(split, name, "*", f"the tar is {size} bytes, the manifest says {expected_bytes}: not the "
                                             f"tar the manifest describes; {UNREPAIRABLE}; {redo}"))
        else:
            bad.append(Bad(split, name, "*", f"{TRUNCATED}: the tar is {size} of the manifest's {expected_bytes} bytes",
                           tar_bytes=size))
    with open(tar, "rb") as data:
        for key, sample in zip(index_keys(samples), samples):
            if any(offset + length > size for _, offset, length, _ in sample):
                bad.append(Bad(split, name, key, f"cut off: the tar ends at byte {size}"))
                continue
            components = {}
            for ext, offset, length, _ in sample:
                data.seek(offset)
                components[ext] = data.read(length)
            reason = check_sample(components, num_classes)
            if reason == UNLABELLED:
                unlabelled += 1
            elif reason:
                bad.append(Bad(split, name, key, reason, components.get("cls", b"").strip() == b"-1"))
    if sha256 and size == expected_bytes and not repaired and not bad and sha256_file(tar) != sha256:
        bad.append(Bad(split, name, "*", f"its sha256 differs from the manifest's, yet every sample decodes: the "
                                         f"damage cannot be placed, so it {UNREPAIRABLE}; {redo}"))
    return Checked(len(samples), bad, unlabelled, size)


@dataclass(frozen=True)
class Job:
    """One shard to check: where its tar and index are (local paths or s3:// URLs)."""
    tar: str
    index: str
    name: str
    split: str
    expected: int | None  # the manifest's count; None: whatever the index lists
    num_classes: int
    make_index: bool = False  # a timm-layout shard not in the index cache yet: index it there
    bytes: int | None = None  # the manifest's size and sha256 of the tar (None: a timm-layout set)
    sha256: str | None = None
    repaired: bool = False  # an earlier repair dropped samples of it


def _verify_job(job: Job) -> Checked:
    """A worker's shard: local, or fetched from S3 into a temporary folder first (each tar once:
    a timm-layout shard is indexed into the loaders' cache from that same copy)."""
    with tempfile.TemporaryDirectory(prefix="verify-shards-") as folder:
        tar, idx = job.tar, job.index
        try:
            for remote, local in ((job.tar, "shard.tar"), (job.index, "shard.idx")):
                if s3.is_s3(remote) and not s3.download(*remote.rsplit("/", 1), Path(folder, local)):
                    raise VerifyError(f"{remote}: missing")
            tar = str(Path(folder, "shard.tar")) if s3.is_s3(tar) else tar
            idx = str(Path(folder, "shard.idx")) if s3.is_s3(idx) else idx
        except s3.S3Error as error:
            raise VerifyError(f"{job.tar}: cannot download ({error})") from None
        if job.make_index and not Path(idx).is_file():
            TimmTar(job.tar, job.name, Path(idx)).make_index(tar)
        return verify_shard(tar, idx, job.name, job.split, job.expected, job.num_classes, job.bytes, job.sha256,
                            job.repaired)


class ShardSet:
    """A shard set, local or on S3: shard-imagenet's (a manifest) or timm's layout (tars only)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.remote = s3.is_s3(self.root)
        if not self.remote and not Path(self.root).is_dir():
            raise VerifyError(f"{self.root}: no such folder")

    def read(self, name: str, missing_ok: bool = False) -> str | None:
        if not self.remote:
            path = Path(self.root, name)
            if not path.is_file():
                if missing_ok:
                    return None
                raise VerifyError(f"{path}: missing")
            return path.read_text()
        bucket, prefix = s3.split_s3_url(self.root)
        try:
            return s3.client().get_object(Bucket=bucket, Key=s3.join_key(prefix, name))["Body"].read().decode()
        except Exception as error:
            if missing_ok and s3.is_missing(error):
                return None
            raise VerifyError(f"{self.root}/{name}: cannot read ({s3.reason(error)})") from None

    def write(self, name: str, text: str) -> None:
        """Atomic locally (a temporary file renamed over it); one PUT on S3 (atomic per object)."""
        if not self.remote:
            write_atomic(Path(self.root, name), text)
            return
        bucket, prefix = s3.split_s3_url(self.root)
        s3.client().put_object(Bucket=bucket, Key=s3.join_key(prefix, name), Body=text.encode())


def plan(root: str, splits: list[str] | None, cache: Path | None = None) -> tuple[dict | None, list[Job]]:
    """(the manifest, or None for a timm-layout set; the shards to check)."""
    shard_set = ShardSet(root)
    text = shard_set.read(MANIFEST, missing_ok=True)
    if text is not None:
        manifest = parse_manifest(text, f"{root}/{MANIFEST}")
        splits = splits or list(manifest["splits"])
        for split in splits:
            if split not in manifest["splits"]:
                raise VerifyError(f"{root}/{MANIFEST}: no split {split!r} (has {', '.join(manifest['splits'])})")
        repaired = {e.get("shard") for split in splits for e in manifest["splits"][split].get("rejected", [])}
        return manifest, [Job(f"{shard_set.root}/{s['name']}", f"{shard_set.root}/{index_name(s['name'])}", s["name"],
                              split, s["samples"], len(manifest["classes"]), bytes=s.get("bytes"),
                              sha256=s.get("sha256"), repaired=s["name"] in repaired)
                          for split in splits for s in manifest["splits"][split]["shards"]]
    # The timm layout (timm/imagenet-1k-wds): tars only; the indices live in the loaders' cache.
    cache = cache or default_index_cache()
    try:
        classes = timm_classes(shard_set.root)
    except DaliImagenetError as error:
        raise VerifyError(str(error)) from None
    jobs = []
    for split in splits or list(TIMM_SPLIT_NAMES):
        try:
            tars = timm_tars(shard_set.root, split, cache)
        except DaliImagenetError as error:
            raise VerifyError(str(error)) from None
        jobs += [Job(t.location, str(t.index), t.name, split, index_sample_count(t.index) if t.indexed else None,
                     len(classes), make_index=True) for t in tars]
    if not jobs:
        raise VerifyError(f"{root}: no {MANIFEST} and no *-train-NNNN.tar (or validation, test) shards of the "
                          f"timm/imagenet-1k-wds layout")
    return None, jobs


def verify(root: str, splits: list[str] | None, workers: int, progress: bool = True,
           cache: Path | None = None) -> tuple[dict | None, list[Bad], dict]:
    """(manifest or None for a timm-layout set, bad samples, stats) of the shard set at `root`."""
    manifest, jobs = plan(root, splits, cache)
    bad: list[Bad] = []
    checked = {job.split: 0 for job in jobs}
    unlabelled = dict.fromkeys(checked, 0)
    started = time.monotonic()
    read_bytes = 0
    bar = tqdm(total=sum(job.expected or 0 for job in jobs) or None, unit="img", disable=not progress,
               desc="verify-shards")
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for job, result in zip(jobs, pool.map(_verify_job, jobs)):
            checked[job.split] += result.samples
            unlabelled[job.split] += result.unlabelled
            bad += result.bad
            read_bytes += result.bytes
            bar.update(result.samples)
    bar.close()
    seconds = time.monotonic() - started
    return manifest, bad, {"checked": checked, "unlabelled": unlabelled, "seconds": seconds, "bytes": read_bytes,
                           "tars": [job.tar for job in jobs]}


def repair(root: str, manifest: dict, bad: list[Bad]) -> list[str]:
    """Drops the bad samples from their shards' indices, then counts them out of the manifest and
    `_info.json`; returns the files written."""
    shard_set = ShardSet(root)
    date = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    written = []
    by_shard: dict[tuple[str, str], list[Bad]] = {}
    for item in bad:
        by_shard.setdefault((item.split, item.shard), []).append(item)
    for item in bad:  # before anything is written: a repair is whole or not made
        if UNREPAIRABLE in item.reason:
            raise VerifyError(f"{root}/{item.shard}: {item.reason}")
    indices = {}
    for (_, name), items in sorted(by_shard.items()):
        idx_name = index_name(name)
        indices[name] = samples = parse_index(shard_set.read(idx_name), f"{root}/{idx_name}")
        if not set(index_keys(samples)) - {item.key for item in items}:
            raise VerifyError(f"{root}/{name}: no sample of it is left to keep, so it {UNREPAIRABLE}; rewrite it with "
                              f"shard-imagenet SOURCE SHARDS --resume (or fetch it again)")
    for (split, name), items in sorted(by_shard.items()):
        idx_name = index_name(name)
        samples = indices[name]
        drop = {item.key for item in items if item.key != "*"}
        if drop:
            shard_set.write(idx_name, index_without(samples, drop))
            written.append(idx_name)
        kept = len(samples) - len(drop & set(index_keys(samples)))
        info = manifest["splits"][split]
        entry = next(s for s in info["shards"] if s["name"] == name)
        for item in items:
            info["rejected"].append({"shard": name, "key": item.key, "reason": item.reason, "date": date,
                                     "by": "verify-shards --repair"})
        lost_unlabelled = sum(1 for item in items if item.unlabelled and item.key in drop)
        if lost_unlabelled:
            info["unlabelled"] = info.get("unlabelled", 0) - lost_unlabelled
            chunk = next((c for c in info.get("chunks", []) if c["chunk"] == entry.get("chunk")), None)
            if chunk is not None:
                chunk["unlabelled"] = chunk.get("unlabelled", 0) - lost_unlabelled
        for item in items:
            if item.tar_bytes is not None:  # truncated: what is left is the tar now (--resume rewrites it whole)
                entry["bytes"] = item.tar_bytes
        dropped = entry["samples"] - kept  # also what an interrupted earlier repair already took out
        entry["samples"] = kept
        info["samples"] -= dropped
        info["rejected_count"] += dropped
    shard_set.write(TIMM_INFO, json.dumps(timm_info(manifest), indent=1) + "\n")
    shard_set.write(MANIFEST, json.dumps(manifest, indent=1) + "\n")  # last: it counts what the indices now hold
    return written + [TIMM_INFO, MANIFEST]


def foreign_files(tars: list[str]) -> int:
    """Files inside the local tars that are no sample's component (LICENSE, dotfiles, __MACOSX)."""
    import tarfile

    count = 0
    for tar in tars:
        if not s3.is_s3(tar) and Path(tar).is_file():
            try:
                with tarfile.open(tar, "r:") as archive:
                    count += sum(1 for m in archive if m.isreg() and sample_key(m.name) is None)
            except (tarfile.TarError, OSError):  # a truncated tar: its samples were checked through the index
                continue
    return count


def repair_command(shards: str, bad: list[Bad]) -> str:
    """The command that drops exactly these samples: it names the splits that hold them (a bare
    --repair would verify, and repair, every split)."""
    splits = sorted({item.split for item in bad})
    return f"verify-shards {shards} --repair " + " ".join(f"--split {split}" for split in splits)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards")
@click.option("--split", "splits", multiple=True, help="split(s) to check (default: all)")
@click.option("--repair", "do_repair", is_flag=True,
              help="drop the bad samples from the indices and the manifest (tars unchanged)")
@click.option("--workers", type=click.IntRange(1), default=os.cpu_count() or 1, show_default=True)
@click.option("--quiet", is_flag=True, help="no progress bar")
def main(shards, splits, do_repair, workers, quiet):
    """Decode every sample of SHARDS (a shard-imagenet folder or s3://bucket/prefix, or a set in
    timm's layout: tars only) as the loaders will; report the bad ones; with --repair, drop them
    without rewriting the tars."""
    try:
        manifest, bad, stats = verify(shards, list(splits) or None, workers, progress=not quiet)
        for item in bad:
            click.echo(f"bad: {item.shard}: sample {item.key}: {item.reason}")
        for split, checked in stats["checked"].items():
            bad_here = sum(1 for b in bad if b.split == split and b.key != "*")
            unlabelled = stats["unlabelled"][split]
            click.echo(f"{split}: checked {checked} = good {checked - bad_here} + bad {bad_here}" + (
                f"; {unlabelled} of the good are unlabelled (label -1, as in ImageNet's test split: decodable, for "
                f"prediction, not for training or scoring)" if unlabelled else ""))
        skipped = foreign_files(stats["tars"])
        if skipped:
            click.echo(
                f"{skipped} file(s) inside the tars are no sample's (no extension, dotfiles, __MACOSX): not read"
            )
        seconds = max(stats["seconds"], 1e-9)
        checked_all = sum(stats["checked"].values())
        click.echo(f"{checked_all} images in {seconds:.1f} s: {checked_all / seconds:.0f} img/s, "
                   f"{stats['bytes'] / 1e6 / seconds:.1f} MB/s, {workers} worker(s)"
                   + ("; a timm-layout set: indices from the loaders' cache" if manifest is None else ""))
        if not bad:
            return
        if manifest is None:
            click.echo(f"{len(bad)} bad sample(s): a timm-layout set has no manifest to record a repair in; convert it "
                       f"with shard-imagenet (which rejects such samples), or rewrite the tars without them", err=True)
            sys.exit(1)
        unrepairable = next((item for item in bad if UNREPAIRABLE in item.reason), None)
        if unrepairable is not None:
            click.echo(f"{shards}/{unrepairable.shard}: {unrepairable.reason}", err=True)
            sys.exit(1)
        if not do_repair:
            click.echo(f"{len(bad)} bad sample(s) remain: drop them with  {repair_command(shards, bad)}", err=True)
            sys.exit(1)
        written = repair(shards, manifest, bad)
        click.echo(f"repaired: {len(bad)} sample(s) dropped; rewrote {', '.join(written)}; the tars are unchanged")
    except DaliImagenetError as error:
        if debug():
            raise
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
