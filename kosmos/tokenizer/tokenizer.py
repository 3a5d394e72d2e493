"""KosmosTokenizer: the project's SentencePiece tokenizer with KOSMOS special tokens.

Special tokens and how they stay apart from text
------------------------------------------------
The first ids are fixed: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, ``<image>`` 4,
``</image>`` 5 (then the 256 byte pieces ``<0x00>`` ... ``<0xFF>``, then the learned pieces).
All of them except ``<unk>`` are SentencePiece *control* symbols: ``encode`` never produces a control
id from text, so a document that literally contains the string "<image>" is encoded as ordinary
pieces ("<", "image", ">", ...) and can never be mistaken for an image marker. Only code that asks
for the ids (``tok.image_id``, ``bos=True``) puts markers in a sequence, which is what the data
pipeline does. ``<unk>`` is never produced either: byte fallback spells any character the
vocabulary lacks as its UTF-8 bytes.

``decode`` renders special ids as their readable names ("<image>", "</s>"), so for display the
two cases look alike; they differ only in ids. ``decode(..., skip_special=True)`` drops them.

With ``--grounding`` the KOSMOS-2 location tokens follow the base vocabulary as further control
symbols (``<grounding>`` first, at id ``vocab_size``).

Text is not normalised: no NFKC, no whitespace collapsing, no dummy prefix space, so
``decode(encode(t)) == t`` for every string and encoding is concatenative:
``decode(encode(a) + encode(b)) == a + b``. (A literal "▁", SentencePiece's own space mark, is
encoded as its UTF-8 bytes so that it too comes back unchanged.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PAD, UNK, BOS, EOS, IMAGE, IMAGE_END = "<pad>", "<unk>", "<s>", "</s>", "<image>", "</image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, IMAGE, IMAGE_END)
"""The special tokens, in id order: ``SPECIAL_TOKENS[i]`` has id ``i``."""

GROUNDING_TOKENS: tuple[str, ...] = (
    "<grounding>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "<delimiter_of_multi_objects/>",
    *(f"<patch_index_{i:04d}>" for i in range(1024)),
)
"""KOSMOS-2's location vocabulary (a 32x32 grid of patch indices), appended after the base vocab."""

SPACE_MARK = "\u2581"  # "▁", SentencePiece's stand-in for a space inside pieces

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
CONFIG_FILE = "tokenizer_config.json"


