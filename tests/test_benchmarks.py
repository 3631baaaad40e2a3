"""Each benchmark in smoke mode: it runs, and its output has the fields with positive numbers.
No speed thresholds here: speed claims come from `make bench`, as ratios measured in one run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # each runs a benchmark harness in processes of its own


def test_bench_smoke_writes_records_table_and_chart(tmp_path):
    out = tmp_path / "results.jsonl"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out),
                             "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    stages = {r["stage"] for r in records}
    assert stages == {"limit", "loader", "step", "end-to-end", "s3", "serve"}
    for record in records:
        assert "error" not in record, record
        assert (
            record["images_per_s"] > 0
            and record["images_per_s_min"] <= record["images_per_s"] <= record["images_per_s_max"]
        )
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
    # shards on S3 behind 0 and 10 ms a request: DALI streaming makes >= 2 GETs per sample and epoch
    # (a .jpg and a .cls), staging a fraction of one per sample, once
    s3 = {(r["latency_ms"], r["name"].split()[0]): r for r in records if r["stage"] == "s3"}
    assert set(s3) == {(0, "streamed"), (0, "staged,"), (10, "streamed"), (10, "staged,")}
    assert all(
        s3[(ms, "streamed")]["gets_per_sample"] >= 2 > 1 > s3[(ms, "staged,")]["gets_per_sample"] for ms in (0, 10)
    )
    assert all(s3[(ms, "staged,")]["staging_mb_per_s"] > 0 for ms in (0, 10))
    assert "| S3 latency | read |" in result.stdout
    # serve.py over HTTP, batching off and on at 1 and 4 clients: answers came, and on shared passes at 4
    served = {(r["batching"], r["clients"]): r for r in records if r["stage"] == "serve"}
    assert set(served) == {(False, 1), (False, 4), (True, 1), (True, 4)}
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in served.values())
    assert served[(False, 4)]["mean_batch"] == 1 and served[(True, 4)]["mean_batch"] > 1
    assert "| model | batching | clients |" in result.stdout


def test_gpu_check_runs_in_smoke_mode_on_cpu(tmp_path):
    """The CPU self-check of the GPU script: every section has its row (run at tiny sizes, or
    saying why not), one table comes out, train.py's stopped + resumed l4-16h run equals its
    straight run, and $OUT (made if missing) holds the results only: at most 8 files, no shard, run
    or checkpoint.
    The step sections measure with benchmarks.steps, which test_bench_smoke runs: skipped here."""
    out, work = tmp_path / "results" / "out", tmp_path / "work"  # $OUT not there yet: the check makes it
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--device", "cpu", "--work",
                             str(work), "--skip", "step"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OUT": str(out)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert [str(p) for p in files] == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    assert sum((out / p).stat().st_size for p in files) < 1_000_000
    assert not work.exists()  # the work folder goes at the end (--keep keeps it)
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    assert {r["section"] for r in rows} == {"setup", "train.py", "memory", "L4 host", "cuda_graph memory",
                                            "pytest -m gpu", "loader", "step", "loader -> step", "eager/graph", "serve",
                                            "total"}
    assert all("seconds" in r for r in rows if r["section"] not in ("train.py",) or "straight vs" in r["what"])
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    measured = [r for r in rows if r["section"] in ("loader", "step", "loader -> step") and "result" not in r]
    assert len(measured) == 1 and all(r["images_per_s"] > 0 for r in measured)  # --smoke: each kind once
    assert [r["result"] for r in rows if r["section"] in ("step", "loader -> step")] == ["not asked for (--skip)"] * 2
    assert [r.get("result") for r in rows if r["section"] in ("cuda_graph memory", "pytest -m gpu")] == [
        "needs a GPU"
    ] * 2
    assert [r["result"] for r in rows if r["section"] == "memory"] == ["needs a GPU (nvidia-smi, NVML)"]
    host = [r for r in rows if r["section"] == "L4 host"]
    assert "cores" in host[0]["result"]  # what the machine had: cores, SMT siblings or none
    fed = [r for r in host if r["what"].startswith("loader -> l4-16h step")]
    assert sorted((r["image_size"], r["threads"], r["hybrid_huffman_threshold"]) for r in fed) == sorted(
        (size, threads, threshold) for size in (32, 48) for threads in (2, 1) for threshold in (1_000_000, 0))
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in fed)
    assert len([r for r in host if r["what"].startswith("l4-16h step alone")]) == 2
    assert host[-1]["what"] == "verdict (2 loader threads)" and "48 px: loader" in host[-1]["result"]
    assert [r["result"] for r in rows if r["section"] == "loader" and "images_per_s" not in r] == ["needs a GPU"]
    sizes = [r for r in rows if r["section"] == "train.py" and "epoch" in r["what"]]
    assert [r["image_size"] for r in sizes] == [32, 48, 48] and [r["new_size"] for r in sizes] == [True, True, False]
    assert all(r["first_step_s"] > 0 and r["steps_per_s"] > 0 for r in sizes)
    verdict = next(r for r in rows if "straight vs stopped" in r["what"])
    assert verdict["result"] == "identical weights" and verdict["tolerance"] == 0 and verdict["passed"] is True
    assert "| train.py | l4-16h: straight vs stopped at step" in result.stdout
    assert (out / "gpu_check.md").read_text().startswith("gpu_check on CPU")
    assert "[train.py]" in (out / "gpu_check.log").read_text()
    served = [r for r in rows if r["section"] == "serve"]  # --smoke: the demo model, 1 and 4 clients, off and on
    assert sorted(r["what"] for r in served) == sorted(f"demo, {c} clients, {b}" for c in (1, 4)
                                                       for b in ("no batching", "batching ≤ 4"))
    assert all(r["images_per_s"] > 0 for r in served)


def test_gpu_check_stopped_half_way_keeps_the_rows_it_finished(tmp_path):
    """SIGTERM (a `timeout`, a machine taken back) once the first train.py run is done and the next
    is under way: gpu_check.json and gpu_check.md are whole, hold every row finished so far and
    say where it stopped; the train.py run in flight is stopped with it; exit 1."""
    out, work = tmp_path / "out", tmp_path / "work"
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--device", "cpu", "--work",
                                str(work)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OUT": str(out)})
    deadline = time.monotonic() + 300
    rows = []
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        if (out / "gpu_check.json").exists():  # whole at any moment: written to a temporary name, then renamed
            rows = json.loads((out / "gpu_check.json").read_text())["rows"]
        if any(r["section"] == "memory" for r in rows):  # the straight run finished: the split run starts now
            break
    assert process.poll() is None, process.stdout.read()[-3000:]
    time.sleep(3)
    in_flight = [p for p in _children(process.pid) if "train.py" in p]
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1, output[-3000:]
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    sections = [r["section"] for r in rows]
    assert sections[:2] == ["setup", "memory"] and sections[-2:] == ["stopped", "total"], sections
    assert "SIGTERM" in rows[-2]["what"] and rows[-2]["stopped"] is True
    assert "L4 host" not in sections and "loader" not in sections  # the sections after it did not run
    table = (out / "gpu_check.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("| ") and not line.startswith("| section")
                and not line.startswith("| ---")]) == len(rows)
    assert "| stopped | SIGTERM after" in (out / "gpu_check.md").read_text()
    assert in_flight and not [p for p in _children(process.pid) if "train.py" in p]
    assert not [line for line in _all_commands() if str(work) in line and "train.py" in line]  # stopped with it
    assert not work.exists()


def _children(pid: int) -> list[str]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append((stat.parent / "cmdline").read_text().replace("\0", " "))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _all_commands() -> list[str]:
    commands = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            commands.append(cmdline.read_text().replace("\0", " "))
        except OSError:
            continue
    return commands


def test_the_resume_verdict_is_exact_for_deterministic_eager_and_bounded_otherwise():
    from benchmarks.gpu_check import LOSS_RTOL, resume_verdict

    assert resume_verdict([], [], 0.0, exact=True)["passed"] is True
    exact_off = resume_verdict([], [], 1e-7, exact=True)
    assert exact_off["passed"] is False and exact_off["tolerance"] == 0.0 and "weights differ" in exact_off["result"]
    close = resume_verdict([2.0, 1.9, 1.8, 9.9], [2.01, 1.89, 1.81, 0.0], 3e-3, exact=False)
    assert (
        close["passed"] is True and close["difference"] == pytest.approx(0.01 / 1.8) and close["tolerance"] == LOSS_RTOL
    )
    # only the first LOSS_WINDOWS windows are compared: round-off grows with every step after
    wrong = resume_verdict([2.0, 1.9], [2.0, 1.9 * (1 + 2 * LOSS_RTOL)], 0.1, exact=False)
    assert wrong["passed"] is False and "FAILED" in wrong["result"]
    assert resume_verdict([], [], 0.0, exact=False)["passed"] is False  # nothing compared is not a pass


def test_gpu_check_says_what_is_missing_in_one_line():
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cuda"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    if result.returncode == 0:
        pytest.skip("a GPU and DALI are here")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("gpu_check: no CUDA GPU is visible")


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


def test_hub_benchmark_smoke_compares_hub_and_local_on_an_imagefolder_tree(tmp_path):
    """An ImageFolder tree is written in the Hub's format, then converted from the stand-in Hub
    and from disk; the record has both rates, the ratio, and no scratch disk for the Hub run."""
    import numpy as np

    from shard_tools.sample import draw_image, encode

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for label, synset in enumerate(("n01440764", "n02102040")):
            folder = tmp_path / "photos" / split / synset
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.JPEG").write_bytes(encode(draw_image(label, rng), "jpeg", rng))
    out = tmp_path / "hub.jsonl"
    result = subprocess.run([sys.executable, "-m", "benchmarks.hub", "--smoke", "--data", str(tmp_path / "photos"),
                             "--work", str(tmp_path / "work"), "--out", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    local, hub = [json.loads(line) for line in out.read_text().splitlines()]
    assert (local["source"], hub["source"]) == ("local", "hub")
    assert local["images"] == hub["images"] == 16 and local["images_per_s"] > 0 and hub["images_per_s"] > 0
    assert hub["ratio_to_local"] == hub["images_per_s"] / local["images_per_s"] and hub["shards_identical"]
    assert hub["peak_scratch_mb"] < 0.1  # nothing of the source lands on disk
    assert list((tmp_path / "work" / "hub-parquet-photos" / "data").glob("train-*.parquet"))
    assert "Hub / local:" in result.stdout


def test_reencode_benchmark_compares_the_three_sets(sample_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.reencode", "--source", str(sample_dir), "--split",
                             "validation", "--max-side", "256", "--quality", "80", "--threads", "1", "--repeats", "2",
                             "--work", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    assert [r["set"] for r in rows] == ["originals", "--max-side 256", "--reencode --max-side 256 --quality 80"]
    assert rows[0]["max_side_px"] > 256 >= rows[1]["max_side_px"] and rows[2]["max_side_px"] <= 256
    assert rows[2]["bytes_per_image"] < rows[0]["bytes_per_image"]  # the sample's ~100 KB images, at 256 px
    assert all(r["images"] == rows[0]["images"] and r["decode"]["images_per_s"] > 0
               and r["decode"]["cpu_ms_per_image_min"] > 0 for r in rows)
    assert "| --reencode --max-side 256 --quality 80 |" in result.stdout
