"""Checkpoints: the DeepSpeed shards every rank writes (saved and reported to Ray Train, verified, restored,
converted when the worker count changed), and turning them into a Hugging Face model dir."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import posixpath
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import GenerationConfig, PretrainedConfig

from llmforge import storage
from llmforge.errors import InputError
from llmforge.model.build import build_model
from llmforge.runtime import deepspeed_accelerator
from llmforge.train.distributed import all_ranks

log = logging.getLogger("llmforge.train")

# Every rank lists the files it wrote, with sizes and SHA-256, in its own manifest. A checkpoint is
# complete when the manifests of all ranks are there and every file matches them: Ray merges the
# ranks' directories as they upload, so a crash mid-save leaves a dir that lacks some of them.
MANIFEST_PREFIX = "llmforge_manifest_rank"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(ckpt_dir: Path, rank: int, world_size: int, step: int) -> None:
    """Record what this rank wrote into ``ckpt_dir``; call it last, after every other file."""
    files = {p.relative_to(ckpt_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and not p.name.startswith(MANIFEST_PREFIX)}
    manifest = {"step": step, "rank": rank, "world_size": world_size, "files": files}
    (ckpt_dir / f"{MANIFEST_PREFIX}{rank:05d}.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def checkpoint_problem(uri: str, checksums: bool = False) -> str | None:
    """Why the checkpoint under ``uri`` (local or ``s3://``) is incomplete, damaged or unsafe to load, or None
    when it is whole: every rank's manifest present, every file listed with its size (and, with ``checksums``,
    a local dir only, its SHA-256 and :func:`unsafe_pickle`)."""
    problem = _inspect(uri, storage.file_sizes(uri), checksums)[0]
    return problem or (unsafe_pickle(Path(uri)) if checksums else None)


# What a checkpoint's pickles may construct beyond torch's own tensors and containers: DeepSpeed's plain data
# holders in its optimizer shards. Loading runs only the callables a pickle names, so a checkpoint whose files
# name nothing else loads as safely as with torch.load(weights_only=True), also by DeepSpeed's own loaders
# (load_checkpoint, zero_to_fp32, ds_to_universal), which unpickle in full.
SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.utils.tensor_fragment.fragment_address",
                "deepspeed.runtime.zero.config.ZeroStageEnum")


def _safe_classes() -> list:
    import importlib
    return [getattr(importlib.import_module(name.rpartition(".")[0]), name.rpartition(".")[2]) for name in SAFE_GLOBALS]


def unsafe_pickle(ckpt_dir: Path) -> str | None:
    """Why loading the checkpoint in ``ckpt_dir`` could run code (a ``.pt`` file naming a global outside
    torch's safe set and :data:`SAFE_GLOBALS`), or None. The files are scanned, never unpickled."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for path in sorted(ckpt_dir.rglob("*.pt")):
        try:
            names = get_unsafe_globals_in_checkpoint(path)
        except Exception as exc:  # not a torch zip file at all
            return f"{path.relative_to(ckpt_dir)} is not a torch checkpoint file ({exc.__class__.__name__}: {exc})"
        unsafe = [name for name in names if name not in SAFE_GLOBALS]
        if unsafe:
            return (f"{path.relative_to(ckpt_dir)} would run code when loaded (it names {', '.join(unsafe[:3])}); "
                    "llmforge never unpickles such a file: whoever can write the checkpoint store could run "
                    "anything on the training nodes")
    return None


def _inspect(uri: str, sizes: dict[str, int], checksums: bool = False) -> tuple[str | None, int | None]:
    """(problem or None, step) of the checkpoint at ``uri`` whose files are ``sizes`` (relative path -> bytes)."""
    manifests = sorted(name for name in sizes if posixpath.basename(name).startswith(MANIFEST_PREFIX))
    if not manifests:
        return "no llmforge manifest (the save did not finish, or it was not written by llmforge)", None
    world_size = step = None
    for name in manifests:
        try:
            manifest = storage.read_json(storage.join(uri, name))
        except ValueError:
            return f"{name} is not readable JSON (cut short while being written?)", None
        world_size, step = manifest["world_size"], manifest["step"]
        for rel, meta in manifest["files"].items():
            if rel not in sizes:
                return f"{rel} is missing (listed by rank {manifest['rank']})", step
            if sizes[rel] != meta["size"]:
                return f"{rel} has {sizes[rel]} bytes, {meta['size']} were written", step
            if checksums and _sha256(Path(uri, rel)) != meta["sha256"]:
                return f"{rel} does not match its SHA-256", step
    if len(manifests) != world_size:
        return f"{len(manifests)} of {world_size} ranks finished saving", step
    return None, step


def checkpoint_world_size(uri: str) -> int:
    """How many workers wrote the checkpoint."""
    return storage.read_json(storage.join(uri, f"{MANIFEST_PREFIX}00000.json"))["world_size"]


def universal_copy(ckpt_dir: Path) -> Path:
    """A copy of a DeepSpeed checkpoint (any ZeRO stage) in DeepSpeed's universal format, which loads on
    any number of workers: every parameter's fp32 weights and Adam moments, whole. Written to a new local
    dir (the checkpoint itself stays as it is); load it with ``load_universal_checkpoint`` set."""
    import argparse
    import tempfile

    deepspeed_accelerator()
    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    tag = latest_tag(ckpt_dir)
    out = Path(tempfile.mkdtemp(prefix="llmforge-universal-"))
    args = argparse.Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(out / tag), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # DeepSpeed asks Megatron-style clients for this state
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints, one line per parameter
        to_universal(args)
    return out


def complete_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """``(step, uri)`` of every complete checkpoint of a Ray Train run dir, newest first; the incomplete
    ones are named in a warning and skipped."""
    by_checkpoint: dict[str, dict[str, int]] = {}
    for rel, size in storage.file_sizes(run_uri).items():  # one listing for the whole run
        name, sep, inner = rel.partition("/")
        if sep and name.startswith("checkpoint_"):
            by_checkpoint.setdefault(name, {})[inner] = size
    found = []
    for name, sizes in sorted(by_checkpoint.items()):
        uri = storage.join(run_uri, name)
        problem, step = _inspect(uri, sizes)
        if problem:
            log.warning("skipping incomplete checkpoint %s: %s", uri, problem)
        else:
            found.append((step, uri))
    return sorted(found, reverse=True)


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        raise InputError(f"{ckpt_dir} is not a DeepSpeed checkpoint (no 'latest' file).",
                         fix="pass a checkpoint dir written by llmforge pretrain (…/checkpoint_*/).")
    return latest.read_text().strip()


def consolidated_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage, on CPU."""
    tag = latest_tag(ckpt_dir)
    problem = unsafe_pickle(ckpt_dir)
    if problem:
        raise InputError(f"Checkpoint {ckpt_dir} is not safe to load: {problem}.",
                         fix="export from a checkpoint that llmforge wrote (its files hold tensors and plain data only).")
    deepspeed_accelerator()
    if list((ckpt_dir / tag).glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # It reports each stage with print() and tqdm; keep that out of the job's output, in the debug log.
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        log.debug("zero_to_fp32: %s", out.getvalue())
        return state
    with torch.serialization.safe_globals(_safe_classes()):
        states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in states["module"].items()}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """The tokenizer files of ``src_dir`` (a tokenizer or model dir) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out_dir / name)


