"""Multi-stage recipes: `python jobs/recipe.py --config configs/recipes/NAME.yaml [--output_dir=DIR] [overrides]`.

Runs the stages in order, each on the previous one's model; submitted again, it skips finished stages and
resumes the unfinished one.
"""

import sys

import _bootstrap  # noqa: F401

from llmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["recipe", *sys.argv[1:]]))
