"""serve.py under load, over HTTP: images/s and latency at 1, 8 and 32 clients, batching on and off.

    python -m benchmarks --only serve                  # part of the suite
    python -m benchmarks.serve [--device cuda] [--clients 1 8 32] [--seconds 5] [--models demo resnet50]

For each model (the demo model: ResNet-18 at 64 px with 8 classes, as `make demo` trains it; and
ResNet-50 at 224 px with ImageNet's 1,000 classes; random weights: the speed is the same), two
serve.py processes on 127.0.0.1, batching off (`--max-batch 1`) and on (`--max-batch` 4 on a CPU,
32 on a GPU; serve.py's --max-wait-ms, 10), measured in turns at each client count. An
asyncio load generator in this process: N clients, each on its own keep-alive HTTP/1.1
connection, each sending its next JPEG (the bundled sample's, 500 x 375, ~50 KB) as soon as its
answer comes (a closed loop). After a warm-up (until every client has had an answer, then half a
window), three windows of --seconds: images/s is the answers a window saw (median and spread of
the three), p50/p99 the latency of every answer in them, from the request's first byte sent to the
answer's last byte read; "mean batch" is how many requests a forward pass held (the server's own
count). The load generator shares the machine with the servers: on a 2-core machine it takes
some of the CPU they would have.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import REPO, machine, summarize

CLIENTS = (1, 8, 32)
BATCH_ON_CPU = 4  # --max-batch with batching on, on a CPU (where serve.py's default is off); on a GPU its default
MODELS = {  # name -> (arch, classes, val size in px)
    "demo": ("resnet18", 8, 64),
    "resnet50": ("resnet50", 1000, 224),
}


def model_checkpoint(name: str, folder: Path) -> Path:
    """A checkpoint of `name`'s network with random weights and its preprocessing (made once)."""
    import dataclasses

    import torch

    from dali_imagenet.config import TrainConfig, load_config
    from dali_imagenet.training import archs

    arch, classes, size = MODELS[name]
    path = folder / f"{name}.pt"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    config = load_config(REPO / "configs" / "cpu-demo.yaml") if name == "demo" else \
        TrainConfig(arch=arch, amp_dtype="float32", val_image_size=size)
    torch.manual_seed(0)
    model = archs.build(arch, classes, blurpool=config.blurpool, width=config.width)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(config), "arch": arch,
                "num_classes": classes, "class_names": None}, path)
    return path


def sample_jpegs(count: int = 16) -> list[bytes]:
    import numpy as np

    from shard_tools.sample import CLASSES, draw_image, encode

    images = []
    for i in range(count):
        rng = np.random.default_rng(3000 + i)
        images.append(encode(draw_image(i % len(CLASSES), rng), "jpeg", rng))
    return images


class Server:
    """serve.py on a free port of 127.0.0.1, started and stopped (SIGTERM) around a measurement."""

    def __init__(self, checkpoint: Path, device: str, extra: list[str], log: Path):
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "serve.py"), "--checkpoint", str(checkpoint), "--port", "0", "--device", device,
             "--no-access-log", *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            self._wait_until_up(log)
        except BaseException:  # a server that never came up is not left running
            self.stop()
            raise

    def _wait_until_up(self, log: Path) -> None:
        first = self.process.stdout.readline()
        if " on http://" not in first:
            raise RuntimeError(f"serve.py did not start: {first.strip() or log.read_text()[-500:]}")
        self.url = first.split(" on ")[1].split()[0]
        self.host, self.port = self.url[len("http://"):].rsplit(":", 1)
        for _ in range(600):
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"serve.py did not answer /v1/health: {log.read_text()[-500:]}")

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/v1/health", timeout=10) as answer:
            return json.loads(answer.read())

    def model(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/v1/model", timeout=10) as answer:
            return json.loads(answer.read())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)
        self.log.close()


async def _client(host: str, port: int, bodies: list[bytes], index: int, stop: asyncio.Event, done: list,
                  answered: set) -> None:
    """One client on one keep-alive connection: a request as soon as the last answer came, until
    `stop`; `done` gets (finish time, latency s) of every answer, `answered` the client's index."""
    reader, writer = await asyncio.open_connection(host, port)
    heads = [f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
             f"Content-Length: {len(body)}\r\n\r\n".encode() for body in bodies]
    i = index
    try:
        while not stop.is_set():
            sent = time.perf_counter()
            writer.write(heads[i % len(bodies)] + bodies[i % len(bodies)])
            await writer.drain()
            status = await reader.readline()
            length = None
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if length is None:
                raise RuntimeError(f"an answer without Content-Length: {status!r}")
            body = await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(f"serve.py answered {status.decode().strip()}: {body[:200]!r}")
            finished = time.perf_counter()
            done.append((finished, finished - sent))
            answered.add(index)
            i += 1
    finally:
        writer.close()


