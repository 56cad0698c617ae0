"""The pretraining job on the driver: check inputs, build the Ray Train ``TorchTrainer``, run it, export.

Everything that can be wrong with the request (dataset, vocabulary, batch sizes, preset, cluster
size) is checked here, before any worker starts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from llmforge import storage, tracking
from llmforge.config import Config, dump_config
from llmforge.data import tokenizer as tokenizer_lib
from llmforge.data.pipeline import load_manifest
from llmforge.evals.record import card_with_training_scores
from llmforge.errors import ConfigError, InputError, StorageError, TrainingDiverged
from llmforge.model.build import model_config
from llmforge.model.flops import count_params
from llmforge.lease import Lease
from llmforge.runtime import ensure_ray
from llmforge.train.checkpoint import (checkpoint_problem, complete_checkpoints, export_hf_model, model_card,
                                       unsafe_pickle)
from llmforge.train.loop import train_loop
from llmforge.train.spec import LoopSpec, ModelSource

log = logging.getLogger("llmforge.train")


def check_request(cfg: Config) -> tuple[dict, object]:
    """The dataset's manifest and the model config, or a clear error."""
    if not cfg.data.dataset:
        raise InputError("No dataset given.", fix="pass --data.dataset=DIR (a dir written by `llmforge prepare`).")
    manifest = load_manifest(cfg.data.dataset)
    tok_uri = storage.join(cfg.data.dataset, manifest["tokenizer"])
    tok_vocab = tokenizer_lib.load_fast(tok_uri).get_vocab_size(with_added_tokens=True)
    if tok_vocab != manifest["vocab_size"]:
        raise InputError(f"Tokenizer in {tok_uri} has {tok_vocab} tokens but the manifest says {manifest['vocab_size']}.",
                         fix="prepare the dataset again; its tokenizer and shards must match.")
    wanted = cfg.model.overrides.get("vocab_size")
    if wanted is not None and wanted != manifest["vocab_size"]:
        raise ConfigError(f"model.overrides.vocab_size={wanted} does not match the dataset's vocabulary "
                          f"({manifest['vocab_size']} tokens in {cfg.data.dataset}).",
                          fix="drop model.overrides.vocab_size: it is taken from the dataset.")
    if cfg.model.init_from:
        config = check_init_from(cfg, manifest, tok_uri)
    else:
        config = model_config(cfg.model, manifest["vocab_size"], manifest["seq_len"],
                              manifest["eos_token_id"], manifest["pad_token_id"])
    t = cfg.train
    per_step = t.micro_batch_size * t.batches_per_step
    train_seqs = manifest["splits"]["train"]["sequences"]
    if train_seqs < t.micro_batch_size * t.max_workers:
        raise ConfigError(
            f"The training split has {train_seqs} sequences, fewer than one micro-batch per worker "
            f"(train.micro_batch_size={t.micro_batch_size} x train.num_workers={t.num_workers}).",
            fix="lower train.micro_batch_size or train.num_workers, or prepare more data.")
    log.info("global batch: %d sequences (%d tokens) per optimizer step; %.1f epochs over %d training sequences",
             per_step, per_step * manifest["seq_len"], t.max_steps * per_step / train_seqs, train_seqs)
    return manifest, config


def check_init_from(cfg: Config, manifest: dict, tok_uri: str):
    """Continued pretraining: the model's config, once its tokenizer is the dataset's and its context holds the
    dataset's sequences."""
    from llmforge.train.lora import resolve_base
    uri = cfg.model.init_from
    if cfg.model.overrides:
        raise ConfigError(f"model.overrides {sorted(cfg.model.overrides)} cannot reshape the model of model.init_from.",
                          fix="drop model.overrides: the architecture is the initial model's.")
    config = check_model_for_dataset("model.init_from", uri, resolve_base(uri, tracking.tracking_uri(cfg)), cfg,
                                     manifest, tok_uri)
    log.info("continued pretraining from %s (%s, fresh optimizer and schedule); model.preset is not used",
             uri, config.model_type)
    return config


