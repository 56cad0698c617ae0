"""Parameter counts (total, and active per token for MoE) and training FLOPs per token, for MFU."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from llmforge.model.build import build_model

# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, for MFU when train.peak_flops is unset.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                 "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12}


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int            # per token: routed experts count only k of n
    embedding: int         # the input embedding (a lookup, no FLOPs)

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def count_params(config: PretrainedConfig) -> ParamCounts:
    with torch.device("meta"):
        model = build_model(config)
    total = embedding = inactive = 0
    n_routed = getattr(config, "n_routed_experts", None)
    k = getattr(config, "num_experts_per_tok", None)
    for name, p in model.named_parameters():
        total += p.numel()
        if "embed_tokens" in name:
            embedding += p.numel()
        if n_routed and ".mlp.experts." in name:
            inactive += p.numel() * (n_routed - k) // n_routed
    if getattr(config, "tie_word_embeddings", False):
        embedding = 0  # the tied matrix is also the output projection, a real matmul
    return ParamCounts(total=total, active=total - inactive, embedding=embedding)


def flops_per_token(config: PretrainedConfig, counts: ParamCounts, seq_len: int) -> float:
    """Training FLOPs per token: 6·N(active, non-embedding) + 12·layers·hidden·seq (attention scores)."""
    return 6 * counts.active_non_embedding + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops(device: torch.device, configured: float | None) -> tuple[float, str]:
    """FLOP/s that MFU is measured against, and where the number came from."""
    if configured:
        return configured, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name} bf16 spec"
    return measured_matmul_flops(device), "measured fp32 matmul" if device.type == "cpu" else "measured matmul"


def measured_matmul_flops(device: torch.device, n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of an n x n matmul on ``device``. On CPU, the fastest single matmul of those run in ``seconds``:
    a worker measures this while other processes (its peers, Ray's daemons) may hold the cores for part of
    the time, and an average would then understate the peak (and overstate MFU, even past 100%)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    iters, fastest, start = 0, float("inf"), time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        a @ b
        fastest = min(fastest, time.perf_counter() - now)
        iters += 1
    if device.type == "cuda":
        # Kernels run asynchronously: only the average over the whole window is meaningful.
        torch.cuda.synchronize()
        return 2 * n**3 * iters / (time.perf_counter() - start)
    return 2 * n**3 / fastest
