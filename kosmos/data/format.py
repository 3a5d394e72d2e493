"""The shard format, in one torch-free place: what a sample of each source kind holds, how tar members are
named and grouped into samples, and how a sample's files are parsed.

    text         KEY.txt                                   the document (UTF-8)
    captions     KEY.jpg|jpeg|png|webp + KEY.txt            the image and its caption
    interleaved  KEY.json {"segments": [...]} + KEY.imgN.jpg  text and image segments in order

Converters also write `KEY.json` metadata beside text and caption samples. Readers use two of its keys
and ignore the rest:

* text, `"prompt_chars": N` (instruction data, `python -m kosmos.data_tools.text --format instructions`):
  `KEY.txt` is the whole templated text and its first N characters are the prompt, the rest the response. The
  text is tokenized as the two pieces (the tokenizer adds no prefix space, so the pieces decode to the text),
  and a source with `data.<source>.loss: response` puts no loss on the prompt's tokens (`<s>` included).
  Without the key (plain text shards) the sample is one piece, as before.
* captions, `"captions": [...]` (COCO; img2dataset or table sets with a list of captions per image): every
  caption of the image. `KEY.txt` holds the first; `captions(files)` gives `KEY.txt` then the others, each
  once. Which one a visit uses is the source's `caption_choice` (`kosmos.data.streams`).

A member `dir/KEY.EXT` belongs to the sample `dir/KEY` and gives it the field `EXT` (everything after the
first dot of the file name, lowercased: `KEY.img0.jpg` gives `img0.jpg`); consecutive members with the same
key form one sample, as webdataset groups them. Interleaved image names in the JSON are lowercased the same
way before they are looked up.

Used by the training reader (`kosmos.data.shards`, `kosmos.data.samples`), the converters that write shards
and the tools that check them (`kosmos.data_tools`); this module imports nothing heavy.
"""

from __future__ import annotations

import bz2
import contextlib
import io
import lzma
import re
import struct
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from kosmos.config import CAPTION_CHOICES, KINDS, LOSSES  # noqa: F401 - re-exported: the allowed values live in config
from kosmos.data.remote import ShardError
from kosmos.untrusted import load_json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image fields of a caption sample, in the order they are looked for."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""Suffixes of the image files read from folders and paths, by the converters (kosmos.data_tools) and by
evaluation (kosmos.eval): one list, so that no image the converters take is skipped, uncounted, by an
evaluation."""
TEXT_FIELD = "txt"
"""A text sample's document; a caption sample's caption."""
JSON_FIELD = "json"
"""An interleaved sample's document; metadata beside the other kinds."""
IMAGE_FIELD = "jpg"
"""The image of a caption sample as the converters write it."""

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
    """``(key, field)`` of a member name, the field lowercased; None for a name that is no sample member: no
    dot in its file name, or webdataset-internal metadata, whose name's first part is ``__NAME__``
    (``__index__.json``, ``__meta__/x.txt``). Other names starting with ``__`` (``__foo.txt``) are samples,
    as webdataset reads them."""
    m = _MEMBER.match(name)
    if m is None:
        return None
    first = m.group(1).split("/", 1)[0]
    if len(first) >= 4 and first.startswith("__") and first.endswith("__"):
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
    """The tar broke or ended early while this sample was read: members after the break may be missing."""
    unsupported: list[str] = field(default_factory=list)
    """Names of members of this sample the reader cannot read (multi-volume continuations, sparse files
    larger than `MAX_SPARSE`), each counted as ``unsupported_member``: the sample is not whole."""

    @property
    def whole(self) -> bool:
        """Whether the sample has every member the tar gave it: not `cut` and none `unsupported`."""
        return not self.cut and not self.unsupported


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


_REPEATED = ("GNU.sparse.offset", "GNU.sparse.numbytes")


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
            k, v = key.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
            if k in _REPEATED and k in out:  # GNU sparse 0.0: one record per run, kept as a list "a,b,..."
                v = out[k] + "," + v
            out[k] = v
            i += n
    except ValueError:
        raise tarfile.ReadError("bad pax extended header") from None
    return out


