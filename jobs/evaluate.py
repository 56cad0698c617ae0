"""Evaluation: `python jobs/evaluate.py --model MODEL_DIR --data DATASET_DIR` prints one JSON line."""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
