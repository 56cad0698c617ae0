"""Configuration: one pydantic tree for every job, loaded from YAML plus dotted overrides.

A job does ``cfg = load_config(path, overrides)`` and passes ``cfg`` down. Every model forbids
unknown keys, so a typo fails with the field's dotted name and the file (or override) it came from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmforge.errors import ConfigError

PII_TYPES = ("EMAIL", "PHONE", "ID_CN", "CARD", "IP")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PiiPattern(Strict):
    """An extra PII pattern: every match is replaced with ``<NAME>``."""

    name: str = Field(pattern=r"^[A-Z][A-Z0-9_]*$", description="placeholder name, upper case")
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class PiiConfig(Strict):
    """PII masking with typed placeholders (`<EMAIL>`, `<PHONE>`, `<ID_CN>`, `<CARD>`, `<IP>`)."""

    enabled: bool = Field(True, description="mask PII at all")
    types: list[Literal["EMAIL", "PHONE", "ID_CN", "CARD", "IP"]] = Field(list(PII_TYPES), description="the built-in detectors to run")
    extra_patterns: list[PiiPattern] = Field([], description="your own patterns, `[{name: NAME, pattern: REGEX}]`; matches become `<NAME>`")
    meta: Literal["mask", "drop", "keep"] = Field("mask", description="the input's other fields (`meta` in `clean/`): "
                                                  "`mask` PII in every string and number of them, `drop` them, or `keep` them as they are")


class DedupConfig(Strict):
    """Exact and near-duplicate removal; within a group the document first in the input is kept."""

    exact: bool = Field(True, description="drop exact duplicates (64-bit hash of the normalized text)")
    near: bool = Field(True, description="drop near duplicates (MinHash + LSH, each candidate pair verified)")
    threshold: float = Field(0.7, gt=0.0, le=1.0, description="Jaccard similarity of shingle sets (estimated)")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    shingle_size: int = Field(5, ge=1, le=32, description="characters per shingle")
    seed: int = Field(1, description="MinHash seed")


class TokenizerConfig(Strict):
    """The byte-level BPE tokenizer trained on the clean text (or reused from `path`)."""

    path: str | None = Field(None, description="reuse this tokenizer dir instead of training one")
    vocab_size: int = Field(8192, ge=300, le=1_000_000, description="BPE vocabulary size")
    min_frequency: int = Field(2, ge=1, description="min pair frequency for a merge")
    max_train_docs: int = Field(200_000, ge=1, description="documents streamed into the BPE trainer")


class DataConfig(Strict):
    """The corpus pipeline (``llmforge prepare``) and the dataset a training job reads."""

    dataset: str | None = Field(None, description="a prepared dataset dir (training jobs)")
    text_field: str = Field("text", description="the text field of JSONL and Parquet inputs")
    id_field: str = Field("id", description="the id field of JSONL and Parquet inputs (optional in the data)")
    txt_mode: Literal["file", "paragraph", "line"] = Field(
        "file", description="what one document is in a .txt file: a `file`, a `paragraph` or a `line`"
    )
    unicode_form: Literal["NFKC", "NFC", "none"] = Field("NFKC", description="Unicode normalization")
    # Quality filter. Fractions are of characters, so they mean the same for Chinese and English.
    min_chars: int = Field(50, ge=0, description="shorter documents are rejected (`too_short`)")
    max_chars: int = Field(200_000, ge=1, description="longer documents are rejected (`too_long`)")
    # The defaults are calibrated on tests/data/filter_set.jsonl.gz (real prose, poetry, code documentation,
    # Chinese prose and poetry, forum posts, and spam): see docs/data.md, "Calibrating the filters".
    max_symbol_ratio: float = Field(0.5, ge=0.0, le=1.0, description="max fraction of visible characters that are "
                                    "not letters or digits (box-drawing characters count as layout, like spaces)")
    max_duplicate_line_fraction: float = Field(0.3, ge=0.0, le=1.0, description="max fraction of line characters in "
                                               "repeated lines (lines without a letter or digit left out)")
    repetition_min_tokens: int = Field(30, ge=0, description="the repeated n-gram checks apply to documents of at "
                                       "least this many tokens (a short poem repeating a phrase is not spam)")
    max_top_2gram_fraction: float = Field(0.2, ge=0.0, le=1.0, description="max coverage of the most frequent 2-gram")
    max_top_3gram_fraction: float = Field(0.18, ge=0.0, le=1.0, description="max coverage of the most frequent 3-gram")
    max_duplicate_ngram_fraction: float = Field(0.4, ge=0.0, le=1.0, description="max coverage of repeated `duplicate_ngram_size`-grams")
    duplicate_ngram_size: int = Field(10, ge=2, le=20, description="n of the repeated n-gram check")
    min_unique_token_ratio: float = Field(0.1, ge=0.0, le=1.0, description="min distinct/total tokens (documents of 20+ tokens)")
    languages: list[str] = Field(default_factory=list, description="keep only documents in these languages "
                                 "(ISO 639-1 codes as py3langid gives them: en, zh, de, ...); empty: keep all. "
                                 "Every kept document's language is in clean/ (lang, lang_score)")
    min_language_share: float = Field(0.2, gt=0.0, le=1.0, description="a mixed-script document (Chinese and "
                                      "English, say) counts as each language holding at least this share of its tokens (CJK "
                                      "characters, words)")
    decontaminate: list[str] = Field(default_factory=list, description="evaluation sets (JSONL or text, one item "
                                     "per record or line, local or s3://): documents sharing a "
                                     "decontaminate_ngram-gram with an item are rejected (`contaminated`)")
    decontaminate_ngram: int = Field(13, ge=4, le=64, description="n of the decontamination n-grams (tokens: words, "
                                     "or CJK characters)")
    pii: PiiConfig = PiiConfig()
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_len: int = Field(512, ge=8, le=1_048_576, description="tokens per packed training sequence")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="documents held out for validation")
    split_seed: int = Field(0, description="seed of the train/validation split")
    batch_size: int = Field(256, ge=1, description="documents per batch of the corpus pipeline's first pass")
    read_range_mb: int = Field(16, ge=1, description="an uncompressed JSONL file (or text file with txt_mode line) "
                               "larger than this is read by several tasks, in byte ranges of at most this many MB")
    executor: Literal["auto", "ray", "local"] = Field(
        "auto", description="where the corpus pipeline's tasks run: `ray` (the cluster at ray.address, or a local Ray "
        "started for the job), `local` (one process per CPU of this machine, no Ray); `auto`: `local` when no Ray "
        "cluster is given or connected and the input is at most data.local_max_mb, else `ray`")
    local_max_mb: int = Field(64, ge=0, description="data.executor=auto runs inputs of at most this many MB "
                              "(a gzip file counted at the uncompressed size it records) in local processes: there "
                              "a Ray's start and stop (seconds) is most of the job")

    @model_validator(mode="after")
    def _bounds(self) -> "DataConfig":
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be below max_chars ({self.max_chars})")
        return self


class ModelConfig(Strict):
    """The model a pretraining run builds (random init; vocabulary and context come from the dataset)."""

    preset: str = Field("deepseek-tiny", description="a name from llmforge.model.presets.PRESETS")
    overrides: dict[str, Any] = Field(default_factory=dict, description="arguments for the HF config class")
    init_from: str | None = Field(None, description="continued pretraining: start from this model's weights (HF dir, "
                                  "s3://, models:/NAME/VERSION) with a fresh optimizer and schedule, instead of "
                                  "the preset's random init; the dataset must use its tokenizer")


class TrainConfig(Strict):
    """The Ray Train + DeepSpeed loop every training job runs (pretraining and fine-tuning)."""

    num_workers: int | tuple[int, int] = Field(2, description="Ray Train workers (one GPU each when GPUs are used), or `[min, max]`: elastic, as many as the cluster gives")
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker; CPU-only clusters: `(CPUs - 1) / workers` (at most 1) unless set")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="optimizer state in host memory (ZeRO 1-3)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    micro_batch_size: int = Field(8, ge=1, description="sequences per worker per forward pass")
    grad_accum: int = Field(1, ge=1, description="micro-batches per worker per optimizer step (at the largest worker count)")
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (AdamW, linear warm-up, cosine decay)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine floor, as a fraction of `lr`")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    beta1: float = Field(0.9, description="AdamW beta1")
    beta2: float = Field(0.95, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="gradient norm clipping (0: off)")
    activation_checkpointing: bool = Field(False, description="recompute activations in backward")
    log_every: int = Field(10, ge=1, description="steps between step log lines and MLflow metrics")
    eval_every: int = Field(100, ge=1, description="steps between validation passes")
    eval_batches: int = Field(8, ge=1, description="validation micro-batches per pass")
    eval_tasks: list[str] = Field(default_factory=list, description="lm-eval tasks (shipped names such as "
                                  "handbook_ending_en, or task YAML paths) run every eval_every steps on rank 0 (on "
                                  "every rank under ZeRO-3, which needs them all for a forward pass), logged as "
                                  "eval/TASK/METRIC beside the loss")
    eval_tasks_limit: int | None = Field(100, ge=1, description="items per task in each train.eval_tasks pass (None: all)")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in storage")
    max_failures: int = Field(3, ge=-1, description="worker-group restarts from the latest checkpoint; -1 unlimited")
    elastic_resize_interval_s: float = Field(60.0, gt=0, description="elastic ranges: how often a healthy run checks "
                                             "whether the cluster can now give it more workers (growing restarts "
                                             "the group from the latest checkpoint)")
    worker_start_timeout_s: float | None = Field(None, gt=0, description="how long a (re)start waits for the workers "
                                                 "it asked for before trying again (an elastic run: with what the "
                                                 "cluster has then); None: Ray's default, 60 s")
    max_nonfinite_in_row: int = Field(3, ge=1, description="NaN/Inf losses in a row (each skipped) before the run stops")
    run_name: str | None = Field(None, description="Ray Train run name; the same name resumes")
    storage_path: str | None = Field(None, description="checkpoint storage, local or s3://; default output_dir/checkpoints")
    resume_from: str | None = Field(None, description="a checkpoint dir to start from")
    peak_flops: float | None = Field(None, gt=0, description="FLOP/s per worker for MFU; default known GPU or measured")

    @model_validator(mode="after")
    def _schedule(self) -> "TrainConfig":
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"num_workers {self.num_workers} must be a count >= 1 or [min, max] with 1 <= min <= max")
        uneven = [w for w in range(self.min_workers, self.max_workers + 1) if self.batches_per_step % w]
        if uneven:
            raise ValueError(
                f"the global batch ({self.batches_per_step} micro-batches: grad_accum {self.grad_accum} x "
                f"{self.max_workers} workers) cannot be split evenly over {uneven} worker(s); pick grad_accum so "
                f"that grad_accum x {self.max_workers} is a multiple of every worker count in {list(self.num_workers)}")
        return self

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def batches_per_step(self) -> int:
        """Micro-batches per optimizer step over all workers: fixed, whatever the worker count of the moment."""
        return self.grad_accum * self.max_workers

    def grad_accum_for(self, world_size: int) -> int:
        """Gradient accumulation that keeps the global batch constant on ``world_size`` workers."""
        return self.batches_per_step // world_size


class TrackingConfig(Strict):
    """MLflow: where runs, metrics, artifacts and registered models go."""

    tracking_uri: str | None = Field(None, description="default MLFLOW_TRACKING_URI, else sqlite in output_dir")
    experiment: str = Field("llmforge", description="MLflow experiment")
    registered_model_name: str | None = Field(None, description="register the exported model under this name")
    parent_run_id: str | None = Field(None, description="make the job's run a child of this MLflow run (set by "
                                      "`llmforge recipe` for each stage)")


class LoraConfig(Strict):
    """The LoRA adapter a fine-tuning run trains."""

    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | None = Field(None, description="None: the attention and MLP projections of the model family")


class FinetuneConfig(Strict):
    """LoRA fine-tuning (``llmforge finetune``); training settings come from ``train.*``."""

    base: str | None = Field(None, description="HF model dir, s3:// copy of one, or models:/NAME/VERSION")
    data: str | None = Field(None, description="chat or instruction JSONL, local or s3://")
    lora: LoraConfig = LoraConfig()
    max_seq_len: int = Field(512, ge=8, description="tokens per example (longer ones are rejected)")
    packing: bool = Field(False, description="pack several examples per sequence instead of padding each")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="examples held out for validation")
    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora: train LoRA adapters on the frozen base (writes adapter/, and merged/ with "
        "finetune.merge); qlora: the same on a 4-bit (NF4) base, bitsandbytes needed (`pip install "
        "'llmforge[qlora]'`; CPU and CUDA); full: train every parameter (writes model/, a full HF model dir)")
    merge: bool = Field(False, description="method=lora/qlora: also write a merged full-precision model")


class AlignConfig(Strict):
    """Preference alignment (``llmforge align``) on {prompt, chosen, rejected} pairs."""

    method: Literal["dpo", "ipo", "simpo"] = Field("dpo", description="the preference loss (docs/post-training.md)")
    base: str | None = Field(None, description="the model to align: HF dir, s3:// copy, or models:/NAME/VERSION; "
                             "also the reference model (DPO, IPO)")
    data: str | None = Field(None, description="JSONL pairs {prompt, chosen, rejected}, strings or message lists, local or s3://")
    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference (DPO, IPO), the "
                        "reward scale (SimPO)")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin")
    max_seq_len: int = Field(512, ge=8, description="tokens per prompt + reply (longer pairs are rejected)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="pairs held out (by prompt) for validation metrics")
    lora: bool = Field(False, description="train a LoRA adapter (finetune.lora settings) instead of every parameter; "
                       "the output is the merged model")
    reference: Literal["auto", "precomputed", "frozen", "adapter"] = Field(
        "auto", description="the reference model of DPO and IPO. precomputed: its log-probs of every pair, computed "
        "once before training by Ray Data batch inference and stored with the pairs (no second model on the "
        "workers; a resumed or resized run reads them back); frozen: a frozen copy of the base on every worker, "
        "run in each step (ZeRO-3: partitioned over the ranks like the policy); adapter (align.lora only): the "
        "base with the adapter disabled, run in each step; auto: adapter with align.lora, else precomputed")

    @model_validator(mode="after")
    def _reference(self) -> "AlignConfig":
        if self.method == "simpo" and self.reference != "auto":
            raise ValueError(f"align.reference={self.reference}: SimPO has no reference model; leave it at auto")
        if self.reference == "adapter" and not self.lora:
            raise ValueError("align.reference=adapter needs align.lora=true (the reference is the base under the "
                             "adapter); without LoRA use precomputed or frozen")
        return self

    @property
    def reference_kind(self) -> str | None:
        """How the reference is computed: precomputed, frozen, adapter, or None (SimPO)."""
        if self.method == "simpo":
            return None
        if self.reference == "auto":
            return "adapter" if self.lora else "precomputed"
        return self.reference


class DistillConfig(Strict):
    """Distillation (``llmforge distill``): a student (``model.preset``/``model.overrides`` at random init, or
    ``model.init_from``) trained on a teacher's token distributions over ``data.dataset``."""

    teacher: str | None = Field(None, description="the teacher: HF dir, s3:// copy, or models:/NAME/VERSION; its "
                                "tokenizer must be the dataset's (the student's)")
    alpha: float = Field(0.5, ge=0, le=1, description="the KL term's weight; 1 - alpha weighs the next-token loss")
    temperature: float = Field(1.0, gt=0, description="both models' logits are divided by it before the KL (the "
                               "KL term is scaled by its square)")
    kl: Literal["forward", "reverse"] = Field("forward", description="forward: KL(teacher || student), the student "
                                              "covers the teacher's distribution; reverse: KL(student || teacher), "
                                              "it settles on the teacher's modes")


