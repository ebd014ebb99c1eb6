# Fresh machine: `make demo` (set up + run the main job), `make test` (set up + run the tests, then the
# wheel smoke: the built wheel installed in a fresh venv and run from outside the checkout).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo demo-quick test test-fast wheel-smoke bench clean

setup: $(VENV)/.installed

# The CPU torch wheel is installed first and pinned: a bare `torch` requirement would pull a
# multi-GB CUDA build. pyproject keeps a permissive range for real users. A second run skips it.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/fastkd demo

demo-quick: setup
	$(BIN)/fastkd demo --quick

test: setup
	$(BIN)/python -m pytest -q
	$(MAKE) wheel-smoke

# What a user installs: build the wheel, install it (after the pinned CPU torch) in a fresh venv in a
# temp folder, and run the CLI, every module's import and a tiny demo from outside the checkout.
wheel-smoke:
	PYTHON=$(PYTHON) bash tests/wheel_smoke.sh

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/loss_table.py
	$(BIN)/python benchmarks/codec_table.py

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
