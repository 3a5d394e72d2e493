"""The documentation stays true to the code: docs/config.md is what scripts/gen_config_docs.py writes from
the config's field docstrings, and every command in README.md and docs/*.md names a module, script and
flags that exist (scripts/docs_check.py; `make docs-check` also runs the runnable ones)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from scripts import gen_config_docs

ROOT = Path(__file__).resolve().parents[1]


def test_config_docs_are_up_to_date():
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert text == gen_config_docs.render(), "docs/config.md is stale: run python scripts/gen_config_docs.py"


def test_config_docs_name_every_key_with_its_docstring():
    from kosmos.config import Config, SourceConfig
    from kosmos.data_tools.cli import field_docs

    text = gen_config_docs.render()
    cfg = Config()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            assert f"| `{section.name}` |" in text
            continue
        docs = field_docs(type(value))
        for f in dataclasses.fields(value):
            if isinstance(getattr(value, f.name), SourceConfig) or f.name == "sources":
                continue
            assert f"| `{section.name}.{f.name}` |" in text, f"{section.name}.{f.name} missing"
            assert docs[f.name] in text, f"{section.name}.{f.name}: its docstring is not in docs/config.md"
    for key, doc in field_docs(SourceConfig).items():
        assert f"| `{key}` |" in text and doc in text


def test_a_changed_docstring_makes_the_docs_stale(monkeypatch):
    from kosmos.data_tools import cli

    real = cli.field_docs

    def edited(cls):
        docs = dict(real(cls))
        if "lr" in docs:
            docs["lr"] = "An edited description."
        return docs

    monkeypatch.setattr(gen_config_docs, "field_docs", edited)
    assert gen_config_docs.render() != (ROOT / "docs" / "config.md").read_text(encoding="utf-8")


def test_every_command_and_flag_in_the_docs_exists():
    """Each command of README.md and docs/*.md: its module or script exists and its parser takes its
    arguments (the runnable blocks also run under `make docs-check`); each --flag is some command's."""
    from scripts import docs_check

    problems = docs_check.check_pages(docs_check.pages())
    assert not problems, "\n".join(problems)


def test_docs_check_finds_a_wrong_flag_module_and_config_key(tmp_path):
    from scripts import docs_check

    page = tmp_path / "page.md"
    page.write_text(
        "Run `python -m kosmos.data_tools.verify --no-such-flag`.\n\n"
        "<!-- docs-check: not run: an example -->\n```bash\n"
        "python -m kosmos.no_such_module --help\n"
        "python -m kosmos.data_tools.captions --format nonsense --input a --output b\n"
        "python train_kosmos.py --config configs/tiny.yaml optim.lrr=1e-4\n"
        "make no-such-target\n```\n\n"
        "```bash\npython -m kosmos.data_tools.verify shards/\n```\n\n"
        "See [there](#no-such-heading) and [this](no_such_file.md).\n\n"
        "```python\nfrom kosmos.model import Kosmos, NoSuchName\n```\n", encoding="utf-8")
    problems = "\n".join(docs_check.check_pages([page]))
    assert "--no-such-flag" in problems
    assert "kosmos.no_such_module" in problems
    assert "invalid choice: 'nonsense'" in problems
    assert "unknown config key 'optim.lrr'" in problems
    assert "no make target ['no-such-target']" in problems
    assert "a bash block without" in problems
    assert "kosmos.model has no ['NoSuchName']" in problems
    assert "no such heading" in problems and "no_such_file.md, which does not exist" in problems


def test_the_readme_stays_short():
    assert (ROOT / "README.md").stat().st_size <= 16_000, "README.md over 16 KB: move details to docs/"
