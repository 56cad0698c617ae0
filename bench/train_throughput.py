"""Tokens/s of the training step: Ray Train + DeepSpeed (one worker) against a plain PyTorch loop.

    python bench/train_throughput.py [--preset deepseek-tiny] [--steps 60] [--micro-batch 8]

Same model, batch, precision (fp32 on CPU) and thread count (the Ray worker gets 1 CPU, so
OMP_NUM_THREADS=1; the plain loop runs with torch.set_num_threads(1)); both report the steady-state
rate over the last third of the steps. Prints one JSON line with both rates and their ratio, plus the
plain loop with every core for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from llmforge.config import load_config  # noqa: E402
from llmforge.data.pipeline import load_manifest  # noqa: E402
from llmforge.model.build import build_model, model_config  # noqa: E402
from llmforge.samples import SAMPLE_DATASET, prepare_sample  # noqa: E402
from llmforge.train.trainer import pretrain  # noqa: E402


def plain_loop(cfg, manifest, dataset: str, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    config = model_config(cfg.model, manifest["vocab_size"], manifest["seq_len"], manifest["eos_token_id"],
                          manifest["pad_token_id"])
    model = build_model(config, seed=cfg.seed)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    seqs = np.stack(pq.read_table(str(Path(dataset) / "tokens" / "train")).column("input_ids").to_pylist())
    batch = t.micro_batch_size
    measure_from = steps - steps // 3
    start = None
    for step in range(steps):
        if step == measure_from:
            start = time.perf_counter()
        i = (step * batch) % (len(seqs) - batch)
        x = torch.as_tensor(seqs[i:i + batch], dtype=torch.long)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - measure_from) * batch * manifest["seq_len"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="deepseek-tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    prepare_sample(SAMPLE_DATASET)
    manifest = load_manifest(SAMPLE_DATASET)
    third = args.steps // 3
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, {
            "data.dataset": SAMPLE_DATASET, "output_dir": out, "model.preset": args.preset,
            "train.num_workers": 1, "train.cpus_per_worker": 1, "train.zero_stage": 2,
            "train.micro_batch_size": args.micro_batch, "train.max_steps": args.steps, "train.warmup_steps": 2,
            # One log window over the last third of the steps; evaluation and checkpoints kept out of it.
            "train.log_every": third, "train.eval_every": 10**6, "train.checkpoint_every": 10**6})
        summary = pretrain(cfg)
        import ray
        ray.shutdown()
    platform = summary["tokens_per_s"]
    plain = plain_loop(cfg, manifest, SAMPLE_DATASET, args.steps, threads=1)
    plain_all = plain_loop(cfg, manifest, SAMPLE_DATASET, args.steps, threads=os.cpu_count() or 1)
    print(json.dumps({"bench": "train_throughput", "preset": args.preset, "micro_batch": args.micro_batch,
                      "seq_len": manifest["seq_len"], "steps": args.steps, "threads": 1,
                      "platform_tokens_per_s": round(platform, 1), "plain_tokens_per_s": round(plain, 1),
                      "platform_over_plain": round(platform / plain, 3),
                      "plain_all_cores_tokens_per_s": round(plain_all, 1), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
