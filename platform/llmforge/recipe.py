"""Multi-stage recipes (``llmforge recipe``, ``jobs/recipe.py``): training stages run in order, each stage's
model the next one's base, with their lineage in MLflow.

A recipe file (``configs/recipes/tiny.yaml``)::

    recipe: tiny                    # its name: the MLflow parent run's, and its stages' run names
    output_dir: runs/recipe-tiny    # stage NAME writes to OUTPUT_DIR/NAME
    config: {...}                   # settings for every stage (any config section)
    stages:
      - {name: pretrain, job: pretrain, config: {...}}
      - {name: sft, job: finetune, config: {finetune: {data: ...}}}
      - {name: dpo, job: align, config: {align: {data: ...}}}

A stage's base is the previous stage's exported model, set where its job reads one: ``model.init_from``
(pretrain: continued pretraining), ``finetune.base``, ``align.base``, ``distill.teacher``; ``base:`` on a
stage names another model instead. A LoRA fine-tuning stage is merged (``finetune.merge``) so that the next
stage gets a full model.

MLflow: one parent run for the recipe, a child run per stage (``tracking.parent_run_id``); each child records
its base model (``llmforge.base_model``, and ``llmforge.base_run_id``: the run that made it), its data's, its
tokenizer's and its chat template's fingerprints (tracking.lineage_tags).

Submitting a recipe again (same output dir) skips the stages that finished with the same settings and the
same base (``OUTPUT_DIR/NAME/stage.json``), and resumes an unfinished one from its checkpoints (its run name
is fixed by its settings); a stage whose settings or base changed runs again under a new run name, and so do
the stages after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmforge import storage, tracking
from llmforge.config import Config, dump_config, load_config
from llmforge.errors import ConfigError, InputError

log = logging.getLogger("llmforge")

JOBS = ("pretrain", "finetune", "align", "distill")
BASE_FIELD = {"pretrain": "model.init_from", "finetune": "finetune.base", "align": "align.base",
              "distill": "distill.teacher"}


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the stage's name: its output dir and run name")
    job: Literal["pretrain", "finetune", "align", "distill"]
    config: dict[str, Any] = Field(default_factory=dict, description="this stage's settings, over the recipe's")
    base: str | None = Field(None, description="the stage's base model; default: the previous stage's model")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", v):
            raise ValueError(f"stage name {v!r}: use lower-case letters, digits, - and _ (at most 40)")
        return v


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipe: str = Field(description="the recipe's name")
    output_dir: str = Field(description="where each stage writes (OUTPUT_DIR/NAME), local or s3://")
    config: dict[str, Any] = Field(default_factory=dict, description="settings for every stage")
    stages: list[Stage] = Field(min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict, description="command-line overrides: over every "
                                      "stage's settings")

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, v: str) -> str:
        return Stage._name(v)

    @field_validator("stages")
    @classmethod
    def _unique(cls, v: list[Stage]) -> list[Stage]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return v


def load_recipe(path: str | Path, overrides: dict[str, Any]) -> Recipe:
    """The recipe file, with command-line overrides: ``output_dir`` is the recipe's, any other applies to every
    stage (``--train.num_workers=1``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Recipe file {path} does not exist.", fix="check --config (e.g. configs/recipes/tiny.yaml).")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Recipe file {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"Recipe file {path} must hold a mapping with recipe, output_dir and stages.")
    overrides = dict(overrides)
    if "output_dir" in overrides:
        tree["output_dir"] = str(overrides.pop("output_dir"))
    tree["config"] = _dotted(tree.get("config") or {})
    tree["overrides"] = overrides
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"Recipe file {path}: {problems}.", fix="see docs/post-training.md#recipes.") from None
    for stage in recipe.stages:  # every stage's settings must be valid before the first stage starts
        stage_config(recipe, stage, base=None, parent_run_id=None, tracking_uri=None)
    first = recipe.stages[0]
    if first.job != "pretrain" and not first.base and BASE_FIELD[first.job] not in _dotted(first.config):
        raise ConfigError(f"Recipe {recipe.recipe}: its first stage {first.name} ({first.job}) has no base model.",
                          fix=f"give the stage `base: MODEL` (or {BASE_FIELD[first.job]} in its config), or start "
                              "the recipe with a pretrain stage.")
    return recipe


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("overrides", "adapters", "vllm_engine_kwargs"):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def stage_config(recipe: Recipe, stage: Stage, base: str | None, parent_run_id: str | None,
                 tracking_uri: str | None) -> Config:
    """A stage's Config: the recipe's settings, then the stage's, then what the recipe sets itself (its base,
    output dir, MLflow parent and store)."""
    settings = {**recipe.config, **_dotted(stage.config), **recipe.overrides}
    for key in ("output_dir", "train.run_name", "tracking.parent_run_id"):
        if key in settings:
            raise ConfigError(f"Recipe {recipe.recipe}, stage {stage.name}: {key} is set by the recipe.",
                              fix=f"drop {key} from the recipe file (stages write to OUTPUT_DIR/NAME).")
    if stage.job == "finetune" and settings.get("finetune.method", "lora") in ("lora", "qlora"):
        settings["finetune.merge"] = True  # the next stage gets a full model
    settings["output_dir"] = storage.join(recipe.output_dir, stage.name)
    base = stage.base or base
    if base is not None:  # the previous stage's model, unless the stage names its own
        settings.setdefault(BASE_FIELD[stage.job], base)
    if parent_run_id:
        settings["tracking.parent_run_id"] = parent_run_id
    if tracking_uri:
        settings["tracking.tracking_uri"] = tracking_uri
    try:
        return load_config(None, settings)
    except ConfigError as exc:
        raise ConfigError(f"Recipe {recipe.recipe}, stage {stage.name}: {exc.what}", fix=exc.fix) from None


