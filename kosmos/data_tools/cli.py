"""The converters' command lines.

The options every converter shares are generated from the option dataclasses (``ShardOptions``,
``ImageOptions``, and ``DocOptions`` for the interleaved converter): an ``OptionSpec`` turns each field into
``--field-name`` with the field's default and its attribute docstring (the string right below the field) as
help, so a default and its description are stated once, in the dataclass. The spec only says what the
dataclass cannot: short aliases, flags spelled otherwise, fields left off the command line and parsers for
values such as sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kosmos.data_tools.conversion import ShardOptions
from kosmos.data_tools.images import ImageOptions
from kosmos.data_tools.records import ConversionError
from kosmos.docstrings import field_docs


def parse_size(text: str) -> int:
    """``"500MB"``, ``"1G"``, ``"1e9"`` or ``"4096"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 500MB, 1G or 1000000)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _help(doc: str) -> str:
    """A docstring as argparse help: reST literals unquoted, ``%`` escaped."""
    return doc.replace("``", "").replace("%", "%%")


@dataclass(frozen=True)
class OptionSpec:
    """Command-line options generated from the fields of an options dataclass.

    Each field ``name`` becomes ``--name-with-dashes`` (dest ``name``) with the field's default (a field
    without one is required) and its docstring as help; the type comes from the annotation. A bool field
    is a flag: off by default, ``--name`` turns it on; on by default, ``--no-name`` (or its ``names``
    entry) turns it off. A ``list[T]`` field takes one or more values, and the option may be repeated:
    ``--name a b --name c`` gives ``[a, b, c]``.
    """

    cls: type
    exclude: tuple[str, ...] = ()
    """Fields left off the command line (they keep their defaults)."""
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Option strings of a field when ``--name-with-dashes`` (``--no-...`` for a flag that is on by
    default) will not do."""
    parsers: dict[str, Callable[[str], Any]] = field(default_factory=dict)
    """Argument parser of a field when its annotated type will not do (e.g. ``parse_size``)."""

    def fields(self) -> list[dataclasses.Field]:
        """The fields that are options, in declaration order."""
        return [f for f in dataclasses.fields(self.cls) if f.name not in self.exclude]

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """Add one option per field to ``parser`` (a parser or an argument group)."""
        docs = field_docs(self.cls)
        hints = typing.get_type_hints(self.cls)
        for f in self.fields():
            dashed = f.name.replace("_", "-")
            doc = _help(docs.get(f.name, ""))
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = None if required else (f.default if f.default is not dataclasses.MISSING
                                              else f.default_factory())
            kind = _base_type(hints[f.name])
            if kind is bool:
                if default:
                    names = self.names.get(f.name, (f"--no-{dashed}",))
                    parser.add_argument(*names, dest=f.name, action="store_false", default=True,
                                        help=f"Turns off what is done by default: {doc[:1].lower()}{doc[1:]}")
                else:
                    names = self.names.get(f.name, (f"--{dashed}",))
                    parser.add_argument(*names, dest=f.name, action="store_true", default=False, help=doc)
                continue
            names = self.names.get(f.name, (f"--{dashed}",))
            if typing.get_origin(kind) is list:
                (item,) = typing.get_args(kind)
                if not required:
                    doc = doc.rstrip(".") + f" (default {' '.join(map(str, default)) or 'none'})."
                parser.add_argument(*names, dest=f.name, type=self.parsers.get(f.name, item), nargs="+",
                                    action="extend", default=None, required=required, help=doc)
                continue
            if not (required or default is None):
                doc = doc.rstrip(".") + " (default %(default)s)."
            parser.add_argument(*names, dest=f.name, type=self.parsers.get(f.name, kind), default=default,
                                required=required, help=doc)

    def from_args(self, args: argparse.Namespace, **overrides: Any) -> Any:
        """The dataclass built from parsed options (fields left off keep their defaults)."""
        values = {f.name: getattr(args, f.name) for f in self.fields()}
        values = {k: v for k, v in values.items() if v is not None or not _is_list(self.cls, k)}
        return self.cls(**{**values, **overrides})


def _is_list(cls: type, name: str) -> bool:
    """Whether field ``name`` is a ``list[T]`` option (None from argparse: the option was not given, so the
    field keeps its default list)."""
    return typing.get_origin(_base_type(typing.get_type_hints(cls)[name])) is list


def _base_type(hint: Any) -> Any:
    """``int`` for ``int | None``; the hint itself otherwise."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return hint


SHARD_OPTIONS = OptionSpec(
    ShardOptions,
    names={"output": ("--output", "-o"), "workers": ("--workers", "-j"), "progress": ("--no-progress",)},
    parsers={"max_shard_bytes": parse_size},
)
IMAGE_OPTIONS = OptionSpec(
    ImageOptions,
    exclude=("jpeg_draft_gap",),  # a speed knob for benchmarks; the default suits conversions
    names={"drop_single_colour": ("--keep-single-colour",)},
)


def add_common_args(p: argparse.ArgumentParser, images: bool = True) -> None:
    """The options every converter shares: ``ShardOptions`` and ``--dry-run`` (group "shards"), and
    ``ImageOptions`` (group "images") for converters that store images."""
    g = p.add_argument_group("shards")
    SHARD_OPTIONS.add_to(g)
    g.add_argument("--dry-run", action="store_true", help="read and count the inputs, write nothing")
    if images:
        IMAGE_OPTIONS.add_to(p.add_argument_group("images"))


def image_options(a: argparse.Namespace) -> ImageOptions:
    """``ImageOptions`` from options added by ``add_common_args``."""
    return IMAGE_OPTIONS.from_args(a)


def shard_options(a: argparse.Namespace) -> ShardOptions:
    """``ShardOptions`` from options added by ``add_common_args``."""
    return SHARD_OPTIONS.from_args(a)


def run_cli(fn: Callable[[], Any]) -> int:
    """Run a converter, turning ``ConversionError``/``ValueError`` into a one-line message and exit 2."""
    try:
        fn()
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
