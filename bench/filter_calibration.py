"""False drops of the quality filter per kind of real text, and the spam it still drops.

    python bench/filter_calibration.py [--set tests/data/filter_set.jsonl.gz] [--data.KEY=VALUE ...]

Runs ``normalize_text`` + ``quality_issue`` over the labelled set (tests/data/README.md has its provenance)
with the defaults (or the overrides given) and, in the same run, with the thresholds the defaults replaced
(repeated 5-grams checked on documents of any length), and prints one JSON line: per kind, the documents of
at least ``min_chars``, the false drops and their reasons; for the junk, how many were dropped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from llmforge.config import DataConfig, parse_overrides  # noqa: E402
from llmforge.data.clean import normalize_text, quality_issue  # noqa: E402

SET = Path(__file__).resolve().parents[1] / "tests" / "data" / "filter_set.jsonl.gz"
BEFORE = {"duplicate_ngram_size": 5, "repetition_min_tokens": 0}


def measure(records: list[dict], cfg: DataConfig) -> dict:
    kinds: dict = defaultdict(lambda: {"docs": 0, "dropped": 0, "reasons": Counter()})
    for record in records:
        text = normalize_text(record["text"], cfg.unicode_form)
        if record["label"] == "good" and len(text) < cfg.min_chars:
            continue
        issue = quality_issue(text, cfg)
        entry = kinds[record["kind"]]
        entry["docs"] += 1
        if issue:
            entry["dropped"] += 1
            entry["reasons"][issue[0]] += 1
    out = {}
    for kind, entry in kinds.items():
        rate = entry["dropped"] / entry["docs"]
        out[kind] = {"docs": entry["docs"], ("dropped" if kind == "junk" else "false_drops"): entry["dropped"],
                     "rate": round(rate, 4), "reasons": dict(entry["reasons"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", default=str(SET))
    args, rest = parser.parse_known_args()
    overrides = {k.removeprefix("data."): v for k, v in parse_overrides(rest).items()}
    with gzip.open(args.set, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    cfg = DataConfig(**overrides)
    after = measure(records, cfg)
    before = measure(records, DataConfig(**{**overrides, **BEFORE}))
    good = [k for k in after if k != "junk"]
    print(json.dumps({
        "bench": "filter_calibration", "set": Path(args.set).name, "records": len(records), "overrides": overrides,
        "worst_false_drop_rate": max(after[k]["rate"] for k in good),
        "worst_false_drop_rate_before": max(before[k]["rate"] for k in good),
        "junk_dropped": after.get("junk", {}).get("rate"), "kinds": after, "before": before,
    }, ensure_ascii=False))


if __name__ == "__main__":
    main()
