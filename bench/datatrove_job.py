"""The datatrove side of bench/data_vs_datatrove.py; run by the Python that has datatrove (not llmforge's venv).

    DATATROVE_PYTHON bench/datatrove_job.py CORPUS_DIR WORK_DIR TOKENIZER_DIR WORKERS

The same job as `jobs/prepare_data.py --data.tokenizer.path`: read JSONL, Gopher repetition and quality filters,
PII formatter, MinHash near-duplicate removal (14 bands of 8; exact copies are found by it too), tokenize with
the given tokenizer. LocalPipelineExecutor, WORKERS processes, one task per input file. The documents the
filters keep are in WORK_DIR/filtered, those MinHash removes in WORK_DIR/removed (for the recall figure). Prints
one JSON line:
{"seconds", "docs_in", "stage_seconds"}.
"""

import json
import sys
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.pipeline.writers import JsonlWriter


def main(corpus: str, work: str, tokenizer: str, workers: int) -> None:
    files = sorted(Path(corpus).glob("*.jsonl"))
    tasks = len(files)
    w = Path(work)
    mh = MinhashConfig(num_buckets=14, hashes_per_bucket=8)
    stages = {
        "filter_pii": ([JsonlReader(corpus, glob_pattern="*.jsonl"), GopherRepetitionFilter(), GopherQualityFilter(),
                        PIIFormatter(), JsonlWriter(str(w / "filtered"))], tasks),
        "minhash_signature": ([JsonlReader(str(w / "filtered")), MinhashDedupSignature(str(w / "sigs"), config=mh)], tasks),
        "minhash_buckets": ([MinhashDedupBuckets(str(w / "sigs"), str(w / "buckets"), config=mh)], mh.num_buckets),
        "minhash_cluster": ([MinhashDedupCluster(str(w / "buckets"), str(w / "remove"), config=mh)], 1),
        "dedup_tokenize": ([JsonlReader(str(w / "filtered")),
                            MinhashDedupFilter(str(w / "remove"), exclusion_writer=JsonlWriter(str(w / "removed"))),
                            DocumentTokenizer(str(w / "tokens"), tokenizer_name_or_path=str(Path(tokenizer) / "tokenizer.json"),
                                              eos_token="<|endoftext|>")], tasks),
    }
    seconds = {}
    started = time.time()
    for name, (pipeline, n) in stages.items():
        t0 = time.time()
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=min(workers, n),
                              logging_dir=str(w / "logs" / name)).run()
        seconds[name] = round(time.time() - t0, 2)
    total = time.time() - started
    docs = sum(1 for f in files for _ in open(f, encoding="utf-8"))
    print(json.dumps({"seconds": round(total, 2), "docs_in": docs, "stage_seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
