"""Checkpoints: the DeepSpeed shards every rank writes, and turning them into a Hugging Face model dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig

from llmforge.errors import InputError
from llmforge.model.build import build_model

def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        raise InputError(f"{ckpt_dir} is not a DeepSpeed checkpoint (no 'latest' file).",
                         fix="pass a checkpoint dir written by llmforge pretrain (…/checkpoint_*/).")
    return latest.read_text().strip()


def consolidated_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage, on CPU."""
    tag = latest_tag(ckpt_dir)
    if list((ckpt_dir / tag).glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """The tokenizer files of ``src_dir`` (a tokenizer or model dir) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out_dir / name)


def export_hf_model(ckpt_dir: Path, config: PretrainedConfig, tokenizer_dir: Path, out_dir: Path,
                    card: str) -> Path:
    """Write ``out_dir`` with config.json, model.safetensors, tokenizer files, generation_config.json, README.md."""
    model = build_model(config)
    state = consolidated_state_dict(ckpt_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer(tokenizer_dir, out_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, do_sample=True, temperature=0.8, top_p=0.95,
                     max_new_tokens=64).save_pretrained(out_dir)
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def model_card(preset: str, counts, metrics: dict, data_stats: dict, config_yaml: str) -> str:
    return f"""---
library_name: transformers
tags: [llmforge, causal-lm, {preset}]
---
# {preset}, trained with llmforge

Pretrained from random initialization with llmforge (Ray Train + DeepSpeed).

- Parameters: {counts.total:,} total, {counts.active:,} active per token
- Final metrics: `{json.dumps(metrics, sort_keys=True)}`

## Data
```json
{json.dumps(data_stats, indent=2, ensure_ascii=False)}
```

## Configuration
```yaml
{config_yaml}```
"""
