# The whole set-up: `make demo` and `make test` each create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would otherwise pull a
	# multi-GB CUDA build on machines without a GPU.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jointkl fit gmm --engine em --out runs/demo-gmm
	$(BIN)/jointkl diagnose runs/demo-gmm

test: $(STAMP)
	$(BIN)/python -m pytest

# Every benchmark at the defaults a user gets; rewrites the tables in docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python scripts/bench/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs build *.egg-info
