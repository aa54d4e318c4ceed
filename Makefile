# Each target creates the virtual environment and installs requirements-dev.txt (the script's
# requirements.txt and pytest) when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: demo test train bench

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)  ## the whole pipeline on generated synthetic data, offline, into a new outputs/DATE-TIME-demo-seed42
	$(BIN)/python brain_tumor_segmentation.py --demo $(ARGS)

test: $(STAMP)  ## the test suite (about 2 minutes on 2 CPU cores)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 tests

train: $(STAMP)  ## train on the real dataset: make train ARGS="--data-dir DIR --epochs 5"
	$(BIN)/python brain_tumor_segmentation.py $(ARGS)

bench: $(STAMP)  ## training speed: this script's fast path against the seed's plain loop (bench/RESULTS.md)
	$(BIN)/python bench/bench.py $(ARGS)
