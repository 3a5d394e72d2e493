"""What flows through a conversion: the records a converter's enumerator yields (``Item`` for a valid
input, ``Skipped`` for one rejected while enumerating), the ``Skip`` a handler raises for an input it drops,
the ``Sample`` it makes otherwise, and ``ConversionError`` for a problem with the command itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Skip(Exception):
    """An input (or one image of a document) that is dropped, with a short machine reason."""

    def __init__(self, reason: str, detail: str = "", image_skips: Counter | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.image_skips = image_skips or Counter()
        """Images of a dropped document that were skipped for their own reasons (still counted)."""
        self.image_examples: dict[str, list[str]] = {}
        """What those images were (their URL or name), the first few per reason, as in Sample."""


class ConversionError(Exception):
    """A problem with the command itself (unreadable input, unknown format, foreign output dir)."""


@dataclass
class Item:
    """One valid input of a converter: becomes one sample unless its handler raises ``Skip``.

    ``payload`` must be picklable: it travels to a worker process.
    """

    key: str
    source: str
    payload: Any


@dataclass
class Skipped:
    """An input rejected while enumerating (before any worker sees it)."""

    reason: str
    source: str
    detail: str = ""
    """What was tried (e.g. the sidecar path), shown after the source in the manifest's examples."""


@dataclass
class Sample:
    """What a handler makes of one item: the sample's files by field (``txt``, ``img0.jpg``, ...; see
    ``kosmos.data.format``), plus per-image counts."""

    files: dict[str, bytes]
    images: int = 0
    image_skips: Counter = field(default_factory=Counter)
    image_examples: dict[str, list[str]] = field(default_factory=dict)
    """The skipped images by reason, the first few of each (their URL or name, and what went wrong): the
    manifest's ``skipped_image_examples``, each after its input's name."""


Handler = Callable[[Item, Any], Sample]
