# Quick start:  make chat   (set up, fetch the default model, start chatting)
#               make test   (set up, fetch the default model, run the tests)
PYTHON ?= python3
VENV ?= .venv
# Pinned so that pip never swaps torch for another build; on a machine with CUDA
# the same version from PyPI brings CUDA support.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmopt-installed

.PHONY: setup model chat test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(BIN)/llmopt pull

chat: model
	$(BIN)/llmopt run

test: model
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check llmopt tests scripts
	$(BIN)/ruff format --check llmopt tests scripts

# Single-stream decode against transformers and llama-cpp-python (builds llama.cpp
# from source the first time: about 10 minutes on 2 cores).
bench: model
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python scripts/bench_decode.py

clean:
	rm -rf $(VENV)