class AutoscalingConfig(Strict):
    """Ray Serve replica autoscaling: replicas are added while the mean ongoing requests per replica is above
    ``target_ongoing_requests`` for ``upscale_delay_s``, removed when below for ``downscale_delay_s``."""

    min_replicas: int = Field(1, ge=0, description="fewest replicas")
    max_replicas: int = Field(1, ge=1, description="most replicas")
    target_ongoing_requests: float = Field(16.0, gt=0, description="mean ongoing requests per replica the autoscaler aims for")
    upscale_delay_s: float = Field(10.0, ge=0, description="how long load must stay above the target before a replica is added")
    downscale_delay_s: float = Field(60.0, ge=0, description="how long load must stay below the target before a replica is removed")
    metrics_interval_s: float = Field(2.0, gt=0, description="how often replicas report their load")

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


class ServeConfig(Strict):
    """The OpenAI-compatible server (``llmforge serve``)."""

    model: str | None = Field(None, description="HF model dir, s3:// copy of one, or models:/NAME/VERSION")
    engine: Literal["auto", "llmforge", "vllm"] = Field(
        "auto", description="what generates: llmforge's own engine, or vLLM through Ray Serve LLM (`make vllm` installs "
        "it); auto: vLLM where it is installed and serves the model, on GPU replicas, and on CPU for DeepSeek models "
        "(faster there under load); else llmforge's engine (bench/RESULTS.md). The choice and its reason are "
        "logged and shown by /health")
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="engine=vllm: more vLLM engine arguments (gpu_memory_utilization, "
        "tensor_parallel_size, enable_prefix_caching, ...), over the ones llmforge derives from this section")
    vllm_cpu_kv_cache_gib: float = Field(1.0, gt=0, description="engine=vllm on CPU: the KV cache's size per replica "
                                         "(VLLM_CPU_KVCACHE_SPACE)")
    model_name: str | None = Field(None, description="the name clients put in `model`; default: the model dir's name")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters: name -> adapter dir (local or s3://)")
    max_loaded_adapters: int = Field(4, ge=1, description="adapters held in memory per replica; least recently used go first")
    host: str = Field("127.0.0.1", description="where Ray Serve's HTTP proxy listens (`--host`)")
    port: int = Field(8000, ge=1, le=65535, description="the HTTP proxy's port (`--port`)")
    max_batch_size: int = Field(32, ge=1, description="sequences decoded together per replica")
    max_model_len: int | None = Field(None, ge=8, description="prompt + output tokens; default the model's context")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica takes at once (running + waiting); its "
                                      "engine also queues at most this many sequences (prompts x n) beyond a full batch, "
                                      "and a request larger than batch + queue gets 400")
    max_queued_requests: int = Field(128, ge=-1, description="requests Ray Serve queues per caller before 503; -1: no limit")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="larger request bodies get 413")
    request_read_timeout_s: float = Field(30.0, gt=0, description="a request body not read whole within this gets 408 "
                                          "(a client sending slowly cannot hold a slot)")
    allow_unauthenticated: bool = Field(False, description="serve without an API key on an address other than "
                                        "loopback (refused otherwise: anyone who reaches it could use the model)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    quantize: Literal["none", "int8"] = Field("none", description="int8: dynamic int8 Linear layers (CPU)")
    fast_decode: bool = Field(True, description="llmforge's own decode step for Llama/Mistral/Qwen2/Qwen3 models "
                              "(same weights and arithmetic, per-group attention windows, MKL-packed weights on CPU); "
                              "false: the model's forward")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica (also its torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica")
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    blocked_terms: list[str] = Field(default_factory=list, description="content filter: refused in prompts, cut from outputs")
    stream_interval_s: float = Field(0.1, ge=0, description="a stream sends its first token at once, then at most one chunk (all new text) per interval, and its last at once")
    log_prompts: bool = Field(False, description="write prompts and outputs to the replica log")
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0, description="how long in-flight requests may finish at shutdown")

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]*", name):
                raise ValueError(f"adapter name {name!r} may hold letters, digits and . _ : - only")
        return value

    @field_validator("blocked_terms")
    @classmethod
    def _terms(cls, value: list[str]) -> list[str]:
        if any(not term.strip() for term in value):
            raise ValueError("blocked terms must not be empty")
        return value


