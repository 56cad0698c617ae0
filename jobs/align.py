"""Preference alignment: `python jobs/align.py --method dpo|ipo|simpo --base MODEL --data PAIRS.jsonl --output DIR
[--config FILE] [overrides]`."""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
