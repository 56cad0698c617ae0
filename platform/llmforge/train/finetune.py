"""The fine-tuning job (SFT): render and tokenize the chat data with Ray Data, train with the pretraining loop
(Ray Train + DeepSpeed; the loss on the replies only), export.

``finetune.method``: ``lora`` trains LoRA adapters on the frozen base and writes the adapter (and a merged
model with ``finetune.merge``); ``full`` trains every parameter and writes a full HF model dir."""

from __future__ import annotations

import json
import logging
import posixpath
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.datasource import FileBasedDatasource

from llmforge import storage, tracking
from llmforge.config import Config
from llmforge.data.dedup import text_hash
from llmforge.data.pack import split_of
from llmforge.data.sources import decode, iter_lines, parse_json
from llmforge.errors import ConfigError, InputError
from llmforge.evals.record import card_with_training_scores
from llmforge.runtime import ensure_ray, quiet_ray_data
from llmforge.train import lora
from llmforge.train.checkpoint import consolidated_state_dict, copy_tokenizer
from llmforge.train.spec import ModelSource
from llmforge.train.trainer import worker_uri, checkpoint_location, has_validation, run_lease, run_trainer, scaling_config

log = logging.getLogger("llmforge.train")

LINE_SCHEMA = pa.schema([("source", pa.string()), ("line_no", pa.int64()), ("line", pa.string()),
                         ("size", pa.int64())])
EXAMPLE_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                            ("split", pa.string()), ("reason", pa.string()), ("line", pa.string()),
                            ("source", pa.string()), ("line_no", pa.int64())])


class JsonLinesDatasource(FileBasedDatasource):
    """Raw lines (invalid UTF-8 repaired) with their file, line number and size; parsing happens downstream so a
    malformed line becomes a reject instead of failing the read. A line over ``max_line_bytes`` is read in
    bounded memory and arrives as its start (``size`` says how long it was), to be rejected as too long."""

    def __init__(self, paths, filesystem, max_line_bytes: int):
        super().__init__(paths, filesystem=filesystem)
        self.max_line_bytes = max_line_bytes

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        rows = []
        for line_no, (raw, dropped) in enumerate(iter_lines(f, self.max_line_bytes), start=1):
            if raw.strip() or dropped:
                rows.append({"source": path, "line_no": line_no, "line": decode(raw.rstrip(b"\r"))[0],
                             "size": len(raw) + dropped})
        yield pa.Table.from_pylist(rows, schema=LINE_SCHEMA)


def max_example_line_bytes(max_seq_len: int) -> int:
    """The longest JSONL line an example of ``max_seq_len`` tokens can plausibly be (a token is rarely more than
    16 characters, a character at most 12 bytes as JSON), with 1 MiB to spare; longer lines are not parsed."""
    return 16 * 12 * max_seq_len + (1 << 20)


class Renderer:
    """Ray Data actor: loads the tokenizer once; renders, masks, splits and pads (or packs) examples."""

    def __init__(self, base_dir: str, max_len: int, val_fraction: float, seed: int, packing: bool):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(base_dir)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.max_len, self.val_fraction, self.seed, self.packing = max_len, val_fraction, seed, packing
        self.max_line_bytes = max_example_line_bytes(max_len)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {name: [] for name in EXAMPLE_SCHEMA.names}
        kept: dict[str, list] = {"train": [], "val": []}

        def add(ids, labels, split, reason, line, source, line_no):
            for key, value in zip(EXAMPLE_SCHEMA.names, (ids, labels, split, reason, line, source, line_no)):
                out[key].append(value)

        columns = (batch.column(c).to_pylist() for c in ("line", "source", "line_no", "size"))
        for line, source, line_no, size in zip(*columns):
            if size > self.max_line_bytes:
                add(None, None, "reject", f"too_long: a line of {size} bytes (more than {self.max_line_bytes}); "
                    "its start is kept here", line, source, line_no)
                continue
            record, problem = parse_json(line)
            if problem is not None:
                add(None, None, "reject", f"malformed_json: {problem}", line, source, line_no)
                continue
            messages, reason = lora.to_messages(record)
            rendered = lora.render(messages, self.tok, self.max_len) if messages else f"invalid_record: {reason}"
            if isinstance(rendered, str):
                add(None, None, "reject", rendered, line, source, line_no)
                continue
            split = split_of(text_hash(f"{posixpath.basename(source)}:{line_no}"), self.val_fraction, self.seed)
            kept[split].append(rendered)
        for split, examples in kept.items():
            rows = lora.pack_examples(examples, self.max_len, self.pad_id) if self.packing else \
                [lora.pad(ids, labels, self.max_len, self.pad_id) for ids, labels in examples]
            for ids, labels in rows:
                add(ids, labels, split, None, None, None, None)
        return pa.Table.from_pydict(out, schema=EXAMPLE_SCHEMA)


