# The llmforge runtime image: the official Ray GPU image for the Ray version pyproject.toml pins, plus
# llmforge and its dependencies. Every node of a cluster runs it (cluster.yaml, k8s/).
#   make image IMAGE=<registry>/llmforge:<tag>
#   make image-vllm IMAGE=...   the same plus vLLM (ray[llm]) for serve.engine=vllm on the GPU nodes: tag -vllm
# Pinned: the base image by Ray version, Python and CUDA flavour; torch by version (the CUDA build from PyPI).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

ARG TORCH_VERSION=2.13.0
# "vllm": the variant that serves with vLLM through Ray Serve LLM (pyproject's [vllm] extra).
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    # Build DeepSpeed's ops for A100 and H100 (the arch string 9.0a breaks its JIT build), into a writable dir.
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    HF_HOME=/tmp/huggingface

# The base image's non-root user; never run as root.
USER ray
WORKDIR /home/ray/llmforge

# Dependencies first (a layer that survives code changes), then the code.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users platform/llmforge/__init__.py platform/llmforge/__init__.py
RUN pip install "torch==${TORCH_VERSION}" \
 && pip install ".${EXTRAS:+[${EXTRAS}]}" "psycopg2-binary>=2.9,<3" \
 && pip uninstall -y llmforge
COPY --chown=ray:users platform ./platform
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs
RUN pip install --no-deps . \
 && python -c "import llmforge, ray; assert ray.__version__.startswith('2.60.'), ray.__version__" \
 && if [ -n "${EXTRAS}" ]; then python -c "import vllm, ray.serve.llm; assert vllm.__version__ == '0.29.0', vllm.__version__"; fi
