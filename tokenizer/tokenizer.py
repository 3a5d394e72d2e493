"""Deprecated name (goes in the next release): this module moved to `kosmos.tokenizer.tokenizer`."""

from kosmos.deprecated import moved

moved(__spec__.name, "kosmos.tokenizer.tokenizer", main=__name__ == "__main__")
