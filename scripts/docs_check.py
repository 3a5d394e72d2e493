"""`make docs-check`: the commands in README.md and docs/*.md work as written.

Every ```bash block carries a marker on the line before it, an HTML comment that does not show on GitHub:

    <!-- docs-check: run NAME -->             run here, command by command, in a scratch folder that the
                                              fixture NAME prepares (FIXTURES below); each must exit 0
    <!-- docs-check: not run: REASON -->      needs a GPU, a data set, a download, a cluster, or minutes

Every command of every block is checked whether it runs or not: its module or script exists and its argument
parser accepts its arguments as written (flags, choices, types; the parser runs in this process and the
program stops right after it), `accelerate launch`'s own options are accepted by accelerate's parser, a
training command's `key=value` overrides load with its config, a `make` target exists. A command written
inline in the text (`python ...`, `accelerate launch ...`, `kosmos-...`, `make ...`) may leave arguments out:
its program must exist and know its flags. Every `--flag` written anywhere in the pages is an option of one
of the project's commands or of accelerate's launcher (or one of the other tools' flags in EXTERNAL_FLAGS);
every link to a file or heading leads somewhere; every ```python block parses and imports names that exist.
tests/test_docs.py runs these checks (about 10 s); this script runs them, then the runnable blocks (about a
minute of CPU time; 3 minutes on the 2 busy cores where it was written).

    python scripts/docs_check.py [--no-run] [FILE.md ...]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import itertools
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python scripts/docs_check.py`: import kosmos and train_kosmos

PAGES = ("README.md", "docs/*.md")

# The commands whose parsers give the flags the pages may mention (beside the ones their commands use).
ENTRY_POINTS = (
    ["train_kosmos.py"], ["-m", "kosmos.generate"], ["-m", "kosmos.summary"], ["-m", "kosmos.plan"],
    ["-m", "kosmos.eval", "run"],
    ["-m", "kosmos.eval", "score"], ["-m", "kosmos.eval", "score", "captioning"],
    ["-m", "kosmos.eval", "score", "vqa"], ["-m", "kosmos.eval", "loss"],
    ["-m", "kosmos.checkpoint", "consolidate"], ["-m", "kosmos.tokenizer.build"], ["-m", "kosmos.serve"],
    ["-m", "kosmos.hf.export"], ["-m", "kosmos.hf.import_hf"],
    *[["-m", f"kosmos.data_tools.{m}"]
      for m in ("captions", "interleaved", "text", "urls", "verify", "inspect", "shapes")],
    ["scripts/demo.py"], ["scripts/gen_config_docs.py"], ["scripts/docs_check.py"], ["-m", "tests.soak"],
    *[[p.relative_to(ROOT).as_posix()] for p in sorted((ROOT / "bench").glob("[!_]*.py"))],
)

# Flags of other tools that the pages quote: img2dataset's options, pip's, tar's.
EXTERNAL_FLAGS = {
    "--url_list", "--input_format", "--url_col", "--save_additional_columns", "--output_format",
    "--resize_mode", "--image_size", "--resize_only_if_bigger", "--output_folder",  # img2dataset
    "--no-deps", "--no-build-isolation", "--no-index",  # pip
    "--sparse",  # tar
    "--use_fsdp", "--cpu",  # accelerate launch options the pages warn about (also in its parser)
}

MARKER = re.compile(r"<!--\s*docs-check:\s*(run\s+(?P<fixture>[\w-]+)|not run:\s*(?P<reason>.+?))\s*-->")
FLAG = re.compile(r"(?<![\w/.-])--[a-zA-Z][\w-]*")
INLINE = re.compile(r"`((?:python3? |accelerate launch |kosmos-[a-z-]+ |make )[^`]*)`")


@dataclass
class Command:
    page: str
    line: int
    text: str  # as written, continuation lines joined
    argv: list[str]


@dataclass
class Block:
    page: str
    line: int
    fixture: str | None  # run with this fixture; None: not run
    reason: str | None
    commands: list[Command]


def pages(names: list[str] | None = None) -> list[Path]:
    if names:
        return [Path(n).resolve() for n in names]
    return sorted({p for pattern in PAGES for p in ROOT.glob(pattern)})


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _split(page: str, line: int, text: str) -> Iterator[Command]:
    """The commands of a block's text: continuation lines joined, comments dropped."""
    logical: list[tuple[int, str]] = []
    pending = ""
    for i, raw in enumerate(text.split("\n")):
        start = line + i - pending.count("\n")
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " \n"
            continue
        logical.append((start, pending + raw))
        pending = ""
    for n, joined in logical:
        argv = shlex.split(joined.replace("\n", ""), comments=True)
        if argv:
            yield Command(page, n, " ".join(joined.split()), argv)


