"""``llmforge eval``: run tasks on a model (in-process or against its endpoint), record the results in MLflow and
the model card, write ``OUTPUT/results.json``; returns the ``eval_done`` summary."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

from llmforge.config import Config
from llmforge.evals import harness, record

log = logging.getLogger(__name__)


def run_eval(cfg: Config, model: str, tasks: list[str], *, endpoint: str | None = None, served_model: str | None = None,
             limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 16,
             data: str | None = None, output: str | None = None, prompts: list[str] | None = None,
             card_dir: str | None = None, chat: bool = False) -> dict:
    """``card_dir``: a local copy of the model whose card also gets the table (a registered model's export dir);
    a local ``model`` dir's own card always does."""
    import lm_eval

    out = harness.evaluate(model, tasks, endpoint=endpoint, served_model=served_model, limit=limit,
                           num_fewshot=num_fewshot, batch_size=batch_size, data=data,
                           tracking_uri=cfg.tracking.tracking_uri, chat=chat)
    results, model_dir = out["results"], out["model_dir"]
    how = (f"lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''}".strip()
           + (f" against {endpoint}{' (chat)' if chat else ''}" if endpoint else " in-process") + f", {datetime.date.today().isoformat()}"
           + (f", at most {limit} items per task" if limit else "") + f"; `llmforge eval --tasks {','.join(tasks)}`.")
    card_path = Path(model_dir) / "README.md"
    card = record.card_with_evaluation(card_path.read_text(encoding="utf-8") if card_path.is_file() else
                                       f"# {model}\n", results, how)
    local = {Path(d).expanduser().resolve() for d in (model, card_dir) if d and "://" not in d and ":/" not in d}
    for directory in local:
        if (directory / "README.md").is_file():
            (directory / "README.md").write_text(card, encoding="utf-8")
            log.info("model card %s: evaluation table updated", directory / "README.md")
    run_id, uri = record.log_evaluation(cfg, model, results, out["raw"], endpoint=endpoint, tasks=out["tasks"],
                                        limit=limit, card=card)
    summary = {"event": "eval_done", "model": model, "endpoint": endpoint, "results": results, "run_id": run_id,
               "tracking_uri": uri}
    if prompts and not endpoint:
        from llmforge.evaluate import generate, load_model
        summary["samples"] = generate(*load_model(str(model_dir)), prompts)
    if output:
        summary["output"] = record.write_results(output, {**summary, "lm_eval": out["raw"]})
    return summary
