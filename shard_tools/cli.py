"""`shard-imagenet SOURCE OUTPUT`: Hugging Face ImageNet-1K parquet or ImageFolder -> webdataset shards."""
from __future__ import annotations

import os

import click

from dali_imagenet.errors import DaliImagenetError, debug
from shard_tools.convert import Options, convert
from shard_tools.sources import SPLITS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=str))
@click.argument("output")
@click.option("--split", "split", type=click.Choice([*SPLITS, "all"]), default="all", show_default=True,
              help="which split(s) to convert")
@click.option("--shard-size", type=click.IntRange(1), default=Options.shard_size, show_default=True,
              help="samples per shard")
@click.option("--seed", type=int, default=Options.seed, show_default=True, help="shuffle seed")
@click.option("--max-side", type=click.IntRange(16), default=None,
              help="re-encode only images whose longer side exceeds this many px")
@click.option("--quality", type=click.IntRange(1, 100), default=Options.quality, show_default=True,
              help="JPEG quality of re-encoded images")
@click.option("--reencode", is_flag=True,
              help="re-encode every image at --quality (with --max-side: larger ones downscaled first), e.g. "
                   "FFCV-like: --reencode --max-side 500 --quality 90; SOURCE may be shards of ours "
                   "(a folder or s3:// prefix)")
@click.option("--max-pixels", type=click.IntRange(1), default=Options.max_pixels, show_default=True,
              help="reject images with more pixels (width x height) than this, before decoding them")
@click.option("--name", default=Options.name, show_default=True, help="shard file prefix")
@click.option("--workers", type=click.IntRange(1), default=os.cpu_count() or 1, show_default=True,
              help="processes (re-encoding scales with cores; pass-through is I/O bound)")
@click.option("--resume", is_flag=True, help="keep shards that the manifest and sha256 prove complete")
@click.option("--overwrite", is_flag=True, help="start over even if OUTPUT holds a manifest")
@click.option("--strict", is_flag=True, help="stop at the first undecodable image instead of rejecting it")
@click.option("--quiet", is_flag=True, help="no progress bar")
def main(source, output, split, shard_size, seed, max_side, quality, reencode, max_pixels, name, workers, resume,
         overwrite, strict, quiet):
    """Convert SOURCE (hf://datasets/OWNER/NAME[@REVISION] read from the Hugging Face Hub, a folder
    of the hub's parquet files, or an ImageFolder tree) into webdataset shards with DALI index
    files in OUTPUT (a folder or s3://bucket/prefix)."""
    splits = SPLITS if split == "all" else (split,)
    options = Options(shard_size=shard_size, seed=seed, max_side=max_side, quality=quality, name=name,
                      reencode=reencode, max_pixels=max_pixels)
    try:
        manifest = convert(source, output, splits, options, workers=workers, resume=resume,
                           overwrite=overwrite, strict=strict, progress=not quiet)
    except DaliImagenetError as error:
        if debug():
            raise
        raise click.ClickException(str(error)) from None
    click.echo(summary_table(manifest))


def summary_table(manifest: dict) -> str:
    stats = manifest["stats"]
    lines = [f"{'split':<12}{'read':>10}{'written':>10}{'rejected':>10}{'converted':>11}{'shards':>8}{'MB':>10}"]
    for split, info in manifest["splits"].items():
        megabytes = sum(s["bytes"] for s in info["shards"]) / 1e6
        lines.append(f"{split:<12}{info['read']:>10}{info['samples']:>10}{info['rejected_count']:>10}"
                     f"{info['converted_count']:>11}{len(info['shards']):>8}{megabytes:>10.1f}")
        lines.append(f"{'':<12}read = written + rejected: {info['read']} = {info['samples']} + {info['rejected_count']}"
                     + (f"; {info['unlabelled']} unlabelled (label -1: for prediction, not training or scoring)"
                        if info.get("unlabelled") else ""))
    seconds = max(stats["seconds"], 1e-9)
    if stats["fetched_bytes_now"]:
        lines.append(f"{stats['fetched_bytes_now'] / 1e6:.1f} MB fetched from the Hub: "
                     f"{stats['fetched_bytes_now'] / 1e6 / seconds:.1f} MB/s")
    lines.append(f"{stats['converted_now']} images in {seconds:.1f} s: {stats['converted_now'] / seconds:.0f} img/s, "
                 f"{stats['source_bytes_now'] / 1e6 / seconds:.1f} MB/s of source; "
                 f"{stats['skipped_chunks']} chunk(s) kept from an earlier run; peak RSS {stats['peak_rss_mb']:.0f} MB")
    for info in manifest["splits"].values():
        for entry in info["rejected"][:10]:
            where = (f"{entry['source']} ({entry['path']})" if "source" in entry
                     else f"{entry['shard']}: sample {entry['key']} (by {entry.get('by', 'a repair')})")
            lines.append(f"rejected {where}: {entry['reason']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
