"""Source dataset -> shuffled webdataset shards with DALI index files and a manifest.

Shuffling with bounded memory: a split's units (row groups / files) are permuted with the seed
and packed into *chunks* of about `SHARDS_PER_CHUNK` shards' worth of rows. A worker reads one
chunk (the only image bytes it holds), permutes its rows and writes the chunk's shards. Each
shard therefore mixes rows from dozens of row groups drawn from the whole split, and readers
only need a small shuffle buffer on top. Chunks are independent: they run in parallel, and a
chunk whose shards the manifest and their sha256 prove complete is skipped by `--resume`.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from dali_imagenet import s3
from dali_imagenet.atomic import written_for
from dali_imagenet.data.folders import check_output_folder, refuse_overlap
from dali_imagenet.data.pixels import MAX_PIXELS
from dali_imagenet.data.shardformat import (
    CLASSES_TSV,
    MANIFEST,
    MANIFEST_VERSION,
    TIMM_INFO,
    ShardWriter,
    classes_tsv,
    index_name,
    sha256_file,
    shard_name,
    timm_info,
)
from dali_imagenet.errors import DaliImagenetError
from shard_tools import hub
from shard_tools.images import Rejected, prepare_image
from shard_tools.sources import SPLITS, Record, Source, Unit, open_source, read_unit, synset_from_path
from shard_tools.storage import open_output

SHARDS_PER_CHUNK = 4  # memory per worker ~ 4 x shard_size x 110 KB (~550 MB at the default size)


class ConvertError(DaliImagenetError):
    """The conversion cannot go on; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class Options:
    """Everything that changes the output bytes; recorded in the manifest and checked on resume."""
    shard_size: int = 1250  # samples per shard: ~1,025 train shards for the full 1,281,167 rows
    seed: int = 0
    max_side: int | None = None  # px; re-encode only images whose longer side is larger (all: `reencode`)
    quality: int = 90  # JPEG quality of re-encoded images
    name: str = "imagenet1k"  # shard file prefix: <split>/<name>-<split>-NNNNNN.tar
    reencode: bool = False  # every image re-encoded at `quality` (FFCV-like with max_side 500, quality 90)
    max_pixels: int = MAX_PIXELS  # width x height; a larger image is rejected before it is decoded


@dataclass
class Chunk:
    split: str
    index: int
    units: list[Unit]
    first_shard: int
    shard_count: int

    @property
    def id(self) -> str:
        return f"{self.split}/{self.index}"

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)


@dataclass
class ChunkResult:
    chunk: str
    split: str
    read: int = 0
    source_bytes: int = 0
    fetched_bytes: int = 0  # from the Hub, over HTTP (0 for a local source)
    unlabelled: int = 0  # samples written with label -1 (ImageNet's test split: all of them)
    shards: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    converted: list[dict] = field(default_factory=list)


def plan_chunks(split: str, units: list[Unit], options: Options) -> list[Chunk]:
    rng = np.random.default_rng([options.seed, SPLITS.index(split)])
    chunk_rows = options.shard_size * SHARDS_PER_CHUNK
    chunks, current, rows, next_shard = [], [], 0, 0
    for position in rng.permutation(len(units)):
        current.append(units[position])
        rows += units[position].rows
        if rows >= chunk_rows:
            chunks.append(Chunk(split, len(chunks), current, next_shard, math.ceil(rows / options.shard_size)))
            next_shard += chunks[-1].shard_count
            current, rows = [], 0
    if current:
        chunks.append(Chunk(split, len(chunks), current, next_shard, math.ceil(rows / options.shard_size)))
    return chunks


def sample_key(record: Record) -> str:
    # webdataset splits a member name at its first dot: keys must have none. The canonical row
    # index keeps keys unique; the source stem keeps them readable.
    stem = PurePosixPath(record.path).stem.replace(".", "_").replace(" ", "_")[:64]
    return f"{record.index:08d}_{stem}" if stem else f"{record.index:08d}"


@dataclass(frozen=True)
class ChunkJob:
    chunk: Chunk
    root: Path
    options: Options
    output: object
    num_classes: int
    synsets: list
    strict: bool
    footers: dict = field(default_factory=dict)  # the Hub: the footers of this chunk's files (read by the planner)
    keep: dict = field(default_factory=dict)  # shard name -> an earlier run's entry for a tar still intact
    repairs: dict = field(default_factory=dict)  # shard name -> verify-shards --repair entries (kept with its tar)


