# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv with the pinned set (requirements.lock) and never an unpinned torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench study clean

$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/stackwise train

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

# Benchmark-only packages (transformers, accelerate, psutil), installed once next to the pinned set.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) requirements-bench.lock
	$(BIN)/pip install -q -r requirements.lock -r requirements-bench.lock
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run_all

# The growth study (not part of bench): ~1.3 h on 2 CPU cores, ~40 min more for --explore; resumable
# (benchmarks/growth_study.py). It writes its tables into benchmarks/RESULTS.md.
study: $(STAMP)
	$(BIN)/python -m benchmarks.growth_study --write-results-md
	$(BIN)/python -m benchmarks.growth_study --explore --write-results-md

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
