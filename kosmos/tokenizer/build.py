"""Train the project's SentencePiece tokenizer on a corpus: ``python -m kosmos.tokenizer.build``.

    python -m kosmos.tokenizer.build --input corpus/ more.jsonl.gz --vocab-size 64007 --output tok/

Inputs are ``.txt`` (one line per sentence), ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line,
its text field a document), webdataset shards ``.tar`` (each sample's ``KEY.txt`` a document, with every
caption of a caption sample's ``KEY.json`` ``"captions"`` list (COCO's five), or for interleaved shards the
text segments of its ``KEY.json``; members grouped as ``kosmos.data.format`` does)
and folders of these, searched recursively. An input may also be a URL (``https://``, ``s3://``, ...; brace
patterns expand) or ``pipe:COMMAND`` naming its file (``pipe:aws s3 cp s3://b/corpus.jsonl.gz -``), streamed
as training reads shards (``kosmos.data.remote``). The inputs are streamed once: every non-empty line is
offered to a reservoir sample of ``--sample-sentences`` lines (seeded), so a corpus larger than
memory is sampled, never loaded whole. Lines that are not UTF-8 and jsonl lines that are not JSON
are skipped, counted and reported; a ``.gz`` that is cut short or corrupt keeps the documents before
the damage and is reported too.

The output folder gets ``tokenizer.model``, ``tokenizer.vocab`` (piece and score per line) and
``tokenizer_config.json`` (special ids, the arguments, the inputs with their sizes and skips).
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import io
import itertools
import json
import os
import random
import re
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from kosmos.data.format import JSON_FIELD, TEXT_FIELD, BadSample, captions, iter_tar
from kosmos.data.remote import PIPE, is_remote, list_many, open_shard, shard_name
from kosmos.errors import command_name
from kosmos.progress import bar as progress_bar
from kosmos.progress import heartbeat
from kosmos.tokenizer.tokenizer import (
    CONFIG_FILE,
    GROUNDING_TOKENS,
    MODEL_FILE,
    SPECIAL_TOKENS,
    VOCAB_FILE,
    KosmosTokenizer,
)
from kosmos.untrusted import load_json

PAPER_VOCAB_SIZE = 64007
N_BYTE_PIECES = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + N_BYTE_PIECES + 1
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".tar", ".tar.gz", ".tgz")
# SentencePiece silently drops training lines longer than max_sentence_length bytes; longer lines
# are cut into chunks of at most CHUNK_CHARS characters (<= 4 bytes each) so none is lost.
MAX_SENTENCE_BYTES = 16384
CHUNK_CHARS = MAX_SENTENCE_BYTES // 4
READ_PIECE = 1 << 20
"""A ``.txt`` input is read at most this many bytes at a time: a longer line (a corpus that is one long line)
is decoded and cut into chunks piece by piece as it streams, never held whole."""


class BuildError(ValueError):
    """A problem with the inputs or arguments, with a one-line message naming the cause."""


@dataclass
class InputStats:
    """What was read from one input file."""

    path: str
    bytes: int
    """Size on disk (compressed size for .gz); for a remote input, the bytes read."""
    documents: int = 0
    """Documents read: jsonl objects, tar KEY.txt members, lines of a .txt."""
    lines: int = 0
    """Non-blank lines offered to the sample (long lines count once per chunk)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason ("not utf-8", "not json", "no text field", "no text member", "broken tar", "truncated file",
    "corrupt file") -> count."""
    errors: list[str] = field(default_factory=list)
    """Details of read errors (what broke a tar)."""

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


# --- finding and reading inputs -------------------------------------------------------------


def _has_suffix(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def _input_name(path: str | Path) -> str:
    """The file name an input's format is told by: a path's or URL's; for ``pipe:COMMAND`` the first word of
    the command with a supported suffix (``pipe:aws s3 cp s3://b/corpus.jsonl.gz -``)."""
    spec = str(path)
    if spec.startswith(PIPE):
        return next((shard_name(w) for w in spec[len(PIPE):].split() if shard_name(w).endswith(SUFFIXES)), "")
    return shard_name(spec) if is_remote(spec) else Path(spec).name


def _remote_inputs(spec: str) -> list[str]:
    """The inputs one remote spec names (`kosmos.data.remote`): brace patterns expanded, globs and folders
    of listable protocols listed (folders: their ``*.tar``); HTTP URLs and pipes are taken as named."""
    from braceexpand import braceexpand

    items = list(braceexpand(spec))
    try:
        listed = list_many(items)
    except ValueError as e:
        raise BuildError(str(e)) from None
    out = []
    for item, found in zip(items, listed, strict=True):
        if not found:
            raise BuildError(f"input not found: {item}")
        for f in found:
            if not _input_name(f).endswith(SUFFIXES):
                raise BuildError(f"unsupported input {f}: expected one of {', '.join(SUFFIXES)} (a pipe: "
                                 "names its file in the command)")
        out += found
    return out


def find_inputs(paths: Sequence[str | Path]) -> list[Path | str]:
    """Expand folders (recursively, sorted) into the supported files; check every path exists. Remote inputs
    (URLs, ``pipe:COMMAND``) are kept as strings, see `_remote_inputs`."""
    files: list[Path | str] = []
    for spec in paths:
        if is_remote(str(spec)):
            files += _remote_inputs(str(spec))
            continue
        p = Path(spec)
        if not p.exists():
            raise BuildError(f"input not found: {p}")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _has_suffix(f))
            if not found:
                raise BuildError(f"no input files ({', '.join(SUFFIXES)}) under {p}")
            files += found
        elif _has_suffix(p):
            files.append(p)
        else:
            raise BuildError(f"unsupported input {p}: expected one of {', '.join(SUFFIXES)} or a folder")
    return files


