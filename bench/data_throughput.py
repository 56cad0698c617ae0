"""Docs/s of the corpus pipeline: `prepare` on Ray against the same pure functions in one plain process.

    python bench/data_throughput.py [--mb 200] [--workdir DIR]

Generates a corpus of about ``--mb`` MB (sample documents with random edits, so the filter, PII and
dedup steps have realistic work), runs ``prepare`` on a local Ray cluster, then the same steps in one
Python process (everything in memory, no Ray), and prints one JSON line with both rates, their ratio
and the peak memory (resident set of the driver plus all Ray worker processes) of each.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from llmforge.config import load_config  # noqa: E402
from llmforge.data import pipeline, sources  # noqa: E402
from llmforge.data import tokenizer as tokenizer_lib  # noqa: E402
from llmforge.data.pack import pack_tokens, split_of  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "platform" / "llmforge" / "sample_data" / "corpus.jsonl.gz"


class PeakRss:
    """Samples the summed RSS of this process, its children and Ray's worker processes."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        seen = {p.pid for p in procs}
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info.get("cmdline") or [])
            if p.pid not in seen and ("ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd):
                procs.append(p)
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def generate(out_dir: Path, megabytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    base = []
    for line in gzip.open(SAMPLE, "rt", encoding="utf-8"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the sample plants malformed lines on purpose
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            base.append(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    target, written, n, part = megabytes * 1_000_000, 0, 0, 0
    while written < target:
        with open(out_dir / f"part-{part:03d}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(20_000):
                r = rng.choice(base)
                words = r["text"].split(" ")
                if rng.random() < 0.8:  # most documents become distinct, some stay (near) duplicates
                    for _ in range(max(1, len(words) // 8)):
                        words[rng.randrange(len(words))] = f"w{rng.randrange(10**6)}"
                line = json.dumps({"id": f"g{n}", "text": " ".join(words)}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                n += 1
                if written >= target:
                    break
        part += 1
    return n


def plain(files: list[str], cfg) -> int:
    """The same pure functions, one process, no Ray: the baseline."""
    data = cfg.data
    staged = []
    for path in files:
        with open(path, "rb") as f:
            batch = []
            for row in sources.iter_records(f, path, files.index(path), data):
                batch.append(row)
                if len(batch) == data.batch_size:
                    staged.append(pipeline.process_batch(pa.Table.from_pylist(batch, schema=sources.RECORD_SCHEMA), data))
                    batch = []
            if batch:
                staged.append(pipeline.process_batch(pa.Table.from_pylist(batch, schema=sources.RECORD_SCHEMA), data))
    buckets = pa.concat_tables([pipeline.bucket_rows(t, data.dedup, 1) for t in staged])
    signatures = pa.concat_tables([pipeline.signature_rows(t) for t in staged])
    dups = pipeline.resolve_duplicates([pipeline.duplicates_in_partition(buckets, signatures, data.dedup)])
    args = {"dup_orders": dups.column("order").to_numpy(), "dup_of": dups.column("duplicate_of").to_numpy(),
            "dup_kind": dups.column("kind").to_pylist()}
    clean = pa.concat_tables([pipeline.clean_rows(pipeline.apply_duplicates(t, **args)) for t in staged])
    texts = clean.column("text").to_pylist()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_lib.train_tokenizer(texts[:data.tokenizer.max_train_docs], data.tokenizer, tmp, data.seq_len)
        tok = tokenizer_lib.load_fast(tmp)
    eos = tok.token_to_id(tokenizer_lib.EOS)
    orders = clean.column("order").to_pylist()
    for split in ("train", "val"):
        docs = [t for t, o in zip(texts, orders) if split_of(o, data.val_fraction, data.split_seed) == split]
        left: list[int] = []
        for i in range(0, len(docs), 512):
            ids = [e.ids for e in tok.encode_batch(docs[i:i + 512], add_special_tokens=False)]
            _, left = pack_tokens(left, ids, data.seq_len, eos)
    return sum(t.num_rows for t in staged)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmforge-bench-"))
    corpus = work / "corpus"
    docs = generate(corpus, args.mb)
    cfg = load_config(None, {"data.tokenizer.vocab_size": 8192})
    files = sorted(str(p) for p in corpus.glob("*.jsonl"))

    import ray
    ray.init(include_dashboard=False, log_to_driver=False)
    with PeakRss() as ray_mem:
        t0 = time.time()
        pipeline.prepare([str(corpus)], str(work / "out"), cfg, overwrite=True)
        ray_s = time.time() - t0
    ray.shutdown()

    with PeakRss() as plain_mem:
        t0 = time.time()
        plain(files, cfg)
        plain_s = time.time() - t0

    print(json.dumps({
        "bench": "data_throughput", "corpus_mb": args.mb, "docs": docs, "cpus": os.cpu_count(),
        "ray_docs_per_s": round(docs / ray_s, 1), "plain_docs_per_s": round(docs / plain_s, 1),
        "ray_over_plain": round(plain_s / ray_s, 3),
        "ray_seconds": round(ray_s, 1), "plain_seconds": round(plain_s, 1),
        "ray_peak_rss_mb": round(ray_mem.peak / 2**20), "plain_peak_rss_mb": round(plain_mem.peak / 2**20),
    }))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
