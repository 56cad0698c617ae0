"""`make quickstart`: the platform on its embedded default (local Ray, bundled sample corpus)."""

import sys

import _bootstrap  # noqa: F401

from llmforge.quickstart import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
