# Everything runs inside .venv (created by `make setup`).
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip

.PHONY: setup test test-fast demo bench gpu-check lint clean docs docs-check

setup: .venv/.installed .venv/.editable .venv/hf-site/.installed

.venv/.installed: requirements.txt requirements-test.txt requirements-serve.txt requirements-nodeps.txt
	python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt -r requirements-serve.txt -r requirements-test.txt
	$(PIP) install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

# The checkout itself, editable: the kosmos-* console scripts, and `import kosmos` from any directory.
# Offline and a few seconds (setuptools is already in the venv); redone when pyproject.toml changes.
.venv/.editable: pyproject.toml .venv/.installed
	$(PIP) install --quiet --no-deps --no-build-isolation --no-index -e .
	touch $@

# transformers for tests/test_hf.py only, outside the venv's site-packages (requirements-hf.txt says why).
.venv/hf-site/.installed: requirements-hf.txt .venv/.installed
	rm -rf .venv/hf-site
	$(PIP) install --quiet --no-deps --target .venv/hf-site -r requirements-hf.txt
	touch $@

## All tests, the slow end-to-end ones included (what CI runs).
test: setup
	$(PY) -m pytest -q --durations=15

## Unit tests only (skips tests marked slow).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

## ruff (pyproject.toml's [tool.ruff]): style, unused names, import order, likely bugs, old syntax.
lint: setup
	$(PY) -m ruff check .

demo: setup
	$(PY) scripts/demo.py

## docs/config.md, from the config dataclasses' field docstrings (tests/test_docs.py fails when it is stale).
docs: setup
	$(PY) scripts/gen_config_docs.py

## Runs the commands of README.md and docs/*.md marked runnable; checks the modules and flags of the others.
docs-check: setup
	$(PY) scripts/docs_check.py

## Every benchmark script in bench/ (bench/_*.py are helpers, not benchmarks).
bench: setup
	@for b in bench/[!_]*.py; do m=$$(basename $$b .py); echo "== python -m bench.$$m"; \
		$(PY) -m bench.$$m || exit 1; done

## The prepared GPU check (bench/gpu.py): configs/kosmos1.yaml on one GPU, one table in at most 8 minutes, the
## rows also in runs/gpu_check.json (docs/benchmarks.md#gpu-check); without CUDA it says so in one line. No
## `setup` first: a GPU machine may bring its own Python and packages (`make gpu-check PY=python3`).
gpu-check:
	@mkdir -p runs
	$(PY) -m bench.gpu --out runs/gpu_check.json

clean:
	rm -rf .venv .pytest_cache demo_out