def export_hf_model(ckpt_dir: Path, config: PretrainedConfig, tokenizer_dir: Path, out_dir: Path,
                    card: str) -> Path:
    """Write ``out_dir`` with config.json, model.safetensors, tokenizer files, generation_config.json, README.md."""
    model = build_model(config)
    state = consolidated_state_dict(ckpt_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer(tokenizer_dir, out_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, do_sample=True, temperature=0.8, top_p=0.95,
                     max_new_tokens=64).save_pretrained(out_dir)
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def model_card(preset: str, counts, metrics: dict, data_stats: dict, config_yaml: str, origin: str | None = None) -> str:
    """``origin``: how the model was made, a sentence's start ("Continued pretraining from `X`"); default: from
    random initialization."""
    origin = origin or "Pretrained from random initialization"
    return f"""---
library_name: transformers
tags: [llmforge, causal-lm, {preset}]
---
# {preset}, trained with llmforge

{origin} with llmforge (Ray Train + DeepSpeed).

- Parameters: {counts.total:,} total, {counts.active:,} active per token
- Final metrics: `{json.dumps(metrics, sort_keys=True)}`

## Data
```json
{json.dumps(data_stats, indent=2, ensure_ascii=False)}
```

## Configuration
```yaml
{config_yaml}```
"""


# ---- save, report and restore in the training loop -------------------------------------------------------
def resume_candidates(latest, run_uri: str, resume_from: str | None) -> list[str]:
    """What to try to resume from, newest first, the same list on every rank (rank 0 decides): Ray's latest
    reported checkpoint, every complete checkpoint of this run in storage (scanned again at each restart,
    so one whose upload finished after Ray's last registration counts too), then ``train.resume_from``."""
    uris = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        steps = dict((uri, step) for step, uri in complete_checkpoints(run_uri))
        if latest is not None:
            steps.setdefault(storage.to_uri(latest.filesystem, latest.path), -1)  # not complete in storage: verified before use
        if resume_from:
            steps.setdefault(resume_from, -1)
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
            if not all_ranks(problem is None, device):
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
        set_rng_states(client_state.get("rng"))
        if rank == 0:
            log.info("restored from step %d on %d worker(s) (%s)", client_state["step"],
                     dist.get_world_size() if dist.is_initialized() else 1, checkpoint.path)
        return client_state
    if ordered:
        raise RuntimeError(f"none of the {len(ordered)} checkpoint(s) to resume from is complete "
                           f"({', '.join(c.path for c in ordered)}); see the warnings above")
    return None


def rng_states() -> dict:
    """The RNG states as tensors, lists and numbers only, so the checkpoint loads without a full unpickle."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict | None) -> None:
    if not states:
        return
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_and_report(engine, cfg, state: dict, metrics: dict, trainable_only: bool = False) -> float:
    """Every rank writes its DeepSpeed shard and its manifest into its own dir; Ray Train uploads it in the
    background and merges the ranks' dirs into one checkpoint. Returns the seconds the loop was blocked."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    started = time.perf_counter()
    ctx = ray.train.get_context()
    tmp = tempfile.mkdtemp(prefix="llmforge-ckpt-")  # Ray deletes it once uploaded
    # LoRA checkpoints skip the frozen base: it is the same in every checkpoint and can be large.
    engine.save_checkpoint(tmp, tag=checkpoint_tag(state["step"]), client_state={**state, "rng": rng_states()},
                           exclude_frozen_parameters=trainable_only)
    if ctx.get_world_rank() == 0:
        from llmforge.config import dump_config
        Path(tmp, "llmforge_config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    write_manifest(Path(tmp), ctx.get_world_rank(), ctx.get_world_size(), state["step"])
    saved = time.perf_counter() - started
    report = {**{k: v for k, v in metrics.items() if v is not None or k == "restored_from_step"},
              "step": state["step"], "first_loss": state["first_loss"], "checkpoint_save_s": saved}
    ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp),
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
    return time.perf_counter() - started
