"""The corpus pipeline's executors without Ray: which one ``data.executor=auto`` takes, and the pool of local
processes (order, progress, errors, the map/reduce of the duplicate search). Ray's side, and the whole pipeline
on both giving one dataset, are in tests/integration/test_prepare.py."""

import logging
import os
import random
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmforge.config import DataConfig, DedupConfig, RayConfig
from llmforge.data import executor
from llmforge.errors import InputError


class _Ray:  # stands in for the imported ray module: an earlier test in this process may have left one connected
    def __init__(self, connected):
        self.connected = connected

    def is_initialized(self):
        return self.connected


def test_auto_runs_small_inputs_locally_unless_a_cluster_is_asked_for(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", _Ray(connected=False))
    auto, mb = DataConfig(), 1_000_000
    assert executor.choose(auto, RayConfig(), 64 * mb) == "local"
    assert executor.choose(auto, RayConfig(), 64 * mb + 1) == "ray"
    assert executor.choose(DataConfig(local_max_mb=0), RayConfig(), 1) == "ray"
    assert executor.choose(auto, RayConfig(address="ray://head:10001"), 1) == "ray"
    assert executor.choose(DataConfig(executor="local"), RayConfig(address="ray://head:10001"), 10**12) == "local"
    assert executor.choose(DataConfig(executor="ray"), RayConfig(), 1) == "ray"
    monkeypatch.setitem(sys.modules, "ray", _Ray(connected=True))  # this process already joined a cluster
    assert executor.choose(auto, RayConfig(), 1) == "ray"
    assert executor.choose(DataConfig(executor="local"), RayConfig(), 1) == "local"
    monkeypatch.delitem(sys.modules, "ray")  # not imported at all: not connected either
    assert executor.choose(auto, RayConfig(), 1) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` sets for the job's driver
    assert executor.choose(auto, RayConfig(), 1) == "ray"


def _rows_after(items, delay):  # module level: the pool pickles tasks by reference
    time.sleep(delay * (3 - items[0]) / 3 + 0.2)  # the first item finishes last
    return [{"item": items[0], "pid": os.getpid(), "rayon": os.environ.get("RAYON_NUM_THREADS")}]


def _fails_on_two(items):
    if items[0] == 2:
        raise InputError("item 2 is bad", fix="leave it out")
    if items[0] > 2:
        time.sleep(30)  # the error must not wait for these
    return [{"item": items[0]}]


def test_local_processes_keep_item_order_log_progress_and_limit_threads(caplog):
    tasks = executor.LocalProcesses(cpus=2)
    try:
        with caplog.at_level(logging.INFO, logger="llmforge.data.pipeline"):
            rows = tasks.map(_rows_after, [0, 1, 2, 3], 0.6, what="step 9", progress_s=0.2)
    finally:
        tasks.close()
    assert [r["item"] for r in rows] == [0, 1, 2, 3]
    assert len({r["pid"] for r in rows}) == 2 and os.getpid() not in {r["pid"] for r in rows}
    assert {r["rayon"] for r in rows} == {"1"}  # one CPU's threads per process, as a Ray task of num_cpus=1
    assert any("step 9:" in m and "/4 tasks done" in m for m in caplog.messages)


def test_local_processes_raise_the_first_error_as_it_is_and_stop_the_other_tasks():
    tasks = executor.LocalProcesses(cpus=2)
    started = time.time()
    try:
        with pytest.raises(InputError, match="item 2 is bad"):
            tasks.map(_fails_on_two, [0, 1, 2, 3, 4])
    finally:
        tasks.close()  # returns at once: the task still sleeping was stopped with the error
    assert time.time() - started < 30, "the error or the close waited for the other tasks"


def test_duplicate_search_on_local_processes_matches_one_partition_in_process(tmp_path):
    import pyarrow.fs as pafs

    from llmforge.data.dedup import signature_batch
    from llmforge.data.pipeline import _bucket_files, _duplicates_of, find_duplicates, resolve_duplicates

    rng = random.Random(3)
    words = [f"w{i}" for i in range(2000)]
    texts = [" ".join(rng.choice(words) for _ in range(80)) for _ in range(40)]
    texts += texts[:5] + [t + " and one more line" for t in texts[5:10]]
    n = len(texts)
    table = pa.Table.from_pydict(signature_batch({"text": texts, "reject_reason": [None] * n, "order": list(range(n))},
                                                 DedupConfig()))
    files = []
    for i in range(0, n, 15):
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(table.slice(i, 15), files[-1])
    fs = pafs.LocalFileSystem()
    whole = resolve_duplicates([_duplicates_of(DedupConfig(), _bucket_files(files, fs, DedupConfig(), 1)[0])])
    tasks = executor.LocalProcesses(cpus=2)
    try:
        got = [find_duplicates(tasks, files, fs, DedupConfig(), partitions, map_tasks=2) for partitions in (1, 3)]
    finally:
        tasks.close()
    expected = ([(40 + i, i, "exact_duplicate") for i in range(5)] + [(45 + i, 5 + i, "near_duplicate") for i in range(5)])
    for dups in [whole, *got]:
        assert [(r["order"], r["duplicate_of"], r["kind"]) for r in dups.sort_by("order").to_pylist()] == expected


def test_auto_judges_a_gzipped_input_by_its_uncompressed_size(tmp_path, monkeypatch):
    """64 MB of gzipped JSONL is some 250 MB of text: ``auto`` counts what the gzip trailer records."""
    import gzip
    import json

    import pyarrow.fs as pafs

    from llmforge.config import Config
    from llmforge.data import pipeline, sources

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", _Ray(connected=False))
    rng = random.Random(3)
    lines = "".join(json.dumps({"text": " ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(400))}) + "\n"
                    for _ in range(3000)).encode()  # ~6 MB of text, repetitive: it compresses some 5x
    packed = tmp_path / "corpus.jsonl.gz"
    packed.write_bytes(gzip.compress(lines))
    two = tmp_path / "two.jsonl.gz"  # two gzip members: the trailer records the last one only
    two.write_bytes(gzip.compress(lines) + gzip.compress(b'{"text": "x"}\n'))
    plain = tmp_path / "corpus.jsonl"
    plain.write_bytes(lines)
    fs = pafs.LocalFileSystem()
    assert sources.text_bytes(fs, str(packed), packed.stat().st_size) == len(lines) > 3 * packed.stat().st_size
    assert sources.text_bytes(fs, str(plain), len(lines)) == len(lines)
    assert sources.text_bytes(fs, str(two), two.stat().st_size) == two.stat().st_size  # never below the file

    chosen = []
    monkeypatch.setattr(pipeline, "ensure_ray", lambda *a, **k: chosen.append("ray"))
    monkeypatch.setattr(executor, "RayTasks", lambda: "ray tasks")
    limit_mb = 3  # between the gzip file's size on disk and its text
    assert packed.stat().st_size < limit_mb * 1_000_000 < len(lines)
    cfg = Config.model_validate({"data": {"local_max_mb": limit_mb}})
    assert pipeline.start_tasks([str(packed)], cfg, dashboard=False) == "ray tasks" and chosen == ["ray"]
    tasks = pipeline.start_tasks([str(tmp_path / "two.jsonl.gz")], cfg, dashboard=False)
    try:
        assert isinstance(tasks, executor.LocalProcesses)
    finally:
        tasks.close()
