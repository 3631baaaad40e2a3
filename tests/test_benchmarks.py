"""Each benchmark in smoke mode: it runs, and its output has the fields with positive numbers.
No speed thresholds here: speed claims come from `make bench`, as ratios measured in one run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_smoke_writes_records_table_and_chart(tmp_path):
    out = tmp_path / "results.jsonl"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out),
                             "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    stages = {r["stage"] for r in records}
    assert stages == {"limit", "loader", "step", "end-to-end"}
    for record in records:
        assert "error" not in record, record
        assert record["images_per_s"] > 0 and record["images_per_s_min"] <= record["images_per_s"] <= record["images_per_s_max"]
        assert record["repeats"] >= 3
        env = record["env"]
        for key in ("machine", "cpu_count", "gpu", "torch", "nvidia-dali-cuda120", "git_commit"):
            assert key in env
        assert record["options"]["smoke"] is True
    loaders = [r for r in records if r["stage"] == "loader"]
    assert {r["backend"] for r in loaders} == {"dali", "torchvision"}
    assert all(r["vs_limit"] > 0 and r["vs_baseline"] > 0 for r in loaders)
    e2e = [r for r in records if r["stage"] == "end-to-end"]
    assert all(0 <= r["data_wait"] <= 1 for r in e2e)
    assert "| stage | what |" in result.stdout and "vs baseline" in result.stdout
    assert "x" in result.stdout.split("| loader | dali train (cpu) |")[1].splitlines()[0]  # a ratio was printed
    assert out.with_suffix(".png").stat().st_size > 5000


def test_gpu_check_runs_in_smoke_mode_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| train step resnet18 bf16 NHWC batch 4 |" in result.stdout
    assert "| Mixup/CutMix, batch 4 |" in result.stdout and "| JPEG decode" in result.stdout
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rows["decode"]["cpu_1thread_images_per_s"] > 0 and rows["mixing"]["mix_ms_median"] > 0


def test_accuracy_benchmark_smoke_writes_json_and_chart(tmp_path):
    """Two recipes on a tiny ImageFolder tree of drawn photos: sharded, trained, evaluated, charted."""
    import numpy as np

    from shard_tools.sample import draw_image, encode

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for label, synset in enumerate(("n01440764", "n02102040", "n02979186")):
            folder = tmp_path / "photos" / split / synset
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.JPEG").write_bytes(encode(draw_image(label, rng), "jpeg", rng))
    out = tmp_path / "accuracy.jsonl"
    result = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--data", str(tmp_path / "photos"),
                             "--config", "configs/imagenette-cpu.yaml", "--config", "configs/imagenette-cpu-floor.yaml",
                             "--smoke", "--minutes", "3", "--work", str(tmp_path / "work"), "--out", str(out),
                             "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["config"] for r in records] == ["imagenette-cpu", "imagenette-cpu-floor"]
    for record in records:
        assert 0 <= record["top1"] <= 100 and record["curve"] and record["wall_s"] > 0
        assert record["images_seen"] == 24 // 8 * 8 and record["options"]["smoke"] is True
    assert records[0]["ema_top1"] is not None  # the fast recipe keeps an EMA; the floor does not
    assert records[1]["ema_top1"] is None
    assert "| imagenette-cpu |" in result.stdout
    assert out.with_suffix(".png").stat().st_size > 5000
