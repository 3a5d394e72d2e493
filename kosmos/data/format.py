"""The shard format, in one torch-free place: what a sample of each source kind holds, how tar members are
named and grouped into samples, and how a sample's files are parsed.

    text         KEY.txt                                   the document (UTF-8)
    captions     KEY.jpg|jpeg|png|webp + KEY.txt            the image and its caption
    interleaved  KEY.json {"segments": [...]} + KEY.imgN.jpg  text and image segments in order

Converters also write `KEY.json` metadata beside text and caption samples. Readers use two of its keys
and ignore the rest:

* text, `"prompt_chars": N` (instruction data, `python -m data_tools.text --format instructions`): `KEY.txt`
  is the whole templated text and its first N characters are the prompt, the rest the response. The text is
  tokenized as the two pieces (the tokenizer adds no prefix space, so the pieces decode to the text), and a
  source with `data.<source>.loss: response` puts no loss on the prompt's tokens (`<s>` included). Without
  the key (plain text shards) the sample is one piece, as before.
* captions, `"captions": [...]` (COCO; img2dataset or table sets with a list of captions per image): every
  caption of the image. `KEY.txt` holds the first; `captions(files)` gives `KEY.txt` then the others, each
  once. Which one a visit uses is the source's `caption_choice` (`kosmos.data.stream`).

A member `dir/KEY.EXT` belongs to the sample `dir/KEY` and gives it the field `EXT` (everything after the
first dot of the file name, lowercased: `KEY.img0.jpg` gives `img0.jpg`); consecutive members with the same
key form one sample, as webdataset groups them. Interleaved image names in the JSON are lowercased the same
way before they are looked up.

Used by the training reader (`kosmos.data.shards`, `kosmos.data.samples`), the converters that write shards
and the tools that check them (`data_tools`); this module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from kosmos.data.remote import ShardError
from kosmos.untrusted import load_json

KINDS = ("text", "captions", "interleaved")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image fields of a caption sample, in the order they are looked for."""
TEXT_FIELD = "txt"
"""A text sample's document; a caption sample's caption."""
JSON_FIELD = "json"
"""An interleaved sample's document; metadata beside the other kinds."""
IMAGE_FIELD = "jpg"
"""The image of a caption sample as the converters write it."""
LOSSES = ("all", "response")
"""What an instruction sample's loss covers (`data.<source>.loss`): the whole text (the paper; default), or
the response only (no loss on `<s>` and the prompt)."""
CAPTION_CHOICES = ("first", "random", "all")
"""How a caption sample with several captions is visited (`data.<source>.caption_choice`; see
`kosmos.data.stream`)."""

_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext rule


class BadSample(Exception):
    """A sample the reader cannot use; ``reason`` is a short machine word counted by the stream."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        """What exactly (a member name), for messages; not part of the reason."""


def member_name(key: str, field: str) -> str:
    """The tar member name of a sample's field: ``member_name("k", "img0.jpg") == "k.img0.jpg"``."""
    return f"{key}.{field}"


def image_field(index: int) -> str:
    """The field of an interleaved document's ``index``-th image (``img0.jpg``, ``img1.jpg``, ...)."""
    return f"img{index}.jpg"


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, field)`` of a member name, the field lowercased; None for a name that is no sample member
    (no dot in its file name, or a webdataset-internal name starting with ``__``)."""
    m = _MEMBER.match(name)
    if m is None or name.startswith("__"):
        return None
    return m.group(1), m.group(2).lower()


def is_image_field(field: str) -> bool:
    """Whether a field holds an image (``jpg``, ``img0.jpg``, ...)."""
    return field.rsplit(".", 1)[-1] in IMAGE_EXTS


# ------------------------------------------------------------------------------------- tar reading


@dataclass(frozen=True)
class TarSpan:
    """A member left unread: its bytes are ``size`` bytes at ``offset`` of the (uncompressed) tar file."""

    offset: int
    size: int


@dataclass
class TarSample:
    """The members of one sample."""

    key: str
    files: dict[str, bytes | TarSpan] = field(default_factory=dict)
    """Field -> bytes (or `TarSpan` for a field the reader chose not to read)."""
    cut: bool = False
    """The tar broke while this sample was read: members after the break are missing."""


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


class _Tail(io.RawIOBase):
    """A stream that remembers how many bytes were read through it and the last 1024 of them."""

    def __init__(self, f: BinaryIO):
        self.f, self.n, self.last = f, 0, bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        got = memoryview(b)[:n]
        self.n += n
        self.last = bytearray(got[-1024:]) if n >= 1024 else (self.last + got)[-1024:]
        return n


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGTYPE, AREGTYPE, CONTTYPE
_SIGNED = struct.Struct("148b8x356b")


def _cstr(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes of 8 GiB and more)
        return tarfile.nti(field)
    try:
        return int(_cstr(field).strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"bad {what} field {field!r}") from None


def _pax(data: bytes) -> dict[str, str]:
    """A pax extended header's records (``LEN KEY=VALUE\\n`` ...)."""
    out, i = {}, 0
    try:
        while i < len(data) and data[i]:
            sp = data.index(b" ", i)
            n = int(data[i:sp])
            if n <= sp - i or i + n > len(data) or data[i + n - 1] != 0x0A:  # each record ends with "\n"
                raise ValueError
            key, _, value = data[sp + 1:i + n - 1].partition(b"=")
            out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
            i += n
    except ValueError:
        raise tarfile.ReadError("bad pax extended header") from None
    return out


