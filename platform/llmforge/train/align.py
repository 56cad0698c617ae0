"""The preference-alignment job (``llmforge align``, ``jobs/align.py``): DPO, IPO or SimPO on the one training
loop (Ray Train + DeepSpeed), every parameter of the base trained.

1. Ray Data renders each {prompt, chosen, rejected} row with the tokenizer's chat template into two sequences
   (prompt + reply, the loss on the reply only), splits the pairs by prompt into train and validation, and
   sets malformed or incomplete rows aside with their reason (``OUTPUT/pref_data/rejects``).
2. DPO and IPO, the reference model being the base (``align.reference``): by default (``precomputed``) it scores
   both replies of every pair once, by Ray Data batch inference, and the log-probabilities are stored with the
   pairs: a resumed or resized run reads them back, and the policy's workers hold no second model. ``frozen``
   puts a frozen copy on every worker instead (train/frozen.py), ``adapter`` (``align.lora``) runs the base
   under the adapter with the adapter disabled; both compute the reference in each step.
3. The loop trains with ``train/objectives/preference.py``; validation reports the rewards on held-out prompts.
4. The aligned model is exported as an HF dir (``OUTPUT/model``) and logged in MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from llmforge import storage, tracking
from llmforge.config import Config
from llmforge.data.dedup import text_hash
from llmforge.data.pack import split_of
from llmforge.data.sources import parse_json
from llmforge.errors import InputError
from llmforge.evals.record import card_with_training_scores
from llmforge.runtime import ensure_ray, quiet_ray_data
from llmforge.train import lora
from llmforge.train.finetune import (REJECT_COLUMNS, JsonLinesDatasource, export_full, max_example_line_bytes,
                                     training_splits, write_split)
from llmforge.train.spec import ModelSource
from llmforge.train.trainer import checkpoint_location, run_lease, run_trainer, scaling_config, worker_uri

log = logging.getLogger("llmforge.train")

SIDES = ("chosen", "rejected")
PAIR_SCHEMA = pa.schema([*((f"{side}_{c}", pa.list_(pa.int32())) for side in SIDES for c in ("input_ids", "labels")),
                         ("split", pa.string()), ("reason", pa.string()),
                         ("line", pa.string()), ("source", pa.string()), ("line_no", pa.int64())])


def _messages(value, what: str) -> tuple[list[dict] | None, str | None]:
    if isinstance(value, str):
        return ([{"role": "user", "content": value}] if what == "prompt" else [{"role": "assistant", "content": value}]), None
    if not isinstance(value, list) or not value:
        return None, f"{what} must be a string or a non-empty list of messages"
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in lora.ROLES or not isinstance(m.get("content"), str):
            return None, f"{what}: bad message {json.dumps(m, ensure_ascii=False)[:80]}"
    return value, None


def to_pair(record: object) -> tuple[tuple[list[dict], str, str] | None, str | None]:
    """A row as (prompt messages, chosen reply, rejected reply), or ``(None, reason)``. Strings, or TRL's
    conversational shape: ``prompt`` a list of messages, ``chosen``/``rejected`` lists ending in the reply."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    missing = [k for k in ("prompt", *SIDES) if k not in record]
    if missing:
        return None, f"missing {', '.join(missing)}"
    prompt, reason = _messages(record["prompt"], "prompt")
    if reason:
        return None, reason
    if prompt[-1]["role"] == "assistant":
        return None, "prompt ends with an assistant message: the reply to prefer must come after it"
    replies = []
    for side in SIDES:
        messages, reason = _messages(record[side], side)
        if reason:
            return None, reason
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            return None, f"{side} must end with a non-empty assistant reply"
        replies.append(messages[-1]["content"])
    if replies[0] == replies[1]:
        return None, "chosen and rejected are the same reply"
    return (prompt, replies[0], replies[1]), None


def render_reply(prompt: list[dict], reply: str, tokenizer, max_len: int) -> tuple[list[int], list[int]] | str:
    """Token ids of prompt + reply through the chat template, labels on the reply's tokens only."""
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
    if not text.startswith(head):
        raise InputError("The tokenizer's chat template does not render the prompt as a prefix of the conversation.",
                         fix="use a template like ChatML, or a tokenizer prepared by llmforge.")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if len(ids) > max_len:
        return f"too_long: {len(ids)} tokens > align.max_seq_len {max_len}"
    labels = [t if start >= len(head) else lora.IGNORE for t, (start, _) in zip(ids, enc["offset_mapping"])]
    if all(label == lora.IGNORE for label in labels):
        return "no_reply_tokens"
    return ids, labels


