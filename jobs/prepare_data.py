"""Corpus pipeline: `python jobs/prepare_data.py --input PATH_OR_GLOB --output DIR [--config FILE] [--overwrite]`."""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
