"""`verify-shards SHARDS`: decode every sample as the loaders will, and drop the bad ones (`--repair`).

    verify-shards SHARDS [--split S] [--repair] [--workers N]      # SHARDS: a folder or s3://bucket/prefix

Each sample's JPEG must decode completely and be what every decoder reads (`images.prepare_image`,
the rules `shard-imagenet` applies when it writes: a baseline RGB JPEG), its `.cls` an integer
label of one of the manifest's classes, and each shard's index must list as many samples as the
manifest says. Every bad sample is reported (shard, key, reason), then a summary per split:
`checked = good + bad`.

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
from dali_imagenet.errors import DaliImagenetError, debug
from dali_imagenet.shardformat import (MANIFEST, TIMM_INFO, index_keys, index_name, index_without, parse_index,
                                       parse_manifest, sample_key, timm_info, write_text_atomic)
from shard_tools.images import Rejected, prepare_image


class VerifyError(DaliImagenetError):
    """The shard set cannot be verified (no manifest, an unreadable shard); one line naming it."""


@dataclass(frozen=True)
class Bad:
    split: str
    shard: str  # its name in the manifest, e.g. train/imagenet1k-train-000003.tar
    key: str
    reason: str


def check_sample(components: dict[str, bytes], num_classes: int) -> str | None:
    """Why a sample cannot be trained on, or None."""
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
    if not text.isdigit():
        return f"label {text[:20]!r} is not a class index"
    if int(text) >= num_classes:
        return f"label {int(text)} outside 0..{num_classes - 1}"
    return None


def verify_shard(tar: str, idx: str, name: str, split: str, expected: int, num_classes: int) -> tuple[int, list[Bad]]:
    """(samples checked, bad samples) of one local shard, read through its index."""
    try:
        samples = parse_index(Path(idx).read_text(), idx)
    except (OSError, DaliImagenetError) as error:
        raise VerifyError(f"{idx}: cannot read the index ({error})") from None
    bad = []
    if len(samples) != expected:
        bad.append(Bad(split, name, "*", f"the index lists {len(samples)} samples, the manifest says {expected}"))
    with open(tar, "rb") as data:
        for key, sample in zip(index_keys(samples), samples):
            components = {}
            for ext, offset, size, _ in sample:
                data.seek(offset)
                components[ext] = data.read(size)
            reason = check_sample(components, num_classes)
            if reason:
                bad.append(Bad(split, name, key, reason))
    return len(samples), bad


def _verify_job(job: tuple) -> tuple[int, list[Bad], int]:
    """A worker's shard: local, or fetched from S3 into a temporary folder first."""
    root, name, split, expected, num_classes = job
    if not s3.is_s3(root):
        tar = f"{root}/{name}"
        return (*verify_shard(tar, index_name(tar), name, split, expected, num_classes), os.path.getsize(tar))
    bucket, prefix = s3.split_s3_url(root)
    client = s3.client()
    with tempfile.TemporaryDirectory(prefix="verify-shards-") as folder:
        tar, idx = Path(folder, "shard.tar"), Path(folder, "shard.idx")
        try:
            client.download_file(bucket, s3.join_key(prefix, name), str(tar))
            client.download_file(bucket, s3.join_key(prefix, index_name(name)), str(idx))
        except Exception as error:
            raise VerifyError(f"{root}/{name}: cannot download ({s3.reason(error)})") from None
        return (*verify_shard(str(tar), str(idx), name, split, expected, num_classes), tar.stat().st_size)


