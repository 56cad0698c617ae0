"""Collectives every rank calls together (a no-op with one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (so all ranks take the same branch)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_across_ranks(values: list[float], device: torch.device) -> float:
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return (t[0] / t[1]).item() if t[1] > 0 else float("nan")


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