class _Member:
    """A regular member of a tar being streamed (`_plain_members`, `_tarfile_members`): read its data with
    `read()` right away, or leave it (the reader skips it)."""

    __slots__ = ("name", "size", "offset_data", "_f", "read_done")

    def __init__(self, f: BinaryIO, name: str, size: int, offset_data: int):
        self._f, self.name, self.size, self.offset_data, self.read_done = f, name, size, offset_data, False

    def read(self) -> bytes:
        self.read_done = True
        return self._f.read(self.size)


def _tarfile_members(f: BinaryIO) -> Iterator[_Member]:
    """The regular members of a compressed tar, through tarfile's streaming mode."""
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            tar.members = []  # streaming: do not keep every header in memory
            if info.isreg():
                yield _Member(tar.extractfile(info), info.name, info.size, info.offset_data)


def _plain_members(f: BinaryIO, seekable: bool) -> Iterator[_Member]:
    """The regular members of an uncompressed tar read from ``f``, front to back: what tarfile's streaming
    mode gives for the formats tar writers produce (ustar, GNU long names, pax ``path``/``size``), at a
    fraction of its cost per header (most of a loader worker's time went into tarfile's header parsing).
    Other members (directories, links, ...) are skipped. Ends quietly at a zero block or where the data ends
    between members, as tarfile does (the caller checks the end-of-archive blocks). Raises, as for a broken
    tar, where tarfile raises (data cut inside a member, an extended header with no member after it) and
    also at a header with a wrong checksum or a malformed pax record: there tarfile ends quietly or renames
    the member, and the rest of the shard was lost uncounted. A seekable ``f`` has the members left unread
    skipped by seeking."""
    end = None  # bytes from here to the end of a seekable file
    if seekable:
        start = f.tell()
        end = f.seek(0, 2) - start
        f.seek(start)
    pos = 0  # of the next block, from where reading began
    long_name: str | None = None
    pax: dict[str, str] = {}
    extended = False  # an extended header was read: a member header must follow
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK and pos == 0:
            raise tarfile.ReadError("empty file" if not header else "truncated header")
        if len(header) < _BLOCK or header == _ZERO_BLOCK:
            if extended:
                raise EOFError(f"tar ends after an extended header at byte {pos}")
            return
        want = _octal(header[148:156], "checksum")
        if want != 256 + sum(header[:148]) + sum(header[156:]) and want != 256 + sum(_SIGNED.unpack(header)):
            raise tarfile.ReadError(f"bad checksum in the tar header at byte {pos}")
        size = _octal(header[124:136], "size")
        kind = header[156:157]
        pos += _BLOCK
        data_at, pad = pos, -size % _BLOCK
        pos += size + pad
        if kind in (b"L", b"K", b"x", b"g"):  # a GNU long name/link or a pax header: for the next member
            data = f.read(size)
            if len(data) != size or len(f.read(pad)) != pad:
                raise EOFError(f"tar cut inside an extended header at byte {data_at}")
            extended = True
            if kind == b"L":
                long_name = _cstr(data).decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax(data)
            continue
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise tarfile.ReadError(f"bad pax size {pax['size']!r}") from None
            pad = -size % _BLOCK
            pos = data_at + size + pad
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            raw, prefix = _cstr(header[:100]), _cstr(header[345:500])
            name = ((prefix + b"/" + raw) if prefix and kind != b"S" else raw).decode(
                "utf-8", "surrogateescape")
        long_name, pax, extended = None, {}, False
        member = None
        if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):
            member = _Member(f, name, size, data_at)
            yield member
        if member is not None and member.read_done:
            if len(f.read(pad)) != pad:
                raise EOFError(f"tar cut inside the padding of {name}")
        elif end is not None:
            if pos > end:
                raise EOFError(f"tar cut inside {name}")
            f.seek(size + pad, 1)
        else:
            left = size + pad
            while left > 0:
                got = len(f.read(min(left, 1 << 20)))
                if not got:
                    raise EOFError(f"tar cut inside {name}")
                left -= got


