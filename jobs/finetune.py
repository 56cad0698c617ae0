"""Supervised fine-tuning: `python jobs/finetune.py --base MODEL --data PATH.jsonl --output DIR
[--method lora|full] [--merge] [overrides]` (jobs/finetune_lora.py is the same job)."""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
