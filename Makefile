# Everything runs inside .venv (created by `make setup`).
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip

.PHONY: setup test test-fast demo bench lint clean

setup: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	touch $@

## All tests, the slow end-to-end ones included (what CI runs).
test: setup
	$(PY) -m pytest -q

## Unit tests only (skips tests marked slow).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(PY) scripts/demo.py

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .venv .pytest_cache demo_out
