import os
import sys
from pathlib import Path

# Tests never phone home, and Ray Train's controller polls fast enough for short runs.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "tests"))  # shared helpers such as tiny_models
