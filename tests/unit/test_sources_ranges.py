"""Byte-range reads of one file (pass 1's read tasks): the ranges of a file, read on their own, give exactly the
records of the whole file, with the same ids and orders, whatever the cut points fall on."""

import io
import json
import random

import pyarrow.fs as pafs
import pytest

from llmforge.config import DataConfig
from llmforge.data.sources import (Piece, RangeStream, byte_ranges, count_newlines, iter_records, read_blocks,
                                   splittable)

CFG = DataConfig(max_chars=2_000)  # a line bound of about 1 MiB


def corpus(rng: random.Random, lines: int) -> bytes:
    """JSONL with blank lines, CRLF endings, bad JSON, a line past the bound and no final newline."""
    out = []
    for i in range(lines):
        kind = rng.random()
        if kind < 0.1:
            out.append(b"")
        elif kind < 0.15:
            out.append(b"{not json")
        elif kind < 0.17:
            out.append(json.dumps({"text": "x" * (1_300_000)}).encode())  # too_long
        else:
            text = " ".join(rng.choice(["alpha", "beta", "gamma", "数据", "\n"]) for _ in range(rng.randrange(1, 60)))
            line = json.dumps({"text": text, "id": None if rng.random() < 0.5 else f"d{i}"}, ensure_ascii=False)
            out.append(line.encode() + (b"\r" if rng.random() < 0.1 else b""))
    return b"\n".join(out)


def records_by_ranges(raw: bytes, cuts: list[int], path: str = "c.jsonl", cfg: DataConfig = CFG) -> list[dict]:
    bounds = [0, *cuts, len(raw)]
    rows = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        f = io.BytesIO(raw)
        before = count_newlines(io.BytesIO(raw), 0, start)
        stream = RangeStream(f, start, end)
        rows += list(iter_records(stream, path, 3, cfg, before + stream.skipped_newline))
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_ranges_read_the_same_records_as_the_whole_file(seed):
    rng = random.Random(seed)
    raw = corpus(rng, 300)
    whole = list(iter_records(io.BytesIO(raw), "c.jsonl", 3, CFG))
    assert any(r["reject_reason"] == "too_long" for r in whole) and any(r["reject_reason"] == "malformed_json" for r in whole)
    newlines = [i for i, b in enumerate(raw) if b == 10]
    for _ in range(8):  # random cuts, and cuts on, just before and just after newlines
        cuts = sorted(set(rng.sample(range(1, len(raw)), rng.randrange(1, 12))))
        assert records_by_ranges(raw, cuts) == whole
        at = rng.choice(newlines)
        for cut in (at, at + 1, at + 2):
            assert records_by_ranges(raw, [cut]) == whole
    assert records_by_ranges(raw, list(range(1, len(raw), 97_001))) == whole  # many ranges inside the long lines


def test_text_lines_by_ranges_and_orders_skip_blank_lines():
    raw = b"one\n\ntwo\r\n   \nthree"
    cfg = DataConfig(txt_mode="line")
    whole = list(iter_records(io.BytesIO(raw), "t.txt", 3, cfg))
    assert [(r["id"], r["text"], r["order"] & 0xFFFFFFFF) for r in whole] == [
        ("t.txt:1", "one", 0), ("t.txt:3", "two", 2), ("t.txt:5", "three", 4)]
    for cut in range(1, len(raw)):
        assert records_by_ranges(raw, [cut], "t.txt", cfg) == whole


def test_byte_ranges_and_which_files_split():
    assert byte_ranges(10, 4) == [(0, 3), (3, 6), (6, 10)]
    assert byte_ranges(4, 4) == [(0, 4)]
    assert byte_ranges(0, 4) == [(0, 0)]
    assert splittable("a.jsonl", CFG) and splittable("A.JSONL", CFG)
    assert not splittable("a.jsonl.gz", CFG) and not splittable("a.parquet", CFG)
    assert not splittable("a.txt", DataConfig(txt_mode="paragraph")) and splittable("a.txt", DataConfig(txt_mode="line"))


def test_read_blocks_of_a_range_piece_from_a_file(tmp_path):
    rng = random.Random(9)
    raw = corpus(rng, 200)
    path = tmp_path / "c.jsonl"
    path.write_bytes(raw)
    fs = pafs.LocalFileSystem()
    cfg = DataConfig(max_chars=2_000, batch_size=16)
    whole = [row for t in read_blocks(fs, Piece(str(path), 3), cfg) for row in t.to_pylist()]
    pieces = []
    before = 0
    for part, (start, end) in enumerate(byte_ranges(len(raw), len(raw) // 5)):
        pieces.append(Piece(str(path), 3, start, end, before, part))
        with open(path, "rb") as f:
            before += count_newlines(f, start, end)
    tables = [t for p in pieces for t in read_blocks(fs, p, cfg)]
    assert all(t.num_rows <= 16 for t in tables)
    assert [row for t in tables for row in t.to_pylist()] == whole
