"""Hostile corpora: a line that never ends, JSON that blows the parser's stack or integer limits. Each becomes a
counted reject with its reason (its start kept), memory stays bounded, and the records after it still come."""

import gzip
import io
import json
import tracemalloc

import pyarrow as pa

from llmforge.config import DataConfig
from llmforge.data.sources import KEPT_PREFIX_BYTES, iter_lines, iter_records, max_line_bytes, parse_json
from llmforge.train.finetune import JsonLinesDatasource, Renderer

CFG = DataConfig(max_chars=10_000)  # a line bound of 12 * 10k + 1 MiB, about 1.1 MB
MB = 1 << 20


class Endless(io.RawIOBase):
    """``size`` bytes of one character and then ``after``, generated as they are read (never held whole)."""

    def __init__(self, size: int, after: bytes = b""):
        self.left, self.after = size, after

    def readable(self):
        return True

    def read(self, n=-1):
        if self.left > 0:
            take = min(n if n > 0 else MB, self.left)
            self.left -= take
            return b"a" * take
        out, self.after = self.after[:n] if n > 0 else self.after, self.after[n:] if n > 0 else b""
        return out


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_line_without_end_is_rejected_as_too_long_in_bounded_memory():
    tail = b'\n{"text": "' + b"ok " * 40 + b'"}\n'
    records = []
    peak = peak_bytes(lambda: records.extend(iter_records(Endless(300 * MB, tail), "big.jsonl", 0, CFG)))
    assert peak < 16 * MB, f"reading a 300 MB line peaked at {peak / MB:.0f} MB"
    assert [r["reject_reason"] for r in records] == ["too_long", None]
    assert len(records[0]["text"]) == KEPT_PREFIX_BYTES and "314572800 bytes" in records[0]["reject_detail"]
    assert records[1]["text"].startswith("ok ok")


def test_a_small_gzip_that_expands_to_one_huge_line(tmp_path):
    bomb = tmp_path / "bomb.jsonl.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        for _ in range(100):
            f.write(b"[" * MB)
        f.write(b'\n{"text": "after the bomb"}\n')
    assert bomb.stat().st_size < MB
    records = []
    with gzip.open(bomb, "rb") as stream:
        peak = peak_bytes(lambda: records.extend(iter_records(stream, "bomb.jsonl.gz", 0, CFG)))
    assert peak < 16 * MB
    assert [r["reject_reason"] for r in records] == ["too_long", None] and records[1]["text"] == "after the bomb"


def test_deep_nesting_and_huge_integers_are_malformed_json_not_a_crash():
    lines = [b"[" * 100_000, b'{"text": "x", "n": ' + b"7" * 5000 + b"}", b'{"text": "fine"}']
    records = list(iter_records(io.BytesIO(b"\n".join(lines)), "hostile.jsonl", 0, CFG))
    assert [r["reject_reason"] for r in records] == ["malformed_json", "malformed_json", None]
    assert "nested too deeply" in records[0]["reject_detail"] and "digit" in records[1]["reject_detail"]
    assert parse_json("[" * 100_000)[1] and parse_json('{"a": 1}') == ({"a": 1}, None)


def test_text_files_and_paragraphs_are_bounded_too():
    limit = max_line_bytes(CFG)
    for mode, stream in (("file", Endless(limit + 10)), ("line", Endless(limit + 10, b"\nshort line\n")),
                         ("paragraph", io.BytesIO((b"x" * 1000 + b"\n") * (limit // 1000 + 5) + b"\nnext one\n"))):
        records = list(iter_records(stream, "doc.txt", 0, DataConfig(max_chars=10_000, txt_mode=mode)))
        assert records[0]["reject_reason"] == "too_long", mode
        assert len(records[0]["text"]) <= KEPT_PREFIX_BYTES
        if mode != "file":
            assert records[1]["reject_reason"] is None and records[1]["text"] in ("short line", "next one")


def test_iter_lines_keeps_ordinary_lines_whole():
    data = b"one\ntwo\r\n\nthree"
    assert list(iter_lines(io.BytesIO(data), 100)) == [(b"one", 0), (b"two\r", 0), (b"", 0), (b"three", 0)]


def test_fine_tuning_data_rejects_hostile_lines_and_keeps_the_rest(tmp_path):
    from tiny_models import tiny_tokenizer
    tiny_tokenizer(tmp_path)
    renderer = Renderer(str(tmp_path), max_len=64, val_fraction=0.0, seed=0, packing=False)
    good = json.dumps({"prompt": "How do I install nginx?", "completion": "sudo apt install nginx"})
    source = JsonLinesDatasource.__new__(JsonLinesDatasource)
    source.max_line_bytes = renderer.max_line_bytes
    lines = b"\n".join([b"[" * 100_000, b'{"prompt": "a", "completion": ' + b"9" * 5000 + b"}",
                        b'"' + b"z" * (renderer.max_line_bytes + 10) + b'"', good.encode()])
    table = pa.concat_tables(source._read_stream(io.BytesIO(lines), "sft.jsonl"))
    out = renderer(table).to_pylist()
    reasons = [row["reason"] for row in out if row["split"] == "reject"]
    assert [r.split(":")[0] for r in reasons] == ["malformed_json", "malformed_json", "too_long"], reasons
    assert sum(row["split"] == "train" for row in out) == 1
