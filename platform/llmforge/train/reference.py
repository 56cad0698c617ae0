"""A frozen reference model beside the policy on every training worker (``align.reference: frozen``).

The reference is the base the policy starts from, loaded once per worker, never trained, run without gradients
in the same micro-batch as the policy. It is placed like the policy's weights:

- ZeRO-3: wrapped in a DeepSpeed engine of its own (ZeRO-3, no optimizer), so its parameters are partitioned over
  the ranks like the policy's and gathered layer by layer in the forward pass: each rank holds 1/N of it. Every
  rank must then run the same number of reference forward passes, which the loop guarantees (every rank computes
  every micro-batch's loss, skipped or not);
- ZeRO-0/1/2: the policy's weights are whole on every rank, so is the reference's: a plain module on the device,
  in bf16 when the policy trains in bf16 (the two then agree at step 0).

It is rebuilt from the base on every (re)start: a resumed or resized run needs nothing of it from the checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch

from llmforge.config import TrainConfig
from llmforge.train.spec import ModelSource

log = logging.getLogger("llmforge.train")


def frozen_reference(source: ModelSource, t: TrainConfig, bf16: bool, device: torch.device, tracking_uri: str | None):
    """The reference model, callable like the policy's engine (``reference(input_ids=...).logits``)."""
    from transformers import AutoModelForCausalLM

    from llmforge.train.lora import resolve_base
    model = AutoModelForCausalLM.from_pretrained(resolve_base(source.uri, tracking_uri), attn_implementation="sdpa",
                                                 dtype=torch.bfloat16 if bf16 else torch.float32)
    model.requires_grad_(False).eval()
    total = sum(p.numel() for p in model.parameters())
    if t.zero_stage != 3:
        log.info("reference: a frozen copy of %s, %.2fM params whole on each worker (ZeRO-%d)", source.uri,
                 total / 1e6, t.zero_stage)
        return model.to(device)
    import deepspeed
    config = {"train_micro_batch_size_per_gpu": t.micro_batch_size, "bf16": {"enabled": bf16},
              "zero_optimization": {"stage": 3}, "steps_per_print": 2**31 - 1}
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    log.info("reference: a frozen copy of %s, %.2fM params partitioned by ZeRO-3: %.2fM on this rank", source.uri,
             total / 1e6, params_on_rank(engine) / 1e6)
    return engine


def params_on_rank(reference) -> int:
    """How many of the reference's parameters this rank holds (ZeRO-3: its partition; else all of them)."""
    module = getattr(reference, "module", reference)
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
