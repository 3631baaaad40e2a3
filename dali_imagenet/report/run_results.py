"""What a run learned, for its page: every class's val accuracy (a sortable table, worst first),
the class pairs it mixes up most, example val images with their true and predicted classes, and
Grad-CAM heat maps over some of them. Read from the final validation's `predictions.npz`; the
images are read from the run's val shards through their indices (only those samples' bytes);
Grad-CAM runs the run's best weights on the CPU (a few images: seconds)."""
from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path

from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.report.html_page import sortable

EXAMPLES = 24  # thumbnails, half wrong and half right
HEAT_MAPS = 8  # of which this many with Grad-CAM (half wrong, half right)
THUMBNAIL_PX = 128
CAM_PX = 160  # the smallest side a heat map is drawn at
CONFUSIONS = 20


def _jpeg_uri(image, quality: int = 80) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def class_names(checkpoint: dict | None, predictions) -> list[str]:
    """Display names of every class the predictions mention (the checkpoint's, else "class N")."""
    from dali_imagenet.data.classes import display_names

    count = int(max(predictions.labels.max(initial=0), predictions.top5.max(initial=0))) + 1
    count = max(count, (checkpoint or {}).get("num_classes") or 0)
    names = (checkpoint or {}).get("class_names")
    return display_names(list(names)) if names and len(names) == count else [f"class {i}" for i in range(count)]


def per_class_table(predictions, names: list[str]) -> str:
    rows = sorted((c for c in predictions.per_class(len(names)) if c["images"]),
                  key=lambda c: (c["top1"], -c["images"], c["index"]))
    body = [[(str(c["index"]), c["index"]), (html.escape(names[c["index"]]), names[c["index"]]),
             (str(c["images"]), c["images"]), (str(c["correct"]), c["correct"]), (f"{c['top1']:.1f}", c["top1"])]
            for c in rows]
    best = ", ".join(f"{names[c['index']]} {c['top1']:.0f} %" for c in rows[::-1][:3])
    worst = ", ".join(f"{names[c['index']]} {c['top1']:.0f} %" for c in rows[:3])
    return (f"<h3>Per class</h3><p>{len(rows)} classes; worst {html.escape(worst)}; best {html.escape(best)}. Worst "
            f"first: click a column's head to sort by it.</p><div class=scroll>"
            f"{sortable(['class', 'name', 'val images', 'top-1 right', 'top-1 %'], body, 'per-class')}</div>")


def confusions_table(predictions, names: list[str]) -> str:
    pairs = predictions.confusions(CONFUSIONS)
    if not pairs:
        return "<h3>Most confused</h3><p>no top-1 was wrong</p>"
    body = [
        [
            (html.escape(names[p["true"]]), names[p["true"]]),
            (html.escape(names[p["predicted"]]), names[p["predicted"]]),
            (str(p["count"]), p["count"]),
            (f"{100 * p['share']:.1f}", 100 * p["share"]),
        ]
        for p in pairs
    ]
    return (f"<h3>Most confused</h3><p>The {len(pairs)} most frequent wrong top-1s: true class, predicted class, "
            f"how many val images, and their share of the true class's.</p>"
            f"{sortable(['true class', 'predicted as', 'images', '% of the class'], body, 'confusions')}")


@dataclass
class Example:
    key: str
    image: object  # PIL, the whole val image
    true: int
    predicted: int
    confidence: float  # of the top-1
    cam: tuple | None = None  # (the crop the model saw, its Grad-CAM overlay), PIL, or None

    @property
    def wrong(self) -> bool:
        return self.true != self.predicted


@dataclass
class Examples:
    items: list[Example]
    why_none: str | None = None  # no images: why
    why_no_cam: str | None = None  # no heat maps: why
    cam_weights: str | None = None  # whose heat maps: "raw" or "ema"


