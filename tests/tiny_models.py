"""Tiny models built from configs (random init, nothing downloaded) for the serving tests."""

from pathlib import Path

import torch

TEXTS = ["How do I install nginx? Run sudo apt install nginx.", "安装软件包的命令是什么？使用 apt install。",
         "Debian is a free operating system with many packages.", "The quick brown fox jumps over the lazy dog."] * 50


def tiny_tokenizer(out: Path):
    from transformers import AutoTokenizer

    from llmforge.config import TokenizerConfig
    from llmforge.data.tokenizer import train_tokenizer
    if not (out / "tokenizer.json").is_file():
        train_tokenizer(TEXTS, TokenizerConfig(vocab_size=400, min_frequency=1), out, model_max_length=256)
    return AutoTokenizer.from_pretrained(out)


def tiny_model(out: Path, preset: str = "llama-tiny", context: int = 256, seed: int = 1) -> Path:
    """An exported HF model dir (config, weights, tokenizer) like the one `llmforge pretrain` writes."""
    from llmforge.config import ModelConfig
    from llmforge.model.build import build_model, model_config
    tok = tiny_tokenizer(out)
    config = model_config(ModelConfig(preset=preset), len(tok), context, tok.eos_token_id, tok.pad_token_id)
    build_model(config, seed=seed).save_pretrained(out)
    return out


def tiny_adapter(base_dir: Path, out: Path, seed: int, targets=("q_proj", "v_proj")) -> Path:
    """A LoRA adapter with random (non-zero) weights, so it visibly changes the base model's outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=16, target_modules=list(targets)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def sample_base(dataset, manifest: dict, out: Path, seed: int, context: int) -> Path:
    """A tiny DeepSeek-style base (random init) with the prepared sample dataset's tokenizer and chat template,
    saved as an HF dir: the starting point of the fine-tuning and alignment tests."""
    from llmforge.config import ModelConfig
    from llmforge.model.build import build_model, model_config
    from llmforge.train.checkpoint import copy_tokenizer
    config = model_config(ModelConfig(preset="deepseek-tiny"), manifest["vocab_size"], context,
                          manifest["eos_token_id"], manifest["pad_token_id"])
    build_model(config, seed=seed).save_pretrained(out)
    copy_tokenizer(Path(dataset) / "tokenizer", out)
    return out
