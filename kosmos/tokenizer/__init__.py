"""The project's custom SentencePiece tokenizer.

Build one with ``python -m kosmos.tokenizer.build --input CORPUS --vocab-size 64007 --output DIR`` and load
it with ``KosmosTokenizer.from_dir(DIR)``. See ``kosmos/tokenizer/tokenizer.py`` for the special tokens.
"""

from pathlib import Path

from kosmos.tokenizer.tokenizer import GROUNDING_TOKENS, SPECIAL_TOKENS, KosmosTokenizer

TINY_CORPUS = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"
"""A small shipped multilingual corpus (plus shape captions) for tests and the demo."""

__all__ = ["GROUNDING_TOKENS", "SPECIAL_TOKENS", "TINY_CORPUS", "KosmosTokenizer"]
