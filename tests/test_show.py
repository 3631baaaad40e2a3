"""What people look at: predict.py, the Gradio demo and the run report, the last two in a real
headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium).

Screenshots of what the browser saw go to build/test-artifacts/."""
from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, child_env, records, run_in_process, script
from PIL import Image

ARTIFACTS = REPO / "build" / "test-artifacts"
CHROMIUM, CHROMEDRIVER = (
    shutil.which("chromium") or "/usr/bin/chromium",
    shutil.which("chromedriver") or "/usr/bin/chromedriver",
)


@pytest.fixture(scope="module")
def demo_run(trained_run) -> Path:
    """The shared short real run: best.pt, metrics.jsonl and the report train.py wrote."""
    return trained_run


def run_script(name: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    """predict.py, evaluate.py or report.py as a user runs them (in this process: `run_in_process`)."""
    result = run_in_process(script(name[: -len(".py")]), [name, *args])
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def val_images(shards: Path, folder: Path) -> dict[str, int]:
    """The validation JPEGs as files, with their labels."""
    import webdataset as wds

    manifest = json.loads((shards / "manifest.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for sample in wds.WebDataset([str(shards / s["name"]) for s in manifest["splits"]["validation"]["shards"]],
                                 shardshuffle=False, empty_check=False):
        path = folder / f"{sample['__key__']}.jpg"
        path.write_bytes(sample["jpg"])
        labels[str(path)] = int(sample["cls"])
    return labels


pytestmark = pytest.mark.slow  # real processes (predict.py, evaluate.py, the Gradio app, a browser)


def test_predict_agrees_with_evaluate(sample_shards, demo_run, tmp_path):
    labels = val_images(sample_shards, tmp_path / "val")
    result = run_script(
        "predict.py", tmp_path / "val", "--checkpoint", demo_run / "best.pt", "--json", "--device", "cpu"
    )
    predictions = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(predictions) == len(labels) == 40
    assert all(len(p["top"]) == 5 and p["top"][0]["probability"] >= p["top"][1]["probability"] for p in predictions)
    top1 = 100 * sum(p["top"][0]["index"] == labels[p["path"]] for p in predictions) / len(predictions)
    for weights in ("auto",):  # predict's default weights are evaluate's default weights
        evaluation = json.loads(run_script("evaluate.py", "--checkpoint", demo_run / "best.pt", "--data", sample_shards,
                                           "--device", "cpu", "--weights", weights, "--json").stdout.splitlines()[-1])
    assert evaluation["images"] == 40 and top1 == pytest.approx(evaluation["top1"])
    names = json.loads((sample_shards / "manifest.json").read_text())["classes"]
    assert predictions[0]["top"][0]["name"] == names[predictions[0]["top"][0]["index"]]


def test_predict_odd_files_one_line_each(sample_shards, demo_run, tmp_path):
    jpeg = next(iter(val_images(sample_shards, tmp_path / "src")))
    image = Image.open(jpeg)
    odd = tmp_path / "odd"
    odd.mkdir()
    image.convert("CMYK").save(odd / "cmyk.jpg", "JPEG")
    image.convert("L").save(odd / "gray.jpg", "JPEG")
    image.convert("RGBA").save(odd / "alpha.png", "PNG")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    (odd / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (odd / "notes.jpg").write_text("not an image")
    result = run_script("predict.py", odd, "--checkpoint", demo_run / "best.pt", "--json", "--top", "3",
                        "--device", "cpu", check=False)
    assert result.returncode == 1
    predicted = {Path(json.loads(line)["path"]).name for line in result.stdout.splitlines()}
    assert predicted == {"cmyk.jpg", "gray.jpg", "alpha.png"}
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "Traceback" not in result.stderr
    assert any("truncated.jpg:" in e for e in errors) and any("notes.jpg:" in e for e in errors)


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    if missing:
        pytest.fail(f"no headless browser ({', '.join(missing)} missing): apt-get install chromium chromium-driver",
                    pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, read by the tests
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradio_demo_in_a_browser(sample_shards, demo_run, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = next(iter(val_images(sample_shards, tmp_path / "val")))
    expected = json.loads(run_script("predict.py", photo, "--checkpoint", demo_run / "best.pt", "--json",
                                     "--device", "cpu").stdout)["top"]
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--checkpoint", str(demo_run / "best.pt"),
                               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.3)
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        header = wait.until(lambda d: d.find_element(By.TAG_NAME, "h1")).text
        assert "dali-imagenet" in header
        page = browser.find_element(By.TAG_NAME, "body").text
        assert "resnet10" in page and "val top-1" in page  # the model and its training accuracy are shown
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#photo input[type=file]"))
        upload.send_keys(str(photo))
        names = [item["name"] for item in expected]
        wait.until(lambda d: names[0] in d.find_element(By.ID, "top5").text)
        shown = browser.find_element(By.ID, "top5").text
        positions = [shown.find(name) for name in names]
        assert all(p >= 0 for p in positions) and positions == sorted(positions), (shown, names)
        heat = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gradcam img"))[0]  # where it looked
        wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", heat) > 0)
        assert (
            browser.execute_script("return arguments[0].naturalWidth", heat) == 320
        )  # the 40 px val crop, drawn larger
        browser.save_screenshot(str(ARTIFACTS / "gradio-demo.png"))
    finally:
        server.terminate()
        server.wait(10)
    assert (ARTIFACTS / "gradio-demo.png").stat().st_size > 10_000


def network_and_console(browser) -> tuple[list, list]:
    """What the page fetched (resource timing: data: URIs are not fetches) and what its console said."""
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    console = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    return fetched, console


def test_the_run_page_shows_what_the_model_learned(demo_run, sample_shards, browser):
    """train.py's own page of the shared run, in Chromium from file://: the headline, curves,
    results, per-class table (sortable), confusions, example thumbnails and Grad-CAM maps; no
    console error, nothing fetched, the run named once in the title."""
    from selenium.webdriver.common.by import By

    from dali_imagenet.data.shards import find_shards, sample_locations
    from dali_imagenet.inference.predictions import Predictions

    predictions = Predictions.load(demo_run / "predictions.npz")  # the final validation, one row per val sample
    val = find_shards(sample_shards, "validation")
    assert list(predictions.keys) == [key for _, key, _ in sample_locations(val)]
    assert len(predictions) == 40 and predictions.top5.shape == (40, 5) and predictions.epoch == 3
    final = [r for r in records(demo_run) if "val_top1" in r][-1]
    best = max(final["val_top1"], final["val_ema_top1"])
    assert 100 * predictions.correct.mean() == pytest.approx(best)  # the better weights of the final validation
    page = demo_run / "report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing to fetch: it renders offline
    browser.get_log("browser")  # what earlier pages said
    browser.get(page.as_uri())
    assert browser.title == f"{demo_run.name} · dali-imagenet" and browser.title.count(demo_run.name) == 1
    assert browser.find_element(By.CSS_SELECTOR, ".top1").text == f"{final['val_top1']:.2f}"
    headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "h2, h3")]
    for section in ("training", "validation", "Results", "What it learned", "Per class", "Most confused", "Examples",
                    "Where it looked (Grad-CAM)", "Machine", "Config"):
        assert section in headings, (section, headings)
    results = browser.find_elements(By.CSS_SELECTOR, "section > table")[0].text
    assert results.count("steps") == 1  # each fact once
    rows = browser.find_elements(By.CSS_SELECTOR, "table.per-class tbody tr")
    assert len(rows) == 8
    first = [float(r.find_elements(By.TAG_NAME, "td")[4].text) for r in rows]
    assert first == sorted(first)  # worst first
    browser.find_elements(By.CSS_SELECTOR, "table.per-class th")[4].click()  # sort by top-1: ascending
    browser.find_elements(By.CSS_SELECTOR, "table.per-class th")[4].click()  # and again: best first
    after = [float(r.find_elements(By.TAG_NAME, "td")[4].text)
             for r in browser.find_elements(By.CSS_SELECTOR, "table.per-class tbody tr")]
    assert after == sorted(first, reverse=True)
    wrong = int((~predictions.correct).sum())
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.confusions tbody tr")) == min(20, len(
        predictions.confusions(20))) and wrong > 0
    thumbnails = browser.find_elements(By.CSS_SELECTOR, "figure.example img")
    assert len(thumbnails) == 24
    heat_maps = browser.find_elements(By.CSS_SELECTOR, "figure.cam img.heat")
    assert len(heat_maps) == 8
    for image in thumbnails + heat_maps:
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 30
    assert len(browser.find_elements(By.CSS_SELECTOR, "figure.example.wrong")) == min(12, wrong)
    fetched, console = network_and_console(browser)
    assert fetched == [] and console == [], (fetched, console)
    browser.save_screenshot(str(ARTIFACTS / "run-report.png"))
    print(f"run page: {page.stat().st_size:,} bytes")


