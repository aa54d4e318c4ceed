# Each target creates the virtual environment and installs requirements-dev.txt (the script's
# requirements.txt and pytest) when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: demo test train bench clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)  ## the whole pipeline on generated synthetic data, offline (a few CPU minutes)
	$(BIN)/python brain_tumor_segmentation.py --demo --overwrite $(ARGS)

test: $(STAMP)  ## the test suite (a few minutes on 2 CPU cores)
	$(BIN)/python -m pytest -q tests

train: $(STAMP)  ## train on the real dataset: make train ARGS="--data-dir DIR --epochs 5"
	$(BIN)/python brain_tumor_segmentation.py $(ARGS)

bench: $(STAMP)  ## training speed: this script's fast path against the seed's plain loop (bench/RESULTS.md)
	$(BIN)/python bench/bench.py $(ARGS)

clean:  ## remove generated outputs and the synthetic demo data (never the real data)
	rm -rf outputs predictions data/synthetic-demo
