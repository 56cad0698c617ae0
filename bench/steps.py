"""Helpers shared by the step benchmarks (align_step.py, distill_step.py): timing a step, and one AdamW training
step of a model on an objective (train/objectives/) as the training loop runs it, minus DeepSpeed."""

from __future__ import annotations

import time

import torch


def timed(step, steps: int, warmup: int = 2) -> float:
    """Mean seconds per call of ``step`` over ``steps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def training_step(model: torch.nn.Module, objective, batch: dict[str, torch.Tensor]):
    """A function running one forward, backward and AdamW step of ``model`` on ``objective``'s loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss, _ = objective.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step