def test_two_runs_overlaid_and_the_page_uploaded(demo_run, browser, s3_bucket, tmp_path):
    """report.py RUN RUN: both runs' curves in one page, a section each; --s3 puts it up as text/html."""
    from selenium.webdriver.common.by import By

    from dali_imagenet.s3 import client

    second = tmp_path / "second"  # two runs overlaid, and the page uploaded as a static site
    shutil.copytree(demo_run, second)
    result = run_script("report.py", demo_run, second, "-o", tmp_path / "both.html", "--s3", f"s3://{s3_bucket}/site")
    assert "uploaded: s3://" in result.stdout
    both = (tmp_path / "both.html").read_text()
    assert both.count("<section>") == 2
    browser.get((tmp_path / "both.html").as_uri())
    for image in browser.find_elements(By.CSS_SELECTOR, "img.curves"):
        assert browser.execute_script("return arguments[0].naturalWidth", image) > 500
    head = client().head_object(Bucket=s3_bucket, Key="site/index.html")
    assert head["ContentType"].startswith("text/html")


def test_an_index_of_runs_local_and_on_s3(demo_run, browser, s3_bucket, tmp_path):
    """report.py over a folder of runs, and over an s3:// prefix of them: one row per run (its
    state, numbers, last update), each linking to its page; top-1 against hours; uploaded as the
    prefix's index.html (text/html), nothing fetched by the page, no console error."""
    from selenium.webdriver.common.by import By

    from dali_imagenet.s3 import client

    runs = tmp_path / "runs"
    shutil.copytree(demo_run, runs / "finished")
    shutil.copytree(demo_run, runs / "under-way")
    (runs / "under-way" / "report.html").unlink()
    lines = (runs / "under-way" / "metrics.jsonl").read_text().splitlines()
    (runs / "under-way" / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # no closing record yet
    (runs / "not-a-run").mkdir()
    run_script("report.py", runs)
    browser.get_log("browser")  # what earlier pages said
    browser.get((runs / "index.html").as_uri())
    rows = {r.find_elements(By.TAG_NAME, "td")[0].text.split()[0]: r.text
            for r in browser.find_elements(By.CSS_SELECTOR, "table.runs tbody tr")}
    assert sorted(rows) == ["finished", "under-way"]
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "table.runs th")]
    finished = next(r for r in browser.find_elements(By.CSS_SELECTOR, "table.runs tbody tr")
                    if r.find_elements(By.TAG_NAME, "td")[0].text.split()[0] == "finished")
    cells = dict(zip(headers, (td.text for td in finished.find_elements(By.TAG_NAME, "td"))))
    assert cells["launches"] == "1" and float(cells["outside training min"]) > 0  # one launch, its start-up at least
    assert "complete" in rows["finished"] and "running" in rows["under-way"] and "no page yet" in rows["under-way"]
    final = [r for r in records(demo_run) if "val_top1" in r][-1]
    assert f"{final['val_top1']:.2f}" in rows["finished"] and "3 / 3" in rows["finished"]
    link = browser.find_element(By.LINK_TEXT, "finished")
    link.click()
    assert browser.current_url.endswith("/finished/report.html")  # the run's own page, through the index's link
    assert browser.title.endswith("· dali-imagenet")
    browser.back()
    assert browser.execute_script("return document.images[0].naturalWidth") > 300  # top-1 against hours
    fetched, console = network_and_console(browser)
    assert fetched == [] and console == [], (fetched, console)
    browser.save_screenshot(str(ARTIFACTS / "run-index.png"))

    for path in runs.rglob("*"):
        if path.is_file() and path.suffix != ".pt":
            client().upload_file(str(path), s3_bucket, f"team/{path.relative_to(runs)}")
    result = run_script("report.py", f"s3://{s3_bucket}/team/", "-o", tmp_path / "index.html", "--s3",
                        f"s3://{s3_bucket}/team")
    assert "uploaded: s3://" in result.stdout
    head = client().head_object(Bucket=s3_bucket, Key="team/index.html")
    assert head["ContentType"].startswith("text/html")
    page = client().get_object(Bucket=s3_bucket, Key="team/index.html")["Body"].read().decode()
    assert 'href="finished/report.html"' in page and "under-way" in page and "running" in page


