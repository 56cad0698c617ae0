import pytest

from llmforge import storage
from llmforge.errors import StorageError


def test_expand_file_dir_and_glob(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.jsonl", "a/2.txt", "a/skip.csv", "3.jsonl.gz"):
        (tmp_path / name).write_text("x")
    suffixes = (".jsonl", ".txt", ".jsonl.gz")
    assert [p.rsplit("/", 1)[1] for p in storage.expand(str(tmp_path), suffixes)] == ["3.jsonl.gz", "1.jsonl", "2.txt"]
    assert [p.rsplit("/", 1)[1] for p in storage.expand(str(tmp_path / "a" / "*.jsonl"), suffixes)] == ["1.jsonl"]
    assert storage.expand(str(tmp_path / "a" / "skip.csv"), suffixes) == [str(tmp_path / "a" / "skip.csv")]


def test_write_read_move(tmp_path):
    storage.write_json(str(tmp_path / "src" / "m.json"), {"a": 1})
    storage.write_text(str(tmp_path / "src" / "sub" / "t.txt"), "hi")
    storage.move_tree(str(tmp_path / "src"), str(tmp_path / "dst"), last="m.json")
    assert storage.read_json(str(tmp_path / "dst" / "m.json")) == {"a": 1}
    assert storage.read_text(str(tmp_path / "dst" / "sub" / "t.txt")) == "hi"
    assert not storage.exists(str(tmp_path / "src"))


def test_bad_uris():
    with pytest.raises(StorageError, match="Unsupported URI scheme"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="not a valid S3 URI"):
        storage.resolve("s3://")
    assert storage.resolve("s3://bucket/prefix/")[1] == "bucket/prefix"