class _Member:
    """A regular member of a tar being streamed (`_plain_members`): read its data with `read()` right away,
    or leave it (the reader skips it). A member with ``unsupported`` set (why, e.g. ``"sparse"``) has data
    the reader cannot give as the file's bytes: it must be left, and counted."""

    __slots__ = ("name", "size", "offset_data", "_f", "read_done", "unsupported", "data")

    def __init__(self, f: BinaryIO, name: str, size: int, offset_data: int, unsupported: str = "",
                 data: bytes | None = None):
        self._f, self.name, self.size, self.offset_data, self.read_done = f, name, size, offset_data, False
        self.unsupported = unsupported
        self.data = data
        """The content already read (a sparse file, rebuilt): no byte range of the tar holds it."""

    def read(self) -> bytes:
        self.read_done = True
        return self._f.read(self.size) if self.data is None else self.data


MAX_SPARSE = 1 << 26
"""The largest sparse file rebuilt in memory, 64 MiB (its size is what the header says, not what the tar
holds: a few kB could claim terabytes); a larger one counts as ``unsupported_member``."""


def _numbers(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()] if text.strip() else []
    except ValueError:
        raise tarfile.ReadError(f"bad sparse {what} {text[:40]!r}") from None
    if any(x < 0 for x in out):
        raise tarfile.ReadError(f"bad sparse {what} {text[:40]!r}")
    return out


def _sparse(f: BinaryIO, header: bytes, kind: bytes, pax: dict[str, str],
            size: int) -> tuple[bytes | None, int]:
    """A GNU sparse file's content and how many bytes of sparse map blocks came before its ``size`` bytes of
    data, read from ``f`` just after its header: GNU/oldgnu type ``S`` (map in the header and extension
    blocks), pax 0.0 (``GNU.sparse.offset``/``numbytes`` records), 0.1 (``GNU.sparse.map``) and 1.0 (map
    at the start of the data). For each of the map's (offset, length) runs the data holds the bytes, in
    order; the rest of the file is zeros. After it, ``f`` is at the data's padding. The content is None,
    with ``f`` at the data, for a variant not known or a file larger than `MAX_SPARSE`: the caller skips it
    as unsupported. Raises for a map that does not fit the data (a broken tar)."""
    extra, runs_read = 0, 0
    if kind == b"S":
        entries = [header[386 + 24 * i:410 + 24 * i] for i in range(4)]
        real = _octal(header[483:495], "sparse size")
        ext = header[482]
        while ext:  # more map entries in extension blocks after the header
            block = f.read(_BLOCK)
            if len(block) != _BLOCK:
                raise EOFError("tar cut inside a sparse map")
            entries += [block[24 * i:24 * i + 24] for i in range(21)]
            ext, extra = block[504], extra + _BLOCK
        flat = [_octal(e[k:k + 12], "sparse map") for e in entries if e[0] for k in (0, 12)]
    elif pax.get("GNU.sparse.major") == "1" and pax.get("GNU.sparse.minor") == "0":
        real = _numbers(pax.get("GNU.sparse.realsize", ""), "size")
        if len(real) != 1 or real[0] > MAX_SPARSE:
            return None, 0
        text = b""
        while True:  # "N\n" then N "offset\nlength\n" pairs, padded to whole blocks
            block = f.read(_BLOCK)
            if len(block) != _BLOCK or runs_read + _BLOCK > size:
                raise EOFError("tar cut inside a sparse map")
            text, runs_read = text + block, runs_read + _BLOCK
            lines = text.split(b"\n")
            if lines[0] and len(lines) - 1 >= 1 + 2 * int(lines[0]):
                break
        try:
            n = int(lines[0])
            flat = [int(x) for x in lines[1:1 + 2 * n]]
        except ValueError:
            raise tarfile.ReadError("bad sparse map") from None
        real = real[0]
    elif "GNU.sparse.map" in pax or "GNU.sparse.numblocks" in pax:
        real = _numbers(pax.get("GNU.sparse.size", ""), "size")
        if len(real) != 1:
            return None, 0
        real = real[0]
        if "GNU.sparse.map" in pax:
            flat = _numbers(pax["GNU.sparse.map"], "map")
        else:
            offsets = _numbers(pax.get("GNU.sparse.offset", ""), "map")
            lengths = _numbers(pax.get("GNU.sparse.numbytes", ""), "map")
            if len(offsets) != len(lengths):
                raise tarfile.ReadError("bad sparse map")
            flat = [x for pair in zip(offsets, lengths, strict=True) for x in pair]
    else:
        return None, 0
    if real > MAX_SPARSE:  # (pax 1.0 was checked before its map was read)
        return None, extra
    if len(flat) % 2:
        raise tarfile.ReadError("bad sparse map")
    runs = list(zip(flat[::2], flat[1::2], strict=True))
    end = 0
    for offset, length in runs:
        if offset < end or offset + length > real:
            raise tarfile.ReadError("bad sparse map")
        end = offset + length
    if (mapped := sum(length for _, length in runs)) != size - runs_read:
        raise tarfile.ReadError(f"sparse map of {mapped} bytes for {size - runs_read} bytes of data")
    out = bytearray(real)
    for offset, length in runs:
        chunk = f.read(length)
        if len(chunk) != length:
            raise EOFError("tar cut inside a sparse file")
        out[offset:offset + length] = chunk
    return bytes(out), extra


