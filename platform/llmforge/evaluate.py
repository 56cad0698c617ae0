"""Perplexity on a dataset's validation split and sample generations from an exported model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from llmforge import storage
from llmforge.data.pipeline import load_manifest
from llmforge.errors import InputError

DEFAULT_PROMPTS = ["Debian is", "The package manager", "Debian 是"]


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise InputError(f"{model_dir} is not a Hugging Face model dir (no config.json).",
                         fix="pass the model/ dir that `llmforge pretrain` exported.")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 40, seed: int = 0) -> list[str]:
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                             pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True))
    return out


def evaluate_model(model_dir: str, dataset: str, max_batches: int = 20, batch_size: int = 8,
                   prompts: list[str] | None = None) -> dict:
    manifest = load_manifest(dataset)
    model, tokenizer = load_model(model_dir)
    if model.config.vocab_size != manifest["vocab_size"]:
        raise InputError(f"Model vocabulary ({model.config.vocab_size}) differs from the dataset's ({manifest['vocab_size']}).",
                         fix="evaluate on the dataset the model was trained with.")
    split = "val" if manifest["splits"].get("val", {}).get("sequences") else "train"
    fs, path = storage.resolve(storage.join(dataset, "tokens", split))
    table = pq.read_table(path, filesystem=fs)
    seqs = np.stack(table.column("input_ids").to_pylist()[: max_batches * batch_size])
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            x = torch.as_tensor(seqs[i:i + batch_size], dtype=torch.long)
            total += model(input_ids=x, labels=x).loss.item() * len(x)
            count += len(x)
    loss = total / count
    return {"event": "eval_done", "model": model_dir, "split": split, "sequences": count, "loss": loss,
            "perplexity": math.exp(min(loss, 50)), "samples": generate(model, tokenizer, prompts or DEFAULT_PROMPTS)}
