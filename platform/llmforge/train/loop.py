"""The per-worker training function that Ray Train runs on every rank, top to bottom.

build model → DeepSpeed engine → restore (the newest complete one of: Ray's latest checkpoint, the run's
checkpoints in storage, ``train.resume_from``) → this rank's slice of each global micro-batch, by position
in the data's seeded order → step → every N steps: log, evaluate, checkpoint.
Every rank saves its own DeepSpeed shard and calls ``ray.train.report`` the same number of times;
only rank 0 talks to MLflow.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llmforge import storage
from llmforge.config import Config, dump_config
from llmforge.errors import TrainingDiverged
from llmforge.model.build import build_model, model_config
from llmforge.model.flops import count_params, flops_per_token, peak_flops
from llmforge.runtime import deepspeed_accelerator, quiet_library_notices
from llmforge.train.checkpoint import (checkpoint_problem, checkpoint_tag, checkpoint_world_size, complete_checkpoints,
                                       universal_copy, write_manifest)
from llmforge.train.data import TokenShards, worker_batch
from llmforge.train.deepspeed_config import deepspeed_config

log = logging.getLogger("llmforge.train")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _mean_across_ranks(values: list[float], device: torch.device) -> float:
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return (t[0] / t[1]).item() if t[1] > 0 else float("nan")


def evaluate(engine, shards: TokenShards, micro_batch_size: int, n_batches: int, device: torch.device) -> float:
    """Mean validation loss over the same ``n_batches`` global micro-batches every time (the first positions
    of the split's seeded order). Every rank runs the same number of forward passes (ZeRO-3 gathers
    parameters collectively)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    engine.eval()
    losses = []
    with torch.no_grad():
        for j in range(n_batches):
            batch = worker_batch(shards, j * world * micro_batch_size, rank, micro_batch_size)
            losses.append(engine(**_to(batch, device)).loss.float().item())
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
    quiet_library_notices()
    deepspeed_accelerator()
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
    # On CPU DeepSpeed print()s each load of its shared-memory all-reduce op: into the debug log instead.
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                               config=deepspeed_config(train_cfg, bf16, world))
    log.debug("deepspeed.initialize: %s", printed.getvalue())

    state = {"step": 0, "samples_consumed": 0, "tokens_seen": 0, "first_loss": None, "nonfinite_skipped": 0}
    client_state = restore(engine, resume_candidates(ray.train.get_checkpoint(), loop_config), device,
                           load_strict=not lora_spec)
    restored_from = None
    if client_state is not None:
        state.update({k: client_state[k] for k in state if k in client_state})
        restored_from = state["step"]

    seq_len = manifest["seq_len"]
    counts = count_params(config)
    flops_token = flops_per_token(config, counts, seq_len)
    peak, peak_source = peak_flops(device, train_cfg.peak_flops)
    tracker = Tracker(rank == 0, loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"))
    data = loop_config["data"]
    train_data = TokenShards(data["train"], seed=cfg.seed)
    val_data = TokenShards(data["val"], seed=cfg.seed) if data.get("val") else None
    if rank == 0:
        log.info("model %s: %.2fM params (%.2fM active), %.3g FLOPs/token; peak %.3g FLOP/s per worker (%s); "
                 "%d worker(s), %s, ZeRO-%d", cfg.model.preset, counts.total / 1e6, counts.active / 1e6,
                 flops_token, peak, peak_source, world, "bf16" if bf16 else "fp32", train_cfg.zero_stage)

    grad_accum = train_cfg.grad_accum_for(world)
    tokens_per_step = train_cfg.micro_batch_size * train_cfg.batches_per_step * seq_len
    val_loss = None
    window_start, window_tokens, started = time.time(), 0, time.time()
    start_step = state["step"]
    reported = False
    nonfinite_in_row = 0
    while state["step"] < train_cfg.max_steps:
        losses = []
        while len(losses) < grad_accum:
            batch = worker_batch(train_data, state["samples_consumed"], rank, train_cfg.micro_batch_size)
            state["samples_consumed"] += world * train_cfg.micro_batch_size
            loss = engine(**_to(batch, device)).loss
            # All ranks skip together, or DeepSpeed's gradient reduction would wait for a rank that skipped.
            if not _all_ranks(bool(torch.isfinite(loss.detach()).item()), device):
                nonfinite_in_row += 1
                state["nonfinite_skipped"] += 1
                if rank == 0:
                    log.warning("step %d: loss is NaN/Inf on some rank; micro-batch skipped (%d in a row, %d in all)",
                                state["step"] + 1, nonfinite_in_row, state["nonfinite_skipped"])
                if nonfinite_in_row >= train_cfg.max_nonfinite_in_row:
                    raise TrainingDiverged(
                        f"The loss was NaN/Inf for {nonfinite_in_row} micro-batches in a row at step {state['step'] + 1}.",
                        fix="resume from the last checkpoint (same run name) with a lower train.lr or stronger "
                            "train.grad_clip, or check the data; train.max_nonfinite_in_row sets the tolerance.")
                continue
            nonfinite_in_row = 0
            engine.backward(loss)
            engine.step()
            losses.append(loss.float().item())
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
                       "tokens_seen": state["tokens_seen"], "nonfinite_skipped": state["nonfinite_skipped"],
                       "epoch": state["samples_consumed"] / len(train_data), "workers": world}
            if rank == 0:
                eta = (train_cfg.max_steps - step) / steps_per_s if steps_per_s > 0 else float("nan")
                log.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f mfu %.2f%% mem %.0fMB eta %.0fs",
                         step, train_cfg.max_steps, mean_loss, metrics["lr"], metrics["grad_norm"] or 0.0,
                         tokens_per_s, 100 * mfu, metrics["memory_mb"], eta)
            window_start, window_tokens = time.time(), 0
        if val_data is not None and (step % train_cfg.eval_every == 0 or last):
            val_loss = evaluate(engine, val_data, train_cfg.micro_batch_size, train_cfg.eval_batches, device)
            metrics.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50)))
            if rank == 0:
                log.info("step %d val_loss %.4f perplexity %.2f", step, val_loss, metrics["val_perplexity"])
        tracker.log(metrics, step)

        if step % train_cfg.checkpoint_every == 0 or last:
            blocked = save_and_report(engine, cfg, state, {**metrics, "val_loss": val_loss,
                                                           "restored_from_step": restored_from},
                                      trainable_only=bool(lora_spec))
            reported = True
            tracker.log({"checkpoint_blocked_s": blocked}, step)
            if rank == 0:
                log.info("step %d checkpoint: the loop waited %.2fs (local write; upload goes on in the background)",
                         step, blocked)
    if not reported:  # restored at max_steps (e.g. resubmitted after training, before export): hand it on
        save_and_report(engine, cfg, state, {"val_loss": val_loss, "restored_from_step": restored_from},
                        trainable_only=bool(lora_spec))


