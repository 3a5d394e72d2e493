"""The old top-level names `tokenizer` and `data_tools` (moved under `kosmos.`) keep working for one release:
an import gives the new module itself, with a DeprecationWarning, and `python -m OLD` prints one note and
runs the new command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_every_moved_module_has_a_shim_at_its_old_name():
    for old, new in (("tokenizer", "kosmos/tokenizer"), ("data_tools", "kosmos/data_tools")):
        moved = {p.name for p in (ROOT / new).glob("*.py")}
        shims = {p.name for p in (ROOT / old).glob("*.py")}
        assert moved == shims, f"{old}/ lacks shims for {sorted(moved - shims)}"
        for shim in (ROOT / old).glob("*.py"):
            text = shim.read_text(encoding="utf-8")
            target = "kosmos." + old + ("" if shim.stem == "__init__" else "." + shim.stem)
            assert f'moved(__spec__.name, "{target}"' in text, f"{shim} does not point at {target}"


def test_an_old_import_gives_the_new_module_with_a_warning():
    code = ("import warnings\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import tokenizer.build, data_tools.records\n"
            "    from tokenizer import KosmosTokenizer, TINY_CORPUS\n"
            "import kosmos.tokenizer, kosmos.tokenizer.build, kosmos.data_tools.records\n"
            "assert tokenizer.build is kosmos.tokenizer.build\n"
            "assert data_tools.records is kosmos.data_tools.records\n"
            "assert KosmosTokenizer is kosmos.tokenizer.KosmosTokenizer and TINY_CORPUS.is_file()\n"
            "from tokenizer.build import BuildError\n"
            "assert BuildError is kosmos.tokenizer.build.BuildError\n"
            "print(sorted({str(x.message) for x in w if x.category is DeprecationWarning}))\n")
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr
    for old in ("tokenizer", "tokenizer.build", "data_tools", "data_tools.records"):
        assert f"the module `{old}` moved to `kosmos.{old}`" in r.stdout


def test_python_m_of_an_old_name_runs_the_new_command_after_one_note():
    r = _python("-m", "data_tools.verify", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["note: `python -m data_tools.verify` is deprecated and goes in the next "
                                     "release; use `python -m kosmos.data_tools.verify`"]
    assert r.stdout.startswith("usage: python -m kosmos.data_tools.verify")
    r = _python("-m", "tokenizer.build", "--input", str(ROOT / "no-such-corpus"), "--vocab-size", "100",
                "--output", str(ROOT / "no-such-output"))
    assert r.returncode == 2 and r.stderr.splitlines()[0].startswith("note: `python -m tokenizer.build`")
    assert "error" in r.stderr.splitlines()[-1] and not (ROOT / "no-such-output").exists()
