"""publish.py against the stand-in Hub, as a Hugging Face user judges it: who can see what was
published (--private, an organisation whose repos are private by default, a repo that exists),
the card's metadata as the Hub reads it (eval results, datasets, base model, licence), nothing of
the publisher's machine in what is published, a Space that builds the same every time (pinned,
CPU torch, stale files removed) and runs with only its requirements importable, and what a failed
call says (the network, offline, the token, the name, the size), whole."""
from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO, child_env
from test_publish import model_hub as model_hub  # noqa: F401 - the fixture, by its name
from test_publish import predictions_of, run_publish
from test_show import val_images

from dali_imagenet.sharing.space import CPU_BUILDS, SPACE_GRADIO, SPACE_PINS, SPACE_PYTHON
from standins.hub_commits import Org


def card_on_the_hub(hub, repo_id: str):
    """The repo's card as huggingface_hub reads it from the Hub."""
    from huggingface_hub import ModelCard, hf_hub_download

    return ModelCard.load(hf_hub_download(repo_id, "README.md", endpoint=hub.url, token="hf_alice_write"))


def public_copies(hub, data: bytes) -> list[str]:
    """The public repos (models and Spaces) that hold these bytes."""
    return [f"{kind}:{repo_id}" for (kind, repo_id), repo in hub.repos.items()
            if not repo.private and data in hub.files(repo_id, kind).values()]


def test_private_leaves_no_public_copy_of_the_weights(trained_run, model_hub, tmp_path):
    hub, env = model_hub
    result = run_publish(env, trained_run, "--hub", "alice/secret", "--private", "--space", "alice/secret-demo")
    assert result.returncode == 0, result.stderr[-2000:]
    weights = hub.files("alice/secret")["model.safetensors"]
    assert hub.repos[("model", "alice/secret")].private and hub.repos[("space", "alice/secret-demo")].private
    assert public_copies(hub, weights) == []
    assert "holds the weights" in result.stdout and "(private;" in result.stdout


def test_an_organisation_private_by_default_stays_private(trained_run, model_hub, tmp_path):
    hub, env = model_hub
    hub.orgs["acme"] = Org({"alice"}, private_by_default=True)
    result = run_publish(env, trained_run, "--hub", "acme/model", "--space", "alice/acme-demo")
    assert result.returncode == 0, result.stderr[-2000:]
    assert hub.repos[("model", "acme/model")].private  # nothing asked: the organisation's default holds
    assert hub.repos[("space", "alice/acme-demo")].private  # the Space follows the model it holds
    assert public_copies(hub, hub.files("acme/model")["model.safetensors"]) == []
    assert "(private: its namespace's default;" in result.stdout


def test_private_on_a_public_repo_says_so_or_changes_it(trained_run, model_hub, tmp_path):
    hub, env = model_hub
    assert run_publish(env, trained_run, "--hub", "alice/open").returncode == 0
    assert not hub.repos[("model", "alice/open")].private  # a user's default: public
    commits = len(hub.commits("alice/open"))
    refused = run_publish(env, trained_run, tmp_path / "out", "--hub", "alice/open", "--private")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "alice/open exists and is public" in refused.stderr and "--make-private" in refused.stderr
    assert len(hub.commits("alice/open")) == commits and not (tmp_path / "out").exists()  # before anything was built
    changed = run_publish(env, trained_run, "--hub", "alice/open", "--make-private")
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert hub.repos[("model", "alice/open")].private and "(private: made private;" in changed.stdout


def test_the_card_as_the_hub_reads_it(trained_run, model_hub, tmp_path):
    """`ModelCard.load` from the Hub: eval results (top-1, top-5 of the published weights at their
    resolution), the dataset, the licence; a wrong licence is refused before anything is built."""
    hub, env = model_hub
    result = run_publish(env, trained_run, tmp_path / "out", "--hub", "alice/carded", "--data-name",
                         "ILSVRC/imagenet-1k", "--license", "mit")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    final = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()
             if '"val_top1"' in line][-1]
    key = "val_ema" if config["dali_imagenet"]["weights"] == "ema" else "val"
    card = card_on_the_hub(hub, "alice/carded")
    data = card.data
    assert data.license == "mit" and data.datasets == ["ILSVRC/imagenet-1k"] and data.library_name == "timm"
    results = {r.metric_type: r for r in data.eval_results}
    assert results["accuracy"].metric_value == round(final[f"{key}_top1"], 2)
    assert results["top_5_accuracy"].metric_value == round(final[f"{key}_top5"], 2)
    assert results["accuracy"].dataset_type == "ILSVRC/imagenet-1k" and "40 px" in results["accuracy"].metric_name
    assert "https://github.com/" in card.text and "pip install git+" in card.text
    for wrong, said in (("apache", "close: apache-2.0"), ("other", "license_name")):
        refused = run_publish(env, trained_run, tmp_path / "no", "--license", wrong)
        assert refused.returncode == 1 and said in refused.stderr and not (tmp_path / "no").exists()


