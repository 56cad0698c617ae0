# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmforge-installed
# The CPU build lies on disk on the dev machines; a GPU machine gets the default (CUDA) build.
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch>=2.4,<2.15

# Build DeepSpeed's C++ ops once per checkout, not once per test or worker.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.1
export PYTHONUNBUFFERED := 1

.PHONY: setup quickstart test test-unit bench clean help

help:
	@echo "make quickstart   set up .venv and run the platform on the bundled sample corpus"
	@echo "make test         set up .venv and run the whole test suite"
	@echo "make test-unit    only the fast unit tests"
	@echo "make bench        run the benchmarks (prints one JSON line each)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "$(TORCH_GPU)"; \
	  else $(PY) -m pip install -q "$(TORCH_CPU)"; fi; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

quickstart: $(STAMP)
	$(PY) jobs/quickstart.py

test: $(STAMP)
	$(PY) -m pytest tests -q

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

bench: $(STAMP)
	$(PY) bench/data_throughput.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf runs .pytest_cache
