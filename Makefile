# One command to set up, one to run the embedded default, one to test. See README.md.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test lint bench clean

setup: $(BIN)/llmadapter

$(BIN)/llmadapter: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU build of torch; pyproject's range (<2.14) keeps pip from fetching CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0 uv
	# uv resolves and installs the rest about six times faster than pip (91 s against 10 min, measured
	# without caches); it keeps the torch above, which satisfies pyproject's range.
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]'
	touch $(BIN)/llmadapter

run: setup
	$(BIN)/python -m flows.demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	# Two workers, whole files each (module fixtures start real servers once): most of the suite waits
	# on real processes, so two run in the time of about one and a half.
	$(BIN)/pytest -q -n 2 --dist loadfile

bench: setup
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/embeddings.py
	$(BIN)/python bench/serving.py --quick
	$(BIN)/python bench/flow.py
	$(BIN)/python bench/observability.py --rounds 3
	$(BIN)/python bench/swap.py
	$(BIN)/python bench/platform_path.py --model tiny
	$(BIN)/python bench/structured.py --check
	$(BIN)/python bench/evaluation.py

clean:
	rm -rf .llmadapter .pytest_cache .mypy_cache .ruff_cache
