# The whole set-up: `make demo` and `make test` each create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from $(TORCH_INDEX) (the CPU build by default): a bare `torch`
	# requirement resolved against PyPI pulls the multi-GB CUDA build on Linux. When that
	# index cannot be reached, pip's configured index is used instead (which may be the CUDA
	# build). Choose another build with e.g. `make TORCH_INDEX=https://download.pytorch.org/whl/cu126`.
	$(BIN)/pip install -q "torch==2.13.0" --index-url $(TORCH_INDEX) || $(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jointkl fit gmm --engine em --out runs/demo-gmm
	$(BIN)/jointkl diagnose runs/demo-gmm

test: $(STAMP)
	$(BIN)/python -m pytest

# Every benchmark at the defaults a user gets; rewrites the tables in docs/benchmarks.md.
# BENCH_ARGS passes options to the runner, e.g. make bench BENCH_ARGS="--only crf,em".
bench: $(STAMP)
	$(BIN)/python scripts/bench/run_all.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs build *.egg-info
