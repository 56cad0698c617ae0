"""Training objectives: what one micro-batch's loss and metrics are. One module per objective, each defining
``build(cfg, frozen=None, vocab_size=None) -> Objective``; the loop looks it up by name (``LoopSpec.objective``).
``columns`` are the columns of the training data it reads.

An objective sees the DeepSpeed engine (call it like the model) and a batch of tensors on the device; it
returns the loss to back-propagate and scalar metrics, which the loop averages over micro-batches and ranks
and logs beside ``loss`` (``val_`` prefixed on the validation split). ``frozen`` is a frozen model it runs
beside the trained one (train/frozen.py: DPO's reference, distillation's teacher); ``vocab_size`` the
tokenizer's, which a model's (padded) embedding may exceed.

``token_loss`` says which value is a plain next-token cross-entropy, so that validation reports it as
``val_loss`` (and ``val_perplexity``), comparable with pretraining's: ``"loss"`` the loss itself, another name
one of the metrics (the objective's own loss is then ``val_objective_loss``), ``None`` none (``val_loss`` is
the objective's loss, with no perplexity).
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch


class Objective(Protocol):
    name: str
    columns: tuple[str, ...]
    token_loss: str | None

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...


def get(name: str, cfg, frozen=None, vocab_size: int | None = None) -> Objective:
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise ValueError(f"no training objective {name!r} (a module of {__name__})") from None
    return module.build(cfg, frozen, vocab_size)