def iter_tar(source: str | Path | BinaryIO, skipped: Counter | None = None, *,
             read: Callable[[str], bool] | None = None, want: Callable[[int], bool] | None = None,
             errors: list[str] | None = None) -> Iterator[TarSample]:
    """The samples of a tar (a path or a seekable binary file; gzip/bz2/xz compressed tars too), in order,
    streamed: regular members grouped by key (see the module docstring), other members ignored.

    A field seen twice in one sample keeps its first bytes and counts ``duplicate_member`` in ``skipped``.
    A tar that breaks (bad header, data cut inside a member, corrupt compression) ends early and counts
    ``broken_shard``; the sample being read then comes out with ``cut`` set. An uncompressed tar that ends
    quietly at a member boundary without the end-of-archive blocks counts ``truncated_shard``. The
    exception text of a break is appended to ``errors`` when given.

    With ``read``, fields for which it is false are not read but given as `TarSpan` byte ranges (only for
    an uncompressed tar; a compressed one is read whole). With ``want``, the samples whose index is not
    wanted have no field read (all `TarSpan`s): a resumed reader skips what it already had cheaply.

    A stream that cannot seek (a URL or pipe from `kosmos.data.remote`) is read once, front to back, and
    checked for the end-of-archive blocks at its end. A shard whose read fails for good (`ShardError`, after
    its retries) ends like a broken one but counts the error's reason (``shard_timeout``, ...) instead.
    """
    skipped = skipped if skipped is not None else Counter()
    own = isinstance(source, str | Path)
    f: BinaryIO = open(source, "rb") if own else source  # closed below
    current: TarSample | None = None
    index = -1  # of the current sample
    tail: _Tail | None = None
    try:
        if getattr(f, "seekable", lambda: False)():
            start = f.tell()
            compressed = f.read(6).startswith(_COMPRESSED)
            f.seek(start)
        else:  # a stream (a URL, a pipe): read once, front to back
            tail = _Tail(f)
            f = io.BufferedReader(tail, 1 << 16)
        try:
            if tail is not None:  # here: a stream that fails at once is counted like one that fails later
                compressed = f.peek(6)[:6].startswith(_COMPRESSED)
            members = _tarfile_members(f) if compressed else _plain_members(f, seekable=tail is None)
            with contextlib.closing(members):
                for info in members:
                    parts = split_member(info.name)
                    if parts is None:
                        continue
                    key, name = parts
                    if current is not None and key != current.key:
                        yield current
                        current = None
                    if current is None:
                        current = TarSample(key)
                        index += 1
                    if name in current.files:
                        skipped["duplicate_member"] += 1
                        continue
                    if want is not None and not want(index):
                        current.files[name] = TarSpan(info.offset_data, info.size)
                        continue
                    if read is not None and not compressed and not read(name):
                        current.files[name] = TarSpan(info.offset_data, info.size)
                        continue
                    data = info.read()
                    if len(data) != info.size:
                        raise EOFError(f"{info.name}: {len(data)} of {info.size} bytes")
                    current.files[name] = data
            # tarfile stops quietly at a cut that falls on a member boundary; a complete archive ends
            # with zero blocks.
            if not compressed and tail is not None:
                while f.read(1 << 16):  # the rest: end-of-archive blocks and padding
                    pass
                if isinstance(getattr(source, "error", None), ShardError):  # ended early at a member boundary
                    raise source.error
                if tail.n < 1024 or bytes(tail.last) != bytes(1024):
                    skipped["truncated_shard"] += 1
            elif not compressed:
                end = f.seek(0, 2)
                if end - start < 1024 or (f.seek(end - 1024) is not None and f.read(1024) != bytes(1024)):
                    skipped["truncated_shard"] += 1
        except (tarfile.TarError, EOFError, OSError) as e:
            failed = getattr(source, "error", None)  # a remote stream's failure: the cause of this break
            why = failed if isinstance(failed, ShardError) else e
            skipped[why.reason if isinstance(why, ShardError) else "broken_shard"] += 1
            if errors is not None:
                errors.append(f"{type(why).__name__}: {why}")
            if current is not None:
                current.cut = True
        if current is not None:
            yield current
    finally:
        if own:
            f.close()


