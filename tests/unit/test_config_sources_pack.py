import io
import json

import pytest

from llmforge.config import load_config, parse_overrides
from llmforge.data.pack import pack_tokens, split_of
from llmforge.data.sources import decode, iter_records, record_from_json_line
from llmforge.config import DataConfig
from llmforge.errors import ConfigError


def test_overrides_parse_types():
    assert parse_overrides(["--data.min_chars=50", "--data.pii.enabled", "false", "--data.dedup.threshold=0.7"]) == {
        "data.min_chars": 50, "data.pii.enabled": False, "data.dedup.threshold": 0.7}


def test_load_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  min_chars: 10\n  dedup:\n    threshold: 0.9\n")
    cfg = load_config(path, {"data.min_chars": 20})
    assert cfg.data.min_chars == 20 and cfg.data.dedup.threshold == 0.9


def test_unknown_key_names_field_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  min_charz: 10\n")
    with pytest.raises(ConfigError, match=r"data\.min_charz: unknown field.*c\.yaml"):
        load_config(path)


def test_wrong_type_from_command_line():
    with pytest.raises(ConfigError, match=r"data\.min_chars.*'abc'.*command line"):
        load_config(None, {"data.min_chars": "abc"})


def test_cross_field_check():
    with pytest.raises(ConfigError, match="min_chars"):
        load_config(None, {"data.min_chars": 500, "data.max_chars": 100})


def test_bad_regex_in_extra_pattern():
    with pytest.raises(ConfigError, match="regular expression"):
        load_config(None, {"data.pii.extra_patterns": [{"name": "X", "pattern": "("}]})


def test_decode_repairs_invalid_utf8():
    text, repaired = decode(b"caf\xc3\xa9 \xff\xfe ok")
    assert text.startswith("café") and repaired == 2


def test_json_line_records():
    cfg = DataConfig()
    ok = record_from_json_line('{"id": 7, "text": "hello", "lang": "en"}', 3, "f:1", "f", cfg)
    assert ok["id"] == "7" and ok["text"] == "hello" and json.loads(ok["meta"]) == {"lang": "en"} and ok["reject_reason"] is None
    assert record_from_json_line('{"text": "unterminated', 0, "f:1", "f", cfg)["reject_reason"] == "malformed_json"
    missing = record_from_json_line('{"body": "x"}', 0, "f:2", "f", cfg)
    assert missing["reject_reason"] == "missing_text" and missing["id"] == "f:2"
    assert record_from_json_line("[1, 2]", 0, "f:3", "f", cfg)["reject_reason"] == "malformed_json"


def test_text_modes():
    raw = b"para one\nline two\n\n\npara two\n"
    rows = list(iter_records(io.BytesIO(raw), "/x/a.txt", 1, DataConfig(txt_mode="paragraph")))
    assert [r["text"] for r in rows] == ["para one\nline two", "para two"]
    assert [r["order"] for r in rows] == [1 << 32, (1 << 32) | 1]
    assert len(list(iter_records(io.BytesIO(raw), "/x/a.txt", 0, DataConfig(txt_mode="line")))) == 3
    assert len(list(iter_records(io.BytesIO(raw), "/x/a.txt", 0, DataConfig()))) == 1


def test_pack_tokens_carries_leftover():
    seqs, left = pack_tokens([], [[1, 2, 3], [4, 5]], 4, 0)
    assert seqs == [[1, 2, 3, 0]] and left == [4, 5, 0]
    seqs, left = pack_tokens(left, [[6]], 4, 0)
    assert seqs == [[4, 5, 0, 6]] and left == [0]


def test_split_is_stable_and_close_to_fraction():
    splits = [split_of(i, 0.1, 0) for i in range(5000)]
    assert splits == [split_of(i, 0.1, 0) for i in range(5000)]
    assert 0.08 < splits.count("val") / 5000 < 0.12
    assert all(split_of(i, 0.0, 0) == "train" for i in range(100))


def test_elastic_worker_range_keeps_the_global_batch():
    t = load_config(None, parse_overrides(["--train.num_workers=[2,4]", "--train.grad_accum=3"])).train
    assert (t.min_workers, t.max_workers, t.batches_per_step) == (2, 4, 12)
    assert [t.grad_accum_for(w) for w in (2, 3, 4)] == [6, 4, 3]
    fixed = load_config(None, {"train.num_workers": 2, "train.grad_accum": 2}).train
    assert (fixed.min_workers, fixed.max_workers, fixed.grad_accum_for(2)) == (2, 2, 2)
    with pytest.raises(ConfigError, match=r"cannot be split evenly over \[3\] worker"):
        load_config(None, {"train.num_workers": [2, 4], "train.grad_accum": 1})
    with pytest.raises(ConfigError, match="1 <= min <= max"):
        load_config(None, {"train.num_workers": [3, 2]})
    with pytest.raises(ConfigError, match="1 <= min <= max"):
        load_config(None, {"train.num_workers": 0})


def test_elastic_timing_settings():
    t = load_config(None, parse_overrides(["--train.num_workers=[1,2]", "--train.elastic_resize_interval_s=5",
                                           "--train.worker_start_timeout_s=20"])).train
    assert (t.elastic_resize_interval_s, t.worker_start_timeout_s) == (5.0, 20.0)
    assert load_config(None, {}).train.worker_start_timeout_s is None  # Ray's own default
    with pytest.raises(ConfigError, match="worker_start_timeout_s"):
        load_config(None, {"train.worker_start_timeout_s": 0})
    with pytest.raises(ConfigError, match="elastic_resize_interval_s"):
        load_config(None, {"train.elastic_resize_interval_s": -1})
