# The two commands: `make test` (set up and run the whole test suite) and
# `make run` (set up and run the main job). Both work on a fresh machine with
# only Python 3 and pip.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned for the dev/CI install: the local CPU build. An unpinned torch
# pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: test run lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# the main job is the `normlab` command: the study extra (.[dev] includes it)
$(VENV)/.installed-run: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[study]"
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@ $(VENV)/.installed-run

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

run: $(VENV)/.installed-run
	$(BIN)/normlab study quick

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
