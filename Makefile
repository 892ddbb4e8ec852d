# Two commands for readers: `make book` and `make test`. Each creates .venv if missing and
# installs what it needs: the pinned torch first (a CPU wheel here), then the package.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin

.PHONY: book test test-gpu notebooks lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

$(VENV)/.book: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[book]"
	@touch $@

test: $(VENV)/.dev
	$(BIN)/python -m pytest

test-gpu: $(VENV)/.dev
	$(BIN)/python -m pytest -m gpu

book: $(VENV)/.book
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "The book: $(CURDIR)/_build/html/index.html"

notebooks: $(VENV)/.book
	$(BIN)/python scripts/make_notebooks.py

lint: $(VENV)/.dev
	$(BIN)/ruff check llminfer tests scripts benchmarks

clean:
	rm -rf _build