def prepare_examples(files: list[str], base_dir: Path, cfg: Config, out_uri: str) -> dict[str, int]:
    """Tokenized examples to ``out_uri``/{train,val}, rejects (with reasons) to ``out_uri``/rejects."""
    import ray

    f = cfg.finetune
    fs, _ = storage.resolve(files[0])
    lines = ray.data.read_datasource(JsonLinesDatasource([storage.resolve(p)[1] for p in files], fs,
                                                         max_example_line_bytes(f.max_seq_len)))
    # Fine-tuning sets are small next to a pretraining corpus: render once, then split three ways.
    examples = lines.map_batches(Renderer, fn_constructor_kwargs={
        "base_dir": str(base_dir), "max_len": f.max_seq_len, "val_fraction": f.val_fraction,
        "seed": cfg.data.split_seed, "packing": f.packing},
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).materialize()
    return {"train": write_split(examples, "train", ["input_ids", "labels"], out_uri),
            "val": write_split(examples, "val", ["input_ids", "labels"], out_uri),
            "rejects": write_split(examples, "reject", REJECT_COLUMNS, out_uri, name="rejects")}


REJECT_COLUMNS = ["reason", "line", "source", "line_no"]


def write_split(ds, split: str, columns: list[str], out_uri: str, name: str | None = None) -> int:
    """The rows of ``ds`` whose ``split`` column is ``split``, only ``columns``, as Parquet in
    ``out_uri``/``name`` (default: the split's name); returns how many."""
    part = ds.map_batches(lambda t: t.filter(pc.equal(t.column("split"), split)), batch_format="pyarrow")
    part = part.select_columns(columns)
    fs, _ = storage.resolve(out_uri)
    part.write_parquet(storage.resolve(storage.join(out_uri, name or split))[1], filesystem=fs)
    return part.count()


def finetune(cfg: Config) -> dict:
    """Run the job; returns the summary printed as the last stdout line."""
    f = cfg.finetune
    if not f.base:
        raise InputError("No base model given.", fix="pass --base MODEL_DIR (or s3://..., models:/NAME/VERSION).")
    if not f.data:
        raise InputError("No fine-tuning data given.", fix="pass --data PATH.jsonl (chat or prompt/completion records).")
    if f.method == "full" and f.merge:
        raise ConfigError("finetune.merge is for method=lora: a full fine-tune writes a full model already.",
                          fix="drop --merge, or use --finetune.method=lora.")
    if f.method == "qlora":
        check_qlora(cfg)
    uri = tracking.tracking_uri(cfg)
    base_dir = lora.resolve_base(f.base, uri)
    targets = lora.target_modules(base_dir, f.lora) if f.method != "full" else []
    files = storage.expand(f.data, (".jsonl", ".jsonl.gz")) if storage.exists(f.data) else []
    if not files:
        raise InputError(f"Fine-tuning data {f.data} does not exist or holds no .jsonl files.", fix="check --data.")

    ensure_ray(cfg.ray)
    scaling = scaling_config(cfg)
    run_name = cfg.train.run_name or f"finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    with run_lease(cfg, run_name):
        return _run_finetune(cfg, run_name, base_dir, targets, files, scaling)


def _run_finetune(cfg: Config, run_name: str, base_dir: Path, targets: list[str], files: list[str], scaling) -> dict:
    f = cfg.finetune
    lineage = tracking.lineage_tags(f.base, f.data, tracking.files_sha256(files), base_dir)
    run_id, uri = tracking.start_run(cfg, run_name, {"job": "finetune", "method": f.method, "base": f.base, **lineage})
    data_uri = storage.join(cfg.output_dir, "sft_data")
    if storage.exists(data_uri):
        storage.delete_tree(data_uri)
    with quiet_ray_data():  # one short pass; the counts line below is its progress
        counts = prepare_examples(files, base_dir, cfg, data_uri)
    log.info("fine-tuning examples: %s (rejects in %s)", counts, storage.join(data_uri, "rejects"))
    base_config, manifest, data = training_splits(cfg, run_id, uri, base_dir, data_uri, counts, f.max_seq_len, "examples")
    source = ModelSource("init_from", worker_uri(f.base)) if f.method == "full" else \
        ModelSource("lora", worker_uri(f.base), tuple(targets), load_in_4bit=f.method == "qlora")
    result = run_trainer(cfg, run_name, run_id, uri, scaling, manifest, data, source)
    metrics = result.metrics
    summary = {"event": "finetune_done", "method": f.method, "run_id": run_id, "tracking_uri": uri,
               "checkpoint": checkpoint_location(result), "adapter_dir": None, "merged_dir": None, "model_dir": None,
               "steps": metrics.get("step"), "first_loss": metrics.get("first_loss"), "final_loss": metrics.get("loss"),
               "val_loss": metrics.get("val_loss"), "restored_from_step": metrics.get("restored_from_step"),
               "examples": counts}
    if f.method == "full":
        final = {k: metrics.get(k) for k in ("step", "loss", "val_loss")}
        card = (f"---\nlibrary_name: transformers\ntags: [llmforge, causal-lm, sft]\n---\n# Fine-tuned with llmforge\n\n"
                f"Every parameter of `{f.base}` fine-tuned (SFT, loss on the replies) on `{f.data}`.\n\n"
                f"- Final metrics: `{json.dumps(final, sort_keys=True)}`\n")
        card = card_with_training_scores(card, metrics, cfg.train.eval_tasks_limit)
        summary.update(export_full(cfg, result, base_dir, base_config, run_id, uri, card))
    else:
        summary.update(_export_lora(cfg, result, base_dir, targets, run_id, uri))
    tracking.finish_run(uri, run_id)
    log.info("fine-tuning done: %s", json.dumps(summary))
    return summary


