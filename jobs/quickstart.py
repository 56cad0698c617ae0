"""`make quickstart`: the platform on its embedded default (local Ray, the sample data shipped with llmforge).

The same as `llmforge quickstart`; extra arguments are config overrides for the pretraining stage.
"""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
