"""A Gradio Space serving the demo (`app.py`) on a published model, that builds the same every
time: its requirements pinned to the versions the tests run with (`SPACE_PINS`, checked against
the test environment by the tests), PyTorch's CPU build (a Space's free hardware has no GPU; the
default Linux wheel brings CUDA's libraries, gigabytes of them), the Python and Gradio versions
in its config, and a few example images.

The model: a public model on the Hub is loaded by the Space as `hf://REPO@COMMIT` (the very
upload, no copy of the weights); otherwise (no `--hub`, or a private model) the Space holds the
published folder as `model/` and must be as private as the model (`sharing/hub.py` sees to it)."""
from __future__ import annotations

import shutil
from pathlib import Path

from dali_imagenet.run.run_folder import REPORT
from dali_imagenet.sharing.folder import CURVES

SPACE_PYTHON = "3.11"  # the Space's python_version: the tests' Python
SPACE_GRADIO = "6.31.0"  # its sdk_version: the Gradio the demo is tested with (a Space installs it itself)
SPACE_PINS = {  # distribution -> version: what app.py and the library's inference path import, as tested
    "torch": "2.14.1", "torchvision": "0.29.1", "timm": "1.0.31", "safetensors": "0.8.0", "huggingface_hub": "2.4.0",
    "pillow": "12.3.0", "numpy": "2.4.6", "pyyaml": "6.0.4", "matplotlib": "3.11.2",
}
CPU_BUILDS = ("torch", "torchvision")  # taken from PyTorch's CPU index: `torch==X+cpu`
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SPACE_MODEL = "model"  # the Space's copy of the published folder, which its app.py loads
SPACE_MODEL_SOURCE = "model.txt"  # or, instead, the hf://REPO@COMMIT it loads
EXAMPLES = "examples"
EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")


def requirements() -> str:
    lines = [f"--extra-index-url {CPU_INDEX}"]
    lines += [f"{name}=={version}{'+cpu' if name in CPU_BUILDS else ''}" for name, version in SPACE_PINS.items()]
    return "\n".join(lines) + "\n"


def space_folder(out: Path, published: Path, app: Path, *, title: str, model_repo: str | None,
                 model_source: str | None, examples: list[Path]) -> Path:
    """What the Space needs: app.py, the library it imports (no DALI: inference only),
    requirements.txt, its README (its config), `examples/`, and the model: `model_source`
    (hf://REPO@COMMIT) in model.txt, or (None) the published folder as `model/`."""
    import dali_imagenet

    out.mkdir(parents=True)
    shutil.copyfile(app, out / "app.py")
    package = Path(dali_imagenet.__file__).parent
    shutil.copytree(package, out / "dali_imagenet", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if model_source:
        (out / SPACE_MODEL_SOURCE).write_text(model_source + "\n")
    else:
        shutil.copytree(published, out / SPACE_MODEL, ignore=shutil.ignore_patterns(REPORT, CURVES))
        (out / SPACE_MODEL / "README.md").unlink(missing_ok=True)  # the Space's README is its config
    (out / EXAMPLES).mkdir()
    for index, example in enumerate(examples):
        shutil.copyfile(example, out / EXAMPLES / f"{index:02d}-{example.name}")
    (out / "requirements.txt").write_text(requirements())
    models = f"models:\n- {model_repo}\n" if model_repo else ""
    loads = f"`{model_source}`" if model_source else f"its copy of {model_repo or 'the published model'} (`model/`)"
    (out / "README.md").write_text(f"---\ntitle: {title}\nsdk: gradio\nsdk_version: {SPACE_GRADIO}\n"
                                   f"python_version: \"{SPACE_PYTHON}\"\napp_file: app.py\npinned: false\n"
                                   f"{models}---\n\n"
                                   f"The dali-imagenet demo of {model_repo or title}: top-5 classes of a photo and "
                                   f"where the model looked (Grad-CAM). It loads {loads}.\n")
    return out