class RayConfig(Strict):
    """Which Ray cluster a job runs on."""

    address: str | None = Field(None, description="Ray cluster to join (`RAY_ADDRESS` also works); unset: a local Ray started in-process")


class Config(Strict):
    """The root: every job reads the sections it needs."""

    output_dir: str = Field("runs/default", description="where a job writes its results (local or s3://)")
    seed: int = Field(0, description="global random seed")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    align: AlignConfig = AlignConfig()
    distill: DistillConfig = DistillConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--data.min_chars=50", "--data.pii.enabled", "false"]`` -> ``{"data.min_chars": 50, ...}``.

    Values are parsed as YAML scalars or lists, so ``50``, ``0.8``, ``true``, ``[1, 2]`` and ``null`` work.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"Unexpected argument {arg!r}.",
                fix="overrides look like --section.field=value (for example --data.min_chars=50).",
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"Override --{key} has no value.", fix=f"write --{key}=VALUE.")
            value = args[i + 1]
            i += 1
        key = key.replace("-", "_")
        try:
            overrides[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            overrides[key] = value
        i += 1
    return overrides


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else child
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"Override --{dotted}: {part!r} is a value, not a section.")
        node = child
    node[parts[-1]] = value


def _describe(errors: list[dict], source_of) -> str:
    lines = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = err.get("input")
        got_text = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc}: {msg}{got_text} [from {source_of(loc)}]")
    return "; ".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (YAML), apply ``base`` (values a job sets itself) then ``overrides``, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.", fix="check the --config path.")
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {path} must hold a mapping at the top level, not {type(loaded).__name__}.")
        tree = loaded
    for dotted, value in (base or {}).items():
        _set_dotted(tree, dotted, value)
    overrides = overrides or {}
    for dotted, value in overrides.items():
        _set_dotted(tree, dotted, value)

    def source_of(loc: str) -> str:
        if any(loc == k or loc.startswith(k + ".") for k in overrides):
            return "command line"
        return source

    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(
            f"Invalid configuration: {_describe(exc.errors(), source_of)}.",
            fix="correct the field named above; `llmforge config --defaults` prints every field.",
        ) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _type_name(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"\b(typing|llmforge\.config)\.", "", text).replace("NoneType", "None")
    return re.sub(r"Literal\[([^\]]*)\]", lambda m: " | ".join(m.group(1).split(", ")), text)


