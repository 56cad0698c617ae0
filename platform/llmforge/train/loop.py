"""The per-worker training function that Ray Train runs on every rank, top to bottom.

build model → DeepSpeed engine → restore (Ray's latest checkpoint, else ``train.resume_from``) →
stream batches from this rank's dataset shard → step → every N steps: log, evaluate, checkpoint.
Every rank saves its own DeepSpeed shard and calls ``ray.train.report`` the same number of times;
only rank 0 talks to MLflow.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from llmforge.config import Config, dump_config
from llmforge.model.build import build_model, model_config
from llmforge.model.flops import count_params, flops_per_token, peak_flops
from llmforge.train.checkpoint import checkpoint_tag
from llmforge.train.deepspeed_config import deepspeed_config

log = logging.getLogger("llmforge.train")


def _collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``labels`` (pretraining shards have no labels: the model predicts every token)."""
    ids = torch.as_tensor(np.stack(list(batch["input_ids"])), dtype=torch.long)
    labels = torch.as_tensor(np.stack(list(batch["labels"])), dtype=torch.long) if "labels" in batch else ids
    return {"input_ids": ids, "labels": labels}


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def batches(shard, micro_batch_size: int, skip: int = 0, drop_last: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches, epoch after epoch; the first ``skip`` (already trained on) are passed over."""
    seen = 0
    while True:
        produced = False
        for batch in shard.iter_torch_batches(batch_size=micro_batch_size, collate_fn=_collate, drop_last=drop_last):
            produced = True
            seen += 1
            if seen > skip:
                yield batch
        if not produced:
            raise RuntimeError("this worker's share of the training data holds no full batch")


def _mean_across_ranks(values: list[float], device: torch.device) -> float:
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return (t[0] / t[1]).item() if t[1] > 0 else float("nan")


def evaluate(engine, shard, micro_batch_size: int, n_batches: int, device: torch.device) -> float:
    """Mean validation loss over ``n_batches`` per rank. Every rank runs the same number of forward passes
    (ZeRO-3 gathers parameters collectively), cycling its shard if it is shorter."""
    engine.eval()
    losses = []
    with torch.no_grad():
        stream = batches(shard, micro_batch_size, drop_last=False)
        for _ in range(n_batches):
            losses.append(engine(**_to(next(stream), device)).loss.float().item())
    engine.train()
    return _mean_across_ranks(losses, device)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Tracker:
    """MLflow logging on rank 0 only (one run per job, created by the driver)."""

    def __init__(self, enabled: bool, tracking_uri: str | None, run_id: str | None):
        self.enabled = enabled and run_id is not None
        if self.enabled:
            import mlflow
            self.client = mlflow.tracking.MlflowClient(tracking_uri)
            self.run_id = run_id

    def log(self, metrics: dict, step: int) -> None:
        if self.enabled:
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                                        if v is not None and math.isfinite(float(v))])


def train_loop(loop_config: dict) -> None:
    import deepspeed
    import ray.train

    cfg = Config.model_validate(loop_config["config"])
    manifest = loop_config["manifest"]
    train_cfg = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bf16 = train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and device.type == "cuda")

    lora_spec = loop_config.get("lora")
    if lora_spec:
        from llmforge.train.lora import build_lora_model, resolve_base
        torch.manual_seed(cfg.seed)
        model = build_lora_model(resolve_base(lora_spec["base"], loop_config.get("tracking_uri")),
                                 cfg.finetune.lora, lora_spec["targets"])
        config = model.config
    else:
        config = model_config(cfg.model, manifest["vocab_size"], manifest["seq_len"],
                              manifest["eos_token_id"], manifest["pad_token_id"])
        model = build_model(config, seed=cfg.seed)
    if train_cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
        if lora_spec:
            model.enable_input_require_grads()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=deepspeed_config(train_cfg, bf16))

    state = {"step": 0, "batches_consumed": 0, "tokens_seen": 0, "first_loss": None}
    restored_from = None
    checkpoint = ray.train.get_checkpoint() or loop_config.get("resume_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            _, client_state = engine.load_checkpoint(ckpt_dir, load_module_strict=not lora_spec)
        if client_state is None:
            raise RuntimeError(f"could not load the DeepSpeed checkpoint in {checkpoint}")
        state.update({k: client_state[k] for k in state if k in client_state})
        restored_from = state["step"]
        if rank == 0:
            log.info("restored from step %d (%s)", restored_from, checkpoint)

    seq_len = manifest["seq_len"]
    counts = count_params(config)
    flops_token = flops_per_token(config, counts, seq_len)
    peak, peak_source = peak_flops(device, train_cfg.peak_flops)
    tracker = Tracker(rank == 0, loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"))
    train_stream = batches(ray.train.get_dataset_shard("train"), train_cfg.micro_batch_size,
                           skip=state["batches_consumed"])
    val_shard = ray.train.get_dataset_shard("val") if loop_config.get("validate") else None
    if rank == 0:
        log.info("model %s: %.2fM params (%.2fM active), %.3g FLOPs/token; peak %.3g FLOP/s per worker (%s); "
                 "%d worker(s), %s, ZeRO-%d", cfg.model.preset, counts.total / 1e6, counts.active / 1e6,
                 flops_token, peak, peak_source, world, "bf16" if bf16 else "fp32", train_cfg.zero_stage)

    tokens_per_step = train_cfg.micro_batch_size * train_cfg.grad_accum * seq_len * world
    val_loss = None
    window_start, window_tokens, started = time.time(), 0, time.time()
    start_step = state["step"]
    reported = False
    while state["step"] < train_cfg.max_steps:
        losses = []
        for _ in range(train_cfg.grad_accum):
            loss = engine(**_to(next(train_stream), device)).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.float().item())
            state["batches_consumed"] += 1
        state["step"] += 1
        state["tokens_seen"] += tokens_per_step
        window_tokens += tokens_per_step
        step = state["step"]
        last = step == train_cfg.max_steps

        metrics: dict = {}
        if step % train_cfg.log_every == 0 or last or step == start_step + 1:
            mean_loss = _mean_across_ranks(losses, device)
            if state["first_loss"] is None:
                state["first_loss"] = mean_loss
            elapsed = time.time() - window_start
            tokens_per_s = window_tokens / elapsed if elapsed > 0 else float("nan")
            mfu = tokens_per_s * flops_token / (peak * world)
            grad_norm = engine.get_global_grad_norm()
            steps_per_s = (step - start_step) / (time.time() - started)
            metrics = {"loss": mean_loss, "lr": engine.get_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "tokens_per_s": tokens_per_s, "mfu": mfu, "memory_mb": _memory_mb(device),
                       "tokens_seen": state["tokens_seen"]}
            if rank == 0:
                eta = (train_cfg.max_steps - step) / steps_per_s if steps_per_s > 0 else float("nan")
                log.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f mfu %.2f%% mem %.0fMB eta %.0fs",
                         step, train_cfg.max_steps, mean_loss, metrics["lr"], metrics["grad_norm"] or 0.0,
                         tokens_per_s, 100 * mfu, metrics["memory_mb"], eta)
            window_start, window_tokens = time.time(), 0
        if val_shard is not None and (step % train_cfg.eval_every == 0 or last):
            val_loss = evaluate(engine, val_shard, train_cfg.micro_batch_size, train_cfg.eval_batches, device)
            metrics.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50)))
            if rank == 0:
                log.info("step %d val_loss %.4f perplexity %.2f", step, val_loss, metrics["val_perplexity"])
        tracker.log(metrics, step)

        if step % train_cfg.checkpoint_every == 0 or last:
            save_and_report(engine, cfg, state, {**metrics, "val_loss": val_loss, "restored_from_step": restored_from},
                            trainable_only=bool(lora_spec))
            reported = True
    if not reported:  # restored at max_steps (e.g. resubmitted after training, before export): hand it on
        save_and_report(engine, cfg, state, {"val_loss": val_loss, "restored_from_step": restored_from},
                        trainable_only=bool(lora_spec))


def save_and_report(engine, cfg: Config, state: dict, metrics: dict, trainable_only: bool = False) -> None:
    """Every rank writes its DeepSpeed shard into its own dir; Ray Train merges them into one checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    report = {**{k: v for k, v in metrics.items() if v is not None or k == "restored_from_step"},
              "step": state["step"], "first_loss": state["first_loss"]}
    with tempfile.TemporaryDirectory() as tmp:
        # LoRA checkpoints skip the frozen base: it is the same in every checkpoint and can be large.
        engine.save_checkpoint(tmp, tag=checkpoint_tag(state["step"]), client_state=dict(state),
                               exclude_frozen_parameters=trainable_only)
        if ray.train.get_context().get_world_rank() == 0:
            Path(tmp, "llmforge_config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp))
