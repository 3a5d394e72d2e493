"""The library stays apart from the applications built on it, and its layers only point down.

kosmos/ (the library, with its tools kosmos.data_tools and kosmos.tokenizer.build) is imported by
train_kosmos.py, scripts/ and bench/, never the other way round, and never through the deprecated top-level
names `tokenizer` and `data_tools` (shims that point into kosmos for one release). bench/ and scripts/ are
not even installed, so an import of them from an installed package would break after `pip install`. Every
import is checked, those inside functions too (the demo used to hide its data_tools imports in a function
body).

Inside kosmos/, each module belongs to a layer (`LAYERS`, lowest first) and imports only from its own layer
or lower ones: config <- model (and data) <- weights <- checkpoint <- evaluation and generation <- training
<- the entry points and tools. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

APPS = {"scripts", "bench", "tests", "train_kosmos"}
DEPRECATED = {"tokenizer", "data_tools"}  # the old top-level names, now shims into kosmos
FORBIDDEN = {
    "kosmos": APPS | DEPRECATED,
    "tokenizer": APPS,  # the shims point into the library only
    "data_tools": APPS,
}
ALLOWED: dict[str, set[str]] = {}  # the library imports no script (kosmos.cli runs kosmos.train)

LAYERS = [  # lowest first; a module name or a package prefix (kosmos.data: every module under it)
    ("base", ["kosmos", "kosmos.errors", "kosmos.untrusted", "kosmos.procs", "kosmos.distributed",
              "kosmos.watchdog", "kosmos.docstrings", "kosmos.deprecated", "kosmos.progress",
              "kosmos.tokenizer"]),  # import nothing of kosmos but each other
    ("config", ["kosmos.config"]),
    ("model", ["kosmos.image", "kosmos.sequence", "kosmos.decoder", "kosmos.vision", "kosmos.model",
               "kosmos.sharding", "kosmos.optim", "kosmos.data"]),  # the network and its inputs; no file
    ("weights", ["kosmos.weights"]),  # finding, checking and loading weights; the one inference loader
    ("checkpoint", ["kosmos.checkpoint"]),  # training save / load / resume, sharded too; consolidate
    ("inference", ["kosmos.generate", "kosmos.eval"]),
    ("training", ["kosmos.training", "kosmos.train_eval", "kosmos.metrics"]),
    ("entry points", ["kosmos.train", "kosmos.cli", "kosmos.summary", "kosmos.plan", "kosmos.eval.__main__",
                      "kosmos.serve", "kosmos.tokenizer.build", "kosmos.data_tools",
                      "kosmos.hf"]),  # and the tools; kosmos/hf/remote/ imports no kosmos (tests/test_hf.py)
]


def _called_name(call: ast.Call) -> str | None:
    return getattr(call.func, "attr", getattr(call.func, "id", None))


def imported_top_level_names(path: Path) -> set[str]:
    """First component of every absolute module name imported anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and _called_name(node) in ("import_module", "__import__"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.add(arg.value.split(".")[0])  # importlib.import_module("x.y") counts too
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_library_does_not_import_applications(package):
    assert modules(package), f"no modules found under {package}/"
    bad = []
    for path in modules(package):
        rel = path.relative_to(ROOT).as_posix()
        wrong = imported_top_level_names(path) & (FORBIDDEN[package] - ALLOWED.get(rel, set()))
        bad += [f"{rel} imports {name}" for name in sorted(wrong)]
    assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}:\n  " + "\n  ".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from data_tools.shapes import draw\n    import bench._perf\n"
                 "    importlib.import_module('scripts.demo')\n    from . import sibling\n")
    assert imported_top_level_names(f) == {"os", "data_tools", "bench", "scripts"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The index of `module`'s layer: the longest matching name or package prefix wins (`kosmos` itself,
    the package's __init__, is no prefix)."""
    best, found = -1, None
    for i, (_, names) in enumerate(layers):
        for name in names:
            if (module == name or (name != "kosmos" and module.startswith(name + "."))) and len(name) > best:
                best, found = len(name), i
    return found


def imported_kosmos_modules(path: Path) -> set[str]:
    """Every `kosmos...` module the file imports, anywhere in it (`from kosmos.x import y` counts as
    kosmos.x.y when that is a module, else kosmos.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "kosmos")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "kosmos":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (ROOT / Path(*sub.split(".")) / "__init__.py").is_file()
                names.add(sub if is_module else node.module)
    return names


def upward_imports(files: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """`importer imports imported` lines for every import that points up a layer (or into no layer)."""
    bad = []
    for importer, imported in sorted(files.items()):
        mine = layer_of(importer, layers)
        if mine is None:
            bad.append(f"{importer} is in no layer: add it to tests/test_layout.py LAYERS")
            continue
        for name in sorted(imported):
            theirs = layer_of(name, layers)
            if theirs is None or theirs > mine:
                where = layers[theirs][0] if theirs is not None else "no layer"
                bad.append(f"{importer} ({layers[mine][0]}) imports {name} ({where})")
    return bad


def test_the_library_layers_only_point_down():
    files = {module_name(p): imported_kosmos_modules(p) for p in modules("kosmos")}
    assert "kosmos.weights" in files and "kosmos.checkpoint" in files
    bad = upward_imports(files)
    assert not bad, "imports that point up a layer (tests/test_layout.py LAYERS):\n  " + "\n  ".join(bad)


def test_the_layer_check_fails_on_an_upward_import(tmp_path):
    """The check can fail: a model-layer module that imports the checkpoint layer (as kosmos.model once
    imported kosmos.checkpoint) is named, and so is a module in no layer."""
    f = tmp_path / "m.py"
    f.write_text("def load():\n    from kosmos.checkpoint import find_checkpoint\n")
    imported = imported_kosmos_modules(f)
    assert imported == {"kosmos.checkpoint"}
    bad = upward_imports({"kosmos.model": imported, "kosmos.weights": {"kosmos.model"}})
    assert bad == ["kosmos.model (model) imports kosmos.checkpoint (checkpoint)"]
    assert upward_imports({"kosmos.nowhere": set()}) == [
        "kosmos.nowhere is in no layer: add it to tests/test_layout.py LAYERS"]
    assert layer_of("kosmos.data.stream") == layer_of("kosmos.model") < layer_of("kosmos.weights")
