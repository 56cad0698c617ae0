"""The sample data shipped inside the package (``llmforge/sample_data/``), so every default that uses it
works wherever llmforge is installed: a checkout, a wheel, the cluster image.

- ``corpus.jsonl.gz``: 901 records of the Debian Reference (English and Chinese) with planted PII,
  duplicates and junk, for ``prepare`` and for ``pretrain`` without ``--data.dataset``;
- ``chat.jsonl``: 80 synthetic chat and instruction records for fine-tuning;
- ``preferences.jsonl``: 80 synthetic preference pairs for alignment (the ``tiny`` recipe's DPO stage);
- ``quickstart.yaml`` / ``quickstart-lora.yaml``: the quickstart's pretraining and LoRA stages.

Provenance and licences: ``sample_data/README.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmforge import storage
from llmforge.config import RayConfig, load_config
from llmforge.errors import InputError
from llmforge.runtime import quiet_ray_data

log = logging.getLogger("llmforge")
SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data"
SAMPLE_DATASET = "runs/sample-dataset"
# The sample corpus is small: a short context and vocabulary give the tiny models enough sequences.
SAMPLE_DATA_SETTINGS = {"data.seq_len": 256, "data.tokenizer.vocab_size": 4096}


def sample_file(name: str) -> Path:
    """The path of one shipped sample file; a clear error when the installation lacks it."""
    path = SAMPLE_DATA / name
    if not path.is_file():
        raise InputError(f"The sample file {name} is not installed with llmforge (looked in {SAMPLE_DATA}).",
                         fix="reinstall llmforge from a complete checkout (`pip install .`), or give your own "
                             "data (--data.dataset DIR for training, --input for prepare).")
    return path


def prepare_sample(dataset: str = SAMPLE_DATASET, ray_cfg: RayConfig | None = None) -> dict:
    """Prepare the sample corpus into ``dataset`` unless a complete dataset is already there; the manifest."""
    from llmforge.data.pipeline import MANIFEST, prepare

    if storage.exists(storage.join(dataset, MANIFEST)):
        log.info("sample dataset already prepared at %s (delete it to prepare again)", dataset)
        return storage.read_json(storage.join(dataset, MANIFEST))
    cfg = load_config(None, SAMPLE_DATA_SETTINGS)
    if ray_cfg is not None:
        cfg.ray = ray_cfg
    with quiet_ray_data():  # seconds per step: the pipeline's own step lines are progress enough
        return prepare([str(sample_file("corpus.jsonl.gz"))], dataset, cfg, overwrite=True)
