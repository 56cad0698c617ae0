"""Serving: `python jobs/serve.py --model MODEL [--adapter NAME=DIR ...] [--host H] [--port P] [--api-key-file FILE] [--config FILE] [overrides]`.

Blocks until interrupted; in-flight requests finish before it exits.
"""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
