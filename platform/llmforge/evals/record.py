"""Evaluation results into MLflow and the model card.

An evaluated model that MLflow knows (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/...``) gets
a child run under the run that trained it, with that run's lineage tags, the registered version named and tagged
(``eval.TASK.METRIC`` on the version, so the registry shows the scores). Any other model gets a run of its own in
``tracking.experiment``. Metrics are named ``eval/TASK/METRIC`` (with ``..._stderr``), the names the training loop
logs with ``train.eval_tasks``, so curves and final scores sit side by side.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

from llmforge.config import Config

log = logging.getLogger(__name__)

PREFIX = "eval/"


def metric_names(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{task: {metric: v}}`` as MLflow metrics ``{"eval/TASK/METRIC": v}`` (finite values only)."""
    return {f"{PREFIX}{task}/{metric}": value for task, metrics in results.items() for metric, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(value)}


def results_of_metrics(metrics: dict) -> dict[str, dict[str, float]]:
    """The inverse of :func:`metric_names` over a run's (or a report's) metrics."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(PREFIX) and key.count("/") >= 2 and value is not None:
            task, metric = key[len(PREFIX):].rsplit("/", 1)
            out.setdefault(task, {})[metric] = float(value)
    return out


def source_run(model_uri: str, tracking_uri: str) -> tuple[str | None, tuple[str, str] | None]:
    """The MLflow run that produced ``model_uri`` and its registered (name, version), when MLflow knows them."""
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri)
    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/", 1)[0], None
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))/?", model_uri)
    if not match:
        return None, None
    name, number, alias = match.groups()
    version = client.get_model_version(name, number) if number else client.get_model_version_by_alias(name, alias)
    return version.run_id, (name, version.version)


def table(results: dict[str, dict[str, float]]) -> str:
    """A markdown table: task, metric, value, standard error."""
    rows = ["| task | metric | value | ± stderr |", "|---|---|---|---|"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr")
            rows.append(f"| {task} | {metric} | {value:.4g} | {'' if stderr is None else f'{stderr:.2g}'} |")
    return "\n".join(rows)


def card_with_evaluation(card: str, results: dict[str, dict[str, float]], how: str) -> str:
    """The model card with its ``## Evaluation`` section (a table; ``how``: one line on what ran) replaced or added
    before ``## Data`` (or at the end)."""
    section = f"## Evaluation\n\n{how}\n\n{table(results)}\n\n"
    card = re.sub(r"## Evaluation\n.*?(?=^## |\Z)", "", card, flags=re.S | re.M)
    if "\n## Data" in card:
        head, _, tail = card.partition("\n## Data")
        return f"{head.rstrip()}\n\n{section}## Data{tail}"
    return f"{card.rstrip()}\n\n{section}"


def card_with_training_scores(card: str, metrics: dict, limit: int | None) -> str:
    """The card of a model trained with ``train.eval_tasks``: the last pass's scores as its evaluation table."""
    results = results_of_metrics(metrics)
    if not results:
        return card
    return card_with_evaluation(card, results, f"`train.eval_tasks` (lm-eval) at step {metrics.get('step')}"
                                + (f", at most {limit} items per task" if limit else "") + ".")


def log_evaluation(cfg: Config, model_uri: str, results: dict[str, dict[str, float]], raw: dict, *,
                   endpoint: str | None, tasks: list, limit, card: str | None) -> tuple[str, str]:
    """Log one evaluation; returns (run_id, tracking_uri). ``card``: the model card with its evaluation table,
    logged as the run's ``model_card/README.md``."""
    import mlflow
    from mlflow.entities import Metric, Param

    from llmforge import tracking

    uri = tracking.tracking_uri(cfg)
    client = mlflow.tracking.MlflowClient(uri)
    parent, registered = source_run(model_uri, uri)
    tags = {"job": "eval", "llmforge.model": model_uri, "llmforge.eval_mode": "endpoint" if endpoint else "in-process"}
    if endpoint:
        tags["llmforge.endpoint"] = endpoint
    if parent:
        source = client.get_run(parent)
        experiment_id = source.info.experiment_id
        tags.update({k: v for k, v in source.data.tags.items() if k.startswith("llmforge.") and k not in tags})
        tags.update({"mlflow.parentRunId": parent, "llmforge.eval_of_run": parent})
    else:
        experiment_id = tracking.ensure_experiment(client, uri, cfg.tracking.experiment)
    if registered:
        tags.update({"llmforge.registered_model": registered[0], "llmforge.registered_version": str(registered[1])})
    commit = tracking.git_commit()
    if commit:
        tags["git_commit"] = commit
    name = "eval-" + (Path(model_uri).name if "://" not in model_uri and ":/" not in model_uri else
                      model_uri.rstrip("/").split("/")[-1] or "model")
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    params = {"tasks": ",".join(t.name for t in tasks), "limit": str(limit), "endpoint": str(endpoint),
              "lm_eval_version": str(raw.get("lm_eval_version")) if raw else "n/a"}
    for t in tasks:
        params[f"task.{t.name}.source"] = t.source[:500]
    now = int(time.time() * 1000)
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, v, now, 0) for k, v in metric_names(results).items()])
    client.log_dict(run_id, {"results": results, "lm_eval": raw}, "eval/results.json")
    if card is not None:
        client.log_text(run_id, card, "model_card/README.md")
    if registered:
        for key, value in metric_names(results).items():
            client.set_model_version_tag(registered[0], registered[1], key.replace("/", "."), f"{value:.6g}")
        client.set_model_version_tag(registered[0], registered[1], "eval_run_id", run_id)
    client.set_terminated(run_id)
    log.info("evaluation logged to MLflow run %s at %s%s", run_id, uri,
             f" (a child of {parent}, registered {registered[0]} v{registered[1]})" if registered else
             (f" (a child of {parent})" if parent else ""))
    return run_id, uri


def write_results(output: str, payload: dict) -> str:
    """``OUTPUT/results.json`` (local or s3://); returns its URI."""
    from llmforge import storage
    target = storage.join(output, "results.json")
    storage.write_text(target, json.dumps(payload, indent=2, ensure_ascii=False, default=str))
    return target
