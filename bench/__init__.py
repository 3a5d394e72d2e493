"""Benchmarks: each script measures the project against a baseline in the same run and prints the ratio.

Run one as ``python -m bench.attention`` or ``python bench/attention.py`` (``make bench`` runs them all);
modules whose names start with an underscore (``_perf``: time and peak memory on CPU and GPU) are helpers,
not benchmarks. bench/ is not part of the installed package.
"""
