"""A Gradio demo of a trained checkpoint: drop or upload a photo, see its top-5 classes and where
the model looked for the first of them (a Grad-CAM heat map over the crop it saw).

    python app.py --checkpoint runs/r50/best.pt [--host 127.0.0.1] [--port 7860] [--device cpu]

The model is loaded once, on the CPU or the GPU; the page shows the model, its validation
accuracy in training and the run's date. On a Hugging Face Space (`publish.py --space`, docs/results.md)
it runs as `python app.py` on the checkpoint named by $DALI_IMAGENET_CHECKPOINT, else the published
folder ./model, else the hf://USER/NAME@COMMIT that ./model.txt names (what `publish.py --space`
puts there: one or the other), else ./model.pt. --checkpoint takes a checkpoint, a published
folder or hf://USER/NAME[@REVISION]. Its examples: the images in ./examples (a Space's), else a
few drawn from the bundled sample.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from dali_imagenet.errors import UsageError, one_line_errors
from dali_imagenet.inference.predictor import WEIGHT_CHOICES, Predictor, image_tensor, load_model

HERE = Path(__file__).resolve().parent


def default_checkpoint() -> str:
    published, named = HERE / "model", HERE / "model.txt"
    if os.environ.get("DALI_IMAGENET_CHECKPOINT"):
        return os.environ["DALI_IMAGENET_CHECKPOINT"]
    if (published / "config.json").is_file():
        return str(published)
    return named.read_text().strip() if named.is_file() else str(HERE / "model.pt")


def example_images(folder: Path, count: int = 4) -> list[str]:
    """The images in ./examples (a Space's), else a few of the bundled sample's classes, drawn
    once into `folder` (none where neither is there)."""
    shipped = sorted(str(p) for p in (HERE / "examples").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return shipped or [str(p) for p in sample_images(folder, count)]


def sample_images(folder: Path, count: int = 4) -> list[Path]:
    """`count` images of the bundled sample's classes, drawn once into `folder` (none where the
    sample's drawing code is not installed)."""
    import numpy as np

    try:
        from shard_tools.sample import CLASSES, draw_image, encode
    except ImportError:
        return []

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for label in range(0, len(CLASSES), max(1, len(CLASSES) // count))[:count]:
        path = folder / f"{CLASSES[label][0].replace(' ', '-')}.jpg"
        if not path.is_file():
            rng = np.random.default_rng(1000 + label)
            path.write_bytes(encode(draw_image(label, rng), "jpeg", rng))
        paths.append(path)
    return paths


def describe(loaded, checkpoint: str) -> str:
    val = loaded.summary.get("val", {})
    accuracy = (f"val top-1 {val['top1']:.1f} %" + (f" (EMA {val['ema_top1']:.1f} %)" if "ema_top1" in val else "")
                + f" after epoch {val.get('epoch', '?')} of {loaded.summary.get('epochs', '?')}") if val else \
        "no validation recorded"
    date = loaded.summary.get("saved_at") or "date not recorded"
    return (f"**{loaded.arch}**, {loaded.num_classes} classes, {loaded.weights} weights from `{Path(checkpoint).name}`"
            f" · {accuracy} · trained {date}")


def build_demo(predictor: Predictor, header: str, examples: list[str]):
    import gradio as gr

    def classify(image):
        if image is None:
            return None, None
        pixels = image_tensor(image)
        top = predictor.top(predictor.probabilities([pixels]), 5)[0]
        _, _, heat = predictor.heat_map(pixels, top[0][0], display_px=320)  # where it looked for its top-1
        return {name: probability for _, name, probability in top}, heat

    with gr.Blocks(title="dali-imagenet demo") as demo:
        gr.Markdown(f"# dali-imagenet: what is in the photo?\n{header}")
        with gr.Row():
            image = gr.Image(type="pil", label="photo", sources=["upload", "clipboard"], elem_id="photo")
            top5 = gr.Label(num_top_classes=5, label="top-5", elem_id="top5")
            heat = gr.Image(type="pil", label="where it looked for its top-1 (Grad-CAM)", interactive=False,
                            elem_id="gradcam")
        image.change(classify, inputs=image, outputs=[top5, heat])
        if examples:
            gr.Examples(examples, inputs=image, label="examples")
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=default_checkpoint(),
                        help="a checkpoint, a published folder or hf://USER/NAME[@REVISION]")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; a Space sets 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or $GRADIO_SERVER_PORT)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help="raw weights or their EMA")
    parser.add_argument("--no-examples", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    with one_line_errors():
        if args.port is not None and not 0 < args.port < 65536:
            raise UsageError(f"--port {args.port}: a port is 1-65535")
        loaded = load_model(args.checkpoint, which=args.weights, device=args.device)
        predictor = Predictor(loaded, device=args.device)
    examples = [] if args.no_examples else example_images(HERE / "build" / "app-examples")
    demo = build_demo(predictor, describe(loaded, args.checkpoint), examples)
    demo.launch(server_name=args.host or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=args.port, share=False, show_error=True)


if __name__ == "__main__":
    main()