def check_model_for_dataset(what: str, uri: str, model_dir: Path, cfg: Config, manifest: dict, tok_uri: str):
    """The config of a model that is to read the dataset's tokens (``what``: the setting naming it), once its
    tokenizer is the dataset's (the same tokens with the same ids: otherwise every embedding would be read as
    another token's), its embedding covers the vocabulary (it may be padded beyond it) and its context holds
    the dataset's sequences; else a clear error, before any worker starts."""
    from transformers import AutoConfig
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"{what} {uri} has no tokenizer.json.",
                         fix="point at a model dir exported with its tokenizer (llmforge pretrain writes one).")
    ours = tokenizer_lib.load_fast(tok_uri).get_vocab(with_added_tokens=True)
    theirs = tokenizer_lib.load_fast(str(model_dir)).get_vocab(with_added_tokens=True)
    fix = (f"prepare the corpus with the model's tokenizer: llmforge prepare ... --data.tokenizer.path={uri}"
           if not uri.startswith(("models:/", "runs:/")) else
           "prepare the corpus with the model's tokenizer (--data.tokenizer.path=A_LOCAL_COPY_OF_THE_MODEL_DIR)")
    if ours != theirs:
        differ = sum(1 for token, i in ours.items() if theirs.get(token) != i)
        raise InputError(f"The dataset {cfg.data.dataset} was tokenized with another tokenizer than {what} "
                         f"{uri}: {len(ours)} vs {len(theirs)} tokens, {differ} of the dataset's with another id or "
                         "missing.", fix=fix + ".")
    config = AutoConfig.from_pretrained(model_dir)
    if config.vocab_size < manifest["vocab_size"]:
        raise InputError(f"{what} {uri} has {config.vocab_size} embeddings, the dataset's vocabulary "
                         f"{manifest['vocab_size']} tokens.", fix=fix + ".")
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and manifest["seq_len"] > context:
        raise ConfigError(f"The dataset's sequences are {manifest['seq_len']} tokens, longer than {what}'s "
                          f"context ({context}).", fix=f"prepare the dataset with --data.seq_len={context} or less.")
    return config


def scaling_config(cfg: Config):
    import ray
    from ray.train import ScalingConfig

    t = cfg.train
    resources = ray.cluster_resources()
    use_gpu = t.use_gpu if t.use_gpu is not None else resources.get("GPU", 0) >= 1
    cpus = t.cpus_per_worker
    if not use_gpu and "cpus_per_worker" not in t.model_fields_set:
        # Leave one CPU for the rest of the cluster's work (Ray Data and Serve actors, other jobs' drivers),
        # or the worker group can wait forever for resources held there; at most one per worker.
        cpus = max(0.25, min(1.0, (resources.get("CPU", 1) - 1) / t.max_workers))
    if not ray.util.client.ray.is_connected() and not _autoscaling(resources):
        # An elastic run starts with min_workers and grows into what the cluster gives.
        need_cpu = cpus * t.min_workers
        if need_cpu > resources.get("CPU", 0) or (use_gpu and t.min_workers > resources.get("GPU", 0)):
            raise ConfigError(
                f"train.num_workers={t.num_workers} needs {need_cpu:g} CPUs{' and GPUs' if use_gpu else ''}, "
                f"the cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs.",
                fix="lower train.num_workers or train.cpus_per_worker, or add nodes.")
    elastic = {} if isinstance(t.num_workers, int) else {"elastic_resize_monitor_interval_s": t.elastic_resize_interval_s}
    return ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}, **elastic)


def _autoscaling(resources: dict) -> bool:
    # Clusters with an autoscaler advertise no fixed capacity we could check against; trust Ray there.
    return bool(os.environ.get("RAY_AUTOSCALER") or os.environ.get("KUBERAY_GEN_RAY_START_PARAMS"))


def _storage_uri(cfg: Config) -> str:
    """Where Ray Train keeps the runs' checkpoints: ``train.storage_path``, else ``OUTPUT_DIR/checkpoints``."""
    return cfg.train.storage_path or storage.join(cfg.output_dir, "checkpoints")


def _storage(cfg: Config) -> tuple[str, object | None]:
    uri = _storage_uri(cfg)
    _, path = storage.resolve(uri)
    return path, (storage.picklable_s3_filesystem() if storage.is_s3(uri) else None)


