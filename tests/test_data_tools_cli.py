"""The converters' shared options are generated from the option dataclasses: defaults and help stated once."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from kosmos.data_tools import captions, cli, interleaved, text
from kosmos.data_tools.cli import IMAGE_OPTIONS, SHARD_OPTIONS, OptionSpec, field_docs
from kosmos.data_tools.conversion import ShardOptions
from kosmos.data_tools.images import ImageOptions
from kosmos.data_tools.interleaved import DOC_OPTIONS, DocOptions

PARSERS = {"captions": (captions.build_parser, (SHARD_OPTIONS, IMAGE_OPTIONS)),
           "interleaved": (interleaved.build_parser, (SHARD_OPTIONS, IMAGE_OPTIONS, DOC_OPTIONS)),
           "text": (text.build_parser, (SHARD_OPTIONS,))}
REQUIRED = {"captions": ["--format", "coco", "--input", "x"],
            "interleaved": ["--format", "mmc4", "--input", "x", "--images-root", "y"],
            "text": ["--input", "x"]}


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_every_shared_option_takes_default_and_help_from_its_dataclass(tool):
    build, specs = PARSERS[tool]
    actions = _actions(build())
    for spec in specs:
        docs = field_docs(spec.cls)
        for f in spec.fields():
            action = actions[f.name]
            doc = docs[f.name].replace("``", "")
            if isinstance(action, argparse._StoreFalseAction):  # the flag turns off a default: it says so
                doc = f"Turns off what is done by default: {doc[:1].lower()}{doc[1:]}"
            assert doc and action.help.startswith(doc.rstrip(".")), (f.name, action.help)
            if f.default is dataclasses.MISSING:
                assert action.required, f.name
            elif isinstance(action, argparse._StoreFalseAction):
                assert f.default is True and action.default is True, f.name
            else:
                assert action.default == f.default, f.name
                if f.default not in (None, False):
                    assert "(default %(default)s)" in action.help, f.name


def test_a_flag_that_turns_off_a_default_says_so_first():
    """`--keep-single-colour` keeps the images of one colour: its help must not open with "Drop images of one
    single colour" (the default it turns off), as it did."""
    helps = {a.option_strings[0]: a.help for a in captions.build_parser()._actions if a.option_strings}
    assert helps["--keep-single-colour"] == ("Turns off what is done by default: drop images of one single "
                                             "colour (the paper's filter).")
    assert helps["--no-progress"] == "Turns off what is done by default: show a progress bar on a terminal."


def test_the_paper_defaults_are_stated_in_the_dataclasses():
    a = captions.build_parser().parse_args(REQUIRED["captions"] + ["--output", "o"])
    assert (a.image_size, a.jpeg_quality, a.min_image_size, a.samples_per_shard) == (256, 90, 64, 10_000)
    b = interleaved.build_parser().parse_args(REQUIRED["interleaved"] + ["-o", "o"])
    assert (b.max_images, b.single_image_drop, b.seed, b.sim_threshold) == (5, 0.5, 0, None)
    assert cli.shard_options(b) == ShardOptions(output=Path("o"))
    assert cli.image_options(b) == ImageOptions()
    assert DOC_OPTIONS.from_args(b, image=cli.image_options(b)) == DocOptions()


def test_option_spellings_and_parsers():
    a = interleaved.build_parser().parse_args(REQUIRED["interleaved"] + [
        "-o", "out", "-j", "3", "--max-shard-bytes", "500MB", "--no-progress", "--overwrite", "--limit", "7",
        "--keep-single-colour", "--image-size", "0", "--max-images", "2", "--single-image-drop", "0",
        "--sim-threshold", "0.25", "--dry-run"])
    assert cli.shard_options(a) == ShardOptions(output=Path("out"), workers=3, max_shard_bytes=500_000_000,
                                                progress=False, overwrite=True, limit=7)
    assert cli.image_options(a) == ImageOptions(image_size=0, drop_single_colour=False)
    assert DOC_OPTIONS.from_args(a) == DocOptions(max_images=2, single_image_drop=0.0, sim_threshold=0.25)
    assert a.dry_run
    assert not hasattr(a, "jpeg_draft_gap") and not hasattr(a, "joiner")
    with pytest.raises(SystemExit):
        text.build_parser().parse_args(REQUIRED["text"] + ["-o", "o", "--image-size", "64"])  # no images


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_help_shows_defaults(tool, capsys):
    build, _ = PARSERS[tool]
    with pytest.raises(SystemExit):
        build().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default 10000)" in out and "--no-progress" in out and "--output OUTPUT, -o OUTPUT" in out
    if tool != "text":
        assert "(default 256)" in out and "(default 90)" in out and "(default 64)" in out
        assert "--keep-single-colour" in out
    if tool == "interleaved":
        assert "(default 5)" in out and "(default 0.5)" in out


def test_option_spec_on_a_plain_dataclass():
    @dataclass
    class Opts:
        """Made up."""

        name: str
        """Who; required (no default)."""
        count: int | None = None
        """How many, or every one."""
        ratio: float = 0.5
        """A share: 50% by default."""
        verbose: bool = False
        """Say more."""
        colour: bool = True
        """Use colour."""

    spec = OptionSpec(Opts, names={"name": ("--name", "-n")})
    p = argparse.ArgumentParser()
    spec.add_to(p)
    assert spec.from_args(p.parse_args(["-n", "x"])) == Opts("x")
    got = spec.from_args(p.parse_args(["-n", "y", "--count", "3", "--ratio", "1", "--verbose",
                                       "--no-colour"]))
    assert got == Opts("y", 3, 1.0, True, False)
    assert "50% by default" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args([])


def test_option_spec_list_fields_repeat_or_take_several_values():
    @dataclass
    class Opts:
        """Made up."""

        roots: list[Path]
        """Where to look; several are searched in order."""
        tags: list[str] = dataclasses.field(default_factory=lambda: ["a"])
        """Labels."""

    spec = OptionSpec(Opts)
    p = argparse.ArgumentParser()
    spec.add_to(p)
    got = spec.from_args(p.parse_args(["--roots", "x", "y", "--roots", "z"]))
    assert got == Opts([Path("x"), Path("y"), Path("z")], ["a"])  # the default list, untouched
    assert spec.from_args(p.parse_args(["--roots", "x", "--tags", "b", "--tags", "c"])).tags == ["b", "c"]
    assert "(default a)" in " ".join(p.format_help().split())
    with pytest.raises(SystemExit):
        p.parse_args(["--tags", "b"])  # --roots is required
    extra = ["z", "--images-root", "w", "-o", "o"]  # after REQUIRED's "--images-root y"
    a = interleaved.build_parser().parse_args(REQUIRED["interleaved"] + extra)
    assert interleaved.IMAGE_ROOTS.from_args(a).images_root == [Path("y"), Path("z"), Path("w")]