def test_a_fine_tuned_run_names_its_base_model(trained_run, sample_shards, model_hub, tmp_path):
    from conftest import train

    hub, env = model_hub
    assert run_publish(env, trained_run, "--hub", "alice/base").returncode == 0
    train(sample_shards, tmp_path / "tuned", "epochs=1", "max_steps=2", "val_image_size=40",
          extra=["--init", "hf://alice/base"], env=env)
    assert run_publish(env, tmp_path / "tuned", "--hub", "alice/tuned").returncode == 0
    card = card_on_the_hub(hub, "alice/tuned")
    assert card.data.base_model == "alice/base" and "[`alice/base`]" in card.text


def test_nothing_of_the_machine_is_published(trained_run, s3_bucket, tmp_path):
    """From an s3:// run and from a local one: no path of this machine, no bucket, no host name,
    in any file (the card, config.json, the run's page)."""
    from conftest import upload_folder
    from test_publish import publish

    upload_folder(trained_run, s3_bucket, "runs/private-name")
    started = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[0])
    host = started["machine"]["machine"]
    for source, out in ((f"s3://{s3_bucket}/runs/private-name", tmp_path / "a"), (trained_run, tmp_path / "b")):
        result = publish(source, out)
        assert result.returncode == 0, result.stderr
        for path in out.iterdir():
            text = path.read_bytes().decode("latin-1")
            for private in (str(tmp_path.parents[2]), started["data"], s3_bucket, f"<td>{host}</td>",
                            f'"{host}"', str(REPO)):
                assert private not in text, (path.name, private)
        assert "(not published)" in (out / "report.html").read_text()


# -- the Space -------------------------------------------------------------------------------

