"""Distillation: `python jobs/distill.py --teacher MODEL [--config student.yaml] --data.dataset DIR [--output DIR]
[overrides]`."""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
