"""The DeepSpeed config dicts of a training run (the trained model's, a frozen model's), from ``train.*``, and
starting an engine on one."""

from __future__ import annotations

import contextlib
import io
import logging

from llmforge.config import TrainConfig

log = logging.getLogger("llmforge.train")


def initialize(model, config: dict, **kwargs):
    """``deepspeed.initialize``'s engine. On CPU DeepSpeed print()s each load of its shared-memory all-reduce op:
    into the debug log instead."""
    import deepspeed
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        engine, *_ = deepspeed.initialize(model=model, config=config, **kwargs)
    log.debug("deepspeed.initialize: %s", printed.getvalue())
    return engine


def frozen_config(train: TrainConfig, bf16: bool) -> dict:
    """A frozen model's engine under ZeRO-3: partitioned like the trained model, no optimizer."""
    return {"train_micro_batch_size_per_gpu": train.micro_batch_size, "bf16": {"enabled": bf16},
            "zero_optimization": {"stage": 3}, "steps_per_print": 2**31 - 1}


def deepspeed_config(train: TrainConfig, bf16: bool, world_size: int) -> dict:
    zero: dict = {"stage": train.zero_stage}
    if train.offload_optimizer and train.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if train.zero_stage == 3:
        # Gather the full weights into the saved checkpoint's fp32 shards only at export, not every save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_for(world_size),
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: no JIT-compiled fused Adam (slow first build on CPU; fails on some GPU arch strings).
            "params": {"lr": train.lr, "betas": [train.beta1, train.beta2], "weight_decay": train.weight_decay,
                       "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": train.max_steps, "warmup_num_steps": train.warmup_steps,
                       "warmup_min_ratio": 0.0, "cos_min_ratio": train.min_lr_ratio, "warmup_type": "linear"},
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