class ShardSet:
    """A shard-imagenet output, local or on S3: read and write its small files."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.remote = s3.is_s3(self.root)
        if not self.remote and not Path(self.root).is_dir():
            raise VerifyError(f"{self.root}: no such folder")

    def read(self, name: str) -> str:
        if not self.remote:
            path = Path(self.root, name)
            if not path.is_file():
                raise VerifyError(f"{path}: missing")
            return path.read_text()
        bucket, prefix = s3.split_s3_url(self.root)
        try:
            return s3.client().get_object(Bucket=bucket, Key=s3.join_key(prefix, name))["Body"].read().decode()
        except Exception as error:
            raise VerifyError(f"{self.root}/{name}: cannot read ({s3.reason(error)})") from None

    def write(self, name: str, text: str) -> None:
        """Atomic locally (a temporary file renamed over it); one PUT on S3 (atomic per object)."""
        if not self.remote:
            write_text_atomic(Path(self.root, name), text)
            return
        bucket, prefix = s3.split_s3_url(self.root)
        s3.client().put_object(Bucket=bucket, Key=s3.join_key(prefix, name), Body=text.encode())


def verify(root: str, splits: list[str] | None, workers: int, progress: bool = True) -> tuple[dict, list[Bad], dict]:
    """(manifest, bad samples, stats) of the shard set at `root`."""
    shard_set = ShardSet(root)
    manifest = parse_manifest(shard_set.read(MANIFEST), f"{root}/{MANIFEST}")
    splits = splits or list(manifest["splits"])
    for split in splits:
        if split not in manifest["splits"]:
            raise VerifyError(f"{root}/{MANIFEST}: no split {split!r} (has {', '.join(manifest['splits'])})")
    jobs = [(shard_set.root, s["name"], split, s["samples"], len(manifest["classes"]))
            for split in splits for s in manifest["splits"][split]["shards"]]
    total = sum(job[3] for job in jobs)
    bad: list[Bad] = []
    checked = dict.fromkeys(splits, 0)
    started = time.monotonic()
    read_bytes = 0
    bar = tqdm(total=total, unit="img", disable=not progress, desc="verify-shards")
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for job, (count, found, size) in zip(jobs, pool.map(_verify_job, jobs)):
            checked[job[2]] += count
            bad += found
            read_bytes += size
            bar.update(count)
    bar.close()
    seconds = time.monotonic() - started
    return manifest, bad, {"checked": checked, "seconds": seconds, "bytes": read_bytes}


def repair(root: str, manifest: dict, bad: list[Bad]) -> list[str]:
    """Drops the bad samples from their shards' indices, then counts them out of the manifest and
    `_info.json`; returns the files written."""
    shard_set = ShardSet(root)
    date = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    written = []
    by_shard: dict[tuple[str, str], list[Bad]] = {}
    for item in bad:
        by_shard.setdefault((item.split, item.shard), []).append(item)
    for (split, name), items in sorted(by_shard.items()):
        idx_name = index_name(name)
        samples = parse_index(shard_set.read(idx_name), f"{root}/{idx_name}")
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
        dropped = entry["samples"] - kept  # also what an interrupted earlier repair already took out
        entry["samples"] = kept
        info["samples"] -= dropped
        info["rejected_count"] += dropped
    shard_set.write(TIMM_INFO, json.dumps(timm_info(manifest), indent=1) + "\n")
    shard_set.write(MANIFEST, json.dumps(manifest, indent=1) + "\n")  # last: it counts what the indices now hold
    return written + [TIMM_INFO, MANIFEST]


def foreign_files(root: str, manifest: dict) -> int:
    """Files inside the local tars that are no sample's component (LICENSE, dotfiles, __MACOSX)."""
    import tarfile

    if s3.is_s3(root):
        return 0
    count = 0
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            with tarfile.open(Path(root, shard["name"]), "r:") as archive:
                count += sum(1 for m in archive if m.isreg() and sample_key(m.name) is None)
    return count


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards")
@click.option("--split", "splits", multiple=True, help="split(s) to check (default: all)")
@click.option("--repair", "do_repair", is_flag=True,
              help="drop the bad samples from the indices and the manifest (tars unchanged)")
@click.option("--workers", type=click.IntRange(1), default=os.cpu_count() or 1, show_default=True)
@click.option("--quiet", is_flag=True, help="no progress bar")
def main(shards, splits, do_repair, workers, quiet):
    """Decode every sample of SHARDS (a shard-imagenet folder or s3://bucket/prefix) as the loaders
    will; report the bad ones; with --repair, drop them without rewriting the tars."""
    try:
        manifest, bad, stats = verify(shards, list(splits) or None, workers, progress=not quiet)
        for item in bad:
            click.echo(f"bad: {item.shard}: sample {item.key}: {item.reason}")
        for split, checked in stats["checked"].items():
            bad_here = sum(1 for b in bad if b.split == split and b.key != "*")
            click.echo(f"{split}: checked {checked} = good {checked - bad_here} + bad {bad_here}")
        skipped = foreign_files(shards, manifest)
        if skipped:
            click.echo(f"{skipped} file(s) inside the tars are no sample's (no extension, dotfiles, __MACOSX): not read")
        seconds = max(stats["seconds"], 1e-9)
        checked_all = sum(stats["checked"].values())
        click.echo(f"{checked_all} images in {seconds:.1f} s: {checked_all / seconds:.0f} img/s, "
                   f"{stats['bytes'] / 1e6 / seconds:.1f} MB/s, {workers} worker(s)")
        if not bad:
            return
        if not do_repair:
            click.echo(f"{len(bad)} bad sample(s) remain: drop them with  verify-shards {shards} --repair", err=True)
            sys.exit(1)
        written = repair(shards, manifest, bad)
        click.echo(f"repaired: {len(bad)} sample(s) dropped; rewrote {', '.join(written)}; the tars are unchanged")
    except DaliImagenetError as error:
        if debug():
            raise
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