def resume_plan(cfg: Config, run_name: str) -> tuple[str, str | None]:
    """Where the loop looks for checkpoints to resume from: the run's dir in storage (a job submitted again
    with the same run name continues from its newest complete checkpoint), else ``train.resume_from``,
    which must be complete (checked here, before any worker starts)."""
    run_uri = storage.absolute(storage.join(_storage_uri(cfg), run_name))
    found = complete_checkpoints(run_uri)
    if found:
        log.info("run %s has %d complete checkpoint(s) in storage; it continues from step %d", run_name, len(found),
                 found[0][0])
    elif cfg.train.resume_from:
        problem = checkpoint_problem(cfg.train.resume_from)
        # A local dir is scanned for unsafe pickles here too (checksums stay the workers' job, on their copies);
        # an s3:// one is scanned on the workers' copies.
        if problem is None and not storage.is_s3(cfg.train.resume_from):
            problem = unsafe_pickle(Path(cfg.train.resume_from))
        if problem:
            raise InputError(f"--resume-from {cfg.train.resume_from} is not a complete checkpoint: {problem}.",
                             fix="pass a checkpoint dir such as OUTPUT/checkpoints/RUN/checkpoint_*/.")
    resume_from = storage.absolute(cfg.train.resume_from) if cfg.train.resume_from and not found else None
    return run_uri, resume_from


def has_validation(manifest: dict, cfg: Config) -> bool:
    """Validation needs at least one sequence per worker (every rank evaluates its own share)."""
    sequences = manifest["splits"].get("val", {}).get("sequences", 0)
    if 0 < sequences < cfg.train.max_workers:
        log.warning("only %d validation sequence(s) for %d workers: validation is skipped", sequences, cfg.train.max_workers)
    return sequences >= cfg.train.max_workers


def worker_uri(uri: str) -> str:
    """What workers load a model from: remote URIs as given (each fetches its own copy), local dirs as absolute
    paths (workers do not share the driver's working directory)."""
    return uri if uri.startswith(("s3://", "models:/", "runs:/")) else str(Path(uri).expanduser().resolve())


def checkpoint_location(result) -> str:
    """Where a Ray Train result's checkpoint lives, as a local path or ``s3://`` URI."""
    return storage.to_uri(result.checkpoint.filesystem, result.checkpoint.path)


def run_lease(cfg: Config, run_name: str) -> Lease:
    """The lease a job holds on its run (``STORAGE/RUN_NAME.lease``) from the first worker to the export: a
    second live job with the same ``train.run_name`` would resume from this one's checkpoints, prune what it
    keeps and overwrite its export, so it refuses before any worker starts."""
    return Lease(storage.join(_storage_uri(cfg), f"{run_name}.lease"), what=f"training run {run_name}")


