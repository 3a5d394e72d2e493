"""Reading untrusted inputs (datasets, shards, files named on a command line) so that one bad value is skipped
and counted, or refused in one line, instead of ending the job. Torch-free, imports nothing heavy at import:
shared by training (`kosmos.data`), evaluation, generation, the converters (`kosmos.data_tools`) and the
tokenizer builder.

    load_json    `json.loads` with a nesting limit (`MAX_JSON_DEPTH`): a 100,000-deep ``[[[...]]]`` raises
                 `json.JSONDecodeError` like any malformed JSON (Python's parser would raise RecursionError,
                 which no ``except ValueError`` catches, and a value nested a little less deep breaks
                 whatever recurses over it later)
    open_image   PIL's `Image.open` of bytes or a file, the header checked against a pixel limit before
                 anything is decoded; every failure an `ImageError` with a short reason
    image_errors what goes wrong while decoding an opened image, as `ImageError`

PIL refuses an image over twice `Image.MAX_IMAGE_PIXELS` with `DecompressionBombError`, which is not an
OSError (readers that caught OSError died on it, at the same image on every rerun), and only warns between
once and twice the limit, then decodes it whole. `open_image` refuses anything over the limit itself.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from itertools import accumulate
from pathlib import Path
from typing import Any

MAX_JSON_DEPTH = 100
"""The deepest nesting of arrays and objects `load_json` accepts. The project's formats nest a few levels
(an interleaved document: object, list, segment); 100 leaves room for any real metadata and none for a value
that would exhaust Python's recursion limit (1000) in the parser or in the code that walks it."""

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


class JSONTooDeep(json.JSONDecodeError):
    """A JSON value nested deeper than the limit: a `json.JSONDecodeError` (a ValueError), so every reader
    that skips or refuses malformed JSON does the same with it."""

    def __init__(self, max_depth: int):
        ValueError.__init__(self, f"nested deeper than {max_depth} levels")
        self.max_depth = max_depth
        self.msg, self.doc, self.pos, self.lineno, self.colno = str(self), "", 0, 1, 1

    def __reduce__(self):
        return self.__class__, (self.max_depth,)


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings not counted)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    brackets = _STRING.sub(b'""', data).translate(None, _NOT_BRACKETS)
    return max(accumulate(_STEP[b] for b in brackets), default=0)


def load_json(text: str | bytes | bytearray, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads(text)`, refusing a value nested deeper than `max_depth` with `JSONTooDeep` (a
    `json.JSONDecodeError`). Costs two `count`s over the text when it holds at most `max_depth` brackets (any
    ordinary record), a scan of its brackets otherwise."""
    if isinstance(text, str):
        opens = text.count("[") + text.count("{")
    else:
        opens = text.count(b"[") + text.count(b"{")
    if opens > max_depth and json_depth(text) > max_depth:
        raise JSONTooDeep(max_depth)
    try:
        return json.loads(text)
    except RecursionError:  # only from a caller already deep in recursion
        raise JSONTooDeep(max_depth) from None


def read_json_file(path: str | Path, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON file (UTF-8) through `load_json`; raises OSError, UnicodeDecodeError or json.JSONDecodeError."""
    return load_json(Path(path).read_bytes().decode("utf-8"), max_depth)


# ----------------------------------------------------------------------------- images


class ImageError(ValueError):
    """An image that cannot be used. ``reason``, a short word the callers count: ``missing_image``,
    ``not_a_file``, ``unreadable_image``, ``empty_image``, ``decompression_bomb``, ``corrupt_image``,
    ``truncated_image`` or ``unsupported_image``; ``detail`` says what exactly (sizes, PIL's message)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason, self.detail = reason, detail

    def __reduce__(self):
        return self.__class__, (self.reason, self.detail)


def pixel_limit(max_pixels: int | None = None) -> int | None:
    """`max_pixels`, or PIL's `Image.MAX_IMAGE_PIXELS` (read when called: None there means no limit)."""
    if max_pixels is not None:
        return max_pixels
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes; `ImageError` ``missing_image`` / ``not_a_file`` (a folder, FIFO, device: never opened,
    a FIFO would block) / ``unreadable_image``, naming the path."""
    p = Path(path)
    try:
        if not p.is_file():
            raise ImageError("missing_image" if not p.exists() else "not_a_file", str(p))
        return p.read_bytes()
    except ImageError:
        raise
    except OSError as e:
        raise ImageError("unreadable_image", f"{p}: {e.strerror or e}") from None


@contextmanager
def image_errors() -> Iterator[None]:
    """Turns what PIL raises for bad image data inside the block into `ImageError` (an `ImageError` passes
    through): a decompression bomb, a file PIL does not recognise, truncated or corrupt data, an unsupported
    mode, and any other exception of a decoder (a decoder bug must not end a job)."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("decompression_bomb", str(e)) from None
    except UnidentifiedImageError as e:
        raise ImageError("corrupt_image", str(e)) from None
    except OSError as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise ImageError(reason, str(e)) from None
    except (ValueError, TypeError, SyntaxError, IndexError, KeyError, EOFError) as e:
        raise ImageError("unsupported_image", f"{type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise many types
        raise ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None


@cache
def _quiet_bomb_warning() -> None:
    """PIL's DecompressionBombWarning (an image between once and twice its limit) is silenced once per
    process: `open_image` refuses such an image itself. (`warnings.catch_warnings` around each open would
    reset every module's "shown once" registry at each image.)"""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def open_image(source: bytes | bytearray | memoryview | str | Path, max_pixels: int | None = None):
    """A PIL image opened from encoded bytes or a file, header read only (decode with ``load()`` or by
    converting it, inside `image_errors`). Raises `ImageError`: ``decompression_bomb`` when its width x height
    is over `max_pixels` (default PIL's `Image.MAX_IMAGE_PIXELS`; checked before anything is decoded),
    ``empty_image``, ``corrupt_image``, ... and for a path also ``missing_image`` / ``not_a_file`` /
    ``unreadable_image``."""
    from PIL import Image

    data = read_bytes(source) if isinstance(source, str | Path) else bytes(source)
    if not data:
        raise ImageError("empty_image", str(source) if isinstance(source, str | Path) else "")
    _quiet_bomb_warning()
    with image_errors():
        img = Image.open(io.BytesIO(data))
    limit = pixel_limit(max_pixels)
    width, height = img.size
    if limit is not None and width * height > limit:
        img.close()
        raise ImageError("decompression_bomb", f"{width}x{height} pixels, over the limit of {limit}")
    return img
