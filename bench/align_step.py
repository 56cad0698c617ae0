"""The cost of preference alignment next to SFT: one training step of each on the same model and batch.

    python bench/align_step.py [--preset deepseek-tiny] [--batch 8] [--seq 192] [--steps 12]

Same model (a preset, random weights), same pairs (random token ids; replies are the second half of each
sequence), AdamW, fp32, this process's threads. Measured, after 2 warm-up steps each:
- ``sft``: the next-token objective on the chosen sequences (B sequences per step);
- ``dpo``: the preference objective (train/objectives/preference.py) on chosen + rejected, with the reference's
  log-probs precomputed as llmforge does (2B sequences per step through the policy);
- ``reference_scoring``: the one forward pass per pair that precomputing them costs (2B sequences, no grad);
- ``dpo_with_frozen_copy``: a step with ``align.reference: frozen``, the objective running a frozen copy of the
  model beside the policy in the step (whole on the worker, as under ZeRO-0/1/2).
Tokens/s count the pairs' tokens (both replies) for the DPO rows and the sequences' for SFT. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from llmforge.config import ModelConfig, load_config  # noqa: E402
from llmforge.model.build import build_model, model_config  # noqa: E402
from llmforge.train.objectives import get  # noqa: E402
from llmforge.train.objectives.preference import reply_logps  # noqa: E402
from steps import timed, training_step  # noqa: E402


def batch(b: int, seq: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, vocab, (b, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=192)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    vocab = 4096
    config = model_config(ModelConfig(preset=args.preset), vocab, args.seq, 0, 0)
    cfg = load_config(None, {})
    frozen_cfg = load_config(None, {"align.reference": "frozen"})
    data = batch(args.batch, args.seq, vocab, 0)
    sft_batch = {"input_ids": data["chosen_input_ids"], "labels": data["chosen_labels"]}
    results = {}

    def trainer(objective_name: str, step_batch: dict, frozen: bool = False):
        model = build_model(config, seed=0)
        if frozen:  # align.reference=frozen: the objective runs the copy itself (whole, as under ZeRO-0/1/2)
            objective = get(objective_name, frozen_cfg, build_model(config, seed=0).eval().requires_grad_(False))
        else:
            objective = get(objective_name, cfg)
        return training_step(model, objective, step_batch)

    reference = build_model(config, seed=0).eval()

    def score():
        with torch.no_grad():
            for side in ("chosen", "rejected"):
                reply_logps(reference(input_ids=data[f"{side}_input_ids"]).logits, data[f"{side}_labels"])

    stored = dict(data)
    for side in ("chosen", "rejected"):
        with torch.no_grad():
            stored[f"ref_{side}_logps"], _ = reply_logps(reference(input_ids=data[f"{side}_input_ids"]).logits,
                                                          data[f"{side}_labels"])
    pair_tokens = 2 * args.batch * args.seq
    seconds = {"sft": timed(trainer("next_token", sft_batch), args.steps),
               "dpo": timed(trainer("preference", stored), args.steps),
               "reference_scoring": timed(score, args.steps),
               "dpo_with_frozen_copy": timed(trainer("preference", data, frozen=True), args.steps)}
    for name, s in seconds.items():
        tokens = args.batch * args.seq if name == "sft" else pair_tokens
        results[name] = {"step_s": round(s, 4), "tokens_per_s": round(tokens / s, 1)}
    print(json.dumps({"bench": "align_step", "preset": args.preset, "batch_pairs": args.batch, "seq_len": args.seq,
                      "threads": torch.get_num_threads(), "cpus": os.cpu_count(), **results,
                      "dpo_step_over_sft_step": round(seconds["dpo"] / seconds["sft"], 2),
                      "frozen_copy_step_over_precomputed": round(seconds["dpo_with_frozen_copy"] / seconds["dpo"], 2)}))


if __name__ == "__main__":
    main()
