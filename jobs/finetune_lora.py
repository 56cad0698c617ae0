"""LoRA fine-tuning, kept for existing scripts: the same job as jobs/finetune.py (whose default method is lora)."""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
