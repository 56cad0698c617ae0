"""`llmforge prepare` against Hugging Face datatrove 0.10.1 doing the same job, on the same generated corpus, the
same tokenizer and the same machine, one after the other.

    python bench/data_vs_datatrove.py [--docs 6700] [--docs 75000] [--workers 2] [--datatrove-python PY]

datatrove is not one of llmforge's dependencies: it runs in a virtualenv of its own (``--datatrove-python``; by
default ``.venv-datatrove/``, created with ``pip install "datatrove[processing]==0.10.1"`` on first use), in a
child process. Its job: JSONL reader, Gopher repetition and quality filters, its PII formatter, exact dedup
(signature, find, filter) and MinHash dedup (14 buckets of 8 hashes over 5-grams: signature, buckets, cluster,
filter), tokenization with the same ``tokenizer.json``; ``LocalPipelineExecutor`` with ``--workers`` tasks and
workers per stage. llmforge's: ``jobs/prepare_data.py --data.tokenizer.path DIR`` (the tokenizer reused, so
neither trains one) on a fresh local Ray.

The corpus (one per ``--docs``, seeded): documents of 3-8 paragraphs drawn from the bundled sample corpus's real
English and Chinese text (the Debian Reference), each with its own header line, 1 in 20 an exact copy of an
earlier one and 1 in 20 a copy with about 1% of its characters edited; about 630 bytes a document, so 75,000 are
about 47 MB. Prints one JSON line per corpus size: seconds and docs/s of each, llmforge's MB/s per core, the
ratio, and what each kept.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

DATATROVE = "datatrove[processing]==0.10.1"

DATATROVE_JOB = r'''
import sys, json, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.filters import GopherRepetitionFilter, GopherQualityFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.dedup import (MinhashDedupSignature, MinhashDedupBuckets, MinhashDedupCluster,
                                      MinhashDedupFilter, ExactDedupSignature, ExactFindDedups, ExactDedupFilter)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.pipeline.writers import JsonlWriter
from datatrove.data import Document

corpus, work, tokenizer, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def text_of(doc: Document) -> str:
    return doc.text

minhash = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
exact = ExactDedupConfig(content_getter=text_of)
started = time.time()
common = dict(tasks=workers, workers=workers, skip_completed=False)
LocalPipelineExecutor([
    JsonlReader(corpus, text_key="text", id_key="id"),
    GopherRepetitionFilter(), GopherQualityFilter(), PIIFormatter(),
    ExactDedupSignature(f"{work}/exact_sigs", exact), MinhashDedupSignature(f"{work}/mh_sigs", minhash),
    JsonlWriter(f"{work}/filtered"),
], logging_dir=f"{work}/logs/1", **common).run()
LocalPipelineExecutor([ExactFindDedups(f"{work}/exact_sigs", f"{work}/exact_dups", exact)],
                      tasks=1, workers=1, skip_completed=False, logging_dir=f"{work}/logs/2a").run()
LocalPipelineExecutor([MinhashDedupBuckets(f"{work}/mh_sigs", f"{work}/mh_buckets", config=minhash)],
                      tasks=minhash.num_buckets, workers=workers, skip_completed=False, logging_dir=f"{work}/logs/2b").run()
LocalPipelineExecutor([MinhashDedupCluster(f"{work}/mh_buckets", f"{work}/mh_remove", config=minhash)],
                      tasks=1, workers=1, skip_completed=False, logging_dir=f"{work}/logs/3").run()
kept = []
LocalPipelineExecutor([
    JsonlReader(f"{work}/filtered"),
    ExactDedupFilter(f"{work}/exact_dups", exact), MinhashDedupFilter(f"{work}/mh_remove"),
    JsonlWriter(f"{work}/kept"),
    DocumentTokenizer(f"{work}/tokens", tokenizer_name_or_path=tokenizer, eos_token="<|endoftext|>"),
], logging_dir=f"{work}/logs/4", **common).run()
import glob, gzip as gz
count = sum(1 for f in glob.glob(f"{work}/kept/*.jsonl.gz") for _ in gz.open(f, "rt"))
print(json.dumps({"seconds": time.time() - started, "kept_docs": count}))
'''


def sample_paragraphs() -> list[str]:
    from llmforge.samples import sample_file
    paragraphs = []
    with gzip.open(sample_file("corpus.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:  # the sample plants malformed lines: skipped here
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                paragraphs += [p.strip() for p in record["text"].split("\n\n") if len(p.strip()) >= 40]
    return sorted(set(paragraphs))


def make_corpus(path: Path, docs: int, seed: int = 0) -> int:
    """``docs`` JSONL documents (see the module docstring); returns the corpus's bytes of text."""
    rng = random.Random(seed)
    pool = sample_paragraphs()
    written, size = [], 0
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(docs):
            roll = rng.random()
            if written and roll < 0.05:
                text = rng.choice(written)
            elif written and roll < 0.10:
                chars = list(rng.choice(written))
                for _ in range(max(1, len(chars) // 100)):
                    chars[rng.randrange(len(chars))] = rng.choice("abcdefghijklmnopqrstuvwxyz")
                text = "".join(chars)
            else:
                text = f"Note {i}: {rng.choice(['setup', 'packages', 'network', 'system'])}\n\n" + "\n\n".join(
                    rng.sample(pool, rng.randint(3, 8)))
                if len(written) < 5000:
                    written.append(text)
            f.write(json.dumps({"id": f"doc-{i}", "text": text}, ensure_ascii=False) + "\n")
            size += len(text.encode("utf-8"))
    return size


def tokenizer_dir(work: Path) -> Path:
    from llmforge.config import TokenizerConfig
    from llmforge.data.tokenizer import train_tokenizer
    out = work / "tokenizer"
    train_tokenizer(sample_paragraphs(), TokenizerConfig(vocab_size=8192), out, model_max_length=2048)
    return out


def datatrove_python(given: str | None) -> str:
    if given:
        return given
    venv = REPO / ".venv-datatrove"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with {DATATROVE} (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", DATATROVE], check=True)
    return str(python)


def run_datatrove(python: str, corpus: Path, work: Path, tokenizer: Path, workers: int) -> dict:
    script = work / "datatrove_job.py"
    script.write_text(DATATROVE_JOB, encoding="utf-8")
    started = time.time()
    proc = subprocess.run([python, str(script), str(corpus), str(work / "dt"), str(tokenizer / "tokenizer.json"),
                           str(workers)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"datatrove failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"seconds": round(time.time() - started, 1), "kept_docs": out["kept_docs"]}


def run_llmforge(corpus: Path, work: Path, tokenizer: Path) -> dict:
    out = work / "llmforge"
    started = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "prepare_data.py"), "--input", str(corpus),
                           "--output", str(out), f"--data.tokenizer.path={tokenizer}"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "platform")})
    if proc.returncode != 0:
        raise RuntimeError(f"llmforge prepare failed:\n{proc.stdout[-3000:]}")
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    return {"seconds": round(time.time() - started, 1), "kept_docs": stats.get("kept_docs")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, action="append", help="corpus sizes in documents (default 6700, 75000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--datatrove-python", help="a python with datatrove 0.10.1 (default: .venv-datatrove/)")
    args = parser.parse_args()
    python = datatrove_python(args.datatrove_python)
    cores = os.cpu_count() or 1
    for docs in args.docs or [6700, 75000]:
        work = Path(tempfile.mkdtemp(prefix="llmforge-bench-dt-"))
        try:
            corpus = work / "corpus"
            size = make_corpus(corpus, docs)
            tokenizer = tokenizer_dir(work)
            dt = run_datatrove(python, corpus, work, tokenizer, args.workers)
            lf = run_llmforge(corpus, work, tokenizer)
            print(json.dumps({
                "bench": "data_vs_datatrove", "docs": docs, "mb": round(size / 1e6, 1), "cores": cores,
                "workers": args.workers,
                "datatrove": {**dt, "docs_per_s": round(docs / dt["seconds"], 1)},
                "llmforge": {**lf, "docs_per_s": round(docs / lf["seconds"], 1),
                             "mb_per_s_per_core": round(size / 1e6 / lf["seconds"] / cores, 3)},
                "llmforge_over_datatrove_docs_per_s": round(dt["seconds"] / lf["seconds"], 2)}), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
