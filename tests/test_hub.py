"""`shard-imagenet hf://datasets/OWNER/NAME`: the Hub's parquet files read by byte range from a
stand-in Hub on 127.0.0.1 (gated like ImageNet), giving the very shards a local copy gives; token
errors; dropped connections and 5xx retried; kill + --resume; a moved revision refused."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_shard_imagenet import run_cli, tree_digest

from standins.hub import StandInHub

REPO_ID = "ILSVRC/imagenet-1k"
URL = f"hf://datasets/{REPO_ID}"
SHARDS = ("--shard-size", "4", "--workers", "1")


@pytest.fixture(scope="module")
def hub(sample_dir):
    server = StandInHub(sample_dir, REPO_ID)
    yield server
    server.close()


def hub_env(hub: StandInHub, tmp_path: Path, token: str | None = "hf_accepted") -> dict:
    import os

    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "PYTHONUNBUFFERED": "1"}
    env.pop("HF_TOKEN", None)
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def local_shards(sample_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "shards"
    run_cli(sample_dir, out, *SHARDS)
    return out


def without_manifest(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k != "manifest.json"}


def fetched_mb(stdout: str) -> float:
    return float(stdout.split(" MB fetched from the Hub")[0].rsplit("\n", 1)[-1])


@pytest.mark.slow
def test_the_hub_gives_the_local_copys_shards(hub, sample_dir, local_shards, tmp_path):
    start = len(hub.requests)
    result = run_cli(URL, tmp_path / "out", *SHARDS, env=hub_env(hub, tmp_path))
    out_tree, local_tree = tree_digest(tmp_path / "out"), tree_digest(local_shards)
    assert len(out_tree) > 30 and without_manifest(out_tree) == without_manifest(local_tree)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    local = json.loads((local_shards / "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "source"} == {k: v for k, v in local.items() if k != "source"}
    sizes = {p.name: p.stat().st_size for p in (sample_dir / "data").glob("*.parquet")}
    assert manifest["source"] == {
        "kind": "hub", "fingerprint": local["source"]["fingerprint"], "repo": REPO_ID, "revision": "main",
        "sha": hub.sha, "endpoint": hub.url,
        "files": [{"path": f"data/{name}", "size": size} for name, size in sorted(sizes.items())]}
    # Every file read names the commit the run resolved, never a branch that could move under it.
    reads = [r for r in hub.requests[start:] if "/resolve/" in r[1] or r[1].startswith("/cdn/")]
    assert reads and all(f"/resolve/{hub.sha}/" in r[1] or r[1].startswith(f"/cdn/{hub.sha}/") for r in reads)
    assert all(r[2] for r in reads), "byte ranges only, never a whole file"
    assert {r[3] for r in reads if "/resolve/" in r[1]} == {302}  # to the CDN, as the Hub answers
    # Footers and row groups only: about the files' bytes, each fetched once.
    assert 0.9 < fetched_mb(result.stdout) * 1e6 / sum(sizes.values()) < 1.1
    assert not list((tmp_path / "hf-home").rglob("*.parquet"))  # nothing of the source on disk


def test_the_progress_bar_shows_mb_per_s_from_the_hub(hub, tmp_path):
    result = subprocess.run([sys.executable, "-m", "shard_tools.cli", URL, str(tmp_path / "out"), "--split",
                             "validation", *SHARDS], cwd=REPO, env=hub_env(hub, tmp_path), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "MB/s from the Hub]" in result.stderr and "MB fetched from the Hub" in result.stdout


@pytest.mark.parametrize(
    "token, says",
    [
        (
            None,
            "no Hugging Face token was found: accept its licence at {url}/datasets/ILSVRC/imagenet-1k, "
            "then set HF_TOKEN",
        ),
        ("hf_not_accepted", "your Hugging Face token has no access to this gated dataset: accept its licence at {url}"),
        ("hf_made_up", "the Hub refused the Hugging Face token (401 invalid credentials)"),
    ],
)
def test_token_problems_are_one_line_and_write_nothing(hub, token, says, tmp_path):
    result = run_cli(URL, tmp_path / "out", check=False, env=hub_env(hub, tmp_path, token))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert says.format(url=hub.url) in lines[0] and URL in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source, says", [
    (f"hf://datasets/{REPO_ID}@v9", "the dataset has no revision 'v9'"),
    ("hf://datasets/ILSVRC/no-such-set", "no dataset ILSVRC/no-such-set on"),
    ("hf://ILSVRC/imagenet-1k", "expected hf://datasets/OWNER/NAME[@REVISION]"),
])
def test_a_wrong_name_or_revision_is_one_line(hub, source, says, tmp_path):
    result = run_cli(source, tmp_path / "out", check=False, env=hub_env(hub, tmp_path))
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert says in result.stderr and not (tmp_path / "out").exists()


def test_offline_mode_is_one_line_not_a_wait(hub, tmp_path):
    started = time.monotonic()
    result = run_cli(URL, tmp_path / "out", check=False, env={**hub_env(hub, tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "HF_HUB_OFFLINE is set" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and time.monotonic() - started < 30


@pytest.mark.slow
def test_a_dropped_connection_and_a_5xx_are_retried(hub, local_shards, tmp_path):
    start = len(hub.requests)
    hub.drop_next("train-00000-of-00002.parquet", after_bytes=1000)  # mid-body, as a broken connection
    hub.fail_next("train-00001-of-00002.parquet", 503)
    hub.fail_next("validation-00000-of-00001.parquet", 502)
    result = run_cli(URL, tmp_path / "out", *SHARDS, env=hub_env(hub, tmp_path))
    assert not hub.faults, "every fault was met"
    assert without_manifest(tree_digest(tmp_path / "out")) == without_manifest(tree_digest(local_shards))
    statuses = [r[3] for r in hub.requests[start:] if r[1].startswith("/cdn/")]
    assert 503 in statuses and 502 in statuses
    ranges = [(r[1], r[2]) for r in hub.requests[start:] if r[1].startswith("/cdn/") and "train-00000" in r[1]]
    assert len(ranges) > len(set(ranges)), "the dropped range was asked for again"
    assert "peer closed connection" in result.stderr or "Retrying" in result.stderr


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_shards_reading_only_what_was_left(hub, local_shards, tmp_path):
    out = tmp_path / "out"
    hub.delay_s = 0.15  # per file read: the run lasts long enough to be killed mid-way
    try:
        process = subprocess.Popen([sys.executable, "-m", "shard_tools.cli", URL, str(out), *SHARDS, "--quiet"],
                                   cwd=REPO, env=hub_env(hub, tmp_path), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline, manifest = time.monotonic() + 60, out / "manifest.json"
        while time.monotonic() < deadline and process.poll() is None:
            if manifest.exists() and len(json.loads(manifest.read_text())["splits"].get("train", {})
                                         .get("chunks", [])) >= 2:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        hub.delay_s = 0.0
    partial = json.loads(manifest.read_text())
    assert partial["complete"] is False, "the run finished before it could be killed"
    result = run_cli(URL, out, *SHARDS, "--resume", env=hub_env(hub, tmp_path))
    kept = int(result.stdout.split(" chunk(s) kept")[0].rsplit(" ", 1)[1])
    assert kept >= 2
    assert tree_digest(out) == {**tree_digest(local_shards), "manifest.json": tree_digest(out)["manifest.json"]}
    total = sum(f["size"] for f in partial["source"]["files"])
    assert fetched_mb(result.stdout) * 1e6 < 0.8 * total, "the finished chunks were read again"


@pytest.mark.slow
def test_a_resume_against_a_moved_branch_refuses(sample_dir, tmp_path):
    hub = StandInHub(sample_dir, REPO_ID)
    try:
        env = hub_env(hub, tmp_path)
        run_cli(URL, tmp_path / "out", "--split", "validation", *SHARDS, env=env)
        first = hub.sha
        hub.commit("README: a typo")
        refused = run_cli(URL, tmp_path / "out", "--split", "validation", *SHARDS, "--resume", check=False, env=env)
        line = refused.stderr.strip()
        assert refused.returncode != 0 and "\n" not in line
        assert f"at commit {first[:12]}" in line and f"is now at {hub.sha[:12]}" in line
        assert f"resume with {URL}@{first}" in line
        pinned = run_cli(f"{URL}@{first}", tmp_path / "out", "--split", "validation", *SHARDS, "--resume", env=env)
        assert "0 images in" in pinned.stdout  # every chunk kept
    finally:
        hub.close()


def test_the_stand_in_answers_the_hub_clients_own_calls(hub, sample_dir, tmp_path, monkeypatch):
    """What the stand-in is trusted for: huggingface_hub's own calls get the Hub's answers from it."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

    api = HfApi(endpoint=hub.url, token="hf_accepted")
    assert api.dataset_info(REPO_ID).sha == hub.sha
    listed = {f.path: f.size for f in api.list_repo_tree(REPO_ID, "data", repo_type="dataset")}  # 2 a page
    assert listed == {f"data/{p.name}": p.stat().st_size for p in (sample_dir / "data").glob("*.parquet")}
    name = "data/validation-00000-of-00001.parquet"
    [info] = api.get_paths_info(REPO_ID, [name], repo_type="dataset")
    assert info.size == listed[name]
    head = get_hf_file_metadata(hf_hub_url(REPO_ID, name, repo_type="dataset", endpoint=hub.url), token="hf_accepted")
    assert head.commit_hash == hub.sha and head.size == listed[name]
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    path = hf_hub_download(REPO_ID, name, repo_type="dataset", endpoint=hub.url, token="hf_accepted",
                           cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == (sample_dir / name).read_bytes()


def raising(error: Exception):
    def call():
        raise error
    return call


def test_retrying_retries_the_network_and_nothing_else(monkeypatch):
    import httpx2

    from dali_imagenet import retry
    from shard_tools import hub

    waits = []
    monkeypatch.setattr(retry.time, "sleep", waits.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise httpx2.ConnectError("connection refused")
        return "answer"

    assert hub.retrying("hf://datasets/a/b", flaky) == "answer"
    assert len(calls) == 4 and waits == [2.0, 4.0, 8.0]  # exponential backoff
    with pytest.raises(
        hub.HubError, match=r"^hf://datasets/a/b: cannot read from the Hub: timed out \(retried for 0 s\)$"
    ):
        hub.retrying("hf://datasets/a/b", raising(httpx2.ReadTimeout("timed out")), timeout_s=0)
    waits.clear()
    with pytest.raises(hub.HubError, match=r"^hf://datasets/a/b/x.parquet: not a readable parquet file \(no magic\)$"):
        hub.retrying("hf://datasets/a/b/x.parquet", raising(OSError("no magic")), what="not a readable parquet file")
    assert waits == [], "a bad file is not retried"


def test_backoff_doubles_to_its_cap_and_passes_a_refused_error_through(monkeypatch):
    from dali_imagenet import retry

    waits, told = [], []
    monkeypatch.setattr(retry.time, "sleep", waits.append)
    errors = iter([TimeoutError("t")] * 6)

    def call():
        error = next(errors, None)
        if error:
            raise error
        return 7

    assert retry.with_backoff(call, lambda e: True, 1e6, 1.0, 5.0, on_wait=lambda e, w: told.append(w)) == 7
    assert waits == told == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    refused = ValueError("not retried")
    with pytest.raises(ValueError) as caught:
        retry.with_backoff(raising(refused), lambda e: not isinstance(e, ValueError), 1e6)
    assert caught.value is refused and waits == told


def test_each_footer_is_read_once_whatever_the_workers(hub, sample_dir, tmp_path):
    """The planner reads each file's footer and hands them to the workers: the Hub sees one
    `resolve` per footer and one per row group, however many workers read (each is rate-limited
    on the real Hub: ~14,300 row groups + 336 footers for ImageNet's three splits)."""
    import pyarrow.parquet as pq

    files = sorted((sample_dir / "data").glob("*.parquet"))
    row_groups = sum(pq.ParquetFile(f).num_row_groups for f in files)
    start = len(hub.requests)
    run_cli(URL, tmp_path / "out", "--shard-size", "4", "--workers", "2", env=hub_env(hub, tmp_path))
    resolves = [r for r in hub.requests[start:] if "/resolve/" in r[1]]
    print(f"{len(resolves)} resolve requests for {len(files)} files and {row_groups} row groups (2 workers)")
    assert len(resolves) <= len(files) + row_groups + 2
    footer_reads = {}
    for _, path, byte_range, _ in resolves:  # a footer read is the file's last 64 KiB
        footer_reads[path] = footer_reads.get(path, 0) + (byte_range.endswith(f"-{_size(sample_dir, path) - 1}"))
    assert set(footer_reads.values()) == {1}, footer_reads


def _size(sample_dir: Path, resolve_path: str) -> int:
    return (sample_dir / "data" / resolve_path.rsplit("/", 1)[-1]).stat().st_size
