"""An HTTP API for a trained model, with dynamic batching (FastAPI on uvicorn).

    python serve.py --checkpoint runs/r50/best.pt [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-wait-ms 10]
    curl -s -H 'Content-Type: image/jpeg' --data-binary @photo.jpg 'http://127.0.0.1:8000/v1/predict?k=3'

--checkpoint takes a checkpoint, a published folder or hf://USER/NAME[@REVISION], as predict.py.
POST /v1/predict: one image as the body (Content-Type image/...) or as the multipart field `file`;
the answer is predict.py --json's for that image (`path`: the upload's file name, `top`: index,
name, probability) plus the model's `model` id and `revision`; `?k=` (default 5); `?gradcam=1` adds
the Grad-CAM heat map of the top-1 as a base64 PNG. GET /v1/health (200 once the model is loaded),
GET /v1/model, the OpenAPI page at /docs. Requests that arrive within --max-wait-ms of each other
are decoded in parallel and go through the model as one batch of --max-batch rows (padded: an
answer never depends on what it was batched with). Bad input gets a 4xx and one line of JSON,
`{"error": ...}`. SIGTERM (or Ctrl-C) stops accepting, answers the requests in flight, exits 0.
docs/serving.md: SkyPilot Serve, containers, the measured speeds.
"""
from __future__ import annotations

import os

# ruff: noqa: E402 (the imports below come after the OpenMP setting, which must precede torch's)
# Before torch loads libgomp: OpenMP threads that sleep when idle instead of spinning. A server's
# model threads share the cores with its decoding threads and event loop (and, on a shared
# machine, with others): spinning threads then take the CPU the others need. Measured on this
# project's 2-core machine under load: ResNet-18 at 64 px, batch 4, 2 threads: 24-160 ms a pass
# passive, 470-1,350 ms spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import io
import logging
import signal
import socket
import sys

import torch
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from dali_imagenet.errors import one_line_errors
from dali_imagenet.inference.batcher import Batcher
from dali_imagenet.inference.identity import model_identity
from dali_imagenet.inference.predictor import WEIGHT_CHOICES, Predictor, load_model, top_json
from dali_imagenet.inference.uploads import MAX_BYTES, MAX_PIXELS, UploadError, decode_upload

