"""The quality filter's defaults on a labelled set of real text (tests/data/filter_set.jsonl.gz, provenance in
tests/data/README.md): they keep at least 95% of every kind of good document and drop every piece of spam."""

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from llmforge.config import DataConfig
from llmforge.data.clean import normalize_text, quality_issue

SET = Path(__file__).resolve().parents[1] / "data" / "filter_set.jsonl.gz"


def _records():
    with gzip.open(SET, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _drops(cfg: DataConfig) -> tuple[Counter, Counter, list[str]]:
    seen, dropped, junk_kept = Counter(), Counter(), []
    for record in _records():
        text = normalize_text(record["text"], cfg.unicode_form)
        issue = quality_issue(text, cfg)
        if record["label"] == "junk":
            if issue is None:
                junk_kept.append(record["id"])
            continue
        if len(text) < cfg.min_chars:
            continue
        seen[record["kind"]] += 1
        dropped[record["kind"]] += issue is not None
    return seen, dropped, junk_kept


def test_the_set_has_every_kind():
    kinds = Counter(r["kind"] for r in _records())
    assert {"prose", "poetry", "code_docs", "chinese_prose", "chinese_poetry", "forum", "junk"} <= set(kinds)
    assert min(kinds.values()) >= 100


def test_defaults_keep_95_percent_of_each_kind_and_drop_all_spam():
    seen, dropped, junk_kept = _drops(DataConfig())
    rates = {kind: dropped[kind] / seen[kind] for kind in seen}
    assert all(rate <= 0.05 for rate in rates.values()), rates
    assert junk_kept == []


@pytest.mark.parametrize("overrides, kind", [
    # The pre-calibration settings (repeated 5-grams, on documents of any length) drop more than 5% of the
    # poems and code documentation: the check above can fail.
    ({"duplicate_ngram_size": 5, "repetition_min_tokens": 0}, "poetry"),
    ({"duplicate_ngram_size": 5, "repetition_min_tokens": 0}, "code_docs"),
])
def test_the_old_settings_failed_the_bar(overrides, kind):
    seen, dropped, _ = _drops(DataConfig(**overrides))
    assert dropped[kind] / seen[kind] > 0.05


def test_box_drawing_tables_and_their_rules_are_layout():
    rows = [("apt", "命令行包管理"), ("aptitude", "文本界面"), ("synaptic", "图形前端"), ("dpkg", "底层工具"),
            ("tasksel", "选择任务"), ("unattended-upgrades", "自动升级")]
    rule = "├────────────────────┼──────────┤"
    table = "\n".join(["下面是常用的软件包管理工具列表,以及它们各自的用途说明。", "┌────────────────────┬──────────┐"]
                      + [line for name, what in rows for line in (f"│ {name:<18} │ {what} │", rule)])
    assert quality_issue(table, DataConfig()) is None
    assert quality_issue("$$$ ### @@@ !!! " * 20 + "┌──┐", DataConfig())[0] == "symbol_ratio"
