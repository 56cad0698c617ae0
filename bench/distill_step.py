"""The teacher's cost in distillation: one training step of a student distilled from a teacher against one step
of plain pretraining of the same student, on the same batch.

    python bench/distill_step.py [--teacher deepseek-tiny] [--student llama-tiny] [--batch 8] [--seq 256] [--steps 12]

Random weights (the cost does not depend on what they have learned), random token ids, AdamW, fp32, this
process's threads. Measured after 2 warm-up steps each:
- ``pretrain``: the next-token objective (train/objectives/next_token.py) on the student;
- ``distill``: the distillation objective (train/objectives/distill.py): the student's forward and backward plus
  the frozen teacher's no-grad forward on the same batch, as llmforge's loop runs it;
- ``teacher_forward``: the teacher's forward pass alone (what distillation adds, besides the KL).
Prints one JSON line.
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
from llmforge.model.flops import count_params  # noqa: E402
from llmforge.train.objectives import get  # noqa: E402
from steps import timed, training_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="deepseek-tiny")
    parser.add_argument("--student", default="llama-tiny")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    vocab = 4096
    student_cfg = model_config(ModelConfig(preset=args.student, overrides={"num_hidden_layers": args.student_layers}),
                               vocab, args.seq, 0, 0)
    teacher_cfg = model_config(ModelConfig(preset=args.teacher), vocab, args.seq, 0, 0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    cfg = load_config(None, {})
    teacher = build_model(teacher_cfg, seed=1).eval().requires_grad_(False)

    def teacher_forward():
        with torch.no_grad():
            teacher(input_ids=ids)

    student = lambda: build_model(student_cfg, seed=0)  # noqa: E731
    seconds = {"pretrain": timed(training_step(student(), get("next_token", cfg), batch), args.steps),
               "distill": timed(training_step(student(), get("distill", cfg, teacher, vocab_size=vocab), batch),
                                args.steps),
               "teacher_forward": timed(teacher_forward, args.steps)}
    tokens = args.batch * args.seq
    results = {name: {"step_s": round(s, 4), "tokens_per_s": round(tokens / s, 1)} for name, s in seconds.items()}
    print(json.dumps({"bench": "distill_step", "teacher": args.teacher, "student": args.student,
                      "student_layers": args.student_layers,
                      "teacher_params_m": round(count_params(teacher_cfg).total / 1e6, 2),
                      "student_params_m": round(count_params(student_cfg).total / 1e6, 2),
                      "batch": args.batch, "seq_len": args.seq, "threads": torch.get_num_threads(),
                      "cpus": os.cpu_count(), **results,
                      "distill_step_over_pretrain_step": round(seconds["distill"] / seconds["pretrain"], 2)}))


if __name__ == "__main__":
    main()