def training_splits(cfg: Config, run_id: str, uri: str, base_dir: Path, data_uri: str, counts: dict, max_len: int,
                    what: str) -> tuple:
    """The base's config, the loop's manifest and the splits' URIs for data prepared into ``data_uri``; fails
    the run (in MLflow too) when there is less than one micro-batch per worker."""
    from transformers import AutoConfig
    t = cfg.train
    if counts["train"] < t.micro_batch_size * t.max_workers:
        tracking.finish_run(uri, run_id, "FAILED")
        raise InputError(f"Only {counts['train']} training {what} for {t.num_workers} worker(s) x micro-batch "
                         f"{t.micro_batch_size}.", fix="add data, or lower train.micro_batch_size / train.num_workers.")
    base_config = AutoConfig.from_pretrained(base_dir)
    manifest = {"seq_len": max_len, "vocab_size": base_config.vocab_size, "eos_token_id": base_config.eos_token_id,
                "pad_token_id": base_config.pad_token_id,
                "splits": {"train": {"sequences": counts["train"]}, "val": {"sequences": counts["val"]}}}
    data = {"train": storage.absolute(storage.join(data_uri, "train"))}
    if has_validation(manifest, cfg):
        data["val"] = storage.absolute(storage.join(data_uri, "val"))
    return base_config, manifest, data


def check_qlora(cfg: Config) -> None:
    """QLoRA needs bitsandbytes on the workers (checked here, on the driver: the image or venv is the same)."""
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("finetune.method=qlora needs bitsandbytes (its 4-bit layers), which is not installed.",
                          fix="pip install 'llmforge[qlora]' (bitsandbytes 0.50, CPU and CUDA), or use --method lora.")


def export_full(cfg: Config, result, base_dir: Path, base_config, run_id: str, uri: str, card: str) -> dict:
    """Trained full weights as an HF model dir (``OUTPUT/model``, the base's tokenizer), logged (and registered
    when ``tracking.registered_model_name`` is set) in MLflow."""
    from llmforge.model.flops import count_params
    from llmforge.train.checkpoint import export_hf_model
    model_uri = storage.join(cfg.output_dir, "model")
    with result.checkpoint.as_directory() as ckpt_dir, storage.publishing(model_uri, last="config.json") as local:
        export_hf_model(Path(ckpt_dir), base_config, base_dir, local, card)
        version = tracking.log_model_dir(uri, run_id, local, cfg.tracking.registered_model_name)
    out = {"model_dir": model_uri, "trainable_params": count_params(base_config).total}
    if version is not None:
        out["registered_model"] = {"name": cfg.tracking.registered_model_name, "version": version}
    return out


def _export_lora(cfg: Config, result, base_dir: Path, targets: list[str], run_id: str, uri: str) -> dict:
    f = cfg.finetune
    model = lora.build_lora_model(base_dir, f.lora, targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with result.checkpoint.as_directory() as ckpt_dir:
        state = consolidated_state_dict(Path(ckpt_dir))
    lora_keys = {k for k in model.state_dict() if "lora_" in k}
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or lora_keys - set(state):
        raise RuntimeError(f"checkpoint does not hold the adapter: unexpected {unexpected[:3]}, "
                           f"missing {sorted(lora_keys - set(state))[:3]}")
    import mlflow
    client = mlflow.tracking.MlflowClient(uri)
    adapter_dir = storage.join(cfg.output_dir, "adapter")
    merged_dir = storage.join(cfg.output_dir, "merged") if f.merge else None
    # Each output is written aside and put in place whole: a reader never loads half an adapter or model.
    with storage.publishing(adapter_dir, last="adapter_config.json") as adapter_local:
        model.save_pretrained(adapter_local)
        copy_tokenizer(base_dir, adapter_local)
        client.log_artifacts(run_id, str(adapter_local), artifact_path="adapter")
    client.log_metric(run_id, "trainable_params", trainable)
    if merged_dir is not None:
        with storage.publishing(merged_dir, last="config.json") as merged_local:
            lora.merge_adapter(model, base_dir, merged_local)
    return {"adapter_dir": adapter_dir, "merged_dir": merged_dir, "trainable_params": trainable}