# ------------------------------------------------------------------------------------ sample parsing


@dataclass(frozen=True)
class ImageSegment:
    """An image of a sample, undecoded."""

    name: str
    """Its field (``jpg``, ``img0.jpg``, ...)."""
    data: bytes


Segment = str | ImageSegment


def _text(files: Mapping[str, object], what: str) -> str:
    data = files.get(TEXT_FIELD)
    if not isinstance(data, bytes):
        raise BadSample(f"missing_{what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("not_utf8") from None
    if not text.strip():
        raise BadSample(f"empty_{what}")
    return text


def _meta(files: Mapping[str, object], key: str) -> object:
    """``KEY.json``'s value at ``key``; None when the sample has no such JSON object or no such key (the bytes
    are searched first: most samples' metadata is not parsed at all)."""
    raw = files.get(JSON_FIELD)
    if not isinstance(raw, bytes) or f'"{key}"'.encode() not in raw:
        return None
    try:
        meta = load_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return meta.get(key) if isinstance(meta, dict) else None


def prompt_chars(files: Mapping[str, object], text: str) -> int:
    """The length of a text sample's prompt (``KEY.json`` ``"prompt_chars"``), 0 when it has none. Raises
    ``BadSample("bad_prompt_chars")`` for a value that is not a whole number in [0, len(text)]."""
    n = _meta(files, "prompt_chars")
    if n is None:
        return 0
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(text):
        raise BadSample("bad_prompt_chars", f"{n!r} for a text of {len(text)} characters")
    return n


def captions(files: Mapping[str, object]) -> list[str]:
    """Every caption of a caption sample, stripped: ``KEY.txt`` first, then the strings of ``KEY.json``'s
    ``"captions"`` list that are not empty and not already in (a list that is not a list of strings is
    ignored). Raises `BadSample` as `parse_sample` does for a ``KEY.txt`` that is missing or unusable."""
    out = [_text(files, "caption").strip()]
    more = _meta(files, "captions")
    if isinstance(more, list):
        for c in more:
            if isinstance(c, str) and c.strip() and c.strip() not in out:
                out.append(c.strip())
    return out


def parse_sample(kind: str, files: Mapping[str, object], caption: int | None = None) -> list[Segment]:
    """A sample's segments in order: text strings and `ImageSegment`s (bytes undecoded).

    ``files`` maps fields to bytes (other entries, such as ``__key__``, are ignored). Raises
    ``BadSample(reason)`` for a sample the reader cannot use: ``missing_text``, ``empty_text``,
    ``missing_caption``, ``empty_caption``, ``not_utf8``, ``missing_image``, ``missing_json``, ``bad_json``,
    ``empty_document``, ``bad_prompt_chars`` or ``no_such_caption``. Interleaved segments that are neither
    text nor image are ignored. A text sample with a prompt (``prompt_chars``) gives two strings, the prompt
    then the response. A caption sample gives its image and ``KEY.txt``, or with ``caption`` the caption of
    that index in `captions(files)`.
    """
    if kind == "text":
        text = _text(files, "text")
        n = prompt_chars(files, text)
        return [text[:n], text[n:]] if 0 < n < len(text) else [text]
    if kind == "captions":
        ext = next((e for e in IMAGE_EXTS if isinstance(files.get(e), bytes)), None)
        if ext is None:
            raise BadSample("missing_image")
        if caption is None:
            return [ImageSegment(ext, files[ext]), _text(files, "caption").strip()]
        every = captions(files)
        if not 0 <= caption < len(every):
            raise BadSample("no_such_caption", f"caption {caption} of {len(every)}")
        return [ImageSegment(ext, files[ext]), every[caption]]
    if kind == "interleaved":
        raw = files.get(JSON_FIELD)
        if not isinstance(raw, bytes):
            raise BadSample("missing_json")
        try:
            segments = load_json(raw.decode("utf-8"))["segments"]
            assert isinstance(segments, list)
        except Exception:  # noqa: BLE001 - not UTF-8, not JSON, not an object, no list of segments
            raise BadSample("bad_json") from None
        out: list[Segment] = []
        for seg in segments:
            if not isinstance(seg, dict):
                raise BadSample("bad_json")
            if seg.get("text"):
                out.append(str(seg["text"]))
            elif seg.get("image"):
                name = str(seg["image"]).lower()
                data = files.get(name)
                if not isinstance(data, bytes):
                    raise BadSample("missing_image", name)
                out.append(ImageSegment(name, data))
        if not out:
            raise BadSample("empty_document")
        return out
    raise ValueError(f"unknown source kind {kind!r} (expected one of {KINDS})")
