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
    from data_tools.cli import field_docs
    from kosmos.config import Config, SourceConfig

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
    from data_tools import cli

    real = cli.field_docs

    def edited(cls):
        docs = dict(real(cls))
        if "lr" in docs:
            docs["lr"] = "An edited description."
        return docs

    monkeypatch.setattr(gen_config_docs, "field_docs", edited)
    assert gen_config_docs.render() != (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