class PairRenderer:
    """Ray Data actor: renders, masks, pads and splits pairs; rows it cannot use become rejects."""

    def __init__(self, base_dir: str, max_len: int, val_fraction: float, seed: int):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(base_dir)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.max_len, self.val_fraction, self.seed = max_len, val_fraction, seed
        self.max_line_bytes = max_example_line_bytes(max_len)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}

        def add(**row):
            for name in PAIR_SCHEMA.names:
                out[name].append(row.get(name))

        columns = (batch.column(c).to_pylist() for c in ("line", "source", "line_no", "size"))
        for line, source, line_no, size in zip(*columns):
            where = {"line": line, "source": source, "line_no": line_no, "split": "reject"}
            if size > self.max_line_bytes:
                add(reason=f"too_long: a line of {size} bytes (more than {self.max_line_bytes})", **where)
                continue
            record, problem = parse_json(line)
            if problem is not None:
                add(reason=f"malformed_json: {problem}", **where)
                continue
            pair, reason = to_pair(record)
            if pair is None:
                add(reason=f"invalid_pair: {reason}", **where)
                continue
            prompt, chosen, rejected = pair
            rendered = [render_reply(prompt, reply, self.tok, self.max_len) for reply in (chosen, rejected)]
            bad = next((r for r in rendered if isinstance(r, str)), None)
            if bad is not None:
                add(reason=bad, **where)
                continue
            # Split by prompt: held-out metrics are on prompts the training never saw.
            key = text_hash(json.dumps(prompt, sort_keys=True, ensure_ascii=False))
            row = {"split": split_of(key, self.val_fraction, self.seed)}
            for side, (ids, labels) in zip(SIDES, rendered):
                row[f"{side}_input_ids"], row[f"{side}_labels"] = lora.pad(ids, labels, self.max_len, self.pad_id)
            add(**row)
        return pa.Table.from_pydict(out, schema=PAIR_SCHEMA)


class ReferenceScorer:
    """Ray Data actor: the reference model's summed log-probabilities of both replies of each pair."""

    def __init__(self, base_dir: str, batch_rows: int = 8):
        import torch
        from transformers import AutoModelForCausalLM
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        self.batch_rows = batch_rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        from llmforge.train.objectives.preference import reply_logps
        torch = self.torch
        scores = {side: [] for side in SIDES}
        with torch.inference_mode():
            for side in SIDES:
                ids = batch.column(f"{side}_input_ids").to_pylist()
                labels = batch.column(f"{side}_labels").to_pylist()
                for i in range(0, len(ids), self.batch_rows):
                    logits = self.model(input_ids=torch.tensor(ids[i:i + self.batch_rows])).logits
                    logps, _ = reply_logps(logits, torch.tensor(labels[i:i + self.batch_rows]))
                    scores[side] += logps.tolist()
        for side in SIDES:
            batch = batch.append_column(f"ref_{side}_logps", pa.array(scores[side], pa.float32()))
        return batch