def process_chunk(job: ChunkJob) -> ChunkResult:
    chunk, options = job.chunk, job.options
    hub.remember_footers(job.footers)
    records, fetched = [], 0
    for unit in chunk.units:
        unit_records, unit_fetched = read_unit(unit, job.root)
        records += unit_records
        fetched += unit_fetched
    if len(records) != chunk.rows:
        raise ConvertError(f"{chunk.units[0].file}: read {len(records)} rows where the metadata promised {chunk.rows}")
    result = ChunkResult(chunk.id, chunk.split, read=len(records),
                         source_bytes=sum(len(r.data or b"") for r in records), fetched_bytes=fetched)
    rng = np.random.default_rng([options.seed, SPLITS.index(chunk.split), chunk.index])
    order = rng.permutation(len(records))
    staging = job.output.staging_dir(chunk.split)
    for offset, positions in enumerate(np.array_split(order, chunk.shard_count)):
        name = shard_name(options.name, chunk.split, chunk.first_shard + offset)
        tar_tmp = staging / (PurePosixPath(name).name + ".tmp")
        idx_tmp = staging / (PurePosixPath(index_name(name)).name + ".tmp")
        with ShardWriter(tar_tmp, idx_tmp) as writer:
            for position in positions:
                record = records[position]
                try:
                    sample = _make_sample(record, job)
                except Rejected as why:
                    if job.strict:
                        raise ConvertError(f"{record.origin} ({record.path or 'no path'}): {why}") from None
                    result.rejected.append({"chunk": chunk.id, "source": record.origin, "path": record.path,
                                            "reason": str(why)})
                    continue
                key, components, converted = sample
                writer.add(key, components)
                result.unlabelled += record.label == -1
                if converted:
                    result.converted.append({"chunk": chunk.id, "key": key, "source": record.origin,
                                             "path": record.path, "reason": converted})
        if writer.samples == 0:  # every row rejected: an empty tar would break the readers
            tar_tmp.unlink()
            idx_tmp.unlink()
            continue
        digest, size = sha256_file(tar_tmp), tar_tmp.stat().st_size
        kept = job.keep.get(name)
        if kept is not None and kept["sha256"] == digest:  # the tar there is this one: keep it, its index, its repairs
            tar_tmp.unlink()
            idx_tmp.unlink()
            result.shards.append(kept)
            result.rejected += job.repairs.get(name, [])
            continue
        # Index first: a tar under its final name then always has its index beside it.
        job.output.publish(idx_tmp, index_name(name), sha256_file(idx_tmp))
        job.output.publish(tar_tmp, name, digest)
        result.shards.append({"name": name, "chunk": chunk.id, "samples": writer.samples, "bytes": size,
                              "sha256": digest})
    return result