def _all_ranks(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (so all ranks take the same branch)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def resume_candidates(latest, loop_config: dict) -> list[str]:
    """What to try to resume from, newest first, the same list on every rank (rank 0 decides): Ray's latest
    reported checkpoint, every complete checkpoint of this run in storage (scanned again at each restart,
    so one whose upload finished after Ray's last registration counts too), then ``train.resume_from``."""
    uris = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        steps = dict((uri, step) for step, uri in complete_checkpoints(loop_config["run_uri"]))
        if latest is not None:
            steps.setdefault(storage.to_uri(latest.filesystem, latest.path), -1)  # not complete in storage: verified before use
        if loop_config.get("resume_from"):
            steps.setdefault(loop_config["resume_from"], -1)
        uris = [sorted(steps, key=steps.get, reverse=True)]
    else:
        uris = [None]
    if dist.is_initialized():
        dist.broadcast_object_list(uris, src=0)
    return uris[0]


def restore(engine, candidates: list[str], device: torch.device, load_strict: bool = True) -> dict | None:
    """Load the first complete checkpoint of ``candidates`` (URIs, newest first) into ``engine``; returns
    its client state, or None when there is none. A damaged or half-written checkpoint is skipped with a
    warning: every rank verifies its copy against the manifests, and all ranks must agree before any loads.
    A checkpoint written by another number of workers is converted to DeepSpeed's universal format first."""
    from ray.train import Checkpoint

    rank = dist.get_rank() if dist.is_initialized() else 0
    ordered = [Checkpoint(path=storage.resolve(uri)[1], filesystem=storage.resolve(uri)[0]) for uri in candidates]
    for checkpoint in ordered:
        with checkpoint.as_directory() as ckpt_dir:
            problem = checkpoint_problem(ckpt_dir, checksums=True)
            if not _all_ranks(problem is None, device):
                if rank == 0:
                    log.warning("not resuming from %s: %s; trying the previous checkpoint", checkpoint.path,
                                problem or "damaged on another rank")
                continue
            saved_world = checkpoint_world_size(ckpt_dir)
            world = dist.get_world_size() if dist.is_initialized() else 1
            if saved_world != world:
                if rank == 0:
                    log.info("checkpoint written by %d worker(s), resuming on %d: converting it to DeepSpeed's "
                             "universal format", saved_world, world)
                load_dir = universal_copy(Path(ckpt_dir))
            else:
                load_dir = ckpt_dir
            # DeepSpeed reads this setting when loading, not at initialize.
            engine._config.load_universal_checkpoint = saved_world != world
            try:
                _, client_state = engine.load_checkpoint(str(load_dir), load_module_strict=load_strict)
            finally:
                engine._config.load_universal_checkpoint = False
                if load_dir != ckpt_dir:
                    shutil.rmtree(load_dir, ignore_errors=True)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {checkpoint.path}")
        _set_rng_states(client_state.get("rng"))
        if rank == 0:
            log.info("restored from step %d on %d worker(s) (%s)", client_state["step"],
                     dist.get_world_size() if dist.is_initialized() else 1, checkpoint.path)
        return client_state
    if ordered:
        raise RuntimeError(f"none of the {len(ordered)} checkpoint(s) to resume from is complete "
                           f"({', '.join(c.path for c in ordered)}); see the warnings above")
    return None


def _rng_states() -> dict:
    """The RNG states as tensors, lists and numbers only, so the checkpoint loads without a full unpickle."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict | None) -> None:
    if not states:
        return
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_and_report(engine, cfg: Config, state: dict, metrics: dict, trainable_only: bool = False) -> float:
    """Every rank writes its DeepSpeed shard and its manifest into its own dir; Ray Train uploads it in the
    background and merges the ranks' dirs into one checkpoint. Returns the seconds the loop was blocked."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    started = time.perf_counter()
    ctx = ray.train.get_context()
    tmp = tempfile.mkdtemp(prefix="llmforge-ckpt-")  # Ray deletes it once uploaded
    # LoRA checkpoints skip the frozen base: it is the same in every checkpoint and can be large.
    engine.save_checkpoint(tmp, tag=checkpoint_tag(state["step"]), client_state={**state, "rng": _rng_states()},
                           exclude_frozen_parameters=trainable_only)
    if ctx.get_world_rank() == 0:
        Path(tmp, "llmforge_config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    write_manifest(Path(tmp), ctx.get_world_rank(), ctx.get_world_size(), state["step"])
    saved = time.perf_counter() - started
    report = {**{k: v for k, v in metrics.items() if v is not None or k == "restored_from_step"},
              "step": state["step"], "first_loss": state["first_loss"], "checkpoint_save_s": saved}
    ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp),
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
    return time.perf_counter() - started
