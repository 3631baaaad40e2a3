"""`stage-shards s3://bucket/prefix FOLDER`: a local copy of shards on S3, made as `train.py` makes it.

`train.py --data s3://...` stages by itself; this is for everything else that reads shards
(`evaluate.py`, `predict.py`, your own loop with `make_loader`), or to stage ahead of a run.
"""
from __future__ import annotations

import click

from dali_imagenet.data.staging import stage
from dali_imagenet.errors import DaliImagenetError, debug


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.argument("folder", type=click.Path(path_type=str))
@click.option("--split", "splits", multiple=True, default=("train", "validation"), show_default=True,
              help="a split to stage (repeatable)")
@click.option("--workers", type=click.IntRange(1), default=16, show_default=True, help="objects in flight")
@click.option("--quiet", is_flag=True, help="no progress bar")
def main(source, folder, splits, workers, quiet):
    """Copy SOURCE's shards (shard-imagenet's, with the manifest; or timm's layout) into FOLDER:
    whole objects, many at a time, each checked against the manifest; a second run fetches only
    what is missing or wrong. Then pass FOLDER as --data."""
    try:
        done = stage(source, folder, tuple(splits), workers=workers, progress=not quiet)
    except DaliImagenetError as error:
        if debug():
            raise
        raise click.ClickException(str(error)) from None
    click.echo(done.line(source))


if __name__ == "__main__":
    main()
