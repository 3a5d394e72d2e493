"""`pip wheel .` builds a wheel holding the library, the tokenizer's data and every console script.

The wheel is built offline from a copy of the checkout (setuptools writes build/ and *.egg-info next to
pyproject.toml), with the environment's own setuptools (--no-build-isolation), as `make setup` installs the
checkout.
"""

from __future__ import annotations

import configparser
import importlib
import inspect
import os
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
    "kosmos-serve": "kosmos.cli:serve",
    "kosmos-tokenizer": "kosmos.tokenizer.build:main",
    "kosmos-export-hf": "kosmos.hf.export:main",
    "kosmos-import-hf": "kosmos.hf.import_hf:main",
    "kosmos-convert-captions": "kosmos.data_tools.captions:main",
    "kosmos-convert-interleaved": "kosmos.data_tools.interleaved:main",
    "kosmos-urls": "kosmos.data_tools.urls:main",
    "kosmos-convert-text": "kosmos.data_tools.text:main",
    "kosmos-verify": "kosmos.data_tools.verify:main",
    "kosmos-inspect": "kosmos.data_tools.inspect:main",
}
INSTALLED_PACKAGES = ("kosmos", "tokenizer", "data_tools")  # the last two: deprecated shims, one release
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
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(  # kosmos/configs: a link
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
        "demo_out", "runs", "outputs"))
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
           "--quiet", "-w", str(tmp / "dist")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"pip wheel failed:\n{res.stdout}\n{res.stderr}"
    (path,) = (tmp / "dist").glob("kosmos_pretrain-*.whl")
    with zipfile.ZipFile(path) as zf:
        zf.path = path
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

    from kosmos import tokenizer

    corpus = tokenizer.TINY_CORPUS.relative_to(Path(tokenizer.__file__).parents[2]).as_posix()
    assert corpus in names  # kosmos.tokenizer.TINY_CORPUS resolves inside the installed package
    data = ROOT / "kosmos" / "tokenizer" / "data"
    assert {f"kosmos/tokenizer/data/{p.name}" for p in data.glob("*.txt")} <= names
    assert "kosmos/serve.html" in names  # kosmos-serve's page (importlib.resources reads it from the package)
    from kosmos.hf import REMOTE_FILES  # the modelling code kosmos-export-hf copies (a folder, not a package)

    assert {f"kosmos/hf/remote/{f}" for f in REMOTE_FILES} <= names

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
                                          ("summary", "kosmos.summary"), ("serve", "kosmos.serve")])
def test_cli_shims_run_the_main_on_sys_argv_and_exit_0(monkeypatch, shim, module):
    """The mains behind the shims return data (a dict, a list): the shim calls them and returns 0."""
    import kosmos.cli

    calls = []
    monkeypatch.setattr(importlib.import_module(module), "main",
                        lambda argv=None: calls.append(argv) or {"returned": "data"})
    assert getattr(kosmos.cli, shim)() == 0
    assert calls == [None]  # no argv: the module's parser reads sys.argv


def _requirements() -> dict[str, str]:
    """requirements.txt's pins: name (normalised) -> version."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements.txt: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_the_package_declares_compatible_ranges_that_hold_the_tested_pins():
    """pyproject.toml's dependencies are ranges (installable into an existing environment), one per
    requirements.txt pin (the versions `make setup` installs and CI tests), each holding its pin."""
    import tomllib

    pytest.importorskip("packaging")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {canonicalize_name(r.name): r.specifier for r in map(Requirement, declared)}
    pins = _requirements()
    assert set(ranges) == set(pins), "pyproject.toml's dependencies and requirements.txt name other packages"
    for name, spec in ranges.items():
        assert spec and not any(s.operator in ("==", "===") for s in spec), f"{name}: {spec} is a pin"
        assert spec.contains(pins[name]), f"{name}: the tested {pins[name]} is not in {spec}"


@pytest.mark.slow
def test_wheel_ships_the_configs_and_declares_ranges_not_pins(wheel):
    names = set(wheel.namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert {"configs/tiny.yaml", "configs/kosmos1.yaml", "configs/templates/my_data.yaml"} <= shipped
    assert {f"kosmos/{p}" for p in shipped} <= names, "configs missing from the wheel"
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [x.split(":", 1)[1].strip() for x in wheel.read(meta).decode().splitlines()
                if x.startswith("Requires-Dist:") and "extra ==" not in x]
    assert len(requires) == len(_requirements()) and not [r for r in requires if "==" in r], requires


@pytest.mark.slow
def test_the_installed_package_takes_a_preset_by_name_from_any_directory(wheel, tmp_path):
    """From the wheel (unpacked, as pip installs it), in a folder with no configs/: `kosmos-summary tiny`
    runs on the shipped preset; an unknown name is one error line listing the presets."""
    site = tmp_path / "site"
    wheel.extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)

    def summary(*args):
        return subprocess.run([sys.executable, "-c", "import sys; from kosmos.cli import summary; "
                               "sys.argv[0] = 'kosmos-summary'; sys.exit(summary())", *args],
                              cwd=work, env=env, capture_output=True, text=True, timeout=300)

    res = summary("tiny")
    assert res.returncode == 0, res.stderr
    assert "tiny" in res.stdout and "total" in res.stdout
    res = summary("tinyy")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
        "error: config 'tinyy': no such file, and no preset of that name; presets: kosmos1, tiny "
        "(or give a path to a YAML file)"), res.stderr
