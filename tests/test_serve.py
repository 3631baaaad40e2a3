"""serve.py as its clients meet it: a real server process on 127.0.0.1, spoken to over HTTP with
httpx, on the shared trained run's checkpoint; and cloud/serve.yaml read by SkyPilot's own code."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REPO, child_env, run_in_process, script

from dali_imagenet.inference.uploads import MAX_BYTES, UploadError, check_pixels

SKY_PYTHON = os.environ.get("DALI_IMAGENET_SKY_PYTHON", str(REPO / ".venv-cloud" / "bin" / "python"))  # as test_cloud


class Server:
    """`python serve.py --checkpoint CHECKPOINT --port 0 ...` until stopped; `url` once it answers."""

    def __init__(self, checkpoint: Path, *extra: str, log: Path):
        self.log = open(log, "w")
        self.process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--checkpoint", str(checkpoint),
                                         "--port", "0", "--no-access-log", *extra], cwd=REPO, env=child_env(),
                                        stdout=subprocess.PIPE, stderr=self.log, text=True)
        first = self.process.stdout.readline()  # "serving ID (REV) on http://127.0.0.1:PORT (...)"
        assert " on http://" in first, f"serve.py said {first!r}; its log: {log.read_text()[-2000:]}"
        self.url = first.split(" on ")[1].split()[0]
        for _ in range(200):  # the socket is bound before uvicorn listens on it: a moment
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"serve.py did not answer /v1/health; its log: {log.read_text()[-2000:]}")

    def predict(self, image: Path, **params) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/predict", params=params, files={"file": (image.name, image.read_bytes())},
                          timeout=120)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/v1/health", timeout=10).json()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """8 images of the bundled sample's 8 classes, ImageNet-sized JPEGs (500 x 375)."""
    import numpy as np

    from shard_tools.sample import draw_image, encode

    folder = tmp_path_factory.mktemp("serve-images")
    paths = []
    for label in range(8):
        rng = np.random.default_rng(2000 + label)
        paths.append(folder / f"image-{label}.jpg")
        paths[-1].write_bytes(encode(draw_image(label, rng), "jpeg", rng))
    return paths


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """Batches of 8 with a 50 ms window, so that requests sent together share forward passes."""
    running = Server(trained_run / "best.pt", "--max-batch", "8", "--max-wait-ms", "50",
                     log=tmp_path_factory.mktemp("serve-log") / "serve.log")
    yield running
    assert running.stop() == 0


def answers(server: Server, images: list[Path], **params) -> list[dict]:
    return [server.predict(image, **params).json() for image in images]


def test_the_answers_are_predict_json_s_with_the_model_and_its_revision(server, images, trained_run):
    """predict.py stacks the 8 images into one batch of 8; the server, one image at a time, pads
    each to its fixed batch of 8: the same shape, so the same kernels, so the same numbers to the
    last bit (a row never depends on the other rows at one shape)."""
    predicted = run_in_process(script("predict"), ["predict.py", *images, "--checkpoint", trained_run / "best.pt",
                                                   "--json", "--top", "3", "--device", "cpu"])
    assert predicted.returncode == 0, predicted.stderr
    expected = {Path(line["path"]).name: line for line in map(json.loads, predicted.stdout.splitlines())}
    revision = "sha256:" + hashlib.sha256((trained_run / "best.pt").read_bytes()).hexdigest()[:16]
    for answer in answers(server, images, k=3):
        assert answer["top"] == expected[answer["path"]]["top"]
        assert (answer["model"], answer["revision"]) == ("run/best.pt", revision)
    raw = httpx.post(f"{server.url}/v1/predict", content=images[3].read_bytes(),
                     headers={"Content-Type": "image/jpeg"}, timeout=60).json()  # the body itself, no form
    assert raw["top"][:3] == expected["image-3.jpg"]["top"] and raw["path"] is None


def test_concurrent_requests_get_the_answers_they_get_one_at_a_time(server, images):
    alone = {image.name: server.predict(image).json() for image in images}
    before = server.health()["batches"]
    requests = images * 4
    random.Random(0).shuffle(requests)
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda image: server.predict(image), requests))
    assert [r.status_code for r in together] == [200] * 32
    assert [r.json() for r in together] == [alone[image.name] for image in requests]
    after = server.health()["batches"]
    shared = sum(count - before.get(size, 0) for size, count in after.items() if int(size) > 1)
    assert shared > 0, after  # some of them did go through the model together


