# Quick start:  make chat   (install the runtime, fetch the default model, start chatting)
#               make test   (the runtime plus the dev extras, the model, then the tests)
PYTHON ?= python3
VENV ?= .venv
# Pinned so that pip never swaps torch for another build; on a machine with CUDA
# the same version from PyPI brings CUDA support.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.llmopt-runtime
DEV := $(VENV)/.llmopt-dev

.PHONY: setup dev model chat test lint bench clean

# The runtime alone: what `llmopt run` and `serve` need.
$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .
	touch $(RUNTIME)

# Tests and lint add the dev extras, among them llama-cpp-python, which pip builds
# from source the first time (the most of `make test`'s setup).
$(DEV): $(RUNTIME)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(DEV)

setup: $(RUNTIME)

dev: $(DEV)

model: setup
	$(BIN)/llmopt pull

chat: model
	$(BIN)/llmopt run

test: dev model
	$(BIN)/python -m pytest -q

lint: dev
	$(BIN)/ruff check llmopt tests scripts
	$(BIN)/ruff format --check llmopt tests scripts

# Single-stream decode against transformers and llama-cpp-python (builds llama.cpp
# from source the first time: about 10 minutes on 2 cores).
bench: model
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python scripts/bench_decode.py

clean:
	rm -rf $(VENV)
