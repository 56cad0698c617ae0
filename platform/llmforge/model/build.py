"""Building a model from a preset: random init, nothing downloaded."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from llmforge.config import ModelConfig
from llmforge.errors import ConfigError
from llmforge.model.presets import FAMILIES, PRESETS


def model_config(cfg: ModelConfig, vocab_size: int, max_positions: int, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> PretrainedConfig:
    if cfg.preset not in PRESETS:
        raise ConfigError(f"Unknown model preset {cfg.preset!r}.", fix=f"choose one of {', '.join(PRESETS)}.")
    args = {**PRESETS[cfg.preset], **cfg.overrides}
    family = FAMILIES[args.pop("family")]
    args.update(vocab_size=vocab_size, max_position_embeddings=max(max_positions, args.get("max_position_embeddings", 0)),
                eos_token_id=eos_token_id, bos_token_id=eos_token_id, pad_token_id=pad_token_id)
    try:
        return family(**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.overrides do not fit {family.__name__}: {exc}") from None


def build_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