def run_trainer(cfg: Config, run_name: str, run_id: str, uri: str, scaling, manifest: dict, data: dict[str, str],
                model: ModelSource = ModelSource(), objective: str = "next_token", frozen: ModelSource | None = None,
                tokenizer: str | None = None):
    """Run ``train_loop`` on a Ray Train worker group; returns the Result (with its final checkpoint).
    ``frozen``: a frozen model the objective runs beside the trained one (train/frozen.py); ``tokenizer``: the
    tokenizer dir for ``train.eval_tasks`` (default: the model source's)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = _storage(cfg)
    if cfg.train.worker_start_timeout_s is not None:
        # Read by Ray Train's controller, which gets the driver's RAY_TRAIN_* variables.
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.train.worker_start_timeout_s)
    log.info("run %s: checkpoints under %s, MLflow run %s at %s", run_name,
             storage.to_uri(storage_fs, storage_path) if storage_fs is not None else storage_path, run_id, uri)
    run_uri, resume_from = resume_plan(cfg, run_name)
    config = cfg.model_dump(mode="json")
    if cfg.train.eval_tasks:
        from llmforge.evals.harness import check_training_tasks
        try:
            config["train"]["eval_tasks"] = check_training_tasks(cfg.train.eval_tasks)
        except InputError:
            tracking.finish_run(uri, run_id, "FAILED")
            raise
    spec = LoopSpec(config=config, manifest=manifest, data=data, run_uri=run_uri, model=model, objective=objective,
                    frozen=frozen, resume_from=resume_from, tracking_uri=uri, mlflow_run_id=run_id, tokenizer=tokenizer)
    try:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"spec": spec},
            scaling_config=scaling,
            run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        )
        result = trainer.fit()
    except Exception as exc:
        tracking.finish_run(uri, run_id, "FAILED")
        failures = list(getattr(exc, "worker_failures", {}).values()) or [exc]
        diverged = [e for e in failures if isinstance(e, TrainingDiverged)]
        if diverged:
            raise TrainingDiverged(diverged[0].what, fix=diverged[0].fix) from None
        unreachable = [line.strip() for e in failures for line in str(e).splitlines() if "AWS Error" in line]
        if storage_fs is not None and unreachable:
            where = storage.to_uri(storage_fs, storage_path)
            raise StorageError(f"Could not write the checkpoint to {where} after retrying: {unreachable[-1]}",
                               fix="check that the S3 endpoint is reachable and the credentials, then submit the job "
                                   "again with the same train.run_name: it continues from its last complete "
                                   "checkpoint.") from None
        raise
    if result.checkpoint is None or result.metrics is None:
        tracking.finish_run(uri, run_id, "FAILED")
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")
    return result


def pretrain(cfg: Config) -> dict:
    """Run the job; returns the summary printed as the last stdout line."""
    manifest, config = check_request(cfg)
    if cfg.model.init_from:
        source = ModelSource("init_from", worker_uri(cfg.model.init_from))
        tags = {"job": "continued_pretraining", "init_from": cfg.model.init_from}
        origin = f"Continued pretraining from `{cfg.model.init_from}`"
    else:
        source, tags, origin = ModelSource(), {"job": "pretrain", "preset": cfg.model.preset}, None
    summary, _ = train_on_tokens(cfg, manifest, config, f"pretrain-{cfg.model.preset}", source, tags, origin)
    summary = {"event": "pretrain_done", **summary}
    log.info("pretraining done: %s", json.dumps(summary))
    return summary


def train_on_tokens(cfg: Config, manifest: dict, config, job: str, source: ModelSource, tags: dict,
                    origin: str | None, objective: str = "next_token",
                    frozen: ModelSource | None = None) -> tuple[dict, dict]:
    """A training job on a prepared dataset's token shards (pretraining, continued pretraining, distillation):
    the MLflow run (with its lineage), the worker group, the HF export; the summary's common fields, and the
    last reported metrics."""
    ensure_ray(cfg.ray)
    scaling = scaling_config(cfg)
    run_name = cfg.train.run_name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    dataset = cfg.data.dataset
    tok_uri = storage.join(dataset, manifest["tokenizer"])
    data = {"train": storage.absolute(storage.join(dataset, "tokens", "train"))}
    if has_validation(manifest, cfg):
        data["val"] = storage.absolute(storage.join(dataset, "tokens", "val"))
    model_uri = storage.join(cfg.output_dir, "model")
    tok_dir = tokenizer_lib.local_copy(tok_uri)  # once: on S3 it is a download
    lineage = tracking.lineage_tags(base=cfg.model.init_from, data=dataset,
                                    data_sha256=tracking.file_sha256(storage.join(dataset, "manifest.json")),
                                    tokenizer=tok_dir)
    with run_lease(cfg, run_name):
        run_id, uri = tracking.start_run(cfg, run_name, {**tags, **lineage})
        result = run_trainer(cfg, run_name, run_id, uri, scaling, manifest, data, source, objective, frozen,
                             tokenizer=storage.absolute(tok_uri))
        metrics = result.metrics
        checkpoint_uri = checkpoint_location(result)
        with result.checkpoint.as_directory() as ckpt_dir, storage.publishing(model_uri, last="config.json") as local_model:
            stats = storage.read_json(storage.join(dataset, "stats.json")) if storage.exists(storage.join(dataset, "stats.json")) else {}
            final = {k: metrics.get(k) for k in ("step", "loss", "val_loss", "val_perplexity", "tokens_per_s", "mfu")}
            card = model_card(cfg.model.preset, count_params(config), final,
                              {"dataset": dataset, "seq_len": manifest["seq_len"], "splits": manifest["splits"],
                               "kept_docs": stats.get("kept_docs")}, dump_config(cfg), origin)
            card = card_with_training_scores(card, metrics, cfg.train.eval_tasks_limit)
            export_hf_model(Path(ckpt_dir), config, tok_dir, local_model, card)
            version = tracking.log_model_dir(uri, run_id, local_model, cfg.tracking.registered_model_name)
    tracking.finish_run(uri, run_id)
    summary = {
        "run_id": run_id, "tracking_uri": uri, "checkpoint": checkpoint_uri,
        "model_dir": model_uri, "steps": metrics.get("step"), "first_loss": metrics.get("first_loss"),
        "final_loss": metrics.get("loss"), "val_loss": metrics.get("val_loss"),
        "tokens_per_s": metrics.get("tokens_per_s"), "mfu": metrics.get("mfu"),
        "restored_from_step": metrics.get("restored_from_step"), "nonfinite_skipped": metrics.get("nonfinite_skipped"),
        "workers": metrics.get("workers"),
    }
    if version is not None:
        summary["registered_model"] = {"name": cfg.tracking.registered_model_name, "version": version}
    return summary, metrics
