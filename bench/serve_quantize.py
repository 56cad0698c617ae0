"""What `serve.quantize: int8` buys on CPU: decode tokens/s through the serving engine and validation
perplexity, float32 against dynamic int8, on the same trained model and data, in one run.

    python bench/serve_quantize.py [--model runs/quickstart/model] [--data runs/sample-dataset] [--batch 32]

Needs a trained model (a random one has no perplexity worth comparing): `make quickstart` writes both
defaults. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from llmforge import storage  # noqa: E402
from llmforge.data.pipeline import load_manifest  # noqa: E402
from llmforge.serve.engine import Engine, EngineSettings, SamplingParams, load_model  # noqa: E402


def perplexity(model, dataset: str, batches: int = 10, batch_size: int = 8) -> float:
    import pyarrow.parquet as pq
    manifest = load_manifest(dataset)
    split = "val" if manifest["splits"].get("val", {}).get("sequences") else "train"
    fs, path = storage.resolve(storage.join(dataset, "tokens", split))
    seqs = np.stack(pq.read_table(path, filesystem=fs).column("input_ids").to_pylist()[: batches * batch_size])
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            x = torch.as_tensor(seqs[i:i + batch_size], dtype=torch.long)
            total += model(input_ids=x, labels=x).loss.item() * len(x)
    return math.exp(total / len(seqs))


def decode_rate(model, tokenizer, batch: int, max_tokens: int, max_len: int) -> float:
    """Tokens/s of ``batch`` requests decoding together through the engine (greedy, fixed length)."""
    engine = Engine(model, tokenizer, EngineSettings(max_batch_size=batch, max_model_len=max_len))
    engine.stop_token_ids = set()  # every request generates exactly max_tokens
    done = threading.Semaphore(0)
    prompts = [tokenizer.encode(f"Debian package {i} is", add_special_tokens=False) for i in range(batch)]
    try:
        started = time.perf_counter()
        for ids in prompts:
            engine.submit(ids, SamplingParams(max_tokens=max_tokens, temperature=0),
                          lambda ev: ev.finish_reason and done.release())
        for _ in prompts:
            done.acquire(timeout=600)
        return batch * max_tokens / (time.perf_counter() - started)
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/quickstart/model")
    parser.add_argument("--data", default="runs/sample-dataset")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"no model at {args.model}: run `make quickstart` first, or pass --model DIR --data DATASET")
    result = {"bench": "serve_quantize", "model": args.model, "batch": args.batch, "threads": torch.get_num_threads()}
    for mode in ("none", "int8"):
        model, tokenizer = load_model(Path(args.model), "float32", mode)
        max_len = min(int(model.config.max_position_embeddings), 256)
        decode_rate(model, tokenizer, 4, 8, max_len)  # warm-up
        key = "fp32" if mode == "none" else "int8"
        result[f"{key}_tokens_per_s"] = round(decode_rate(model, tokenizer, args.batch, args.max_tokens, max_len), 1)
        result[f"{key}_perplexity"] = round(perplexity(model, args.data), 3)
    result["int8_speedup"] = round(result["int8_tokens_per_s"] / result["fp32_tokens_per_s"], 3)
    result["perplexity_change_pct"] = round(100 * (result["int8_perplexity"] / result["fp32_perplexity"] - 1), 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