def _decompressor(magic: bytes):
    if magic.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip: checks the CRC-32 and length at the end
    if magic.startswith(b"BZh"):
        return bz2.BZ2Decompressor()  # checks each block's CRC
    return lzma.LZMADecompressor(lzma.FORMAT_XZ)  # checks each block's check (CRC-64 by default)


_CHUNK = 1 << 16
_ZLIB = type(zlib.decompressobj())


_OUT = 1 << 20
"""The most bytes one decompressor call gives: a small input that inflates hugely (a bomb) comes in pieces."""


def _inflate(f: BinaryIO, limit: int | None = None) -> Iterator[tuple[bytes, bool]]:
    """The decompressed bytes of a gzip/bzip2/xz file read from ``f`` (one stream or several concatenated,
    as ``cat a.gz b.gz`` makes them), as ``(chunk, stream_checked)``: ``stream_checked`` is true on the
    chunk that ends a stream whose check (CRC) matched. Stops after ``limit`` bytes when given. Raises
    EOFError where the file ends inside a stream, and the decompressor's error (zlib.error, OSError,
    lzma.LZMAError) at corrupt data or a wrong check. Trailing zero padding is ignored, and so is other
    data after a complete stream that does not start like one (as gzip -d does)."""
    magic = f.read(6)
    data, d, given = magic, _decompressor(magic), 0
    pending = False  # the decompressor holds output for input it already has
    while True:
        if not data and not pending:
            data = f.read(_CHUNK)
            if not data:
                raise EOFError("compressed stream cut short (no end-of-stream marker)")
        out = d.decompress(data, _OUT)
        # zlib hands back the input it did not use; bz2 and lzma keep it and say whether they need more
        data = d.unused_data if d.eof else getattr(d, "unconsumed_tail", b"")
        pending = len(out) == _OUT if isinstance(d, _ZLIB) else not d.needs_input
        if limit is not None and given + len(out) >= limit:
            yield out[:limit - given], False
            return
        given += len(out)
        if d.eof:
            yield out, True
            rest = data + f.read(max(0, 6 - len(data)))
            if not rest.startswith(_COMPRESSED):  # the end (zero padding, or trailing data tar ignores)
                return
            data, d, pending = rest, _decompressor(rest), False
        elif out:
            yield out, False


def _checked_length(f: BinaryIO) -> tuple[int, Exception | None]:
    """How many decompressed bytes of the compressed file ``f`` can be trusted, and the error that ends the
    rest (None when the whole file is sound). Only data of streams whose check matched is trusted: a
    decompressor gives data before it reaches the check that would reject it, and a corrupt stream can
    look cut: decoding from a changed byte on may run to the end of the file with no error, giving wrong
    bytes (5 of 20,000 four-byte changes of gzip files did, in tests/test_tar_damage.py's corpus, when the
    data of a stream that looked cut was used). Reads ``f`` from where it is to its end."""
    total, checked = 0, 0
    try:
        for chunk, done in _inflate(f):
            total += len(chunk)
            if done:
                checked = total
    except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        what = "cut short" if isinstance(e, EOFError) else "corrupt"
        return checked, EOFError(f"compressed tar {what} ({e}); of its {total} decompressed bytes the "
                                 f"{total - checked} after the last stream whose check matched are not used")
    return total, None


