"""Make ``llmforge`` importable from a plain checkout (e.g. `ray job submit --working-dir .`)."""

import sys
from pathlib import Path

try:
    import llmforge  # noqa: F401  (installed with `pip install -e .`)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
