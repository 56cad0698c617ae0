"""The embedded default run: prepare the bundled sample corpus (skipped when already prepared)."""

from __future__ import annotations

import json
import logging
import sys

from llmforge import storage
from llmforge.cli import SAMPLE_CORPUS
from llmforge.config import load_config, parse_overrides
from llmforge.data.pipeline import MANIFEST, prepare
from llmforge.errors import LLMForgeError
from llmforge.runtime import setup_logging

log = logging.getLogger("llmforge")
QUICKSTART_DIR = "runs/quickstart"
SAMPLE_DATASET = "runs/sample-dataset"
SAMPLE_DATA_SETTINGS = {"data.seq_len": 256, "data.tokenizer.vocab_size": 4096}


def prepare_sample(dataset: str, ray_cfg=None) -> dict:
    """Prepare the bundled sample corpus into ``dataset`` unless a complete dataset is already there."""
    if storage.exists(storage.join(dataset, MANIFEST)):
        log.info("sample dataset already prepared at %s (delete it to prepare again)", dataset)
        return storage.read_json(storage.join(dataset, MANIFEST))
    cfg = load_config(None, SAMPLE_DATA_SETTINGS)
    if ray_cfg is not None:
        cfg.ray = ray_cfg
    return prepare([str(SAMPLE_CORPUS)], dataset, cfg, overwrite=True)


def main(argv: list[str]) -> int:
    setup_logging()
    try:
        overrides = parse_overrides(argv)
        dataset = storage.join(QUICKSTART_DIR, "dataset")
        manifest = prepare_sample(dataset, overrides)
        stats = storage.read_json(storage.join(dataset, "stats.json"))
    except LLMForgeError as exc:
        print(f"llmforge quickstart: error: {exc}", file=sys.stderr)
        return exc.exit_code
    log.info("dataset: %s (clean/, rejects/, tokenizer/, tokens/, stats.json)", dataset)
    print(json.dumps({"event": "quickstart_done", "dataset": dataset, "kept_docs": stats["kept_docs"],
                      "rejected_docs": stats["rejected_docs"], "splits": manifest["splits"]}), flush=True)
    return 0
