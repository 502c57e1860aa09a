# A fresh machine needs only Python 3.11: `make test` builds .venv, installs the pinned CPU torch first
# (an unpinned torch would pull several GB of CUDA packages), then this package with its dev extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup test test-slow lint docs demo flops bench dist clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

# The tests marked slow (deselected by `make test`); CI runs them after `make test`.
test-slow: setup
	$(PY) -m pytest -q -m slow

# The main job: trains EMANet and the FCN baseline on the synthetic context set (CPU) and writes a report.
demo: setup
	$(PY) -m pip install -q -e ".[report]"
	$(VENV)/bin/emanet demo --out reports/demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# The documentation site (README, docs/, the API reference from the docstrings) into site/. Strict: a broken link
# or cross-reference fails the build; tests/test_docs.py fails on a documented public name without a docstring.
docs: setup
	$(PY) -m pip install -q -e ".[docs]"
	$(VENV)/bin/mkdocs build --strict

flops: setup
	$(VENV)/bin/emanet flops

bench: setup
	$(VENV)/bin/emanet bench --out benchmarks

# What an upload to a package index would take: the sdist and the wheel in dist/, checked by twine (rendering of
# the README as the long description, metadata). tests/test_packaging.py also installs the wheel into a fresh venv.
dist: setup
	rm -rf dist
	$(PY) -m build --outdir dist
	$(PY) -m twine check --strict dist/*

clean:
	rm -rf $(VENV) build dist site *.egg-info src/*.egg-info .pytest_cache
