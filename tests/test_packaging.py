"""`pip wheel .` builds a wheel holding the library, the tokenizer's data and every console script.

The wheel is built offline from a copy of the checkout (setuptools writes build/ and *.egg-info next to
pyproject.toml), with the environment's own setuptools (--no-build-isolation), as `make setup` installs the
checkout.
"""

from __future__ import annotations

import configparser
import importlib
import inspect
import shutil
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONSOLE_SCRIPTS = {
    "kosmos-train": "kosmos.cli:train",
    "kosmos-generate": "kosmos.cli:generate",
    "kosmos-eval": "kosmos.eval:main",
    "kosmos-summary": "kosmos.cli:summary",
    "kosmos-plan": "kosmos.cli:plan",
    "kosmos-consolidate": "kosmos.cli:consolidate",
    "kosmos-tokenizer": "tokenizer.build:main",
    "kosmos-convert-captions": "data_tools.captions:main",
    "kosmos-convert-interleaved": "data_tools.interleaved:main",
    "kosmos-urls": "data_tools.urls:main",
    "kosmos-convert-text": "data_tools.text:main",
    "kosmos-verify": "data_tools.verify:main",
    "kosmos-inspect": "data_tools.inspect:main",
}
INSTALLED_PACKAGES = ("kosmos", "tokenizer", "data_tools")
NOT_INSTALLED = ("bench/", "scripts/", "tests/", "configs/", "assets/")


def _build_backend_missing() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    if find_spec("pip") is None:
        return "pip is not installed in this environment"
    try:
        setuptools_version = version("setuptools")
    except PackageNotFoundError:
        return "setuptools is not installed in this environment (needed for pip wheel --no-build-isolation)"
    major_minor = tuple(int(x) for x in setuptools_version.split(".")[:2] if x.isdigit())
    if major_minor < (70, 1) and find_spec("wheel") is None:  # older setuptools builds wheels with `wheel`
        return f"setuptools {setuptools_version} needs the `wheel` package, which is not installed"
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    reason = _build_backend_missing()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
        "demo_out", "runs", "outputs"))
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
           "--quiet", "-w", str(tmp / "dist")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"pip wheel failed:\n{res.stdout}\n{res.stderr}"
    (path,) = (tmp / "dist").glob("kosmos_pretrain-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def _entry_points(zf: zipfile.ZipFile) -> dict[str, str]:
    (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.optionxform = str  # keep the names' case
    parser.read_string(zf.read(name).decode())
    return dict(parser["console_scripts"])


@pytest.mark.slow
def test_wheel_holds_the_packages_and_the_tokenizer_data(wheel):
    names = set(wheel.namelist())
    expected = {"train_kosmos.py"}
    for package in INSTALLED_PACKAGES:  # every module of every (sub)package, e.g. kosmos/data/stream.py
        for init in (ROOT / package).rglob("__init__.py"):
            expected |= {p.relative_to(ROOT).as_posix() for p in init.parent.glob("*.py")}
    assert "kosmos/data/stream.py" in expected and "kosmos/cli.py" in expected
    assert expected - names == set(), "modules missing from the wheel"

    import tokenizer

    corpus = "tokenizer/" + tokenizer.TINY_CORPUS.relative_to(Path(tokenizer.__file__).parent).as_posix()
    assert corpus in names  # tokenizer.TINY_CORPUS resolves inside the installed package
    assert {f"tokenizer/data/{p.name}" for p in (ROOT / "tokenizer" / "data").glob("*.txt")} <= names

    stray = sorted(n for n in names if n.startswith(NOT_INSTALLED))
    assert not stray, "applications, tests or configs in the wheel"


@pytest.mark.slow
def test_wheel_declares_every_console_script(wheel):
    assert _entry_points(wheel) == CONSOLE_SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CONSOLE_SCRIPTS))
def test_console_script_resolves_to_a_main_returning_an_exit_status(wheel, script):
    target = _entry_points(wheel).get(script)
    assert target, f"{script} is not in the wheel's entry_points.txt"
    module_name, _, attr = target.partition(":")
    assert module_name.replace(".", "/") + ".py" in wheel.namelist() or \
        module_name.replace(".", "/") + "/__init__.py" in wheel.namelist()
    fn = getattr(importlib.import_module(module_name), attr)
    assert callable(fn)
    inspect.signature(fn).bind()  # the console script calls it with no arguments (it parses sys.argv)
    # sys.exit(main()): an int is the exit status and None is 0, but any other object (a dict of results,
    # a list of texts) is printed and exits 1. A main that returns data needs a shim in kosmos/cli.py.
    returns = typing.get_type_hints(fn).get("return", "unannotated")
    assert returns in (int, int | None, type(None)), (
        f"{target} returns {returns}: a console script needs an exit status; point {script} at a shim in "
        "kosmos/cli.py")


@pytest.mark.parametrize("shim, module", [("train", "kosmos.train"), ("generate", "kosmos.generate"),
                                          ("summary", "kosmos.summary")])
def test_cli_shims_run_the_main_on_sys_argv_and_exit_0(monkeypatch, shim, module):
    """The mains behind the shims return data (a dict, a list): the shim calls them and returns 0."""
    import kosmos.cli

    calls = []
    monkeypatch.setattr(importlib.import_module(module), "main",
                        lambda argv=None: calls.append(argv) or {"returned": "data"})
    assert getattr(kosmos.cli, shim)() == 0
    assert calls == [None]  # no argv: the module's parser reads sys.argv