def space_site(folder: Path) -> Path:
    """A site-packages holding only what a Space installs: the distributions of its requirements
    and of the Gradio it runs, with everything they require (as the installed metadata says; the
    CPU builds of torch bring no CUDA libraries), linked from this environment's."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wanted, todo = set(), [*SPACE_PINS, "gradio"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in wanted:
            continue
        wanted.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            if name in CPU_BUILDS and re.match(r"(nvidia|triton|cuda)", requirement.name):
                continue
            todo.append(requirement.name)
    folder.mkdir()
    for name in wanted:
        distribution = metadata.distribution(name)
        for top in {file.parts[0] for file in distribution.files or [] if not file.parts[0].startswith("..")}:
            if not (folder / top).exists() and Path(distribution.locate_file(top)).exists():
                (folder / top).symlink_to(distribution.locate_file(top))
    return folder


SPACE_CHECK = """
import app, dali_imagenet, sys
assert dali_imagenet.__file__.startswith(app.HERE.as_posix())
assert not any("site-packages" in p for p in sys.path), sys.path  # only the Space's own site
loaded = app.load_model(app.default_checkpoint())
predictor = app.Predictor(loaded)
examples = app.example_images(app.HERE / "build")
assert examples and all(e.startswith((app.HERE / "examples").as_posix()) for e in examples), examples
app.build_demo(predictor, app.describe(loaded, app.default_checkpoint()), examples)
from PIL import Image
pixels = app.image_tensor(Image.open({image!r}))
print(app.default_checkpoint(), predictor.top(predictor.probabilities([pixels]), 1)[0][0][0])
"""


def test_the_space_pins_what_the_tests_run_with():
    assert {name: metadata.version(name).split("+")[0] for name in SPACE_PINS} == SPACE_PINS
    assert metadata.version("gradio") == SPACE_GRADIO
    assert platform.python_version().rsplit(".", 1)[0] == SPACE_PYTHON


@pytest.mark.slow
def test_the_space_builds_the_same_and_runs_on_its_requirements(trained_run, sample_shards, model_hub, tmp_path):
    hub, env = model_hub
    first = run_publish(env, trained_run, "--space", "alice/demo")  # no model repo: the Space holds the weights
    assert first.returncode == 0, first.stderr[-2000:]
    assert "model/model.safetensors" in hub.files("alice/demo", "space")
    commits = len(hub.commits("alice/demo", "space"))
    second = run_publish(env, trained_run, "--hub", "alice/tiny", "--space", "alice/demo")
    assert second.returncode == 0, second.stderr[-2000:]
    space = hub.files("alice/demo", "space")
    commit = hub.commits("alice/tiny")[-1].oid
    assert len(hub.commits("alice/demo", "space")) == commits + 1  # stale files gone in the same commit
    assert not any(name.startswith("model/") for name in space)  # a public model: loaded from the Hub, no copy
    assert space["model.txt"].decode().strip() == f"hf://alice/tiny@{commit}"

    readme = space["README.md"].decode()
    assert f"sdk_version: {SPACE_GRADIO}\n" in readme and f'python_version: "{SPACE_PYTHON}"' in readme
    assert "models:\n- alice/tiny" in readme
    requirements = space["requirements.txt"].decode().splitlines()
    assert requirements[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"
    pins = dict(line.split("==") for line in requirements[1:])
    assert pins == {name: version + ("+cpu" if name in CPU_BUILDS else "") for name, version in SPACE_PINS.items()}
    assert len([name for name in space if name.startswith("examples/")]) == 4  # the sample's classes, drawn

    folder = tmp_path / "space"
    for name, data in space.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    images = tmp_path / "val"
    val_images(sample_shards, images)
    image = next(images.iterdir())
    site = space_site(tmp_path / "site")  # no site-packages (-S): only the Space's requirements are importable
    ran = subprocess.run([sys.executable, "-S", "-c", SPACE_CHECK.format(image=str(image))], cwd=folder,
                         capture_output=True, text=True, timeout=180,
                         env={**child_env(), **env, "PYTHONPATH": str(site), "HF_HOME": str(tmp_path / "space-hf")})
    assert not (site / "nvidia").exists() and not (site / "shard_tools").exists() and (site / "gradio").exists()
    assert ran.returncode == 0, ran.stderr[-3000:]
    source, top = ran.stdout.split()[-2:]
    assert source == f"hf://alice/tiny@{commit}"
    ours = predictions_of(trained_run / "best.pt", images)
    assert int(top) == next(p for p in ours if p["path"] == str(image))["top"][0]["index"]


# -- what a failed call says -------------------------------------------------------------------

def test_hub_errors_say_what_failed_whole(trained_run, model_hub, tmp_path):
    hub, env = model_hub
    cases = [
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, ["alice/x"],
         "cannot reach the Hub at http://127.0.0.1:9 (the network: "),
        ({"HF_TOKEN": "hf_unknown"}, ["alice/x"], "the Hub refused the token (401: "),
        ({}, ["bob/x"], "bob/x: the token may not do this (403: "),
    ]
    hub.private_storage_bytes["alice"] = 100_000  # the weights are 1.3 MB
    cases.append(({}, ["alice/big", "--private"], "alice/big: too large for what the Hub allows this account (403: "))
    for extra_env, args, said in cases:
        result = run_publish({**env, **extra_env}, trained_run, "--hub", *args)
        assert result.returncode == 1 and said in result.stderr, (args, result.stderr)
        assert "--private" not in args or "Private repository storage limit reached" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    offline = subprocess.run([sys.executable, str(REPO / "publish.py"), str(trained_run), "--hub", "alice/x"],
                             capture_output=True, text=True, timeout=120, env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "offline mode" in offline.stderr
    assert offline.stderr.strip().endswith("please unset the `HF_HUB_OFFLINE` environment variable.")  # whole
    missing = predictions_of_error(env, "hf://alice/nothing-here", tmp_path)
    assert "hf://alice/nothing-here: no such repo, or a private or gated one" in missing


def predictions_of_error(env, source: str, tmp_path: Path) -> str:
    from conftest import run_in_process, script

    image = tmp_path / "one.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    result = run_in_process(script("predict"), ["predict.py", str(image), "--checkpoint", source, "--device", "cpu"],
                            env)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr
