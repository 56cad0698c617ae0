"""Evaluation: `python jobs/evaluate.py --model MODEL --tasks T1,T2 [--endpoint URL] [--limit N] [--output DIR]`
runs lm-eval-harness tasks and prints an eval_done JSON line last (docs/evaluation.md)."""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