def prepare_pairs(files: list[str], base_dir: Path, cfg: Config, out_uri: str, score: bool) -> dict[str, int]:
    """Tokenized pairs to ``out_uri``/{train,val} (with the reference's log-probs when ``score``), rejects with
    their reasons to ``out_uri``/rejects."""
    import ray

    a = cfg.align
    fs, _ = storage.resolve(files[0])
    lines = ray.data.read_datasource(JsonLinesDatasource([storage.resolve(p)[1] for p in files], fs,
                                                         max_example_line_bytes(a.max_seq_len)))
    rendered = lines.map_batches(PairRenderer, fn_constructor_kwargs={
        "base_dir": str(base_dir), "max_len": a.max_seq_len, "val_fraction": a.val_fraction, "seed": cfg.data.split_seed},
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).materialize()
    kept = rendered.map_batches(lambda t: t.filter(pc.not_equal(t.column("split"), "reject")), batch_format="pyarrow")
    if score:
        kept = kept.map_batches(ReferenceScorer, fn_constructor_kwargs={"base_dir": str(base_dir)}, batch_size=64,
                                batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    kept = kept.materialize()
    pair_columns = [f"{side}_{c}" for side in SIDES for c in ("input_ids", "labels")] + \
        ([f"ref_{side}_logps" for side in SIDES] if score else [])
    return {"train": write_split(kept, "train", pair_columns, out_uri), "val": write_split(kept, "val", pair_columns, out_uri),
            "rejects": write_split(rendered, "reject", REJECT_COLUMNS, out_uri, name="rejects")}


def align(cfg: Config) -> dict:
    """Run the job; returns the summary printed as the last stdout line."""
    a = cfg.align
    if not a.base:
        raise InputError("No base model given.", fix="pass --base MODEL_DIR (or s3://..., models:/NAME/VERSION).")
    if not a.data:
        raise InputError("No preference data given.", fix="pass --data PAIRS.jsonl ({prompt, chosen, rejected} rows).")
    uri = tracking.tracking_uri(cfg)
    base_dir = lora.resolve_base(a.base, uri)
    files = storage.expand(a.data, (".jsonl", ".jsonl.gz")) if storage.exists(a.data) else []
    if not files:
        raise InputError(f"Preference data {a.data} does not exist or holds no .jsonl files.", fix="check --data.")
    ensure_ray(cfg.ray)
    scaling = scaling_config(cfg)
    run_name = cfg.train.run_name or f"align-{a.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    with run_lease(cfg, run_name):
        return _run_align(cfg, run_name, base_dir, files, scaling)


def _run_align(cfg: Config, run_name: str, base_dir: Path, files: list[str], scaling) -> dict:
    a = cfg.align
    lineage = tracking.lineage_tags(a.base, a.data, tracking.files_sha256(files), base_dir)
    run_id, uri = tracking.start_run(cfg, run_name, {"job": "align", "method": a.method, "base": a.base,
                                                     "reference": a.reference_kind or "none", **lineage})
    data_uri = storage.join(cfg.output_dir, "pref_data")
    counts = _pairs(files, base_dir, cfg, data_uri, score=a.reference_kind == "precomputed")
    log.info("preference pairs: %s (rejects in %s)", counts, storage.join(data_uri, "rejects"))
    base_config, manifest, data = training_splits(cfg, run_id, uri, base_dir, data_uri, counts, a.max_seq_len, "pairs")
    targets = lora.target_modules(base_dir, cfg.finetune.lora) if a.lora else []
    source = ModelSource("lora", worker_uri(a.base), tuple(targets)) if a.lora else ModelSource("init_from", worker_uri(a.base))
    reference = ModelSource("init_from", worker_uri(a.base)) if a.reference_kind == "frozen" else None
    log.info("alignment: %s, reference %s", a.method, a.reference_kind or "none (SimPO)")
    result = run_trainer(cfg, run_name, run_id, uri, scaling, manifest, data, source, objective="preference",
                         frozen=reference)
    metrics = result.metrics
    final = {k: metrics.get(k) for k in ("step", "loss", "val_loss", "val_rewards/accuracies", "val_rewards/margins")}
    card = (f"---\nlibrary_name: transformers\ntags: [llmforge, causal-lm, {a.method}]\n---\n# Aligned with llmforge\n\n"
            f"`{a.base}` aligned with {a.method.upper()} (beta {a.beta}) on `{a.data}`.\n\n"
            f"- Final metrics: `{json.dumps(final, sort_keys=True)}`\n")
    card = card_with_training_scores(card, metrics, cfg.train.eval_tasks_limit)
    exported = export_merged(cfg, result, base_dir, targets, run_id, uri, card) if a.lora else \
        export_full(cfg, result, base_dir, base_config, run_id, uri, card)
    tracking.finish_run(uri, run_id)
    summary = {"event": "align_done", "method": a.method, "reference": a.reference_kind, "run_id": run_id, "tracking_uri": uri,
               "checkpoint": checkpoint_location(result), "model_dir": exported["model_dir"],
               "adapter_dir": exported.get("adapter_dir"),
               "steps": metrics.get("step"), "first_loss": metrics.get("first_loss"), "final_loss": metrics.get("loss"),
               "reward_accuracy": metrics.get("val_rewards/accuracies"),
               "reward_margin": metrics.get("val_rewards/margins"), "rejected": counts["rejects"],
               "restored_from_step": metrics.get("restored_from_step"),
               "pairs": {"train": counts["train"], "val": counts["val"]}}
    log.info("alignment done: %s", json.dumps(summary))
    return summary


def export_merged(cfg: Config, result, base_dir: Path, targets: list[str], run_id: str, uri: str, card: str) -> dict:
    """A LoRA policy: the adapter (``OUTPUT/adapter``) and the base with it merged (``OUTPUT/model``, a full HF dir)."""
    from llmforge.train.checkpoint import consolidated_state_dict, copy_tokenizer
    model = lora.build_lora_model(base_dir, cfg.finetune.lora, targets)
    with result.checkpoint.as_directory() as ckpt_dir:
        state = consolidated_state_dict(Path(ckpt_dir))
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not any("lora_" in k for k in state):
        raise RuntimeError(f"checkpoint does not hold the adapter (unexpected keys {unexpected[:3]})")
    adapter_uri, model_uri = storage.join(cfg.output_dir, "adapter"), storage.join(cfg.output_dir, "model")
    with storage.publishing(adapter_uri, last="adapter_config.json") as local:
        model.save_pretrained(local)
        copy_tokenizer(base_dir, local)
    with storage.publishing(model_uri, last="config.json") as local:
        lora.merge_adapter(model, base_dir, local)
        (local / "README.md").write_text(card, encoding="utf-8")
        version = tracking.log_model_dir(uri, run_id, local, cfg.tracking.registered_model_name)
    out = {"model_dir": model_uri, "adapter_dir": adapter_uri}
    if version is not None:
        out["registered_model"] = {"name": cfg.tracking.registered_model_name, "version": version}
    return out


def _pairs(files: list[str], base_dir: Path, cfg: Config, data_uri: str, score: bool) -> dict[str, int]:
    """The rendered (and scored) pairs, made once per output dir: a resubmitted job (same run name, resuming
    from its checkpoints) reads back the reference log-probs its first attempt stored."""
    done = storage.join(data_uri, "counts.json")
    if storage.exists(done):
        counts = storage.read_json(done)
        if counts.get("scored") == score and counts.get("files") == files:
            log.info("preference pairs already prepared in %s (with reference log-probs: %s)", data_uri, score)
            return counts
    if storage.exists(data_uri):
        storage.delete_tree(data_uri)
    with quiet_ray_data():
        counts = prepare_pairs(files, base_dir, cfg, data_uri, score)
    storage.write_json(done, {**counts, "scored": score, "files": files})
    return counts