def blocks(path: Path) -> list[Block]:
    """The ```bash blocks of a page, with their markers."""
    lines = path.read_text(encoding="utf-8").split("\n")
    out = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = MARKER.search(prev)
            cmds = list(_split(_rel(path), i + 2, "\n".join(lines[i + 1:j])))
            out.append(Block(_rel(path), i + 1, m and m.group("fixture"), m and m.group("reason"), cmds)
                       if m else Block(_rel(path), i + 1, None, None, cmds))
            i = j
        i += 1
    return out


def inline_commands(path: Path) -> list[Command]:
    """Commands written as `code` in the text, outside the fenced blocks."""
    out, fence = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.startswith("```"):
            fence = not fence
            continue
        if not fence:
            for m in INLINE.finditer(line):
                with contextlib.suppress(ValueError):
                    out.append(Command(_rel(path), n, m.group(1), shlex.split(m.group(1))))
    return out


# --- checking a command's arguments against its parser, in this process -------------------------------


class _Parsed(Exception):
    """Raised after the command's parser ran: nothing of the program beyond it runs."""

    def __init__(self, parser: argparse.ArgumentParser, namespace, error: str | None):
        self.parser, self.namespace, self.error = parser, namespace, error


@contextlib.contextmanager
def _stop_after_parsing() -> Iterator[None]:
    """The first parse of the command line (parse_args, or parse_known_args called directly) raises _Parsed
    with the parser, its result and its error; nested parses (subcommands) run as usual."""
    real_parse, real_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    depth = [0]

    def run(real, parser, args, namespace):
        if depth[0]:
            return real(parser, args, namespace)
        depth[0] += 1
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                ns = real(parser, args, namespace)
        except SystemExit as e:
            msg = err.getvalue().strip().splitlines()
            error = None if e.code in (0, None) else (msg[-1] if msg else f"exit {e.code}")
            raise _Parsed(parser, None, error) from None
        finally:
            depth[0] -= 1
        raise _Parsed(parser, ns, None)

    argparse.ArgumentParser.parse_args = lambda self, args=None, namespace=None: run(
        real_parse, self, args, namespace)
    argparse.ArgumentParser.parse_known_args = lambda self, args=None, namespace=None: run(
        real_known, self, args, namespace)
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = real_parse, real_known


def _console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: name -> "module:function" (read without tomllib: Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+:\w+)"', section, re.M))


SHIMS = {"train_kosmos.py": "kosmos.train"}
"""Scripts that only hand over to a module's main: checked as `python -m` that module."""


def parse(target: list[str], args: list[str]) -> _Parsed:
    """Runs a command (`["-m", "mod"]`, `["script.py"]` or `["kosmos-x"]`) up to its argument parsing."""
    if target[0] in SHIMS:
        target = ["-m", SHIMS[target[0]]]
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target[-1], *args]
    try:
        with _stop_after_parsing():
            if target[0] == "-m":
                with warnings.catch_warnings():  # "found in sys.modules": imported by an earlier check
                    warnings.simplefilter("ignore", RuntimeWarning)
                    runpy.run_module(target[1], run_name="__main__", alter_sys=True)
            elif target[0].endswith(".py"):
                script = ROOT / target[0]
                if not script.is_file():
                    raise FileNotFoundError(f"no script {target[0]}")
                if "ArgumentParser" not in script.read_text(encoding="utf-8"):  # it would run in full
                    if args:
                        raise _Parsed(argparse.ArgumentParser(), None, "takes no arguments")
                    return _Parsed(argparse.ArgumentParser(add_help=False), argparse.Namespace(), None)
                sys.path.insert(0, str(script.parent))
                runpy.run_path(str(script), run_name="__main__")
            else:
                module, func = _console_scripts()[target[0]].split(":")
                getattr(__import__(module, fromlist=[func]), func)()
    except _Parsed as p:
        return p
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise RuntimeError(f"{' '.join(target)} returned without parsing its arguments")


