"""The layout's rules, read from the source: no import cycle inside the library (imports inside
functions count), the library never imports the tools or the scripts, and every error class a
user can meet derives from the one base."""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

from conftest import REPO
from dali_imagenet.errors import DaliImagenetError, Interrupted

LIBRARY = REPO / "dali_imagenet"


def imports(path: Path) -> set[str]:
    """Top-level package names and `dali_imagenet` modules one file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.add(parts[0])
            if parts[0] == "dali_imagenet" and len(parts) > 1 and (LIBRARY / f"{parts[1]}.py").is_file():
                found.add(f"dali_imagenet.{parts[1]}")
    return found


def library_graph() -> dict[str, set[str]]:
    graph = {}
    for path in LIBRARY.glob("*.py"):
        module = f"dali_imagenet.{path.stem}"
        graph[module] = {m for m in imports(path) if m.startswith("dali_imagenet.") and m != module}
    return graph


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
    for path in LIBRARY.glob("*.py"):
        assert not imports(path) & scripts, f"{path.name} imports {imports(path) & scripts}"


def test_every_error_class_derives_from_the_one_base():
    modules = [f"dali_imagenet.{p.stem}" for p in LIBRARY.glob("*.py")
               if p.stem not in ("pipelines", "dali_loader")]  # these two import DALI (CPU-only here; fine too)
    modules += [f"shard_tools.{p.stem}" for p in (REPO / "shard_tools").glob("*.py") if p.stem != "__init__"]
    modules += ["dali_imagenet.pipelines", "dali_imagenet.dali_loader"]
    errors = []
    for name in modules:
        module = importlib.import_module(name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, Exception) and value.__module__ == name:
                if value is Interrupted:  # a stop request acted on, not an error: the run leaves cleanly
                    continue
                errors.append(value)
                assert issubclass(value, DaliImagenetError), f"{name}.{value.__name__} is not a DaliImagenetError"
    assert len(errors) >= 12  # the family: shards, config, checkpoints, runs, S3, devices, the converter, ...


def test_no_assert_validates_data_in_the_library():
    for path in [*LIBRARY.glob("*.py"), *(REPO / "shard_tools").glob("*.py")]:
        asserts = [n.lineno for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Assert)]
        assert not asserts, f"{path.name}: assert at line(s) {asserts} (python -O removes it; raise an error instead)"
