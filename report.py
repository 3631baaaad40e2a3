"""One self-contained HTML page (plots embedded, no network needed to view it) from run folders.

    python report.py runs/r50 [runs/r50-ema ...] [-o report.html] [--s3 s3://bucket/prefix]

Train loss, LR, images/s and data wait against steps; val top-1/top-5/loss (raw and EMA)
against epochs; the config, the machine and the final numbers of each run. Several run folders:
their curves overlaid. train.py writes RUN/report.html at the end of every run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dali_imagenet.report import upload, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl and config.yaml)")
    parser.add_argument("-o", "--output", help="the page (default: RUN/report.html for one run, report.html for several)")
    parser.add_argument("--s3", help="also upload it as s3://bucket/prefix/index.html (text/html), a static site")
    args = parser.parse_args()
    output = Path(args.output or (Path(args.runs[0]) / "report.html" if len(args.runs) == 1 else "report.html"))
    try:
        path = write_report(args.runs, output)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"report: {path.resolve()}  (open file://{path.resolve()})")
    if args.s3:
        from dali_imagenet import s3

        try:
            print(f"uploaded: {upload(path, args.s3)}")
        except Exception as error:  # botocore's many error types: its reason, on one line
            sys.exit(f"error: {args.s3}: upload failed ({s3.reason(error)})")


if __name__ == "__main__":
    main()
