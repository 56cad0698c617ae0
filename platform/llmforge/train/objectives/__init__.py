"""Training objectives: what one micro-batch's loss and metrics are. One module per objective, each defining
``build(cfg) -> Objective``; the loop looks it up by name (``LoopSpec.objective``). ``columns`` are the
columns of the training data it reads.

An objective sees the DeepSpeed engine (call it like the model) and a batch of tensors on the device; it
returns the loss to back-propagate and scalar metrics, which the loop averages over micro-batches and ranks
and logs beside ``loss`` (``val_`` prefixed on the validation split).
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch


class Objective(Protocol):
    name: str
    columns: tuple[str, ...]

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...


def get(name: str, cfg, reference_model=None) -> Objective:
    """The objective ``name``; ``reference_model``: a frozen model it runs beside the policy (LoopSpec.reference)."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise ValueError(f"no training objective {name!r} (a module of {__name__})") from None
    return module.build(cfg, reference_model)
