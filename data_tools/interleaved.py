"""Deprecated name (goes in the next release): this module moved to `kosmos.data_tools.interleaved`."""

from kosmos.deprecated import moved

moved(__spec__.name, "kosmos.data_tools.interleaved", main=__name__ == "__main__")
