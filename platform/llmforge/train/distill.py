"""The distillation job (``llmforge distill``, ``jobs/distill.py``): a student trained on a teacher's token
distributions over a prepared dataset, on the one training loop (Ray Train + DeepSpeed).

The student is ``model.preset`` (with ``model.overrides``) at random init, or the model ``model.init_from``;
the teacher (``distill.teacher``) must share the dataset's tokenizer, which the student is built on: checked
before any worker starts. Each worker holds the teacher frozen (train/frozen.py; partitioned under ZeRO-3) and
runs it on the same micro-batches; the loss is train/objectives/distill.py's. The student is exported as an HF
dir (``OUTPUT/model``) and logged in MLflow; ``val_loss`` is its plain next-token loss on the validation split,
comparable with a pretraining run's.
"""

from __future__ import annotations

import json
import logging

from llmforge import storage, tracking
from llmforge.config import Config
from llmforge.errors import InputError
from llmforge.train.lora import resolve_base
from llmforge.train.spec import ModelSource
from llmforge.train.trainer import check_model_for_dataset, check_request, train_on_tokens, worker_uri

log = logging.getLogger("llmforge.train")


def distill(cfg: Config) -> dict:
    """Run the job; returns the summary printed as the last stdout line."""
    d = cfg.distill
    if not d.teacher:
        raise InputError("No teacher model given.", fix="pass --teacher MODEL_DIR (or s3://..., models:/NAME/VERSION).")
    manifest, student = check_request(cfg)
    teacher_dir = resolve_base(d.teacher, tracking.tracking_uri(cfg))
    teacher = check_model_for_dataset("distill.teacher", d.teacher, teacher_dir, cfg, manifest,
                                      storage.join(cfg.data.dataset, manifest["tokenizer"]))
    log.info("distillation: teacher %s (%s, %s embeddings), student %s (%s embeddings), %s KL at T=%g, alpha %g",
             d.teacher, teacher.model_type, teacher.vocab_size, cfg.model.init_from or cfg.model.preset,
             student.vocab_size, d.kl, d.temperature, d.alpha)
    source = ModelSource("init_from", worker_uri(cfg.model.init_from)) if cfg.model.init_from else ModelSource()
    tags = {"job": "distill", "teacher": d.teacher, "student": cfg.model.init_from or cfg.model.preset}
    origin = f"Distilled from `{d.teacher}` ({d.kl} KL, T={d.temperature}, alpha={d.alpha})" + \
        (f", starting from `{cfg.model.init_from}`" if cfg.model.init_from else ", from random initialization")
    summary, metrics = train_on_tokens(cfg, manifest, student, f"distill-{cfg.model.preset}", source, tags, origin,
                                       objective="distill", frozen=ModelSource("init_from", worker_uri(d.teacher)))
    summary = {"event": "distill_done", "teacher": d.teacher, **summary,
               "teacher_val_loss": metrics.get("val_teacher_ce"), "val_kl": metrics.get("val_kl")}
    log.info("distillation done: %s", json.dumps(summary))
    return summary