def examples(run, predictions) -> Examples:
    """The val images of the final validation shown on the page (wrong first, by a fixed seed),
    half of HEAT_MAPS wrong and half right with Grad-CAM; why not, where the shards or weights are
    not at hand."""
    from PIL import Image

    from dali_imagenet.data.shards import find_shards, read_components
    from dali_imagenet.inference.predictor import image_tensor

    staged = run.started.get("staged_to")  # the run's local copy of s3:// data, where it is still at hand
    data = staged if staged and os.path.isdir(staged) else run.started.get("data")
    rows = predictions.examples(EXAMPLES)
    keys = [str(predictions.keys[i]) for i in rows]
    try:
        jpegs = read_components(find_shards(data, "validation"), keys) if data else {}
    except DaliImagenetError as error:
        return Examples([], f"the val shards are not at hand ({error}): no images")
    if not jpegs:
        return Examples([], f"the val shards ({data}) hold none of the predicted keys")
    wrong_rows = [i for i in rows if not predictions.correct[i]]
    right_rows = [i for i in rows if predictions.correct[i]]
    with_cam = set(wrong_rows[:HEAT_MAPS // 2] + right_rows[:HEAT_MAPS - min(len(wrong_rows), HEAT_MAPS // 2)])
    predictor = _predictor(run, predictions.weights) if with_cam else None
    found = Examples([], cam_weights=predictions.weights if predictor else None,
                     why_no_cam=None if predictor else "no checkpoint with weights in the run folder")
    for i in rows:
        key = str(predictions.keys[i])
        if key not in jpegs:
            continue
        image = Image.open(io.BytesIO(jpegs[key])).convert("RGB")
        example = Example(key, image, int(predictions.labels[i]), int(predictions.top5[i, 0]),
                          float(predictions.probabilities[i, 0]))
        if predictor is not None and i in with_cam and found.why_no_cam is None:
            try:
                example.cam = predictor.heat_map(image_tensor(image), example.predicted, display_px=CAM_PX)[1:]
            except DaliImagenetError as error:  # a network without a feature map (a ViT): said, not drawn
                found.why_no_cam = str(error)
        found.items.append(example)
    return found


def _examples_html(found: Examples, names: list[str]) -> str:
    """The thumbnails and heat maps; a line saying why where there are none."""
    if not found.items:
        return f"<h3>Examples</h3><p>{html.escape(found.why_none or 'none')}</p>"
    cards, cams = [], []
    for example in found.items:
        wrong = " wrong" if example.wrong else ""
        caption = (f"true: {html.escape(names[example.true])}<br><span class=\"{wrong.strip()}\">predicted: "
                   f"{html.escape(names[example.predicted])} ({example.confidence:.0%})</span>")
        thumbnail = example.image.copy()
        thumbnail.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        key = html.escape(example.key)
        cards.append(f"<figure class=\"example{wrong}\"><img alt=\"{key}\" src=\"{_jpeg_uri(thumbnail)}\">"
                     f"<figcaption>{caption}</figcaption></figure>")
        if example.cam is not None:
            crop, heat = example.cam
            cams.append(f"<figure class=\"cam{wrong}\"><img alt=\"{key}\" src=\"{_jpeg_uri(crop)}\">"
                        f"<img class=heat alt=\"Grad-CAM of {key}\" src=\"{_jpeg_uri(heat)}\">"
                        f"<figcaption>{caption}<br>where it looked for {html.escape(names[example.predicted])}"
                        f"</figcaption></figure>")
    cam_text = ("<h3>Where it looked (Grad-CAM)</h3><p>The last conv stage's activations weighted by the gradient of "
                "the predicted class: red drove that prediction. " + (f"{found.cam_weights} weights of "
                                                                       if found.cam_weights else "")
                + "the run's checkpoint, on the CPU.</p>" + "".join(cams)) if cams else (
        "<h3>Where it looked (Grad-CAM)</h3><p>" + html.escape(found.why_no_cam or "none") + "</p>")
    return (f"<h3>Examples</h3><p>{len(cards)} val images of the final validation, chosen by a fixed seed: the wrong "
            f"first, then right ones.</p>{''.join(cards)}{cam_text}")


def _predictor(run, weights: str):
    from dali_imagenet.inference.predictor import Predictor, load_model
    from dali_imagenet.run.run_folder import BEST, LAST

    for name in (LAST, BEST):  # the weights that made the final validation's predictions
        if (Path(run.folder) / name).is_file():
            try:
                return Predictor(load_model(Path(run.folder) / name, which=weights), device="cpu")
            except DaliImagenetError:
                continue
    return None


def learned_sections(run, checkpoint: dict | None, path: Path) -> str:
    """The page's "What it learned" part, or one line saying why there is none."""
    from dali_imagenet.inference.predictions import Predictions

    if not Path(path).is_file():
        return ("<h2>What it learned</h2><p>no predictions.npz: a run writes it at its final validation (with the "
                "DALI loader)</p>")
    try:
        predictions = Predictions.load(path)
    except DaliImagenetError as error:
        return f"<h2>What it learned</h2><p>{html.escape(str(error))}</p>"
    names = class_names(checkpoint, predictions)
    return (f"<h2>What it learned</h2><p>The final validation (epoch {predictions.epoch}, {len(predictions):,} images, "
            f"{predictions.weights} weights: the better of raw and EMA there), image by image.</p>"
            f"{per_class_table(predictions, names)}{confusions_table(predictions, names)}"
            f"{_examples_html(examples(run, predictions), names)}")