def test_the_model_card_renders_as_the_hub_shows_it(demo_run, browser, tmp_path):
    """The published card's Markdown rendered as GitHub-flavoured Markdown (what the Hub renders),
    its metadata beside it, in Chromium: the results table, the curves image, the load snippet."""
    from markdown_it import MarkdownIt
    from selenium.webdriver.common.by import By

    out = tmp_path / "published"
    result = run_in_process(script("publish"), ["publish.py", str(demo_run), str(out), "--data-name",
                                                "ILSVRC/imagenet-1k"])
    assert result.returncode == 0, result.stderr
    _, metadata, body = (out / "README.md").read_text().split("---\n", 2)
    page = tmp_path / "card.html"
    page.write_text(f"<!doctype html><meta charset=utf-8><base href='{out.as_uri()}/'><title>model card</title>"
                    "<style>body{font-family:sans-serif;max-width:1100px;margin:1em auto;display:flex;gap:2em}"
                    "main{flex:3}aside{flex:1;font-size:12px}table{border-collapse:collapse}"
                    "td,th{border:1px solid #ccc;padding:2px 6px}pre{background:#f4f4f4;padding:6px;overflow:auto}"
                    "img{max-width:100%}</style>"
                    f"<main>{MarkdownIt('commonmark').enable('table').render(body)}</main>"
                    f"<aside><h4>metadata</h4><pre>{html_escape(metadata)}</pre></aside>")
    browser.get(page.as_uri())
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "main table th")]
    assert {"val size", "weights", "top-1 %", "top-5 %"} <= set(headers)
    curves = browser.find_element(By.CSS_SELECTOR, "main img[alt='validation curves']")
    assert browser.execute_script("return arguments[0].naturalWidth", curves) > 100  # curves.png beside it
    code = " ".join(c.text for c in browser.find_elements(By.CSS_SELECTOR, "main pre code"))
    assert 'timm.create_model("local-dir:published", pretrained=True)' in code
    assert "model-index" in browser.find_element(By.TAG_NAME, "aside").text
    browser.set_window_size(1280, 2400)
    browser.save_screenshot(str(ARTIFACTS / "model-card.png"))
    browser.set_window_size(1280, 1000)
    assert (ARTIFACTS / "model-card.png").stat().st_size > 10_000


def html_escape(text: str) -> str:
    import html

    return html.escape(text)