def _decode(raw: bytes, stats: InputStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("not utf-8")
        return None


def _read_documents(
    path: Path | str, stats: InputStats, text_field: str, on_progress: Callable[[int], None]
) -> Iterator[str]:
    """Yield the documents of one input file, counting skips in ``stats``.

    ``on_progress(n)`` is called with the bytes of the file (compressed bytes for .gz) consumed
    since the last call. A remote input (a URL or ``pipe:``, streamed with retries) that fails for good keeps
    the documents read before and is counted by the failure's reason.
    """
    name = _input_name(path)
    with open_shard(str(path)) as raw:
        last = 0

        def progress() -> None:
            nonlocal last
            pos = raw.tell()
            on_progress(pos - last)
            last = pos

        if name.endswith((".tar", ".tar.gz", ".tgz")):
            broken: Counter = Counter()
            errors: list[str] = []
            for sample in iter_tar(raw, broken, read=lambda f: f in (TEXT_FIELD, JSON_FIELD), errors=errors):
                data = sample.files.get(TEXT_FIELD)
                if isinstance(data, bytes):
                    text = _decode(data, stats)
                    if text is not None and isinstance(sample.files.get(JSON_FIELD), bytes):
                        text = "\n".join([text, *_more_captions(sample.files)])
                elif isinstance(sample.files.get(JSON_FIELD), bytes):  # an interleaved document
                    text = _segments_text(sample.files[JSON_FIELD], stats)
                else:
                    text = None
                    if not sample.cut:  # a sample cut by a broken tar is counted as "broken tar"
                        stats.skip("no text member")
                if text is not None:
                    yield text
                progress()
            if broken["broken_shard"]:  # the documents read before the damage are kept
                stats.skip("broken tar")
                stats.errors.append(f"broken tar after {stats.documents} documents: {'; '.join(errors)}")
        else:
            stream = gzip.open(raw) if name.endswith(".gz") else raw
            jsonl = name.endswith((".jsonl", ".jsonl.gz"))
            try:
                if jsonl:
                    yield from _jsonl_texts(stream, stats, text_field, progress)
                else:  # a line is a document, read in bounded pieces
                    yield from _txt_lines(stream, stats, progress)
            except (OSError, EOFError, zlib.error) as e:  # the documents read before the damage are kept
                what = "truncated file" if isinstance(e, EOFError) else "corrupt file"
                if getattr(raw, "error", None) is None:  # else counted below, by its cause
                    stats.skip(what)
                    stats.errors.append(f"{what} after {stats.documents} documents: {type(e).__name__}: {e}")
        progress()
        if (err := getattr(raw, "error", None)) is not None:
            stats.skip(err.reason)
            stats.errors.append(f"{err.reason} after {stats.documents} documents: {err}")
        if is_remote(str(path)):
            stats.bytes = raw.tell()


def _more_captions(files: dict) -> list[str]:
    """The captions of a caption sample beyond its ``KEY.txt`` (the first): the rest of ``KEY.json``'s
    ``"captions"`` list (COCO's five), as training reads them (``kosmos.data.format.captions``); none for a
    text sample."""
    try:
        return captions(files)[1:]
    except BadSample:
        return []


def _segments_text(raw: bytes, stats: InputStats) -> str | None:
    """The text of an interleaved sample's ``KEY.json`` (``{"segments": [{"text": ...}, {"image": ...}]}``,
    see ``kosmos.data.format``): its text segments, one per line; None (counted) when it holds none."""
    text = _decode(raw, stats)
    if text is None:
        return None
    try:
        segments = load_json(text).get("segments")
    except (json.JSONDecodeError, AttributeError):
        segments = None
    if not isinstance(segments, list):
        stats.skip("no text member")
        return None
    texts = [s["text"] for s in segments if isinstance(s, dict) and isinstance(s.get("text"), str)]
    if not texts:
        stats.skip("no text segment")
        return None
    return "\n".join(texts)


def _jsonl_texts(stream: BinaryIO, stats: InputStats, text_field: str,
                 progress: Callable[[], None]) -> Iterator[str]:
    """The `text_field` of each JSON object of a jsonl input (one a line); other lines skipped and counted."""
    for n, line in enumerate(stream):
        if n % 4096 == 0:
            progress()
        text = _decode(line, stats)
        if text is None or not text.strip():
            continue
        try:
            obj = load_json(text)
        except json.JSONDecodeError:
            stats.skip("not json")
            continue
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            stats.skip("no text field")
            continue
        yield text


def _txt_lines(stream: BinaryIO, stats: InputStats,
               progress: Callable[[], None]) -> Iterator[str | Iterator[str]]:
    """The lines of a ``.txt`` input (each a document), read at most READ_PIECE bytes at a time: a line that
    fits is one string, a longer one an iterator over its decoded pieces (``_long_line``), drained here if the
    reader leaves it, so that the next line starts where it ends. A line that is not UTF-8 is skipped and
    counted (the chunks of a long one before the bad byte are kept); a read error is raised here, after the
    pieces read before it."""
    for n in itertools.count():
        if n % 4096 == 0:
            progress()
        raw = stream.readline(READ_PIECE)
        if not raw:
            return
        if len(raw) < READ_PIECE or raw.endswith(b"\n"):
            text = _decode(raw, stats)
            if text is not None:
                yield text
            continue
        error: list[BaseException] = []
        pieces = _long_line(stream, raw, stats, error, progress)
        yield pieces
        for _ in pieces:  # what the reader did not take
            pass
        if error:
            raise error[0]


def _long_line(stream: BinaryIO, raw: bytes, stats: InputStats, error: list[BaseException],
               progress: Callable[[], None]) -> Iterator[str]:
    """The rest of a line longer than READ_PIECE bytes, whose first piece is `raw`, decoded piece by piece (a
    character cut between two pieces is completed by the next). A read error ends it and goes into `error`,
    for `_txt_lines` to raise where its reader expects it."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        while True:
            end = len(raw) < READ_PIECE or raw.endswith(b"\n")
            try:
                text = decoder.decode(raw, final=end)
            except UnicodeDecodeError:
                stats.skip("not utf-8")
                while not end:  # skip the rest of the line
                    raw = stream.readline(READ_PIECE)
                    end = len(raw) < READ_PIECE or raw.endswith(b"\n")
                return
            yield text
            if end:
                return
            progress()
            raw = stream.readline(READ_PIECE)
    except (OSError, EOFError, zlib.error) as e:
        error.append(e)


def _split_lines(document: str | Iterable[str]) -> Iterator[str]:
    """The non-blank lines of a document (a string, or its pieces in turn: `_txt_lines`), long ones cut into
    chunks SentencePiece accepts (at most CHUNK_CHARS characters, at a space in the second half of that where
    there is one). Linear in the length of the document: a line is cut where it is, never copied but for the
    chunks and the unfinished end of a piece (under CHUNK_CHARS), so a corpus that is one 280 MB line streams
    in bounded memory. A chunk of blanks alone is left out, as a blank line is."""
    rest = ""  # the unfinished line of the pieces so far
    for piece in [document] if isinstance(document, str) else document:
        lines = piece.split("\n")
        lines[0] = rest + lines[0]
        rest = lines.pop()
        for line in lines:
            yield from _chunks(line, final=True)
        if len(rest) > CHUNK_CHARS:
            done = yield from _chunks(rest, final=False)
            rest = rest[done:]
    if rest:
        yield from _chunks(rest, final=True)


def _chunks(line: str, final: bool) -> Generator[str, None, int]:
    """The non-blank chunks of `line` (its trailing carriage returns left out), cut as `_split_lines` says;
    returns where the chunks end. Not `final` (more of the line is still to come), only what is surely a
    whole chunk is given: while more than CHUNK_CHARS characters are left."""
    end = len(line)
    while end and line[end - 1] == "\r":
        end -= 1
    start = 0
    while end - start > CHUNK_CHARS:
        cut = line.rfind(" ", start + CHUNK_CHARS // 2, start + CHUNK_CHARS)
        cut = cut if cut >= 0 else start + CHUNK_CHARS
        if not line[start:cut].isspace():
            yield line[start:cut]
        start = cut
    if final and start < end and not line[start:end].isspace():
        yield line[start:end]
    return start


class Reservoir:
    """A uniform random sample of at most ``size`` items from a stream (Algorithm R)."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seen = 0
        self.items: list[str] = []
        self._rng = random.Random(seed)

    def add(self, item: str) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self._rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = item


def sample_lines(
    inputs: Sequence[str | Path],
    sample_sentences: int = 2_000_000,
    *,
    text_field: str = "text",
    seed: int = 0,
    quiet: bool = False,
) -> tuple[list[str], list[InputStats]]:
    """Stream every input once and return a seeded uniform sample of its lines, and per-file stats.

    Raises BuildError for a missing or unsupported path, an unreadable file, or no text at all.
    """
    files = find_inputs(inputs)
    stats = [InputStats(path=str(f), bytes=0 if is_remote(str(f)) else f.stat().st_size) for f in files]
    reservoir = Reservoir(sample_sentences, seed)
    with progress_bar(total=sum(s.bytes for s in stats), unit="B", unit_scale=True, desc="reading corpus",
                      enabled=not quiet) as bar:
        for f, st in zip(files, stats, strict=True):
            for doc in _read_documents(f, st, text_field, bar.update):
                st.documents += 1
                for line in _split_lines(doc):
                    st.lines += 1
                    reservoir.add(line)

    for st in stats:
        if st.skipped and not quiet:
            reasons = ", ".join(f"{n} {why}" for why, n in st.skipped.items())
            details = f" ({'; '.join(st.errors)})" if st.errors else ""
            print(f"tokenizer.build: {st.path}: skipped {reasons}{details}", file=sys.stderr)
    if not reservoir.items:
        why = [f"{st.path} ({', '.join(f'{n} {r}' for r, n in st.skipped.items())})" if st.skipped
               else st.path for st in stats]
        raise BuildError(f"no text in the inputs: {'; '.join(why)}")
    return reservoir.items, stats


# --- training -------------------------------------------------------------------------------


@contextmanager
def _stderr_to(log: io.IOBase) -> Iterator[None]:
    """Send file descriptor 2 (where SentencePiece's C++ code logs) to ``log`` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(log.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _train_error(message: str, vocab_size: int, n_lines: int, character_coverage: float) -> BuildError:
    """Turn SentencePiece's error into a one-line message that says what to change."""
    if m := re.search(r"Please set it to a value <= (\d+)", message):
        return BuildError(
            f"--vocab-size {vocab_size} is too large for this corpus ({n_lines} sampled lines): "
            f"it supports at most {m[1]}; use a smaller vocabulary or more text"
        )
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return BuildError(
            f"--vocab-size {vocab_size} is too small: the corpus needs {m[1]} ids for its characters "
            f"at --character-coverage {character_coverage}, specials and byte pieces included; "
            "raise --vocab-size or lower --character-coverage"
        )
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    detail = first.split("] ", 1)[1] if "] " in first else first  # drop "INTERNAL: src/x.cc(94) [...]"
    return BuildError(f"SentencePiece training failed: {detail}")


def _add_grounding_tokens(proto: bytes) -> bytes:
    """Append KOSMOS-2's location tokens to a model as control symbols (ids after the base vocab)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # protobuf missing
        raise BuildError(f"--grounding needs the protobuf package ({e})") from None
    model = pb.ModelProto()
    model.ParseFromString(proto)
    for token in GROUNDING_TOKENS:
        model.pieces.add(piece=token, score=0.0, type=pb.ModelProto.SentencePiece.CONTROL)
    return model.SerializeToString()


def train_sentencepiece(
    lines: Sequence[str],
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    seed: int = 0,
    num_threads: int | None = None,
) -> bytes:
    """Train on ``lines`` and return the serialized model; SentencePiece's log is kept quiet.

    The options make the round trip exact (no normalisation, whitespace kept, no dummy prefix),
    give the special tokens ids 0-5 and spell unknown characters as bytes.
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    options = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=SPECIAL_TOKENS[0], unk_piece=SPECIAL_TOKENS[1],
        bos_piece=SPECIAL_TOKENS[2], eos_piece=SPECIAL_TOKENS[3],
        control_symbols=list(SPECIAL_TOKENS[4:]),
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=MAX_SENTENCE_BYTES,
        input_sentence_size=0,  # sampling is done by the reservoir already
        shuffle_input_sentence=True,
        hard_vocab_limit=True,
        num_threads=num_threads or os.cpu_count() or 1,
    )
    with tempfile.TemporaryFile() as log:
        try:
            with _stderr_to(log):
                spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
        except (RuntimeError, OSError) as e:
            raise _train_error(str(e), vocab_size, len(lines), character_coverage) from None
    return model.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def build_tokenizer(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    vocab_size: int = PAPER_VOCAB_SIZE,
    *,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    sample_sentences: int = 2_000_000,
    text_field: str = "text",
    grounding: bool = False,
    seed: int = 0,
    num_threads: int | None = None,
    quiet: bool = False,
) -> KosmosTokenizer:
    """Train a tokenizer on ``inputs``, write it to ``output_dir`` and return it loaded.

    See ``python -m kosmos.tokenizer.build --help`` for the arguments. Raises BuildError, with a
    one-line message, for bad arguments or inputs.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise BuildError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise BuildError(
            f"--vocab-size {vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
            f"({len(SPECIAL_TOKENS)} special tokens + {N_BYTE_PIECES} byte pieces + 1)"
        )
    if not 0.98 <= character_coverage <= 1.0:  # SentencePiece's own bounds
        raise BuildError(f"--character-coverage must be in [0.98, 1], got {character_coverage}")
    if sample_sentences < 1:
        raise BuildError(f"--sample-sentences must be positive, got {sample_sentences}")
    if not inputs:
        raise BuildError("no inputs given")

    lines, stats = sample_lines(inputs, sample_sentences, text_field=text_field, seed=seed, quiet=quiet)
    n_lines = sum(s.lines for s in stats)
    if not quiet:
        print(f"tokenizer.build: training a {model_type} model of {vocab_size} pieces on {len(lines)} "
              f"of {n_lines} lines ...", file=sys.stderr)
    start = time.perf_counter()
    with heartbeat("tokenizer.build: training", enabled=False if quiet else None):  # C++: no loop for a bar
        proto = train_sentencepiece(lines, vocab_size, model_type=model_type,
                                    character_coverage=character_coverage, seed=seed, num_threads=num_threads)
    train_seconds = time.perf_counter() - start
    if grounding:
        proto = _add_grounding_tokens(proto)
    tok = KosmosTokenizer(proto)  # checks the special ids before anything is written

    config = {
        "tokenizer_class": "KosmosTokenizer",
        "vocab_size": vocab_size,
        "size": len(tok),
        "special_tokens": {t: tok.special_ids[t] for t in SPECIAL_TOKENS},
        "grounding": {"first_id": tok.grounding_start, "count": len(GROUNDING_TOKENS)} if grounding else None,
        "args": {
            "vocab_size": vocab_size, "model_type": model_type, "character_coverage": character_coverage,
            "sample_sentences": sample_sentences, "text_field": text_field, "grounding": grounding,
            "seed": seed,
        },
        "inputs": [asdict(s) for s in stats],
        "corpus": {
            "bytes": sum(s.bytes for s in stats), "documents": sum(s.documents for s in stats),
            "lines": n_lines, "sampled_lines": len(lines),
            "skipped": dict(sum((Counter(s.skipped) for s in stats), Counter())),
        },
        "normalization": "identity (no NFKC, whitespace kept, no dummy prefix), byte fallback, split digits",
        "sentencepiece_version": spm.__version__,
        "train_seconds": round(train_seconds, 3),
    }

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = "".join(f"{tok.id_to_token(i)}\t{tok._sp.get_score(i):g}\n" for i in range(len(tok)))
    _write_atomic(out / MODEL_FILE, proto)
    _write_atomic(out / VOCAB_FILE, vocab.encode("utf-8"))
    config_text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    _write_atomic(out / CONFIG_FILE, config_text.encode("utf-8"))
    if not quiet:
        print(f"tokenizer.build: wrote {out}/{{{MODEL_FILE},{VOCAB_FILE},{CONFIG_FILE}}}: {len(tok)} ids "
              f"(trained in {train_seconds:.1f} s)", file=sys.stderr)
    return KosmosTokenizer.from_dir(out)


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=command_name("kosmos.tokenizer.build"),
        description="Train a SentencePiece tokenizer with the KOSMOS special tokens "
        "(<pad> 0, <unk> 1, <s> 2, </s> 3, <image> 4, </image> 5) on your corpus.",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="corpus files (.txt one sentence per line; .jsonl/.jsonl.gz one JSON object "
                        "per line; .tar webdataset shards: KEY.txt documents, or the text segments of "
                        "interleaved KEY.json) or folders of them")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for tokenizer.model, tokenizer.vocab and tokenizer_config.json")
    parser.add_argument("--vocab-size", type=int, default=PAPER_VOCAB_SIZE,
                        help="ids in the vocabulary, the special tokens and 256 byte pieces included "
                        "(default %(default)s, as in KOSMOS-1)")
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram",
                        help="SentencePiece algorithm (default %(default)s)")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of character occurrences that get their own piece; rarer characters "
                        "are spelled as UTF-8 byte pieces; 0.98 to 1 (default %(default)s)")
    parser.add_argument("--sample-sentences", type=int, default=2_000_000, metavar="N",
                        help="train on a uniform random sample of at most N lines of the corpus "
                        "(default %(default)s; bounds memory: the corpus is streamed, never loaded whole)")
    parser.add_argument("--text-field", default="text",
                        help="the field of each jsonl object that holds the document text "
                             "(default %(default)s)")
    parser.add_argument("--grounding", action="store_true",
                        help="append KOSMOS-2's 1030 location tokens (<grounding>, <phrase>, ..., "
                        "<patch_index_1023>) after the vocabulary, starting at id --vocab-size")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the line sample and of training (default %(default)s)")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="training threads (default: 0, all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 2 bad input or arguments)."""
    args = parse_args(argv)
    try:
        build_tokenizer(
            args.input, args.output, args.vocab_size, model_type=args.model_type,
            character_coverage=args.character_coverage, sample_sentences=args.sample_sentences,
            text_field=args.text_field, grounding=args.grounding, seed=args.seed,
            num_threads=args.num_threads, quiet=args.quiet,
        )
    except BuildError as e:
        print(f"tokenizer.build: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