def _default_text(field) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return yaml.safe_dump(value, default_flow_style=True, width=1_000).strip().removesuffix("...").strip()


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md): a table per section, from the models' fields,
    types, defaults and descriptions, so the docs cannot drift from the code."""
    sections: list[tuple[str, type[BaseModel]]] = []

    def collect(prefix: str, model: type[BaseModel]) -> None:
        sections.append((prefix, model))
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                collect(f"{prefix}{name}.", field.annotation)

    collect("", Config)
    out = ["# Configuration reference", "",
           "Generated from `platform/llmforge/config.py` by `python scripts/gen_config_docs.py`; a test keeps it in",
           "sync. Every job reads this one tree: YAML (`--config FILE`) plus dotted overrides on the command line",
           "(`--train.max_steps=500`, `--data.dedup.threshold 0.7`, values parsed as YAML). Unknown keys and wrong",
           "types are errors that name the field and where it came from. `llmforge config --defaults` prints every",
           "default; `llmforge config --config FILE [overrides]` prints the resolved tree.", ""]
    for prefix, model in sections:
        rows = [(name, field) for name, field in model.model_fields.items()
                if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))]
        if not rows:
            continue
        out += [f"## `{prefix.rstrip('.') or '(root)'}`", ""]
        if model.__doc__:
            out += [" ".join(model.__doc__.split()).replace("``", "`"), ""]
        out += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in rows:
            cells = [f"`{prefix}{name}`", f"`{_type_name(field.annotation)}`", f"`{_default_text(field)}`",
                     field.description or ""]
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        out.append("")
    return "\n".join(out)
