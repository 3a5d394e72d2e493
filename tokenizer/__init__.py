"""Deprecated name (goes in the next release): this module moved to `kosmos.tokenizer`."""

from kosmos.deprecated import moved

moved(__spec__.name, "kosmos.tokenizer", main=__name__ == "__main__", package=True)
