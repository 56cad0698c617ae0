"""Checkpoints: the DeepSpeed shards every rank writes, and turning them into a Hugging Face model dir."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import posixpath
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig

from llmforge import storage
from llmforge.errors import InputError
from llmforge.model.build import build_model
from llmforge.runtime import deepspeed_accelerator

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


def model_card(preset: str, counts, metrics: dict, data_stats: dict, config_yaml: str) -> str:
    return f"""---
library_name: transformers
tags: [llmforge, causal-lm, {preset}]
---
# {preset}, trained with llmforge

Pretrained from random initialization with llmforge (Ray Train + DeepSpeed).

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
