"""Pretraining: `python jobs/pretrain.py [--config configs/pretrain/PRESET.yaml] [--resume-from CKPT] [overrides]`.

With no arguments: the `deepseek-tiny` preset on the bundled sample corpus (prepared first if needed).
"""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