class KosmosTokenizer:
    """A SentencePiece model with the KOSMOS special ids; see the module docstring.

    Build one with ``python -m kosmos.tokenizer.build`` and load it with :meth:`from_dir`.
    The object pickles (for data-loader workers) by its serialized model.
    """

    def __init__(self, model: bytes | str | Path, config: dict[str, Any] | None = None):
        """Load from a serialized model (bytes) or a ``tokenizer.model`` path.

        ``config`` is the ``tokenizer_config.json`` content, kept for reference only.
        """
        import sentencepiece as spm

        proto = model if isinstance(model, bytes) else Path(model).read_bytes()
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            where = "" if isinstance(model, bytes) else f" {model}"
            raise ValueError(f"not a SentencePiece model:{where} ({e})") from None
        self._proto = proto
        self._sp = sp
        self.config = config or {}
        self.path: Path | None = None
        """The folder it was loaded from (by :meth:`from_dir`), else None."""

        ids = [sp.piece_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))) or not all(
            sp.is_control(i) or sp.is_unknown(i) for i in ids
        ):
            found = tuple(sp.id_to_piece(i) for i in range(min(len(SPECIAL_TOKENS), sp.get_piece_size())))
            raise ValueError(
                f"not a KOSMOS tokenizer: ids 0-5 must be the special tokens {SPECIAL_TOKENS}, got {found}"
            )
        self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.image_id, self.image_end_id = ids

        # Every id that decode renders by name: the control symbols (specials, grounding) and <unk>.
        self._special: dict[int, str] = {
            i: sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)
        }
        self.special_ids: dict[str, int] = {piece: i for i, piece in self._special.items()}
        """Name -> id of every special token (the six above and, with grounding, KOSMOS-2's)."""
        self.grounding_start: int | None = self.special_ids.get(GROUNDING_TOKENS[0])
        """Id of ``<grounding>`` (the first location token), or None without ``--grounding``."""

    @classmethod
    def from_dir(cls, path: str | Path) -> KosmosTokenizer:
        """Load the tokenizer that ``python -m kosmos.tokenizer.build --output DIR`` wrote."""
        path = Path(path)
        model = path / MODEL_FILE
        if not model.is_file():
            raise FileNotFoundError(f"no {MODEL_FILE} in {path}: "
                                    "build one with `python -m kosmos.tokenizer.build`")
        config_path = path / CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
        tok = cls(model, config)
        tok.path = path
        return tok

    # --- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; never a special id except the ``<s>``/``</s>`` asked for."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__} (use encode_batch for lists)")
        if SPACE_MARK in text:
            return self._encode_with_space_marks(text, bos, eos)
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """``[encode(t, bos, eos) for t in texts]``, in parallel in C++ (``num_threads=-1``: all cores)."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch takes a sequence of str")
        out = self._sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=num_threads)
        for k, text in enumerate(texts):
            if SPACE_MARK in text:
                out[k] = self._encode_with_space_marks(text, bos, eos)
        return out

    def _encode_with_space_marks(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Encode text holding a literal U+2581: SentencePiece would read it as a space, so each one
        is spelled as its three UTF-8 byte pieces (decode turns those back into U+2581)."""
        marks = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode("utf-8")]
        ids = [self.bos_id] if bos else []
        for k, part in enumerate(text.split(SPACE_MARK)):
            if k:
                ids += marks
            ids += self._sp.encode(part)
        return ids + [self.eos_id] if eos else ids

    # --- decoding ---------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``. Special ids come out as their names ("<image>"), or not at all with
        ``skip_special``. Accepts any iterable of ints (a list, a 1-D tensor or array)."""
        if type(ids) is not list:
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        try:
            if self._special.keys().isdisjoint(ids):
                return self._sp.decode(ids)
            return self._decode_with_specials(ids, skip_special)
        except (IndexError, TypeError):
            bad = next((i for i in ids if not (isinstance(i, int) and 0 <= i < len(self))), None)
            if bad is None:
                raise
            raise IndexError(f"token id {bad!r} is not in range(0, {len(self)})") from None

    def _decode_with_specials(self, ids: list[int], skip_special: bool) -> str:
        # Decode each run of ordinary ids with SentencePiece (so byte pieces merge back into
        # characters) and put the special tokens' names between the runs.
        special = self._special
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in special:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if not skip_special:
                    parts.append(special[i])
            else:
                run.append(i)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    # --- vocabulary -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of ids: the built ``--vocab-size``, plus 1030 with ``--grounding``."""
        return self._sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        """The base vocabulary size (``--vocab-size``): ``len(self)`` without the grounding tokens."""
        return len(self) if self.grounding_start is None else self.grounding_start

    def token_to_id(self, token: str) -> int:
        """Id of a piece or special token ("<image>", "<patch_index_0042>", "▁the")."""
        i = self._sp.piece_to_id(token)
        if i == self.unk_id and token != UNK:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return i

    def id_to_token(self, i: int) -> str:
        """The piece of id ``i`` ("▁the", "<0x0A>", "<image>")."""
        if not 0 <= i < len(self):
            raise IndexError(f"token id {i} is out of range for a vocabulary of {len(self)}")
        return self._sp.id_to_piece(i)

    def __repr__(self) -> str:
        return f"KosmosTokenizer(size={len(self)}, grounding={self.grounding_start is not None})"

    # --- pickling (data-loader workers) -----------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self._proto, "config": self.config, "path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model"], state["config"])
        self.path = state.get("path")
