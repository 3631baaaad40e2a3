"""The Hugging Face Hub: a published folder uploaded as one commit to a model repo (created if
needed; every earlier commit stays a revision one can load), and a Gradio Space that serves the
demo on it. The token is `HF_TOKEN` or the one `hf auth login` saved; `HF_ENDPOINT` names another
Hub. A missing or refused token, a repo one may not write: one line each."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dali_imagenet.sharing.folder import PublishError

SPACE_REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "huggingface_hub", "pillow", "numpy", "pyyaml",
                      "matplotlib")
SPACE_MODEL = "model"  # the Space's copy of the published folder, which its app.py loads


@dataclass
class Pushed:
    repo_id: str
    url: str  # the repo's page
    commit: str  # the commit's id: hf://REPO@COMMIT loads exactly this upload


def check_token() -> None:
    """Raises, in one line, unless the Hub takes the token: before anything is built."""
    _api()


def _api():
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    api = HfApi(token=token, endpoint=os.environ.get("HF_ENDPOINT"))  # as it is now, not at import
    try:
        api.whoami()
    except Exception as error:  # noqa: BLE001 - huggingface_hub's HTTP errors: the Hub's reason, one line
        raise PublishError(f"the Hub refused the token ({_reason(error)})") from None
    return api


def _reason(error: Exception) -> str:
    return " ".join(str(error).split())[:200]


def push(folder: Path, repo_id: str, *, kind: str = "model", private: bool = False, message: str,
         space_sdk: str | None = None) -> Pushed:
    """`folder` as one commit to `repo_id` (created when missing; an existing repo keeps its
    privacy): its files replace those of the same names, nothing else is removed."""
    if repo_id.count("/") != 1:
        raise PublishError(f"{repo_id}: a Hub repo is USER/NAME")
    api = _api()
    try:
        api.create_repo(repo_id, repo_type=kind, private=private, exist_ok=True, space_sdk=space_sdk)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=kind, commit_message=message)
    except Exception as error:  # noqa: BLE001 - a refused write, a name taken, the network: one line
        raise PublishError(f"{repo_id}: the Hub refused the upload ({_reason(error)})") from None
    prefix = {"model": "", "space": "spaces/", "dataset": "datasets/"}[kind]
    return Pushed(repo_id, f"{api.endpoint}/{prefix}{repo_id}", info.oid)


def space_folder(out: Path, published: Path, app: Path, *, title: str, model_repo: str | None) -> Path:
    """What a Gradio Space needs to serve the demo on the published model: app.py, the library it
    imports (no DALI: inference only), requirements.txt, the Space's README (its config) and the
    published folder as `model/`."""
    import dali_imagenet

    try:
        import gradio

        version = f"sdk_version: {gradio.__version__}\n"  # the Space runs the Gradio the app was tested with
    except ImportError:
        version = ""

    out.mkdir(parents=True)
    shutil.copyfile(app, out / "app.py")
    package = Path(dali_imagenet.__file__).parent
    shutil.copytree(package, out / "dali_imagenet", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(published, out / SPACE_MODEL, ignore=shutil.ignore_patterns("report.html", "curves.png"))
    (out / SPACE_MODEL / "README.md").unlink(missing_ok=True)  # the Space's README is its config
    (out / "requirements.txt").write_text("\n".join(SPACE_REQUIREMENTS) + "\n")
    models = f"models:\n- {model_repo}\n" if model_repo else ""
    (out / "README.md").write_text(f"---\ntitle: {title}\nsdk: gradio\n{version}"
                                   f"app_file: app.py\npinned: false\n{models}---\n\n"
                                   f"The dali-imagenet demo of {model_repo or title}: top-5 classes of a photo and "
                                   f"where the model looked (Grad-CAM).\n")
    return out
