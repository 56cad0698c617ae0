"""Write docs/configuration.md from the config models (`python scripts/gen_config_docs.py`).

tests/unit/test_docs.py fails when the committed file differs from what this writes.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from llmforge.config import reference_markdown  # noqa: E402

if __name__ == "__main__":
    target = REPO / "docs" / "configuration.md"
    target.write_text(reference_markdown(), encoding="utf-8")
    print(f"wrote {target.relative_to(REPO)}")
