"""Tests of the tokenizer package: build (inputs, sampling, bad input), KosmosTokenizer, the CLI."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile

import pytest

from kosmos.tokenizer import GROUNDING_TOKENS, SPECIAL_TOKENS, TINY_CORPUS, KosmosTokenizer
from kosmos.tokenizer.build import BuildError, Reservoir, build_tokenizer, main, sample_lines

TINY_VOCAB_SIZE = 1000  # what the tiny_tokenizer fixture in conftest.py asks for

ROUND_TRIP = {
    "latin_accents": "Crème brûlée, naïve façade, Ångström, Zażółć gęślą jaźń, Příliš žluťoučký kůň.",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "greek": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "arabic": "ذهبتُ إلى السوق في الصباح واشتريتُ خبزًا طازجًا.",
    "hebrew": "ספר טוב הוא חבר נאמן.",
    "cjk": "今天天气很好。東京は日本の首都です。서울은 한국의 수도입니다.",
    "thai": "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "devanagari": "भारत एक विशाल देश है।",
    "emoji": "Great job 🎉🎉 👩‍💻 🇫🇷 ❤️ 👍🏽",
    "whitespace": "\tleading tab\n\nline  two   has    spaces\r\ntrailing spaces   \n\n\t\t",
    "leading_space": "   starts with spaces",
    "digits": "Call 0800 123 4567 before 23:59, or pay €1,234.56.",
    "markup_text": "a page about <image> tags: <s>, </s>, <pad>, <unk>, </image> <0x41> ▁",
    "unseen": "𓀀𓂀 ꙮ \U0010fffd \ue000 ᚠᛇᚻ ⠓⠑⠇⠇⠕ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b\u00ad",
    "combining": "e\u0301 vs é, ﬁ ligature, Ｆｕｌｌｗｉｄｔｈ, ½ ²",
    "empty": "",
}


# --- KosmosTokenizer --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_is_exact(tiny_tokenizer, name):
    text = ROUND_TRIP[name]
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.unk_id not in ids  # byte fallback: no text ever becomes <unk>


def test_unseen_characters_fall_back_to_bytes(tiny_tokenizer):
    ids = tiny_tokenizer.encode("𓀀")  # U+13000, not in the corpus: its 4 UTF-8 bytes
    assert [tiny_tokenizer.id_to_token(i) for i in ids] == ["<0xF0>", "<0x93>", "<0x80>", "<0x80>"]


def test_size_and_special_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok) == TINY_VOCAB_SIZE == tok.vocab_size
    ids = [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.image_id, tok.image_end_id]
    assert ids == [0, 1, 2, 3, 4, 5]
    for token, i in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tok.token_to_id(token) == i
        assert tok.id_to_token(i) == token
        assert tok.decode([i]) == token  # readable, one id each
    assert tok.grounding_start is None


def test_text_never_produces_special_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    specials = set(tok.special_ids.values())
    for token in SPECIAL_TOKENS:
        ids = tok.encode(token)
        assert len(ids) > 1 and specials.isdisjoint(ids), token  # spelled as ordinary pieces
    text = "caption <image></image> with <s> literal </s> markup"
    assert specials.isdisjoint(tok.encode(text))


def test_image_markers_are_kept_apart_from_image_text(tiny_tokenizer):
    tok = tiny_tokenizer
    literal = tok.encode("see <image> here")
    marked = tok.encode("see ") + [tok.image_id, tok.image_end_id] + tok.encode(" here")
    assert tok.image_id not in literal and marked.count(tok.image_id) == 1
    assert tok.decode(marked) == "see <image></image> here"
    assert tok.decode(marked, skip_special=True) == "see  here"


def test_bos_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    body = tok.encode("a red circle")
    assert tok.encode("a red circle", bos=True, eos=True) == [tok.bos_id, *body, tok.eos_id]
    assert tok.encode("a red circle", eos=True) == [*body, tok.eos_id]
    assert tok.decode([tok.bos_id, *body, tok.eos_id]) == "<s>a red circle</s>"


def test_encoding_is_concatenative(tiny_tokenizer):
    tok = tiny_tokenizer
    a, b = "a blue square", " at the top right\n"
    assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b


def test_learned_pieces_compress_the_training_text(tiny_tokenizer):
    text = "a blue square at the top right"
    assert len(tiny_tokenizer.encode(text)) < len(text) / 2


def test_encode_batch_matches_encode(tiny_tokenizer):
    texts = list(ROUND_TRIP.values())
    assert tiny_tokenizer.encode_batch(texts, bos=True) == [tiny_tokenizer.encode(t, bos=True) for t in texts]
    with pytest.raises(TypeError):
        tiny_tokenizer.encode(["not", "a", "str"])


def test_decode_accepts_tensors_and_rejects_bad_ids(tiny_tokenizer):
    torch = pytest.importorskip("torch")
    ids = tiny_tokenizer.encode("a green star", bos=True)
    assert tiny_tokenizer.decode(torch.tensor(ids)) == "<s>a green star"
    for bad in (TINY_VOCAB_SIZE, -1):
        with pytest.raises(IndexError, match=rf"token id {bad} is not in range\(0, {TINY_VOCAB_SIZE}\)"):
            tiny_tokenizer.decode([5, bad])
    with pytest.raises(KeyError):
        tiny_tokenizer.token_to_id("<no such piece>")


def test_from_dir_and_pickle(tiny_tokenizer):
    loaded = KosmosTokenizer.from_dir(tiny_tokenizer.path)
    text = ROUND_TRIP["cjk"] + ROUND_TRIP["latin_accents"]
    assert loaded.encode(text) == tiny_tokenizer.encode(text)
    clone = pickle.loads(pickle.dumps(tiny_tokenizer))
    assert clone.encode(text) == tiny_tokenizer.encode(text) and len(clone) == len(tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer.build"):
        KosmosTokenizer.from_dir(tiny_tokenizer.path / "missing")


def test_output_folder(tiny_tokenizer):
    out = tiny_tokenizer.path
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["special_tokens"] == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert config["vocab_size"] == config["size"] == TINY_VOCAB_SIZE
    assert config["inputs"][0]["path"] == str(TINY_CORPUS)
    assert config["inputs"][0]["bytes"] == TINY_CORPUS.stat().st_size
    assert config["args"]["character_coverage"] == 0.995
    vocab = (out / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == TINY_VOCAB_SIZE and vocab[4].split("\t")[0] == "<image>"


def test_not_a_kosmos_model(tmp_path):
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        KosmosTokenizer(b"garbage")


# --- reading and sampling the corpus ----------------------------------------------------------


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_reads_every_input_format(tmp_path):
    (tmp_path / "a.txt").write_text("txt one\n\n   \ntxt two\n", encoding="utf-8")
    docs = [{"text": "json one\njson two"}, {"text": "json three", "url": "x"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "gz one"}) + "\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    members = {"k1.txt": b"tar one\ntar two", "k1.json": b'{"lang": "en"}', "k2.txt": b"tar 3"}
    _tar(shards / "000.tar", members)
    (shards / "notes.md").write_text("ignored", encoding="utf-8")

    lines, stats = sample_lines([tmp_path / "a.txt", tmp_path / "b.jsonl", shards], 100, quiet=True)
    assert sorted(lines) == sorted(["txt one", "txt two", "json one", "json two", "json three",
                                    "tar one", "tar two", "tar 3"])
    assert [(s.documents, s.lines) for s in stats] == [(4, 2), (2, 3), (2, 3)]
    assert stats[2].path.endswith("000.tar") and stats[2].bytes > 0

    lines, stats = sample_lines([tmp_path / "c.jsonl.gz"], 100, text_field="body", quiet=True)
    assert lines == ["gz one"]


def test_caption_shards_give_every_caption_of_key_json(tmp_path):
    """A COCO caption sample holds its first caption in KEY.txt and all five in KEY.json's "captions": the
    tokenizer reads each once, as training does (kosmos.data.format.captions)."""
    five = [f"caption {i} of the cat" for i in range(5)]
    _tar(tmp_path / "coco.tar", {"k1.jpg": b"x", "k1.txt": five[0].encode(),
                                 "k1.json": json.dumps({"captions": five}).encode(),
                                 "k2.jpg": b"x", "k2.txt": b"only one", "k2.json": b'{"width": 3}'})
    lines, stats = sample_lines([tmp_path / "coco.tar"], 100, quiet=True)
    assert sorted(lines) == sorted([*five, "only one"])
    assert (stats[0].documents, stats[0].lines) == (2, 6)


def test_bad_lines_are_skipped_counted_and_reported(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "good line"}\nnot json\n{"text": "caf\xe9"}\n{"other": 1}\n[1, 2]\n')
    lines, stats = sample_lines([bad], 100)
    assert lines == ["good line"]
    assert stats[0].skipped == {"not json": 1, "not utf-8": 1, "no text field": 2}
    err = capsys.readouterr().err
    assert "bad.jsonl: skipped 1 not json, 1 not utf-8, 2 no text field" in err


def test_broken_tar_keeps_what_was_read(tmp_path):
    _tar(tmp_path / "s.tar", {f"k{i}.txt": f"document {i} ".encode() * 200 for i in range(20)})
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: len(data) // 2])
    lines, stats = sample_lines([tmp_path / "s.tar"], 100, quiet=True)
    assert 0 < len(lines) < 20
    assert stats[0].skipped == {"broken tar": 1} and "broken tar after" in stats[0].errors[0]


def test_long_lines_are_chunked_not_dropped(tmp_path):
    (tmp_path / "long.txt").write_text("word " * 10_000, encoding="utf-8")
    lines, _ = sample_lines([tmp_path / "long.txt"], 100, quiet=True)
    assert len(lines) > 1 and "".join(lines) == "word " * 10_000
    assert max(len(line.encode()) for line in lines) <= 16384


def _split_lines_before(document: str) -> list[str]:
    """What tokenizer.build cut a document into before issue 22 (quadratic: `line = line[cut:]`), chunks of
    blanks alone left out."""
    from kosmos.tokenizer.build import CHUNK_CHARS

    out = []
    for line in document.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        while len(line) > CHUNK_CHARS:
            cut = line.rfind(" ", CHUNK_CHARS // 2, CHUNK_CHARS)
            cut = cut if cut > 0 else CHUNK_CHARS
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return [c for c in out if c.strip()]


def test_long_lines_are_cut_as_before_whole_or_streamed_in_pieces():
    import random

    from kosmos.tokenizer.build import _split_lines

    rng = random.Random(0)
    for _ in range(30):
        parts = []
        for _ in range(rng.randrange(1, 6)):
            kind = rng.choice(["words", "nospace", "blank", "crlf", "short"])
            n = rng.randrange(1, 20_000)
            parts.append({"words": "word " * (n // 5), "nospace": "x" * n, "blank": " " * n,
                          "crlf": "ab " * (n // 3) + "\r\r", "short": "a line"}[kind])
        doc = "\n".join(parts) + rng.choice(["", "\n", "\r\n"])
        want = _split_lines_before(doc)
        assert list(_split_lines(doc)) == want
        cuts = sorted(rng.sample(range(len(doc)), min(len(doc), rng.randrange(1, 40))))
        pieces = [doc[a:b] for a, b in zip([0, *cuts], [*cuts, len(doc)], strict=True)]
        assert list(_split_lines(iter(pieces))) == want


def test_a_corpus_that_is_one_long_line_is_read_in_bounded_memory(tmp_path):
    """A 280 MB corpus of one line did not finish in 600 s at 1.4 GB: the line was read whole and cut with
    `line = line[cut:]`, copying the rest at every cut. Now it is read in pieces of READ_PIECE bytes and cut
    where it is: what Python allocates while reading stays near a few pieces, whatever the line's length
    (speed: bench/tokenizer.py)."""
    import tracemalloc

    from kosmos.tokenizer import build

    CHUNK_CHARS, READ_PIECE = build.CHUNK_CHARS, getattr(build, "READ_PIECE", 1 << 20)
    line = "word " * (12 * READ_PIECE // 5)  # 12 MB, no newline
    (tmp_path / "one.txt").write_text(line, encoding="utf-8")
    tracemalloc.start()
    try:
        lines, stats = sample_lines([tmp_path / "one.txt"], 10, quiet=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats[0].documents == 1 and stats[0].lines == len(_split_lines_before(line))
    assert all(0 < len(c) <= CHUNK_CHARS for c in lines)
    assert peak < 8 * READ_PIECE, f"{peak / 1e6:.1f} MB allocated to read a {len(line) / 1e6:.0f} MB line"
    # a long line among short ones, gzipped, one not UTF-8 (skipped, counted): the next lines are intact
    long = "abc " * (READ_PIECE // 2)
    data = f"first\n{long}\n".encode() + b"bad \xff " + long.encode() + b"\nlast\n"
    with gzip.open(tmp_path / "mix.txt.gz", "wb") as f:
        f.write(data)
    lines, stats = sample_lines([tmp_path / "mix.txt.gz"], 10_000, quiet=True)
    assert lines == ["first", *_split_lines_before(long), "last"]
    assert stats[0].documents == 4 and stats[0].skipped == {"not utf-8": 1}


def test_reservoir_sample_is_bounded_uniform_and_seeded():
    def sample(seed, size=100, n=10_000):
        r = Reservoir(size, seed)
        for i in range(n):
            r.add(str(i))
        return r

    r = sample(0)
    assert len(r.items) == 100 and r.seen == 10_000 and len(set(r.items)) == 100
    assert sample(0).items == r.items and sample(1).items != r.items
    # Uniform: the sample's mean index is near the stream's (4999.5); a prefix-only sample fails.
    means = [sum(map(int, sample(s).items)) / 100 for s in range(20)]
    assert 4000 < sum(means) / len(means) < 6000
    assert sample(0, size=100, n=50).items == [str(i) for i in range(50)]


def test_sampling_caps_the_training_lines(tmp_path):
    lines, stats = sample_lines([TINY_CORPUS], 500, seed=3, quiet=True)
    assert len(lines) == 500 and stats[0].lines > 3000
    assert set(lines) <= set(TINY_CORPUS.read_text(encoding="utf-8").splitlines())


# --- building: options and bad input ----------------------------------------------------------


def test_bpe_with_grounding_tokens(tmp_path):
    tok = build_tokenizer([TINY_CORPUS], tmp_path, 500, model_type="bpe", character_coverage=0.98,
                          grounding=True, quiet=True)
    assert tok.vocab_size == 500 and len(tok) == 500 + len(GROUNDING_TOKENS) == 1530
    assert tok.grounding_start == 500 == tok.token_to_id("<grounding>")
    assert tok.token_to_id("<delimiter_of_multi_objects/>") == 505
    assert tok.token_to_id("<patch_index_0000>") == 506
    assert tok.token_to_id("<patch_index_1023>") == 1529
    assert tok.decode([tok.token_to_id("<phrase>")]) == "<phrase>"
    text = "<grounding><phrase>a red circle</phrase><object><patch_index_0042></object>"
    ids = tok.encode(text)
    assert max(ids) < 500 and tok.decode(ids) == text  # text never yields location tokens
    assert KosmosTokenizer.from_dir(tmp_path).grounding_start == 500
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["grounding"]["first_id"] == 500


def test_grounding_tokens_start_exactly_at_vocab_size(tmp_path):
    """The rule behind the paper layout (64007 base ids, <grounding> at 64007), checked at sizes
    the tiny corpus supports; training 64007 pieces needs a large corpus."""
    for size in (300, 400):
        tok = build_tokenizer([TINY_CORPUS], tmp_path / str(size), size, model_type="bpe",
                              character_coverage=0.98, grounding=True, quiet=True)
        assert tok.token_to_id("<grounding>") == size
        assert len(tok) == size + 1030


def test_vocab_too_large_for_the_corpus_says_how_large_it_may_be(tmp_path):
    with pytest.raises(BuildError, match=r"--vocab-size 64007 is too large .* at most \d+") as e:
        build_tokenizer([TINY_CORPUS], tmp_path, 64007, quiet=True)
    assert "\n" not in str(e.value)
    most = int(str(e.value).split("at most ")[1].split(";")[0])
    assert len(build_tokenizer([TINY_CORPUS], tmp_path, most, quiet=True)) == most


@pytest.mark.parametrize(
    ("make", "vocab", "message"),
    [
        (lambda d: d / "missing.txt", 500, "input not found: .*missing.txt"),
        (lambda d: (d / "e.txt").write_text("\n \n") and d / "e.txt", 500, "no text in the inputs: .*e.txt"),
        (lambda d: (d / "x.bin").write_bytes(b"\0") and d / "x.bin", 500, "unsupported input .*x.bin"),
        (lambda d: (d / "l.txt").write_bytes(b"\xff\xfe\xfa\n") and d / "l.txt", 500,
         r"no text in the inputs: .*l.txt \(1 not utf-8\)"),
        (lambda d: (d / "bad.jsonl.gz").write_bytes(b"not gzip") and d / "bad.jsonl.gz", 500,
         r"no text in the inputs: .*bad.jsonl.gz \(1 corrupt file\)"),
        (lambda d: (d / "empty").mkdir() or d / "empty", 500, "no input files .* under .*empty"),
        (lambda d: TINY_CORPUS, 100, "--vocab-size 100 is too small: it must be at least 263"),
        (lambda d: TINY_CORPUS, 300, "--vocab-size 300 is too small: the corpus needs \\d+ ids"),
        (lambda d: TINY_CORPUS, 500, "--character-coverage must be in"),
    ],
    ids=["missing", "empty", "unsupported", "not-utf8", "bad-gzip", "empty-folder", "tiny-vocab",
         "required-chars", "coverage"],
)
def test_bad_input_is_one_clear_line(tmp_path, make, vocab, message):
    path = make(tmp_path)
    coverage = 0.5 if "coverage" in message else 1.0
    with pytest.raises(BuildError, match=message) as e:
        build_tokenizer([path], tmp_path / "out", vocab, character_coverage=coverage, quiet=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "tokenizer.model").exists()


# --- command line -----------------------------------------------------------------------------


def test_cli_builds_a_tokenizer(tmp_path, capfd):
    out = tmp_path / "tok"
    argv = ["--input", str(TINY_CORPUS), "--vocab-size", "600", "--output", str(out),
            "--character-coverage", "0.99", "--model-type", "unigram", "--sample-sentences", "2000"]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "wrote" in err and "trainer_interface" not in err  # SentencePiece's own log is silenced
    tok = KosmosTokenizer.from_dir(out)
    assert len(tok) == 600 and tok.config["corpus"]["sampled_lines"] == 2000


def test_cli_error_is_one_line_without_sentencepiece_trace(tmp_path, capfd):
    assert main(["--input", str(TINY_CORPUS), "--vocab-size", "64007", "--output", str(tmp_path)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tokenizer.build: error: --vocab-size 64007 is too large")
    assert not any(".cc(" in line or "INTERNAL" in line for line in err)


def test_cli_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--input", "--vocab-size", "--model-type", "--character-coverage", "--sample-sentences",
                   "--text-field", "--grounding", "--output"):
        assert option in out


def test_training_shows_a_heartbeat_on_a_terminal_and_nothing_when_quiet(tmp_path, monkeypatch):
    """SentencePiece trains in C++ with its log kept quiet: on a terminal a line every few seconds says the
    build is still training (kosmos.progress.heartbeat), around the start and the elapsed-time lines; none
    with --quiet. (The training is made to last a moment: the tiny corpus trains in a blink.)"""
    import sys
    import time

    import kosmos.progress
    import kosmos.tokenizer.build as build
    from tests.helpers import Terminal

    real = build.train_sentencepiece

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "train_sentencepiece", slow)
    monkeypatch.setattr(kosmos.progress, "HEARTBEAT_EVERY", 0.02)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    build_tokenizer([TINY_CORPUS], tmp_path / "a", 300, model_type="bpe", character_coverage=0.98)
    out = term.getvalue()
    assert "tokenizer.build: training a bpe model" in out and "tokenizer.build: training ... 0 s" in out
    assert "trained in" in out and "reading corpus" in out
    term.seek(0), term.truncate()
    build_tokenizer([TINY_CORPUS], tmp_path / "b", 300, model_type="bpe", character_coverage=0.98, quiet=True)
    assert term.getvalue() == ""
