"""One decode step of the serving engine, three ways, on the same batch: the model's own forward (the baseline),
llmforge's Llama-family step with plain weights, and with weights packed for MKL.

    python bench/decode_step.py [--rows 28] [--columns 200] [--threads 1] [--batch 32] [--max-len 1024]

The model is serve_load's (4-layer Llama shape, ~7M parameters, random weights). ``--rows`` running rows hold
between 50 and ``--columns`` columns each (spread evenly) in a slot cache of ``--batch`` rows and ``--max-len``
columns, as the engine allocates it; the step writes one column and is timed over repeats (median of 7 runs of
30 steps). Prints one JSON line: ms per step of each path and their speed-ups over the model's forward, with
the largest logit difference from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "bench"))

from llmforge.serve.engine import SlotCache, load_model, model_decode  # noqa: E402
from llmforge.serve.fast_decode import FastDecoder, PackedLinears  # noqa: E402
from serve_load import build_model  # noqa: E402


def filled_cache(config, rows: int, columns: int, batch: int, max_len: int) -> tuple[SlotCache, list[int]]:
    cache = SlotCache(config.num_hidden_layers, batch, max_len)
    shape = (batch, config.num_key_value_heads, max_len, config.hidden_size // config.num_attention_heads)
    g = torch.Generator().manual_seed(0)
    for layer in cache.layers:
        layer.lazy_initialization(torch.empty(shape), torch.empty(shape))
        layer.keys.copy_(torch.randn(shape, generator=g))
        layer.values.copy_(torch.randn(shape, generator=g))
    cache.state.rows, cache.state.cursor = rows, columns
    held = [50 + (columns - 50) * i // max(1, rows - 1) for i in range(rows)]
    return cache, [columns - h for h in held]


def timed(step, repeats: int = 30, runs: int = 7) -> float:
    for _ in range(5):
        step()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        samples.append((time.perf_counter() - started) / repeats)
    return sorted(samples)[runs // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=28)
    parser.add_argument("--columns", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32, help="serve.max_batch_size: the rows weights are packed for")
    parser.add_argument("--max-len", type=int, default=1024, help="the slot cache's columns (serve.max_model_len)")
    args = parser.parse_args()
    if not 0 < args.rows <= args.batch or not 50 < args.columns < args.max_len:
        parser.error("need 0 < --rows <= --batch and 50 < --columns < --max-len")
    torch.set_num_threads(args.threads)
    model, _ = load_model(build_model(Path(tempfile.mkdtemp(prefix="bench-decode-"))), device="cpu")
    max_len = args.max_len
    packed, why = PackedLinears.build(model, args.batch)
    paths = {"model_forward": None, "fast_plain": FastDecoder(model)}
    if packed is not None:
        paths["fast_packed"] = FastDecoder(model, packed)
    ids = torch.randint(0, model.config.vocab_size, (args.rows,), generator=torch.Generator().manual_seed(1))
    result = {"bench": "decode_step", "rows": args.rows, "columns": args.columns, "threads": args.threads,
              "packed_for_rows": packed.rows if packed else None, **({"not_packed": why} if why else {})}
    reference = None
    with torch.inference_mode():
        for name, fast in paths.items():
            cache, starts = filled_cache(model.config, args.rows, args.columns, args.batch, max_len)
            positions = torch.tensor([args.columns - s for s in starts])

            def step():
                cache.state.cursor = args.columns  # every repeat writes the same column
                if fast is None:
                    return model_decode(model, ids, positions, cache, starts)
                return fast(ids, positions, cache, starts)

            logits = step()
            reference = logits if reference is None else reference
            result[f"{name}_ms"] = round(timed(step), 3)
            result[f"{name}_max_logit_diff"] = float((logits - reference).abs().max())
    for name in paths:
        if name != "model_forward":
            result[f"{name}_speedup"] = round(result["model_forward_ms"] / result[f"{name}_ms"], 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