def test_the_model_page_health_and_openapi(server, trained_run):
    card = httpx.get(f"{server.url}/v1/model", timeout=10).json()
    assert card["arch"] == "resnet10" and card["num_classes"] == 8 and len(card["classes"]) == 8
    assert card["preprocessing"]["image_size"] == 40 and card["serving"]["max_batch"] == 8
    assert card["source"] == str(trained_run / "best.pt")
    assert server.health()["status"] == "ok"
    spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert set(spec["paths"]) == {"/v1/predict", "/v1/health", "/v1/model"}
    assert {"image/*", "multipart/form-data"} <= set(spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"])
    assert httpx.get(f"{server.url}/docs", timeout=10).status_code == 200


def test_gradcam_adds_a_png_heat_map_of_the_top_1(server, images):
    import base64
    import io

    from PIL import Image

    answer = server.predict(images[2], gradcam=1, k=2).json()
    assert answer["gradcam"]["index"] == answer["top"][0]["index"]
    heat = Image.open(io.BytesIO(base64.b64decode(answer["gradcam"]["png_base64"])))
    assert heat.format == "PNG" and heat.size == (224, 224)


def png_bomb(width: int, height: int) -> bytes:
    """A valid greyscale PNG of width x height black pixels: a few hundred KB at most, whatever the size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def chunks(data: bytes, size: int = 1 << 20):
    for start in range(0, len(data), size):
        yield data[start:start + size]


def bad_inputs(images: list[Path]) -> dict:
    """name -> (how it is sent, the status it must get, a word of its error)."""
    jpeg = images[0].read_bytes()
    too_big = os.urandom(MAX_BYTES + 1)
    return {
        "not an image": (dict(content=b"GIF? no: plain text\n" * 50, headers={"Content-Type": "image/jpeg"}), 400,
                         "not an image"),
        "truncated": (dict(content=jpeg[: len(jpeg) // 2], headers={"Content-Type": "image/jpeg"}), 400, "truncated"),
        "empty": (dict(content=b"", headers={"Content-Type": "image/png"}), 400, "not an image"),
        "bomb, 64 MP": (dict(content=png_bomb(8000, 8000), headers={"Content-Type": "image/png"}), 413,
                        "64,000,000 px"),
        "bomb, 400 MP": (dict(content=png_bomb(20000, 20000), headers={"Content-Type": "image/png"}), 413,
                         "decompression bomb"),
        "a needle, 50,000 x 1": (dict(content=png_bomb(50000, 1), headers={"Content-Type": "image/png"}), 413, "ratio"),
        "over the byte limit": (dict(content=too_big, headers={"Content-Type": "image/jpeg"}), 413, "limit"),
        "over the byte limit, chunked": (dict(content=chunks(too_big), headers={"Content-Type": "image/jpeg"}), 413,
                                         "limit"),
        "over the byte limit, in a form": (dict(files={"file": ("big.jpg", too_big)}), 413, "limit"),
        "wrong content type": (dict(content=jpeg, headers={"Content-Type": "application/json"}), 415, "Content-Type"),
        "no content type": (dict(content=jpeg, headers={"Content-Type": ""}), 415, "Content-Type"),
        "a form without `file`": (dict(files={"photo": ("a.jpg", jpeg)}), 400, "`file`"),
        "a broken form": (dict(content=b"--x\r\nnonsense", headers={"Content-Type": "multipart/form-data; boundary=x"}),
                          400, "form"),
        "k = 0": (dict(content=jpeg, headers={"Content-Type": "image/jpeg"}, params={"k": 0}), 422, "k"),
        "k = five": (dict(content=jpeg, headers={"Content-Type": "image/jpeg"}, params={"k": "five"}), 422, "k"),
    }


def test_each_bad_input_gets_its_4xx_and_one_line_and_the_next_request_is_answered(server, images):
    good = server.predict(images[1]).json()
    for name, (request, status, word) in bad_inputs(images).items():
        response = httpx.post(f"{server.url}/v1/predict", timeout=60, **request)
        assert response.status_code == status, (name, response.text)
        assert "\n" not in response.text and list(response.json()) == ["error"], (name, response.text)
        assert word in response.json()["error"], (name, response.text)
        assert server.predict(images[1]).json() == good, name
    assert httpx.get(f"{server.url}/v1/nowhere", timeout=10).json() == {"error": "Not Found"}


def test_past_max_concurrency_a_prediction_gets_503_and_health_still_answers(trained_run, images, tmp_path):
    """One prediction held (a batch of 2 waits up to 4 s for a second row): the next is refused with
    503 at once, while /v1/health (a load balancer's readiness probe) answers 200 throughout."""
    busy = Server(trained_run / "best.pt", "--max-concurrency", "1", "--max-batch", "2", "--max-wait-ms", "4000",
                  log=tmp_path / "serve.log")
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(busy.predict, images[0])
            while busy.health()["in_flight"] < 1:
                time.sleep(0.02)
            refused = busy.predict(images[1])
            assert refused.status_code == 503 and "--max-concurrency 1" in refused.json()["error"]
            assert httpx.get(f"{busy.url}/v1/health", timeout=10).status_code == 200
            assert held.result().status_code == 200
    finally:
        assert busy.stop() == 0


def test_sigterm_answers_the_requests_in_flight_then_exits_0(server, trained_run, images, tmp_path):
    """Six requests wait in a 3 s batching window when SIGTERM comes: all six are answered, with
    the answers the other server (same batch shape) gives them one at a time, then the server
    exits 0 and a request after it finds no server."""
    alone = [server.predict(image).json() for image in images[:6]]
    log = tmp_path / "serve.log"
    stopping = Server(trained_run / "best.pt", "--max-batch", "8", "--max-wait-ms", "3000", log=log)
    try:
        results = [None] * 6

        def send(i):
            results[i] = stopping.predict(images[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while stopping.health()["in_flight"] < 6:
            assert time.monotonic() < deadline, stopping.health()
            time.sleep(0.05)
        stopping.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        assert stopping.process.wait(timeout=60) == 0, log.read_text()[-2000:]
        assert [r.status_code for r in results] == [200] * 6
        assert [r.json() for r in results] == alone
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{stopping.url}/v1/health", timeout=5)
        assert "6 requests answered in 1 forward pass\n" in stopping.process.stdout.read()
    finally:
        stopping.stop()


def test_the_pixel_check_refuses_big_and_elongated_images():
    check_pixels(8000, 5000, 40_000_000)
    for width, height in ((8000, 5001), (20000, 20000)):
        with pytest.raises(UploadError, match="over the limit") as refused:
            check_pixels(width, height, 40_000_000)
        assert refused.value.status == 413
    with pytest.raises(UploadError, match="ratio"):
        check_pixels(5001, 100)
    check_pixels(5000, 100)


SERVICE = """
import json, sys, sky
from sky.serve import serve_utils
from sky.serve.autoscalers import Autoscaler
config = sky.utils.yaml_utils.read_yaml(sys.argv[1])
missing = None
try:
    sky.Task.from_yaml_config(dict(config))
except ValueError as error:
    missing = str(error)
found = {}
for gpus in (None, 'L4:1'):
    task = sky.Task.from_yaml_config(dict(config), env_overrides=[('MODEL', 'hf://someone/model')])
    if gpus:  # what `sky serve up --gpus L4:1` does
        task.set_resources_override({'accelerators': gpus})
    serve_utils.validate_service_task(task, pool=False)  # what `sky serve up` checks before launching
    spec, resources = task.service, list(task.resources)[0]
    found[gpus or 'cpu'] = {
        'readiness': spec.readiness_path, 'ports': spec.ports, 'min': spec.min_replicas, 'max': spec.max_replicas,
        'qps': spec.target_qps_per_replica, 'fallback': spec.dynamic_ondemand_fallback,
        'autoscaler': type(Autoscaler.from_spec('s', spec)).__name__, 'spot': resources.use_spot,
        'accelerators': resources.accelerators, 'cpus': resources.cpus, 'run': task.run, 'envs': dict(task.envs),
        'setup': task.setup}
print(json.dumps({'missing': missing, **found}))
"""


def test_skypilot_reads_the_service_and_its_l4_option():
    if not os.path.exists(SKY_PYTHON):
        pytest.fail(f"{SKY_PYTHON} is missing: `make test` builds it (make cloud-venv)")
    result = subprocess.run([SKY_PYTHON, "-c", SERVICE, str(REPO / "cloud" / "serve.yaml")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert "MODEL" in found["missing"]  # no default model: `--env MODEL=...` or SkyPilot refuses
    cpu, l4 = found["cpu"], found["L4:1"]
    assert cpu["readiness"] == "/v1/health" and cpu["ports"] == "8000"
    assert cpu["spot"] is True and cpu["accelerators"] is None and cpu["cpus"] == "4+"
    assert l4["spot"] is True and l4["accelerators"] == {"L4": 1}
    assert cpu["autoscaler"] == "FallbackRequestRateAutoscaler" and cpu["fallback"] is True
    assert cpu["qps"] > 0 and 1 <= cpu["min"] < cpu["max"]
    assert "serve.py --checkpoint \"$MODEL\" --host 0.0.0.0 --port 8000" in cpu["run"]
    assert "EXTRAS=serve GPU=optional bash cloud/setup.sh" in cpu["setup"]
    assert cpu["envs"]["MODEL"] == "hf://someone/model"