def _make_sample(record: Record, job: ChunkJob) -> tuple[str, dict[str, bytes], str | None]:
    label = record.label
    if label is None:
        raise Rejected("no label")
    if label < -1 or (job.num_classes and label >= job.num_classes):
        raise Rejected(f"label {label} outside 0..{job.num_classes - 1}")
    prepared = prepare_image(record.data, job.options.max_side, job.options.quality, job.options.reencode,
                             job.options.max_pixels)
    synset = (job.synsets[label] if 0 <= label < len(job.synsets) else None) or synset_from_path(record.path)
    meta = {"path": record.path, "synset": synset, "label": label,
            "width": prepared.width, "height": prepared.height}
    components = {
        "jpg": prepared.data,
        "cls": str(label).encode("ascii"),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    return sample_key(record), components, prepared.converted


@dataclass
class Earlier:
    """What an earlier run left of the chunks: those whose every shard is intact, and, of the
    others, the shards that still are (kept when the chunk is redone)."""
    done: dict[str, ChunkResult] = field(default_factory=dict)
    intact: dict[str, dict[str, dict]] = field(default_factory=dict)  # chunk -> shard name -> manifest entry
    repairs: dict[str, list[dict]] = field(default_factory=dict)  # shard name -> verify-shards --repair entries


def _previous_results(manifest: dict, output, chunks: list[Chunk]) -> Earlier:
    """Chunks of an earlier run whose every shard is present with the recorded size and sha256.
    A set repaired by `verify-shards --repair` counts too: its tars are unchanged, its indices
    and shard counts leave the dropped samples out, and its `rejected` entries (which name a shard,
    not a chunk) stay with the chunk that wrote the shard. A chunk with a tar whose sha256 no
    longer matches is redone from the source: that tar is rewritten, and its chunk's intact tars
    (with their indices and repairs) are kept."""
    results: dict[str, ChunkResult] = {}
    earlier = Earlier()
    for split, info in manifest.get("splits", {}).items():
        for entry in info.get("chunks", []):
            results[entry["chunk"]] = ChunkResult(entry["chunk"], split, entry["read"], entry["source_bytes"],
                                                  unlabelled=entry.get("unlabelled", 0))
        chunk_of_shard = {s["name"]: s["chunk"] for s in info.get("shards", [])}
        for kind in ("shards", "rejected", "converted"):
            for entry in info.get(kind, []):
                chunk = entry.get("chunk") or chunk_of_shard.get(entry.get("shard"))
                if chunk in results:
                    getattr(results[chunk], kind).append(entry)
                if kind == "rejected" and "shard" in entry:
                    earlier.repairs.setdefault(entry["shard"], []).append(entry)
    for chunk in chunks:
        result = results.get(chunk.id)
        if result is None:
            continue
        intact = {s["name"]: s for s in result.shards if output.verify(s["name"], s["bytes"], s["sha256"])}
        if len(intact) == len(result.shards):
            earlier.done[chunk.id] = result
        else:
            earlier.intact[chunk.id] = intact
    return earlier


def build_manifest(source: Source, options: Options, splits: list[str], results: dict[str, ChunkResult],
                   complete: bool) -> dict:
    manifest = {
        "version": MANIFEST_VERSION,
        "complete": complete,
        "source": {"kind": source.kind, "fingerprint": source.fingerprint, **source.details},
        "options": asdict(options),
        "classes": source.class_names,
        "synsets": source.synsets,
        "splits": {},
    }
    for split in splits:
        ordered = sorted((r for r in results.values() if r.split == split), key=lambda r: int(r.chunk.split("/")[1]))
        shards = sorted((s for r in ordered for s in r.shards), key=lambda s: s["name"])
        manifest["splits"][split] = {
            "rows": source.splits[split].rows,
            "read": sum(r.read for r in ordered),
            "samples": sum(s["samples"] for s in shards),
            "rejected_count": sum(len(r.rejected) for r in ordered),
            "converted_count": sum(len(r.converted) for r in ordered),
            "unlabelled": sum(r.unlabelled for r in ordered),
            "shards": shards,
            "rejected": [e for r in ordered for e in r.rejected],
            "converted": [e for r in ordered for e in r.converted],
            "chunks": [{"chunk": r.chunk, "read": r.read, "source_bytes": r.source_bytes, "unlabelled": r.unlabelled}
                       for r in ordered],
        }
    return manifest


_OWN_FILES = {MANIFEST, CLASSES_TSV, TIMM_INFO, ".write-test"}
_SPLIT_NAMES = "|".join(SPLITS)
_OWN_SHARD = re.compile(rf"({_SPLIT_NAMES})/[^/]+-({_SPLIT_NAMES})-\d{{6}}\.(tar|idx)(\.tmp)?")


def written_by_us(name: str) -> bool:
    """Whether a path under OUTPUT (relative; a folder ends with '/') is one this tool writes."""
    return (name in _OWN_FILES or name.removesuffix(".tmp") in _OWN_FILES or written_for(name) in _OWN_FILES
            or (name.endswith("/") and name.rstrip("/") in SPLITS) or bool(_OWN_SHARD.fullmatch(name)))


def check_output(source_path: str | Path, output_url: str) -> None:
    """Before any work: a local OUTPUT is not SOURCE, inside it or around it, and holds nothing
    but what this tool writes (a conversion's shards, indices and manifest; a half-done one too)."""
    if s3.is_s3(output_url):
        if s3.is_s3(str(source_path)):
            refuse_overlap(output_url, str(source_path), output_name="OUTPUT", source_name="SOURCE")
        return
    if not hub.is_hub(str(source_path)) and Path(source_path).exists():
        refuse_overlap(output_url, source_path, output_name="OUTPUT", source_name="SOURCE")
    check_output_folder(output_url, written_by_us, what="shard-imagenet's output", marker=MANIFEST)


def convert(source_path: str | Path, output_url: str, splits: tuple[str, ...], options: Options,
            workers: int = 1, resume: bool = False, overwrite: bool = False, strict: bool = False,
            progress: bool = True) -> dict:
    """Runs the conversion; returns the final manifest with a `stats` entry (not written)."""
    started = time.perf_counter()
    check_output(source_path, output_url)
    source = open_source(source_path, splits)
    output = open_output(output_url)
    splits_present = [s for s in splits if s in source.splits]
    chunks = [c for s in splits_present for c in plan_chunks(s, source.splits[s].units, options)]

    previous = output.read_text(MANIFEST)
    done: dict[str, ChunkResult] = {}
    if previous is not None and not (resume or overwrite):
        raise ConvertError(
            f"{output.url}/{MANIFEST} exists: pass --resume to continue that run or --overwrite to start over"
        )
    if previous is not None and resume:
        old = json.loads(previous)
        _check_same_commit(old.get("source", {}), source, output.url)
        if old.get("source", {}).get("fingerprint") != source.fingerprint:
            raise ConvertError(f"{output.url}/{MANIFEST}: made from a different source; cannot resume")
        if {**asdict(Options()), **old.get("options", {})} != asdict(options):  # fields it predates: their defaults
            raise ConvertError(
                f"{output.url}/{MANIFEST}: made with options {old.get('options')}; cannot resume with {asdict(options)}"
            )
        earlier = _previous_results(old, output, chunks)
        done = earlier.done
    else:
        earlier = Earlier()

    todo = [c for c in chunks if c.id not in done]
    jobs = [ChunkJob(c, source.root, options, output, len(source.class_names), source.synsets, strict,
                     {u.file: source.footers[u.file] for u in c.units if u.file in source.footers},
                     earlier.intact.get(c.id, {}), earlier.repairs) for c in todo]
    bar = tqdm(total=sum(c.rows for c in chunks), initial=sum(r.read for r in done.values()), unit="img",
               unit_scale=True, disable=not progress, desc="shard-imagenet", smoothing=0.1)
    source_bytes = fetched_bytes = 0
    try:
        for result in _run(jobs, workers):
            done[result.chunk] = result
            source_bytes += result.source_bytes
            fetched_bytes += result.fetched_bytes
            bar.update(result.read)
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix_str(f"{fetched_bytes / 1e6 / elapsed:.1f} MB/s from the Hub" if fetched_bytes else
                                f"{source_bytes / 1e6 / elapsed:.1f} MB/s")
            output.write_text(
                MANIFEST, json.dumps(build_manifest(source, options, splits_present, done, False), indent=1)
            )
    finally:
        bar.close()

    manifest = build_manifest(source, options, splits_present, done, True)
    for split, info in manifest["splits"].items():
        if info["read"] != info["rows"] or info["read"] != info["samples"] + info["rejected_count"]:
            raise ConvertError(f"{split}: rows do not add up (source {info['rows']}, read {info['read']}, "
                               f"written {info['samples']}, rejected {info['rejected_count']})")
    output.write_text(CLASSES_TSV, classes_tsv(source.class_names, source.synsets))
    output.write_text(TIMM_INFO, json.dumps(timm_info(manifest), indent=1))
    output.write_text(MANIFEST, json.dumps(manifest, indent=1))  # last: "complete" means all of the above is there
    elapsed = time.perf_counter() - started
    manifest["stats"] = {
        "seconds": elapsed,
        "converted_now": sum(r.read for r in done.values() if r.chunk in {c.id for c in todo}),
        "source_bytes_now": source_bytes,
        "fetched_bytes_now": fetched_bytes,
        "peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                           resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024,
        "skipped_chunks": len(chunks) - len(todo),
    }
    return manifest


def _check_same_commit(old: dict, source: Source, output_url: str) -> None:
    """A Hub conversion resumes only against the commit it started from: a branch that moved
    may hold other bytes under the same file names."""
    new_sha = source.details.get("sha")
    if old.get("sha") and new_sha and old["sha"] != new_sha:
        raise ConvertError(f"{output_url}/{MANIFEST}: made from {old.get('repo')} at commit {old['sha'][:12]}, but "
                           f"{source.root} is now at {new_sha[:12]}: resume with "
                           f"hf://datasets/{old.get('repo')}@{old['sha']}, or pass --overwrite")


def _run(jobs: list[ChunkJob], workers: int):
    if workers <= 1 or len(jobs) <= 1:
        yield from map(process_chunk, jobs)
        return
    # spawn: no boto3 client or open file is shared with a forked child.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(process_chunk, jobs)