def fingerprint(cfg: Config, job: str, base_run_id: str | None) -> str:
    """What a stage's result depends on: its job, its settings (not its MLflow parent) and the run that made
    its base."""
    settings = cfg.model_dump(mode="json")
    settings["tracking"].pop("parent_run_id", None)
    settings["train"].pop("run_name", None)
    blob = json.dumps({"job": job, "config": settings, "base_run_id": base_run_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_stage(job: str, cfg: Config) -> dict:
    if job == "pretrain":
        from llmforge.samples import SAMPLE_DATASET, prepare_sample
        from llmforge.train.trainer import pretrain
        if cfg.data.dataset is None:
            log.info("no data.dataset: the bundled sample corpus, prepared at %s", SAMPLE_DATASET)
            prepare_sample(SAMPLE_DATASET, cfg.ray)
            cfg.data.dataset = SAMPLE_DATASET
        return pretrain(cfg)
    if job == "finetune":
        from llmforge.train.finetune import finetune
        return finetune(cfg)
    if job == "align":
        from llmforge.train.align import align
        return align(cfg)
    from llmforge.train.distill import distill
    if cfg.data.dataset is None:
        raise InputError("A distill stage needs data.dataset (a prepared dataset with the teacher's tokenizer).",
                         fix="set data.dataset in the stage's config.")
    return distill(cfg)


def stage_model(summary: dict) -> str:
    """The full model a stage exported (a LoRA stage's merged one)."""
    return summary.get("merged_dir") or summary["model_dir"]


def run_recipe(recipe: Recipe, recipe_text: str) -> dict:
    """Run (or resume) the recipe; returns the summary printed as the last stdout line."""
    import mlflow

    common = load_config(None, {**recipe.config, **recipe.overrides, "output_dir": recipe.output_dir})
    uri = tracking.tracking_uri(common)  # one MLflow store for every stage: by default OUTPUT_DIR/mlflow.db
    state_uri = storage.join(recipe.output_dir, "recipe.json")
    state = storage.read_json(state_uri) if storage.exists(state_uri) else {}
    client = mlflow.tracking.MlflowClient(uri)
    parent = state.get("parent_run_id") if state.get("tracking_uri") == uri else None
    if parent is not None:
        try:
            client.get_run(parent)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a run the store does not have
            parent = None
    if parent is None:
        parent, _ = tracking.start_run(common, f"recipe-{recipe.recipe}",
                                       {"job": "recipe", "recipe": recipe.recipe,
                                        "stages": " -> ".join(f"{s.name} ({s.job})" for s in recipe.stages)})
        client.log_text(parent, recipe_text, "recipe.yaml")
        storage.write_json(state_uri, {"parent_run_id": parent, "tracking_uri": uri, "recipe": recipe.recipe})
    else:
        client.update_run(parent, status="RUNNING")
        log.info("recipe %s: resuming, MLflow parent run %s", recipe.recipe, parent)
    results: list[dict] = []
    base, base_run = None, None
    started = time.time()
    try:
        for i, stage in enumerate(recipe.stages, 1):
            cfg = stage_config(recipe, stage, base, parent, uri)
            fp = fingerprint(cfg, stage.job, base_run)
            cfg.train.run_name = f"{recipe.recipe}-{stage.name}-{fp[:8]}"
            done_uri = storage.join(cfg.output_dir, "stage.json")
            done = storage.read_json(done_uri) if storage.exists(done_uri) else None
            if done is not None and done.get("fingerprint") == fp:
                summary, skipped = done["summary"], True
                log.info("recipe %s [%d/%d] %s (%s): finished before with the same settings and base; skipped "
                         "(run %s)", recipe.recipe, i, len(recipe.stages), stage.name, stage.job, summary["run_id"])
            else:
                log.info("recipe %s [%d/%d] %s (%s) from %s, run %s", recipe.recipe, i, len(recipe.stages),
                         stage.name, stage.job, base or "scratch", cfg.train.run_name)
                stage_started = time.time()
                summary, skipped = run_stage(stage.job, cfg), False
                client.set_tag(summary["run_id"], "llmforge.stage", stage.name)
                if base_run:
                    client.set_tag(summary["run_id"], "llmforge.base_run_id", base_run)
                storage.write_json(done_uri, {"fingerprint": fp, "job": stage.job, "summary": summary,
                                              "config": dump_config(cfg), "seconds": round(time.time() - stage_started, 1)})
            client.set_tag(parent, f"stage.{i}.{stage.name}", summary["run_id"])
            base, base_run = stage_model(summary), summary["run_id"]
            results.append({"name": stage.name, "job": stage.job, "run_id": summary["run_id"], "model_dir": base,
                            "skipped": skipped})
    except BaseException:
        tracking.finish_run(uri, parent, "FAILED")
        raise
    client.set_tag(parent, "llmforge.final_model", base)
    tracking.finish_run(uri, parent)
    summary = {"event": "recipe_done", "recipe": recipe.recipe, "parent_run_id": parent, "tracking_uri": uri,
               "seconds": round(time.time() - started, 1), "stages": results}
    log.info("recipe done: %s", json.dumps(summary))
    return summary
