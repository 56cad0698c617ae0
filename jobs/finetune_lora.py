"""LoRA fine-tuning: `python jobs/finetune_lora.py --base MODEL --data PATH.jsonl --output DIR [--merge] [overrides]`."""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