class _Inflated(io.RawIOBase):
    """The first ``limit`` decompressed bytes of a compressed file, as a forward-only stream."""

    def __init__(self, f: BinaryIO, limit: int):
        self.chunks, self.buf, self.pos = _inflate(f, limit), b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            chunk = next(self.chunks, None)
            if chunk is None:
                return 0
            self.buf = chunk[0]
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        self.pos += n
        return n


def _plain_members(f: BinaryIO, seekable: bool) -> Iterator[_Member]:
    """The regular members of an uncompressed tar read from ``f``, front to back: what tarfile's streaming
    mode gives for the formats tar writers produce (ustar, GNU long names, pax ``path``/``size``), at a
    fraction of its cost per header (most of a loader worker's time went into tarfile's header parsing).
    Compressed tars come here decompressed (`iter_tar`). Other members (directories, links, ...) are
    skipped. GNU sparse files (type ``S``, or pax headers with ``GNU.sparse.*`` records: `tar --sparse` in
    any format) are given rebuilt (`_sparse`), under the file's real name (pax 0.1/1.0 store them as
    ``./GNUSparseFile.PID/NAME``); multi-volume continuations (``M``), a sparse file larger than
    `MAX_SPARSE` or of an unknown variant are given with ``unsupported`` set and their data unread: their
    stored bytes are not the file's. Ends quietly at a zero block or
    where the data ends between members, as tarfile does (the caller checks the end-of-archive blocks).
    Raises, as for a broken tar, where tarfile raises (data cut inside a member, an extended header with no
    member after it) and also at a header with a wrong checksum or a malformed pax record: there tarfile
    ends quietly or renames the member, and the rest of the shard was lost uncounted. A seekable ``f`` has
    the members left unread skipped by seeking."""
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
        unsupported = ""
        sparse: bytes | None = None  # a sparse file's content, rebuilt from its data runs
        if kind == b"S" or any(k.startswith("GNU.sparse.") for k in pax):
            sparse, extra = _sparse(f, header, kind, pax, size)
            data_at, pos = data_at + extra, pos + extra
            if sparse is None:
                unsupported = "sparse"
        elif kind == b"M":
            unsupported = "continued from another volume"
        if "GNU.sparse.name" in pax:  # pax sparse 0.1/1.0: "path" is ./GNUSparseFile.PID/NAME
            name = pax["GNU.sparse.name"]
        elif "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            raw, prefix = _cstr(header[:100]), _cstr(header[345:500])
            name = ((prefix + b"/" + raw) if prefix and kind != b"S" else raw).decode(
                "utf-8", "surrogateescape")
        long_name, pax, extended = None, {}, False
        member = None
        if sparse is not None:  # its data runs are read: what is left is the padding
            yield _Member(f, name, len(sparse), data_at, data=sparse)
            if len(f.read(pad)) != pad:
                raise EOFError(f"tar cut inside the padding of {name}")
            continue
        if unsupported or (kind in _REGULAR and not (kind == b"\0" and name.endswith("/"))):
            member = _Member(f, name, size, data_at, unsupported)
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
    A GNU sparse file (`tar --sparse`) is given whole, its holes as zeros. A member the reader cannot read
    (a multi-volume continuation, a sparse file larger than `MAX_SPARSE`) counts ``unsupported_member`` and
    is named in its sample's `TarSample.unsupported`. A tar that breaks (bad header, data cut inside a
    member, corrupt compression) ends early and counts ``broken_shard``; a tar that ends quietly at a
    member boundary without the end-of-archive blocks counts ``truncated_shard``. Either way the last
    sample comes out with ``cut`` set: its members after the break may be missing (`TarSample.whole` is
    false). The exception text of a break is appended to ``errors`` when given.

    A compressed tar is first read through to its end to check it (gzip's CRC-32, bzip2's block CRCs, xz's
    checks), then decompressed again for its members: only data of a stream whose check matched is used,
    so a corrupt or cut compressed tar gives no byte from its damaged stream (for the common single-stream
    ``.tar.gz``: no sample) and counts ``broken_shard``; a decompressor gives data before the check that
    rejects it. Decompressing twice costs CPU, never wrong bytes; a stream that cannot seek is first spooled
    (compressed) to a temporary file.

    With ``read``, fields for which it is false are not read but given as `TarSpan` byte ranges (only for
    an uncompressed tar; a compressed one is read whole). With ``want``, the samples whose index is not
    wanted have no field read (all `TarSpan`s): a resumed reader skips what it already had cheaply. A
    sparse file is always given as bytes (no byte range of the tar holds it).

    A stream that cannot seek (a URL or pipe from `kosmos.data.remote`) is read once, front to back, and
    checked for the end-of-archive blocks at its end. A shard whose read fails for good (`ShardError`, after
    its retries) ends like a broken one but counts the error's reason (``shard_timeout``, ...) instead.
    """
    skipped = skipped if skipped is not None else Counter()
    own = isinstance(source, str | Path)
    f: BinaryIO = open(source, "rb") if own else source  # closed below
    opened = f
    current: TarSample | None = None
    index = -1  # of the current sample
    tail: _Tail | None = None  # counts the bytes of a tar read as a stream, for the end-of-archive check
    spool = None
    damaged: Exception | None = None  # what a compressed tar's check found
    try:
        try:
            seekable = getattr(f, "seekable", lambda: False)()
            if seekable:
                start = f.tell()
                compressed = f.read(6).startswith(_COMPRESSED)
                f.seek(start)
            else:  # a stream (a URL, a pipe): read once, front to back
                # here: a stream that fails at once is counted like one that fails later
                f = io.BufferedReader(f, _CHUNK) if not hasattr(f, "peek") else f
                compressed = f.peek(6)[:6].startswith(_COMPRESSED)
            body: BinaryIO = f
            if compressed:
                if not seekable:
                    spool = tempfile.SpooledTemporaryFile(64 << 20)
                    while chunk := f.read(1 << 20):
                        spool.write(chunk)
                    f, start = spool, 0
                    f.seek(0)
                trusted, damaged = _checked_length(f)
                f.seek(start)
                tail = _Tail(_Inflated(f, trusted))
                body = io.BufferedReader(tail, _CHUNK)
            elif not seekable:
                tail = _Tail(f)
                body = io.BufferedReader(tail, _CHUNK)
            members = _plain_members(body, seekable=tail is None)
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
                    if info.unsupported:
                        skipped["unsupported_member"] += 1
                        current.unsupported.append(f"{info.name} ({info.unsupported})")
                        continue
                    if name in current.files:
                        skipped["duplicate_member"] += 1
                        continue
                    if want is not None and not want(index) and info.data is None:
                        current.files[name] = TarSpan(info.offset_data, info.size)
                        continue
                    if read is not None and not compressed and not read(name) and info.data is None:
                        current.files[name] = TarSpan(info.offset_data, info.size)
                        continue
                    data = info.read()
                    if len(data) != info.size:
                        raise EOFError(f"{info.name}: {len(data)} of {info.size} bytes")
                    current.files[name] = data
            # The member parser stops quietly at a cut that falls on a member boundary (or inside a
            # header); a complete archive ends with zero blocks.
            if tail is not None:
                while body.read(1 << 16):  # the rest: end-of-archive blocks and padding
                    pass
                if isinstance(getattr(source, "error", None), ShardError):  # ended early at a member boundary
                    raise source.error
                if damaged is not None:
                    raise damaged
                ended = tail.n >= 1024 and bytes(tail.last) == bytes(1024)
            else:
                end = f.seek(0, 2)
                ended = end - start >= 1024 and f.seek(end - 1024) is not None and f.read(1024) == bytes(1024)
            if not ended:
                skipped["truncated_shard"] += 1
                if current is not None:  # it may have had more members after the cut
                    current.cut = True
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            failed = getattr(source, "error", None)  # a remote stream's failure: the cause of this break
            why = failed if isinstance(failed, ShardError) else damaged or e
            skipped[why.reason if isinstance(why, ShardError) else "broken_shard"] += 1
            if errors is not None:
                errors.append(f"{type(why).__name__}: {why}")
            if current is not None:
                current.cut = True
        if current is not None:
            yield current
    finally:
        if own:
            opened.close()
        if spool is not None:
            spool.close()


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
