"""kosmos.data.streams (logical streams and their positions) and kosmos.data.retry (the rules that stop a
source) are pure Python: importing them pulls in no torch, so that the positions a checkpoint holds can be
read, split and remapped without the model's stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "torchvision", "open_clip", "accelerate", "timm", "transformers"}


def _module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    for f in (path.with_suffix(".py"), path / "__init__.py"):
        if f.is_file():
            return f
    return None


def import_time_imports(path: Path) -> set[str]:
    """The modules a file imports when it is itself imported: every import outside function bodies and
    `if TYPE_CHECKING:` blocks (`from kosmos.data import retry` counts as kosmos.data.retry when that is a
    module)."""
    out: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names
                           if _module_file(f"{node.module}.{a.name}") is not None)
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return out


def imported_at_import(module: str) -> set[str]:
    """Every module importing `module` imports, following the project's own modules (and their packages'
    __init__) transitively; others by name only."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a module's packages are imported first
            sub = ".".join(parts[:i])
            if sub in seen:
                continue
            seen.add(sub)
            f = _module_file(sub) if parts[0] == "kosmos" else None
            if f is not None:
                todo += sorted(import_time_imports(f))
    return seen


@pytest.mark.parametrize("module", ["kosmos.data.streams", "kosmos.data.retry"])
def test_the_logical_streams_import_no_torch(module):
    heavy = sorted(m for m in imported_at_import(module) if m.split(".")[0] in HEAVY)
    assert not heavy, f"{module} pulls in {heavy} when imported (import them inside a function, or under " \
                      "TYPE_CHECKING for annotations)"


def test_the_import_check_sees_what_a_module_imports(tmp_path):
    assert "torch" in imported_at_import("kosmos.data.stream")  # SourceDataset is a torch IterableDataset
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\nelse:\n"
                 "    import json\n\ndef f():\n    import numpy\n\nclass C:\n    import re\n")
    assert import_time_imports(f) == {"os", "typing", "json", "re"}


@pytest.mark.slow
def test_the_logical_streams_import_no_torch_in_a_fresh_process():
    code = ("import sys; import kosmos.data.streams, kosmos.data.retry; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
