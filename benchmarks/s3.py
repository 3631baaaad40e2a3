"""Shards on S3, read two ways in one run: streamed (DALI reads `s3://` itself, every epoch) and
staged (copied to a local folder once, then read there), behind a bucket's latency.

    python -m benchmarks --only s3                      # part of the suite
    python -m benchmarks.s3 --data SHARDS --latency-ms 0 10 20

A local S3 server (moto) answers a ranged GET in ~3 ms here; `standins.s3.LatencyProxy` in front of it adds
N ms to each request, as a real bucket's time to the first byte. For each latency it prints the
DALI train loader's images/s streamed and from the staged copy, the object GETs per sample (per
epoch when streamed; once per machine when staged) and the staging's MB/s. The train reader's
shuffle buffer is the loader's (capped at the rank's samples, so a small split is not re-read).
Each repeat is one whole epoch; GETs per sample count the samples those epochs hand out (DALI's
prefetch reads a little ahead, into the next epoch).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, machine, run_isolated
from standins.s3 import LatencyProxy, S3Server

BUCKET = "bench-shards"


def measure(latency_ms: float, loader_args: list[str], samples_read: int, batch: int, env: dict) -> list[dict]:
    """Streamed and staged, at one latency: two records. `samples_read`: what the loader reads in
    the measured epochs (the GETs are counted per sample of it)."""
    from dali_imagenet.data import staging

    proxy = LatencyProxy(env["AWS_ENDPOINT_URL"], latency_ms)
    env = {**env, "AWS_ENDPOINT_URL": proxy.url}
    url = f"s3://{BUCKET}/shards"
    try:
        # (a) streamed: DALI's own S3 client, a ranged GET per sample component
        streamed = run_isolated("benchmarks.loaders", ["--data", url, *loader_args], env=env)
        stream_gets = len(proxy.object_reads("shards/")) - 1  # the manifest, read once to find the shards
        proxy.reset()
        # (b) staged: whole objects, many at a time, then local files
        with tempfile.TemporaryDirectory(prefix="dali-imagenet-staged-") as folder:
            saved = dict(os.environ)
            os.environ.update(env)
            try:
                staged = staging.stage(url, folder, ("train",), progress=False, log=lambda line: None)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            stage_gets = len(proxy.object_reads("shards/"))
            local = run_isolated("benchmarks.loaders", ["--data", folder, *loader_args], env=env)
            samples = train_samples(Path(folder))
    finally:
        proxy.close()
    common = {"stage": "s3", "latency_ms": latency_ms, "batch_size": batch}
    return [{**common, "name": "streamed from s3://", **streamed, "gets_per_sample": stream_gets / samples_read,
             "gets_counted_over": "each epoch"},
            {**common, "name": "staged, then local", **local, "gets_per_sample": stage_gets / samples,
             "gets_counted_over": "once per machine", "staging_mb_per_s": staged.bytes_fetched / 1e6 / staged.seconds,
             "staging_s": staged.seconds, "staged_mb": staged.bytes_fetched / 1e6}]


def train_samples(data: Path) -> int:
    return sum(s["samples"] for s in json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"])


def run(data: Path, latencies: list[float], smoke: bool, threads: int, epochs: int = 3) -> list[dict]:
    """Uploads `data` (a shard folder) to a fresh local S3 server, then measures each latency over
    whole epochs (each a repeat: an epoch's first batch waits for the shuffle buffer's fill, as in
    training)."""
    batch, size = (8, 64) if smoke else (32, 224)
    epoch_batches = train_samples(data) // batch
    timing = ["--warmup-batches", "0", "--batches", str(epoch_batches), "--repeats", str(epochs)]
    loader_args = ["--backend", "dali", "--split", "train", "--device", "cpu", "--batch-size", str(batch),
                   "--image-size", str(size), "--threads", str(threads), *timing]
    server = S3Server()
    server.start()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        from dali_imagenet import s3

        client = s3.client()
        client.create_bucket(Bucket=BUCKET)
        for path in sorted(data.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"shards/{path.relative_to(data)}")
        os.environ.clear()
        os.environ.update(saved)
        results = []
        for latency in latencies:
            print(f"  S3 latency {latency:g} ms: streamed, then staged", flush=True)
            results += measure(latency, loader_args, epochs * epoch_batches * batch, batch, env)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
    return results


def table(results: list[dict]) -> str:
    lines = ["| S3 latency | read | img/s (median) | spread | vs staged | object GETs per sample | staging MB/s |",
             "| ---: | --- | ---: | --- | ---: | --- | ---: |"]
    staged = {r["latency_ms"]: r["images_per_s"] for r in results if r["name"].startswith("staged")}
    for r in results:
        ratio = r["images_per_s"] / staged[r["latency_ms"]] if staged.get(r["latency_ms"]) else None
        mb_s = f"{r['staging_mb_per_s']:,.0f} ({r['staged_mb']:.0f} MB in {r['staging_s']:.1f} s)" \
            if "staging_mb_per_s" in r else ""
        lines.append(
            f"| {r['latency_ms']:g} ms | {r['name']} | {r['images_per_s']:,.0f} | "
            f"{r['images_per_s_min']:,.0f}-{r['images_per_s_max']:,.0f} | "
            f"{f'{ratio:.2f}x' if ratio else ''} | {r['gets_per_sample']:.3f} {r['gets_counted_over']} | {mb_s} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a shard folder (shard-imagenet's) to put on the S3 server")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0, 10, 20])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="bench-results/s3.jsonl")
    args = parser.parse_args()
    results = run(Path(args.data), args.latency_ms, args.smoke, args.threads)
    env = machine()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as sink:
        sink.writelines(json.dumps({**r, "env": env, "options": vars(args)}) + "\n" for r in results)
    print(table(results))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
