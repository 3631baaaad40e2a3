"""The layout's rules, read from the source: the library's layers import only downward, no import
cycle inside the library (imports inside functions count), the library never imports the tools
or the scripts, and every error class a user can meet derives from the one base."""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

from conftest import REPO

from dali_imagenet.errors import DaliImagenetError, Interrupted

LIBRARY = REPO / "dali_imagenet"
# Lowest first: a module may import its own layer's and lower layers' modules, never a higher one's.
LAYERS = ("shared", "data", "training", "run", "inference", "report", "sharing")
SHARED = {"errors", "s3", "retry", "seeding", "distributed", "cuda_check", "atomic"}  # the top level, beside config
# config.py describes a whole run, so it knows the layers' defaults (data's, training's): it sits
# above them; the layers take explicit arguments and never need it, but the recipe, which builds a
# run's training from a config, does. So: config may import data and training, never run or report.
CONFIG_MAY_IMPORT = ("shared", "data", "training")


def modules() -> dict[str, Path]:
    """Every library module ("dali_imagenet.data.shards") and its file."""
    found = {}
    for path in LIBRARY.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str) -> str:
    """"shared", "config", or the subpackage: data, training, run, report."""
    parts = module.split(".")
    if len(parts) > 2:
        return parts[1]
    return "config" if parts[-1] == "config" else "shared"


def imports(path: Path) -> set[str]:
    """Top-level package names and `dali_imagenet` modules one file imports, anywhere in it."""
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            found.add(name.split(".")[0])
            if name in known and name != "dali_imagenet":
                found.add(name)
    return found


def library_graph() -> dict[str, set[str]]:
    """Module -> the library modules it imports (a subpackage's __init__ is no edge: it imports nothing)."""
    graph = {}
    for module, path in modules().items():
        graph[module] = {m for m in imports(path) if m.startswith("dali_imagenet.") and m != module
                         and m.rsplit(".", 1)[-1] not in LAYERS}
    return graph


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up the layers: "dali_imagenet.data.x -> dali_imagenet.run.y"."""
    found = []
    for module, imported in sorted(graph.items()):
        if module == "dali_imagenet":  # the package's face: `from dali_imagenet import make_loader`, lazily
            continue
        here = layer_of(module)
        allowed = CONFIG_MAY_IMPORT if here == "config" else LAYERS[:LAYERS.index(here) + 1]
        for other in sorted(imported):
            there = layer_of(other)
            upward = (here in ("shared", "data")) if there == "config" else there not in allowed
            if upward:
                found.append(f"{module} -> {other}")
    return found


def test_the_layers_import_only_downward():
    assert wrong_way(library_graph()) == []


def test_the_layer_check_sees_an_import_going_up():
    assert wrong_way({"dali_imagenet.data.shards": {"dali_imagenet.run.outputs", "dali_imagenet.errors"},
                      "dali_imagenet.training.step": {"dali_imagenet.config", "dali_imagenet.data.loader"},
                      "dali_imagenet.data.loader": {"dali_imagenet.config"},
                      "dali_imagenet.config": {"dali_imagenet.data.partition", "dali_imagenet.run.spot"},
                      "dali_imagenet.run.outputs": {"dali_imagenet.report.html_report"}}) == [
        "dali_imagenet.config -> dali_imagenet.run.spot", "dali_imagenet.data.loader -> dali_imagenet.config",
        "dali_imagenet.data.shards -> dali_imagenet.run.outputs",
        "dali_imagenet.run.outputs -> dali_imagenet.report.html_report"]


def test_each_layer_says_what_it_holds():
    """The direction of imports is the rule (above); how many modules a layer holds is not: a count
    would push a module into the wrong folder."""
    top = [p for p in LIBRARY.glob("*.py") if p.stem != "__init__"]
    assert {p.stem for p in top} == SHARED | {"config"}
    for layer in LAYERS[1:]:
        folder = LIBRARY / layer
        docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert docstring and "Imports" in docstring, f"{layer}/__init__.py must say what it holds and may import"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = set(), set()

    def visit(node, path):
        visiting.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep in visiting:
                return path + [dep]
            if dep not in done:
                cycle = visit(dep, path + [dep])
                if cycle:
                    return cycle
        visiting.discard(node)
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_the_library():
    assert find_cycle(library_graph()) is None, " -> ".join(find_cycle(library_graph()))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_imports_no_tool_or_script():
    scripts = {p.stem for p in REPO.glob("*.py")} | {"shard_tools", "benchmarks"}
    for path in LIBRARY.rglob("*.py"):
        assert not imports(path) & scripts, f"{path.name} imports {imports(path) & scripts}"


def test_every_error_class_derives_from_the_one_base():
    names = sorted(modules()) + [f"shard_tools.{p.stem}" for p in (REPO / "shard_tools").glob("*.py")
                                 if p.stem != "__init__"]
    errors = []
    for name in names:
        module = importlib.import_module(name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, Exception) and value.__module__ == name:
                if value is Interrupted:  # a stop request acted on, not an error: the run leaves cleanly
                    continue
                errors.append(value)
                assert issubclass(value, DaliImagenetError), f"{name}.{value.__name__} is not a DaliImagenetError"
    assert len(errors) >= 12  # the family: shards, config, checkpoints, runs, S3, devices, the converter, ...


def test_no_assert_validates_data_in_the_library():
    for path in [*LIBRARY.rglob("*.py"), *(REPO / "shard_tools").glob("*.py")]:
        asserts = [n.lineno for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Assert)]
        assert not asserts, f"{path.name}: assert at line(s) {asserts} (python -O removes it; raise an error instead)"


def test_the_wheel_holds_the_product_and_nothing_else(tmp_path):
    """dali_imagenet and shard_tools (with the class list they ship); not the benchmarks, the
    stand-ins, the tests or the scripts."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {
        "dali_imagenet", "shard_tools"}
    assert "dali_imagenet/data/imagenet1k_classes.tsv" in names and "dali_imagenet/sharing/hub.py" in names


def test_make_lint_refuses_an_api_newer_than_the_python_floor(tmp_path):
    """`make lint` (CI runs it) checks the code against setup.cfg's python_requires floor with
    vermin: the tests run on one newer Python and cannot see a 3.11-only call such as datetime.UTC,
    which spot.py once made at every reclaim on the cloud image's 3.10. The product passes it; a
    file with that call fails it, naming the call; the 3.10 spelling passes."""
    import subprocess

    def lint(*args) -> subprocess.CompletedProcess:  # -o install: the venv as it is (no reinstall)
        return subprocess.run(["make", "-s", "-o", "install", "lint", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    assert "python_requires = >=3.10," in (REPO / "setup.cfg").read_text()
    product = lint()
    assert product.returncode == 0, product.stdout + product.stderr
    newer, older = tmp_path / "newer.py", tmp_path / "older.py"
    newer.write_text("import datetime\n\nstamp = datetime.datetime.now(datetime.UTC)\n")
    older.write_text("import datetime\n\nstamp = datetime.datetime.now(datetime.timezone.utc)\n")
    refused = lint(f"FLOOR_CHECKED={newer}")
    assert refused.returncode != 0 and "'datetime.UTC' member requires !2, 3.11" in refused.stdout, refused.stdout
    assert lint(f"FLOOR_CHECKED={older}").returncode == 0