async def _load(host: str, port: int, bodies: list[bytes], clients: int, warmup_s: float, window_s: float,
                windows: int) -> dict:
    """`clients` clients; the warm-up lasts until each has had an answer and `warmup_s` more."""
    stop, done, answered = asyncio.Event(), [], set()
    tasks = [asyncio.create_task(_client(host, port, bodies, c, stop, done, answered)) for c in range(clients)]
    try:
        while len(answered) < clients and not any(task.done() for task in tasks):
            await asyncio.sleep(0.01)
        await asyncio.sleep(warmup_s)
        measured_from = time.perf_counter()
        await asyncio.sleep(windows * window_s)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    rates, latencies = [], []
    for w in range(windows):
        lo, hi = measured_from + w * window_s, measured_from + (w + 1) * window_s
        inside = [latency for finished, latency in done if lo <= finished < hi]
        rates.append(len(inside) / window_s)
        latencies += inside
    if not latencies:
        raise RuntimeError(f"no answer in the measured windows at {clients} clients: make --seconds longer")
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {**summarize(rates), "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * cuts[98],
            "answers": len(latencies)}


def measure(model: str, checkpoint: Path, device: str, clients: list[int], seconds: float, bodies: list[bytes],
            logs: Path) -> list[dict]:
    """Batching off and on, each in a serve.py of its own, both up at once and measured in turns
    at each client count: a change in the machine's load falls on both alike."""
    servers = {}
    try:
        for batching in (False, True):
            rows = ["--max-batch", str(BATCH_ON_CPU if batching else 1)] if device == "cpu" or not batching else []
            servers[batching] = Server(checkpoint, device, rows, logs / f"{model}-{'on' if batching else 'off'}.log")
        records = []
        for count in clients:
            for batching, server in servers.items():
                serving = server.model()["serving"]
                before = server.health()["batches"]
                # the warm-up: oneDNN/cuDNN pick and build their kernels at the first pass of each shape
                result = asyncio.run(_load(server.host, int(server.port), bodies, count, seconds / 2, seconds, 3))
                after = server.health()["batches"]
                passes = {int(n): c - before.get(n, 0) for n, c in after.items()}
                requests = sum(n * c for n, c in passes.items())
                records.append({"stage": "serve", "name": f"{model} batching {'on' if batching else 'off'}",
                                "model": model, "batching": batching, "clients": count, "device": device,
                                "max_batch": serving["max_batch"], "max_wait_ms": serving["max_wait_ms"],
                                "mean_batch": requests / max(1, sum(passes.values())), **result})
                print(f"    batching {'on ' if batching else 'off'}, {count:>2} clients: {result['images_per_s']:.1f} "
                      f"img/s, p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms", flush=True)
        return records
    finally:
        for server in servers.values():
            server.stop()


def run(work: Path, device: str, smoke: bool, models: list[str] | None = None, clients: list[int] | None = None,
        seconds: float | None = None) -> list[dict]:
    models = models or (["demo"] if smoke else list(MODELS))
    clients = clients or ([1, 4] if smoke else list(CLIENTS))
    seconds = seconds or (0.5 if smoke else 5.0)
    bodies = sample_jpegs(4 if smoke else 16)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as logs:
        for model in models:
            print(f"[serve] {model} ({device})", flush=True)
            results += measure(model, model_checkpoint(model, work / "serve-models"), device, clients, seconds, bodies,
                               Path(logs))
    add_ratios(results)
    results.sort(key=lambda r: (list(MODELS).index(r["model"]), r["batching"], r["clients"]))
    return results


def add_ratios(results: list[dict]) -> None:
    """Each batching-on row: its img/s over batching off's, same model and clients (same run)."""
    off = {(r["model"], r["clients"]): r["images_per_s"] for r in results if not r["batching"]}
    for record in results:
        if record["batching"] and off.get((record["model"], record["clients"])):
            record["vs_off"] = record["images_per_s"] / off[(record["model"], record["clients"])]


def table(results: list[dict]) -> str:
    rows = ["| model | batching | clients | img/s (median) | spread | p50 ms | p99 ms | mean batch | vs off |",
            "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        batching = f"on (≤ {r['max_batch']}, {r['max_wait_ms']:g} ms)" if r["batching"] else "off"
        ratio = f"{r['vs_off']:.2f}x" if "vs_off" in r else ""
        rows.append(f"| {r['model']} | {batching} | {r['clients']} | {r['images_per_s']:,.1f} | "
                    f"{r['images_per_s_min']:,.1f}-{r['images_per_s_max']:,.1f} | {r['p50_ms']:,.0f} | "
                    f"{r['p99_ms']:,.0f} | {r['mean_batch']:.1f} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS))
    parser.add_argument("--clients", nargs="+", type=int, help=f"concurrent clients (default {CLIENTS})")
    parser.add_argument("--seconds", type=float, help="each of the three measured windows (default 5)")
    parser.add_argument("--work", default="build/bench", help="where the models' checkpoints are made")
    parser.add_argument("--out", default="bench-results/serve.jsonl")
    parser.add_argument("--smoke", action="store_true", help="the demo model, 1 and 4 clients, 0.5 s windows")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work = work if work.is_absolute() else REPO / work
    results = run(work, args.device, args.smoke, args.models, args.clients, args.seconds)
    env = machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as sink:
        sink.writelines(json.dumps({**r, "env": env, "options": {"smoke": args.smoke}}) + "\n" for r in results)
    print("\n" + table(results) + f"\n\nresults: {out}")


if __name__ == "__main__":
    main()
