"""A frozen model beside the trained one on every training worker: DPO's reference (``align.reference: frozen``),
distillation's teacher.

It is loaded once per worker, never trained, run without gradients on the same micro-batch as the trained
model. It is placed like the trained model's weights:

- ZeRO-3: wrapped in a DeepSpeed engine of its own (ZeRO-3, no optimizer), so its parameters are partitioned over
  the ranks like the trained model's and gathered layer by layer in the forward pass: each rank holds 1/N of it.
  Every rank must then run the same number of its forward passes, which the loop guarantees (every rank computes
  every micro-batch's loss, skipped or not);
- ZeRO-0/1/2: the trained weights are whole on every rank, so are these: a plain module on the device, in bf16
  when training is in bf16 (a DPO policy and its reference then agree at step 0).

It is rebuilt from the base on every (re)start: a resumed or resized run needs nothing of it from the checkpoint.
"""

from __future__ import annotations

import logging

import torch

from llmforge.config import TrainConfig
from llmforge.train.deepspeed_config import frozen_config, initialize
from llmforge.train.spec import ModelSource

log = logging.getLogger("llmforge.train")


def frozen_model(source: ModelSource, t: TrainConfig, bf16: bool, device: torch.device, tracking_uri: str | None):
    """The frozen model, callable like the trained model's engine (``frozen(input_ids=...).logits``)."""
    from llmforge.train.lora import load_pretrained
    model = load_pretrained(source.uri, tracking_uri, torch.bfloat16 if bf16 else torch.float32)
    model.requires_grad_(False).eval()
    total = sum(p.numel() for p in model.parameters())
    if t.zero_stage != 3:
        log.info("frozen model %s: %.2fM params whole on each worker (ZeRO-%d)", source.uri,
                 total / 1e6, t.zero_stage)
        return model.to(device)
    engine = initialize(model, frozen_config(t, bf16))
    engine.eval()
    log.info("frozen model %s: %.2fM params partitioned by ZeRO-3: %.2fM on this rank", source.uri,
             total / 1e6, params_on_rank(engine) / 1e6)
    return engine


def params_on_rank(frozen) -> int:
    """How many of the frozen model's parameters this rank holds (ZeRO-3: its partition; else all of them)."""
    module = getattr(frozen, "module", frozen)
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