log = logging.getLogger("serve")
MAX_K = 1000  # the most classes one answer may list
# Rows per forward pass. Every pass is padded to it (an answer must not depend on its batch), so a
# lone request pays for all the rows: on a CPU, where a batch gains little, that did not pay off
# (docs/serving.md: ResNet-50 with 4 rows, two runs: 0.19x and 0.48x the rate at 1 client; at 32
# clients 1.00x and 1.89x, within the noise of a loaded machine).
DEFAULT_BATCH = {"cpu": 1, "cuda": 16}
UPLOAD_BODY = {"required": True, "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}}}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, a published folder or hf://USER/NAME[@REV]")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (the line 'serving on' names it)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help="raw weights or their EMA")
    parser.add_argument("--max-batch", type=int, help=f"images per forward pass; 1: no batching (default "
                        f"{DEFAULT_BATCH['cpu']} on a CPU, {DEFAULT_BATCH['cuda']} on a GPU; docs/serving.md)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long the first request of a batch waits for others (ms)")
    parser.add_argument("--decode-threads", type=int, default=os.cpu_count() or 1, help="uploads decoded at once")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="largest upload (bytes)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="largest image, width x height (px)")
    parser.add_argument("--max-concurrency", type=int, default=64,
                        help="predictions held at once, beyond which a prediction is answered 503 at once, before its "
                        "body is read (memory: each holds its upload); /v1/health always answers")
    parser.add_argument("--drain-s", type=float, default=30.0,
                        help="on SIGTERM: how long the requests in flight may take before they are cancelled (s)")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="a line per request (uvicorn's access log, on stdout)")
    args = parser.parse_args(argv)
    args.max_batch = args.max_batch or DEFAULT_BATCH[args.device]
    for name in ("max_batch", "decode_threads", "max_bytes", "max_pixels", "max_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_wait_ms < 0 or args.drain_s < 0:
        parser.error("--max-wait-ms and --drain-s must be >= 0")
    return args


async def read_body(request, max_bytes: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to be over `max_bytes`: from its
    Content-Length before a byte is read, else while it streams in."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise UploadError(413, f"the upload is {int(length):,} bytes, over the limit of {max_bytes:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise UploadError(413, f"the upload is over the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request, max_bytes: int) -> tuple[bytes, str | None]:
    """(the image's bytes, its file name where it came in a multipart form)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media.startswith("image/"):
        return await read_body(request, max_bytes), None
    if media != "multipart/form-data":
        raise UploadError(415, f"Content-Type {media or '(none)'}: send the image as the body with Content-Type "
                               "image/..., or as the field `file` of a multipart/form-data form")
    body = await read_body(request, max_bytes)

    async def whole():
        yield body

    try:
        form = await MultiPartParser(request.headers, whole(), max_files=1, max_fields=16).parse()
    except MultiPartException as error:
        raise UploadError(400, f"not a readable multipart form ({error.message})") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise UploadError(400, "the multipart form has no file in a field named `file`")
        return await upload.read(), upload.filename
    finally:
        await form.close()


def heat_map_png(predictor: Predictor, image: torch.Tensor, class_index: int) -> dict:
    from dali_imagenet.training.archs import ArchError

    try:
        _, _, heat = predictor.heat_map(image, class_index)
    except ArchError as error:  # a network without a feature map to look at (a transformer's tokens)
        raise UploadError(422, f"no Grad-CAM for this model: {error}") from None
    png = io.BytesIO()
    heat.save(png, format="PNG")
    return {"index": class_index, "png_base64": base64.b64encode(png.getvalue()).decode("ascii")}


def model_card(predictor: Predictor, checkpoint: str, identity: dict, args) -> dict:
    loaded, config = predictor.loaded, predictor.loaded.config
    mean, std = config.normalization()
    return {"model": identity["id"], "revision": identity["revision"], "source": checkpoint, "arch": loaded.arch,
            "weights": loaded.weights, "num_classes": loaded.num_classes, "classes": predictor.names,
            "preprocessing": {"image_size": predictor.image_size, "crop_fraction": config.val_crop_fraction,
                              "crop_mode": config.val_crop_mode, "interpolation": config.val_interpolation,
                              "mean": list(mean), "std": list(std)},
            "run": loaded.summary,
            "serving": {"device": args.device, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                        "max_bytes": args.max_bytes, "max_pixels": args.max_pixels}}


def build_app(predictor: Predictor, checkpoint: str, identity: dict, args):
    model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
    decoders = concurrent.futures.ThreadPoolExecutor(args.decode_threads, thread_name_prefix="decode")
    card = model_card(predictor, checkpoint, identity, args)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.batcher = Batcher(predictor.forward, args.max_batch, args.max_wait_ms / 1000, model_thread)
        app.state.batcher.start()
        app.state.answered = app.state.in_flight = 0
        yield
        await app.state.batcher.close()  # uvicorn let the requests in flight finish first
        model_thread.shutdown()
        decoders.shutdown()

    app = FastAPI(title="dali-imagenet", version="1", lifespan=lifespan,
                  description=f"{card['arch']} ({card['model']}, {card['revision']}): top-k classes of an image")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(UploadError)
    async def refused(request, exc: UploadError):
        return error(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        return error(422, f"{' '.join(str(part) for part in first.get('loc', ()))}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)  # the traceback goes to the server's log
        return error(500, f"internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")

    def prepare(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_upload(data, args.max_pixels)
        return image, predictor.transform(image)

    @app.post("/v1/predict", openapi_extra={"requestBody": UPLOAD_BODY},
              summary="Top-k classes of one image (the body, or the multipart field `file`)")
    async def predict(request: Request, k: int = Query(5, ge=1, le=MAX_K, description="how many classes"),
                      gradcam: bool = Query(False, description="add the top-1's Grad-CAM heat map (base64 PNG)")):
        if request.app.state.in_flight >= args.max_concurrency:  # before the body is read: its memory is the limit
            return error(503, f"busy: {request.app.state.in_flight} predictions in flight (--max-concurrency "
                              f"{args.max_concurrency}); retry")
        request.app.state.in_flight += 1
        try:
            data, filename = await read_upload(request, args.max_bytes)
            loop = asyncio.get_running_loop()
            image, item = await loop.run_in_executor(decoders, prepare, data)
            row = await request.app.state.batcher.submit(item)
            top = predictor.top(row[None], k)[0]
            answer = {"path": filename, "top": top_json(top), "model": identity["id"],
                      "revision": identity["revision"]}
            if gradcam:
                answer["gradcam"] = await loop.run_in_executor(model_thread, heat_map_png, predictor, image, top[0][0])
        finally:
            request.app.state.in_flight -= 1
        request.app.state.answered += 1
        return JSONResponse(answer)

    @app.get("/v1/health", summary="200 once the model is loaded; the requests in flight and answered, the "
             "batches run (requests in a forward pass: how many times)")
    async def health(request: Request):
        sizes = request.app.state.batcher.batch_sizes
        return {"status": "ok", "in_flight": request.app.state.in_flight, "answered": request.app.state.answered,
                "batches": {str(n): sizes[n] for n in sorted(sizes)}}

    @app.get("/v1/model", summary="The model: arch, classes, preprocessing, where the weights came from")
    async def model():
        return card

    return app


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with one_line_errors():
        loaded = load_model(args.checkpoint, which=args.weights, device=args.device)
        predictor = Predictor(loaded, device=args.device)
        identity = model_identity(args.checkpoint)
        sock = listening_socket(args.host, args.port)
    app = build_app(predictor, args.checkpoint, identity, args)
    # No uvicorn limit_concurrency: it counts connections (a load balancer keeps many open) and answers 503 on
    # every path, the readiness probe's too; the predictions' own limit is in /v1/predict.
    config = uvicorn.Config(app, log_level="info", access_log=args.access_log, timeout_graceful_shutdown=args.drain_s)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it stopped on once it has drained; handled here, it ends in exit 0.
    stops = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stops.append(number))
    host, port = sock.getsockname()[:2]
    print(f"serving {identity['id']} ({identity['revision']}) on http://{host}:{port} ({args.device}, batches of "
          f"{args.max_batch}, {args.max_wait_ms:g} ms wait)", flush=True)
    server.run(sockets=[sock])
    if not server.started:
        return 1
    batches = app.state.batcher.batch_sizes
    passes = sum(batches.values())
    print(f"stopped{' on a signal' if stops else ''}: {app.state.answered} requests answered in {passes} forward "
          f"pass{'' if passes == 1 else 'es'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
