"""The per-worker training function that Ray Train runs on every rank, top to bottom.

model (:class:`~llmforge.train.spec.ModelSource`) → DeepSpeed engine (and a frozen reference model, for objectives
that run one: train/frozen.py) → restore (the newest complete one of:
Ray's latest checkpoint, the run's checkpoints in storage, ``train.resume_from``) → this rank's slice of each
global micro-batch, by position in the data's seeded order → the objective's loss → step → every N steps: log,
evaluate, checkpoint. Every rank saves its own DeepSpeed shard and calls ``ray.train.report`` the same number
of times (train/checkpoint.py); only rank 0 talks to MLflow (tracking.py). What a batch's loss is lives in
``train/objectives/``: one module per objective.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from llmforge.config import Config, TrainConfig
from llmforge.errors import TrainingDiverged
from llmforge.model.build import build_model, model_config
from llmforge.model.flops import count_params, flops_per_token, peak_flops
from llmforge.runtime import deepspeed_accelerator, quiet_library_notices
from llmforge.tracking import RankZeroMetrics
from llmforge.train import objectives
from llmforge.train.checkpoint import restore, resume_candidates, save_and_report
from llmforge.train.data import TokenShards, worker_batch
from llmforge.train.deepspeed_config import deepspeed_config, initialize
from llmforge.train.frozen import frozen_model, params_on_rank
from llmforge.train.distributed import all_ranks, mean_across_ranks, rank_and_world
from llmforge.train.spec import LoopSpec, ModelSource

log = logging.getLogger("llmforge.train")


def train_loop(loop_config: dict) -> None:
    spec: LoopSpec = loop_config["spec"]
    quiet_library_notices()
    deepspeed_accelerator()
    import ray.train

    cfg = spec.cfg
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")

    # The model and its engine (and a frozen reference, if the objective has one); then the newest complete
    # checkpoint, if any, over their fresh state.
    model = build_trainable(spec.model, cfg, spec.manifest, spec.tracking_uri)
    config = model.config
    engine = deepspeed_engine(model, t, bf16, world)
    frozen = frozen_model(spec.frozen, t, bf16, device, spec.tracking_uri) if spec.frozen else None
    objective = objectives.get(spec.objective, cfg, frozen, vocab_size=spec.manifest["vocab_size"])
    state = {"step": 0, "samples_consumed": 0, "tokens_seen": 0, "first_loss": None, "nonfinite_skipped": 0}
    client_state = restore(engine, resume_candidates(ray.train.get_checkpoint(), spec.run_uri, spec.resume_from),
                           device, load_strict=not spec.model.trainable_only)
    restored_from = None
    if client_state is not None:
        state.update({k: client_state[k] for k in state if k in client_state})
        restored_from = state["step"]

    seq_len = spec.manifest["seq_len"]
    counts = count_params(config)
    flops_token = flops_per_token(config, counts, seq_len)
    peak, peak_source = peak_flops(device, t.peak_flops)
    tracker = RankZeroMetrics(rank == 0, spec.tracking_uri, spec.mlflow_run_id)
    if frozen is not None:  # its memory: ZeRO-3 partitions it like the trained model
        tracker.log({"frozen_params_on_rank": params_on_rank(frozen)}, state["step"])
    train_data = TokenShards(spec.data["train"], seed=cfg.seed, columns=objective.columns)
    val_data = TokenShards(spec.data["val"], seed=cfg.seed, columns=objective.columns) if spec.data.get("val") else None
    task_eval = task_evaluator(spec, rank) if t.eval_tasks else None
    if rank == 0:
        log.info("model %s: %.2fM params (%.2fM active), %.3g FLOPs/token; peak %.3g FLOP/s per worker (%s); "
                 "%d worker(s), %s, ZeRO-%d, objective %s", _model_name(spec.model, cfg), counts.total / 1e6,
                 counts.active / 1e6, flops_token, peak, peak_source, world, "bf16" if bf16 else "fp32",
                 t.zero_stage, objective.name)

    grad_accum = t.grad_accum_for(world)
    tokens_per_step = t.micro_batch_size * t.batches_per_step * seq_len
    val_metrics: dict = {}
    window_start, window_tokens, started = time.time(), 0, time.time()
    start_step = state["step"]
    reported = False
    nonfinite_in_row = 0
    while state["step"] < t.max_steps:
        losses, extras = [], []
        while len(losses) < grad_accum:
            batch = worker_batch(train_data, state["samples_consumed"], rank, t.micro_batch_size)
            state["samples_consumed"] += world * t.micro_batch_size
            loss, extra = objective.loss(engine, _to(batch, device))
            # All ranks skip together, or DeepSpeed's gradient reduction would wait for a rank that skipped.
            if not all_ranks(bool(torch.isfinite(loss.detach()).item()), device):
                nonfinite_in_row += 1
                state["nonfinite_skipped"] += 1
                if rank == 0:
                    log.warning("step %d: loss is NaN/Inf on some rank; micro-batch skipped (%d in a row, %d in all)",
                                state["step"] + 1, nonfinite_in_row, state["nonfinite_skipped"])
                if nonfinite_in_row >= t.max_nonfinite_in_row:
                    raise TrainingDiverged(
                        f"The loss was NaN/Inf for {nonfinite_in_row} micro-batches in a row at step {state['step'] + 1}.",
                        fix="resume from the last checkpoint (same run name) with a lower train.lr or stronger "
                            "train.grad_clip, or check the data; train.max_nonfinite_in_row sets the tolerance.")
                continue
            nonfinite_in_row = 0
            engine.backward(loss)
            engine.step()
            losses.append(loss.float().item())
            extras.append(extra)
        state["step"] += 1
        state["tokens_seen"] += tokens_per_step
        window_tokens += tokens_per_step
        step = state["step"]
        last = step == t.max_steps

        metrics: dict = {}
        if step % t.log_every == 0 or last or step == start_step + 1:
            mean_loss = mean_across_ranks(losses, device)
            if state["first_loss"] is None:
                state["first_loss"] = mean_loss
            elapsed = time.time() - window_start
            tokens_per_s = window_tokens / elapsed if elapsed > 0 else float("nan")
            grad_norm = engine.get_global_grad_norm()
            metrics = {"loss": mean_loss, **_mean_metrics(extras, device), "lr": engine.get_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_token / (peak * world),
                       "memory_mb": _memory_mb(device), "tokens_seen": state["tokens_seen"],
                       "nonfinite_skipped": state["nonfinite_skipped"],
                       "epoch": state["samples_consumed"] / len(train_data), "workers": world}
            if rank == 0:
                steps_per_s = (step - start_step) / (time.time() - started)
                eta = (t.max_steps - step) / steps_per_s if steps_per_s > 0 else float("nan")
                extra_text = "".join(f" {k} {v:.4g}" for k, v in metrics.items() if k not in _LOGGED and v is not None)
                log.info("step %d/%d loss %.4f%s lr %.2e grad_norm %.3f tokens/s %.0f mfu %.2f%% mem %.0fMB eta %.0fs",
                         step, t.max_steps, mean_loss, extra_text, metrics["lr"], metrics["grad_norm"] or 0.0,
                         tokens_per_s, 100 * metrics["mfu"], metrics["memory_mb"], eta)
            window_start, window_tokens = time.time(), 0
        if val_data is not None and (step % t.eval_every == 0 or last):
            val_metrics = evaluate(engine, objective, val_data, t.micro_batch_size, t.eval_batches, device)
            metrics.update(val_metrics)
            if rank == 0:
                log.info("step %d %s", step, " ".join(f"{k} {v:.4f}" for k, v in val_metrics.items()))
        if task_eval is not None and (step % t.eval_every == 0 or last):
            started_eval = time.time()
            scores = task_eval(engine.module)
            val_metrics.update(scores)  # reported with every checkpoint, like validation's (the model card's table)
            metrics.update(scores)
            if rank == 0:
                log.info("step %d eval tasks (%.1fs): %s", step, time.time() - started_eval,
                         " ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in scores.items()
                                  if not k.endswith("_stderr")))
        tracker.log(metrics, step)

        if step % t.checkpoint_every == 0 or last:
            # The last validation's figures go with every report, whether or not this step validated.
            blocked = save_and_report(engine, cfg, state, {**metrics, "val_loss": None, **val_metrics,
                                                           "restored_from_step": restored_from},
                                      trainable_only=spec.model.trainable_only)
            reported = True
            tracker.log({"checkpoint_blocked_s": blocked}, step)
            if rank == 0:
                log.info("step %d checkpoint: the loop waited %.2fs (local write; upload goes on in the background)",
                         step, blocked)
    if not reported:  # restored at max_steps (e.g. resubmitted after training, before export): hand it on
        save_and_report(engine, cfg, state, {"val_loss": val_metrics.get("val_loss"), "restored_from_step": restored_from},
                        trainable_only=spec.model.trainable_only)


# What the step line prints itself; any other metric (an objective's) is added after the loss.
_LOGGED = {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_mb", "tokens_seen", "nonfinite_skipped",
           "epoch", "workers"}


def build_trainable(source: ModelSource, cfg: Config, manifest: dict, tracking_uri: str | None) -> torch.nn.Module:
    """The model to train, in float32 (DeepSpeed casts for bf16), with activation checkpointing if asked."""
    if source.kind == "lora":
        from llmforge.train.lora import build_lora_model, resolve_base
        torch.manual_seed(cfg.seed)
        model = build_lora_model(resolve_base(source.uri, tracking_uri), cfg.finetune.lora, list(source.targets),
                                 load_in_4bit=source.load_in_4bit)
        if source.load_in_4bit:
            quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
            if not quantized:
                raise RuntimeError("QLoRA: the base has no 4-bit layers after loading with bitsandbytes")
            log.info("QLoRA: %d Linear layers of the base in 4-bit NF4", quantized)
    elif source.kind == "init_from":
        from llmforge.train.lora import load_pretrained
        model = load_pretrained(source.uri, tracking_uri, torch.float32)
    else:
        config = model_config(cfg.model, manifest["vocab_size"], manifest["seq_len"], manifest["eos_token_id"],
                              manifest["pad_token_id"])
        model = build_model(config, seed=cfg.seed)
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable()
        if source.kind == "lora":
            model.enable_input_require_grads()
    return model


def task_evaluator(spec: LoopSpec, rank: int):
    """``train.eval_tasks`` on this rank (see :class:`llmforge.evals.harness.TrainingEvaluator`), with the
    tokenizer of the dataset (pretraining) or of the base model (fine-tuning, alignment)."""
    from llmforge.data import tokenizer as tokenizer_lib
    from llmforge.evals.harness import TrainingEvaluator
    t = spec.cfg.train
    if spec.tokenizer:
        tokenizer_dir = tokenizer_lib.local_copy(spec.tokenizer)
    else:
        from llmforge.train.lora import resolve_base
        tokenizer_dir = resolve_base(spec.model.uri, spec.tracking_uri)
    return TrainingEvaluator(t.eval_tasks, str(tokenizer_dir), t.eval_tasks_limit,
                             active=rank == 0 or t.zero_stage == 3, batch_size=t.micro_batch_size)


def deepspeed_engine(model: torch.nn.Module, t: TrainConfig, bf16: bool, world: int):
    trainable = [p for p in model.parameters() if p.requires_grad]
    return initialize(model, deepspeed_config(t, bf16, world), model_parameters=trainable)


def evaluate(engine, objective, shards: TokenShards, micro_batch_size: int, n_batches: int,
             device: torch.device) -> dict[str, float]:
    """The objective's mean loss (``val_loss``, ``val_perplexity``: see ``objectives.token_loss``) and metrics
    (``val_`` prefixed) over the same ``n_batches`` global micro-batches every time (the first positions of the
    split's seeded order). Every rank runs the same number of forward passes (ZeRO-3 gathers parameters
    collectively)."""
    rank, world = rank_and_world()
    engine.eval()
    losses, extras = [], []
    with torch.no_grad():
        for j in range(n_batches):
            batch = worker_batch(shards, j * world * micro_batch_size, rank, micro_batch_size)
            loss, extra = objective.loss(engine, _to(batch, device))
            losses.append(loss.float().item())
            extras.append(extra)
    engine.train()
    loss = mean_across_ranks(losses, device)
    out = {"val_loss": loss, **{f"val_{k}": v for k, v in _mean_metrics(extras, device).items()}}
    if objective.token_loss not in (None, "loss"):  # val_loss: the plain next-token loss, as pretraining's
        out["val_objective_loss"], out["val_loss"] = loss, out[f"val_{objective.token_loss}"]
    if objective.token_loss is not None:  # a perplexity only where val_loss is a token cross-entropy
        out["val_perplexity"] = math.exp(min(out["val_loss"], 50))
    return out


def _mean_metrics(extras: list[dict[str, float]], device: torch.device) -> dict[str, float]:
    """An objective's metrics averaged over micro-batches and ranks (every rank has the same keys)."""
    return {key: mean_across_ranks([e[key] for e in extras], device) for key in (extras[0] if extras else {})}


def _model_name(source: ModelSource, cfg: Config) -> str:
    return cfg.model.preset if source.kind == "preset" else f"{source.uri} ({source.kind})"


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
