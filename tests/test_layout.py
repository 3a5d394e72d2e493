"""The library stays apart from the applications built on it.

kosmos/ (the library) and tokenizer/ are imported by data_tools/, train_kosmos.py, scripts/ and bench/,
never the other way round (tokenizer/ may use kosmos/). bench/ and scripts/ are not even installed, so
an import of them from an installed package would break after `pip install`. Every import is checked,
those inside functions too (the demo used to hide its data_tools imports in a function body).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

APPS = {"data_tools", "scripts", "bench", "tests", "train_kosmos"}
FORBIDDEN = {
    "kosmos": APPS,
    "tokenizer": APPS,  # it may use the library (kosmos), not the tools
    "data_tools": {"scripts", "bench", "tests", "train_kosmos"},
}
# The console-script shims (see pyproject.toml) are the one library module allowed to call the training
# entry point: they exist only to turn its return value into an exit status.
ALLOWED = {"kosmos/cli.py": {"train_kosmos"}}


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
