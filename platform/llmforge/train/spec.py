"""What a training job hands its workers: one typed :class:`LoopSpec`, built on the driver, the same for every
stage (pretraining, continued pretraining, fine-tuning, alignment), read by :func:`llmforge.train.loop.train_loop`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmforge.config import Config


@dataclass(frozen=True)
class ModelSource:
    """Where the trained model's starting weights come from.

    - ``preset``: random init from ``model.preset`` (pretraining);
    - ``init_from``: the weights of an HF model dir, ``s3://`` copy or ``models:/NAME/VERSION`` (``uri``),
      every parameter trained (continued pretraining, full fine-tuning);
    - ``lora``: that model frozen, with LoRA adapters on ``targets`` (only the adapters are trained and saved);
      ``load_in_4bit``: the frozen base in bitsandbytes NF4 (QLoRA).
    """

    kind: Literal["preset", "init_from", "lora"] = "preset"
    uri: str | None = None
    targets: tuple[str, ...] = ()
    load_in_4bit: bool = False

    @property
    def trainable_only(self) -> bool:
        """Checkpoints hold only the trained parameters (the frozen base is the same in every one)."""
        return self.kind == "lora"


@dataclass(frozen=True)
class LoopSpec:
    config: dict                     # the job's Config, as JSON (validated again on each worker)
    manifest: dict                   # seq_len, vocab_size, eos/pad ids, split sizes
    data: dict[str, str]             # split name -> token shards URI ("train", optionally "val")
    run_uri: str                     # the run's dir in checkpoint storage
    model: ModelSource = field(default_factory=ModelSource)
    objective: str = "next_token"    # a module of llmforge.train.objectives
    frozen: ModelSource | None = None  # a frozen model the objective runs (DPO's reference, distillation's teacher)
    resume_from: str | None = None   # train.resume_from, when the run has no checkpoint of its own
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    tokenizer: str | None = None     # the tokenizer dir (train.eval_tasks); None: the model source's own (uri)

    @property
    def cfg(self) -> Config:
        return Config.model_validate(self.config)
