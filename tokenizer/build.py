"""Deprecated name (goes in the next release): this module moved to `kosmos.tokenizer.build`."""

from kosmos.deprecated import moved

moved(__spec__.name, "kosmos.tokenizer.build", main=__name__ == "__main__")