def _accelerate_launcher(args: list[str]) -> tuple[list[str], list[str], str | None]:
    """`accelerate launch [options] (script.py | -m module) args` -> the target, its args and an error of
    accelerate's own parser."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            ns = parser.parse_args(args)
    except SystemExit:
        return [], [], "accelerate launch: " + (err.getvalue().strip().splitlines() or ["bad options"])[-1]
    script, rest = ns.training_script, list(ns.training_script_args)
    return (["-m", script] if ns.module else [script]), rest, None


def _target(prog: str, args: list[str]) -> tuple[list[str] | None, list[str], str | None]:
    """A command line -> (the program to parse for: `["-m", mod]`, `["script.py"]`, `["kosmos-x"]`, or None
    for another tool), its arguments, and an error found on the way (accelerate's own options)."""
    if prog in ("python", "python3"):
        if not args:
            return None, [], "python without a module or script"
        return (args[:2], args[2:], None) if args[0] == "-m" else (args[:1], args[1:], None)
    if prog == "accelerate":
        if args[:1] != ["launch"]:
            return None, [], f"accelerate {args[:1]}: only `accelerate launch` is checked"
        return _accelerate_launcher(args[1:])
    if prog in _console_scripts():
        return [prog], args, None
    return None, args, None  # another tool (img2dataset, pip, aws): its block says why it is not run


def check_command(cmd: Command, complete: bool = True) -> str | None:
    """None if the command's program exists and accepts its arguments, else what is wrong. A `complete`
    command (a block's) is parsed as written; an inline one may leave out required arguments and values
    (`python -m kosmos.tokenizer.build`, `--resume latest`): its program must exist and know its flags."""
    argv = [a for a in cmd.argv if a != "..."]
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if not argv:
        return None
    prog, args = argv[0], argv[1:]
    if prog == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        missing = [t for t in args if t not in targets]
        return f"no make target {missing}" if missing else None
    if prog == "accelerate" and not complete:  # the launcher's flags are checked with every page's flags
        if not any(a.endswith(".py") or a in ("-m", "--module") for a in args):
            return None
    target, args, err = _target(prog, args)
    if err or target is None:
        return err
    if not complete:  # the parser of the subcommand named before the first flag, given --help
        words = list(itertools.takewhile(lambda a: not a.startswith("-"), args))
        try:
            parser = parse(target, [*words, "--help"]).parser
        except Exception as e:  # noqa: BLE001 - a missing module or script
            return f"{' '.join(target)}: {type(e).__name__}: {e}"
        unknown = [a for a in args if a.startswith("--") and a.split("=")[0] not in _options(parser)]
        return f"{' '.join(target)}: no option {unknown}" if unknown else None
    try:
        parsed = parse(target, args)
    except Exception as e:  # noqa: BLE001 - a missing module, or a program that ran past its parser
        return f"{' '.join(target)}: {type(e).__name__}: {e}"
    if parsed.error:
        return f"{' '.join(target)}: {parsed.error}"
    ns = parsed.namespace
    if target in (["train_kosmos.py"], ["kosmos-train"]) and ns is not None and (ROOT / ns.config).is_file():
        from kosmos.config import ConfigError, load_config

        try:
            load_config(ROOT / ns.config, list(ns.overrides))
        except ConfigError as e:
            return f"{ns.config}: {e}"
    return None


def _options(parser: argparse.ArgumentParser) -> set[str]:
    opts = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                opts |= _options(sub)
    return opts


def known_flags() -> set[str]:
    """Every option of the project's commands and of `accelerate launch`."""
    from accelerate.commands.launch import launch_command_parser

    flags = _options(launch_command_parser()) | EXTERNAL_FLAGS
    for entry in ENTRY_POINTS:
        target, args = (entry[:2], entry[2:]) if entry[0] == "-m" else (entry[:1], [])
        flags |= _options(parse(target, [*args, "--help"]).parser)
    return flags


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    out, fence = set(), False
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            out.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return out


def check_links(path: Path) -> list[str]:
    """Links to other files of the checkout and to headings (`#anchor`) that do not exist."""
    problems = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                problems.append(f"{_rel(path)}:{n}: link to {file}, which does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{_rel(path)}:{n}: link to #{anchor}, no such heading in {_rel(dest)}")
    return problems


def check_python(path: Path) -> list[str]:
    """The ```python blocks: they parse, and every name they import exists (the code itself is not run:
    it needs a trained checkpoint)."""
    problems = []
    text = path.read_text(encoding="utf-8")
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S):
        line = text[:m.start()].count("\n") + 2
        try:
            tree = ast.parse(m.group(1))
        except SyntaxError as e:
            problems.append(f"{_rel(path)}:{line + (e.lineno or 1) - 1}: python block: {e.msg}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                try:
                    module = importlib.import_module(node.module)
                except ImportError as e:
                    problems.append(f"{_rel(path)}:{line + node.lineno - 1}: {e}")
                    continue
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                if missing:
                    problems.append(f"{_rel(path)}:{line + node.lineno - 1}: {node.module} has no {missing}")
    return problems


def check_pages(paths: list[Path]) -> list[str]:
    """What is wrong with the commands, flags and links of these pages (empty: nothing)."""
    problems = [p for path in paths for p in check_links(path) + check_python(path)]
    for path in paths:
        for block in blocks(path):
            where = f"{block.page}:{block.line}"
            if block.fixture is None and block.reason is None:
                problems.append(f"{where}: a bash block without `<!-- docs-check: run NAME -->` or "
                                f"`<!-- docs-check: not run: REASON -->` on the line before it")
            elif block.fixture is not None and block.fixture not in FIXTURES:
                problems.append(f"{where}: unknown fixture {block.fixture!r} (docs_check.FIXTURES)")
        cmds = [(c, True) for b in blocks(path) for c in b.commands]
        cmds += [(c, False) for c in inline_commands(path)]
        for cmd, complete in cmds:
            err = check_command(cmd, complete)
            if err:
                problems.append(f"{cmd.page}:{cmd.line}: `{cmd.text}`: {err}")
    flags = known_flags()
    for path in paths:
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            for flag in FLAG.findall(line):
                if flag.split("=")[0] not in flags:
                    problems.append(f"{_rel(path)}:{n}: {flag} is no option of any command here")
    return problems


# --- running the runnable blocks ----------------------------------------------------------------------


def _own_data(work: Path) -> None:
    """A folder of captioned images (generated shapes: a.png + a.txt) and a folder of text (the shipped
    corpus), as the README's "your own data" starts from; configs/ and train_kosmos.py at hand."""
    from kosmos.data_tools.shapes import make_shapes
    from kosmos.tokenizer import TINY_CORPUS

    make_shapes(str(work / "shapes"), 64, 96, 0, 0)
    (work / "shapes" / "images").rename(work / "my_images")
    (work / "my_text").mkdir()
    shutil.copy(TINY_CORPUS, work / "my_text")
    _checkout(work)


def _checkout(work: Path) -> None:
    """configs/ and train_kosmos.py at hand, as in a checkout."""
    for name in ("configs", "train_kosmos.py"):
        (work / name).symlink_to(ROOT / name)


FIXTURES: dict[str, Callable[[Path], None]] = {"own-data": _own_data, "checkout": _checkout}


def run_block(block: Block) -> list[str]:
    """Runs a block's commands in order in a fresh scratch folder; the problems (empty: all exited 0)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    with tempfile.TemporaryDirectory(prefix="docs-check-") as tmp:
        work = Path(tmp)
        FIXTURES[block.fixture](work)
        for cmd in block.commands:
            start = time.monotonic()
            print(f"$ {cmd.text}", flush=True)
            r = subprocess.run(["bash", "-c", cmd.text], cwd=work, env=env, capture_output=True, text=True)
            print(f"  exit {r.returncode}, {time.monotonic() - start:.0f} s", flush=True)
            if r.returncode:
                tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
                where = f"{cmd.page}:{cmd.line}: `{cmd.text}` exited {r.returncode}"
                return [f"{where}:\n    " + "\n    ".join(tail)]
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pages", nargs="*", help="markdown files (default: README.md and docs/*.md)")
    ap.add_argument("--no-run", action="store_true", help="only check commands and flags; run nothing")
    args = ap.parse_args(argv)
    paths = pages(args.pages)
    start = time.monotonic()
    problems = check_pages(paths)
    n_cmds = sum(len(b.commands) for p in paths for b in blocks(p))
    n_cmds += sum(len(inline_commands(p)) for p in paths)
    took = time.monotonic() - start
    print(f"checked {n_cmds} commands and the flags and links of {len(paths)} pages in {took:.0f} s")
    if not args.no_run:
        for path in paths:
            for block in blocks(path):
                if block.fixture in FIXTURES:
                    problems += run_block(block)
    for p in problems:
        print(f"docs-check: {p}", file=sys.stderr)
    print("docs-check: ok" if not problems else f"docs-check: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
