"""``llmforge compare``: several MLflow runs side by side — the config values that differ, final metrics, eval
scores (the run's own ``eval/`` metrics and those of its evaluation runs) — as a table, and a plot (loss curves,
score bars with their standard errors) logged as an artifact of a ``compare`` run."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from llmforge.errors import InputError
from llmforge.evals.record import PREFIX, source_run

# Metrics that are bookkeeping, not results: left out of the table.
_SKIP = {"restored_from_step", "checkpoint_blocked_s", "workers", "nonfinite_skipped", "frozen_params_on_rank"}


def _run_id(ref: str, uri: str) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException
    try:
        if ref.startswith(("models:/", "runs:/")):
            run_id, _ = source_run(ref, uri)
            if run_id is None:
                raise InputError(f"{ref} is not a run or model URI.", fix="use runs:/RUN_ID or models:/NAME/VERSION.")
        elif re.fullmatch(r"[0-9a-f]{32}", ref):
            run_id = ref
        else:
            raise InputError(f"{ref!r} is not an MLflow run ID, runs:/RUN_ID or models:/NAME/VERSION.",
                             fix="copy a run's ID from the MLflow UI or a job's *_done line (run_id).")
        mlflow.tracking.MlflowClient(uri).get_run(run_id)
        return run_id
    except MlflowException as exc:
        raise InputError(f"MLflow at {uri} has no {ref}: {exc.message.splitlines()[0]}",
                         fix="check the ID and the tracking URI (--tracking-uri or MLFLOW_TRACKING_URI).") from None


def eval_scores(client, run) -> dict[str, float]:
    """``eval/`` metrics of a run and of its evaluation runs (the newest evaluation of each metric wins)."""
    scores = {k: v for k, v in run.data.metrics.items() if k.startswith(PREFIX)}
    children = client.search_runs([run.info.experiment_id], f"tags.`llmforge.eval_of_run` = '{run.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    for child in children:
        scores.update({k: v for k, v in child.data.metrics.items() if k.startswith(PREFIX)})
    return scores


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def compare(refs: list[str], tracking_uri: str | None = None, output: str | None = None) -> dict:
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise InputError("No MLflow store to read the runs from.",
                         fix="pass --tracking-uri (e.g. sqlite:///runs/quickstart/mlflow.db) or set MLFLOW_TRACKING_URI.")
    if len(refs) < 2:
        raise InputError("compare needs at least two runs.", fix="pass two or more run IDs or model URIs.")
    client = mlflow.tracking.MlflowClient(uri)
    ids = [_run_id(ref, uri) for ref in refs]
    runs = [client.get_run(i) for i in ids]
    names = [f"{r.info.run_name or r.info.run_id[:8]} ({r.info.run_id[:6]})" for r in runs]

    params = [r.data.params for r in runs]
    differing = sorted(k for k in set().union(*params) if len({p.get(k) for p in params}) > 1)
    finals = [{k: v for k, v in r.data.metrics.items() if not k.startswith(PREFIX) and k not in _SKIP} for r in runs]
    scores = [eval_scores(client, r) for r in runs]
    sections = [
        "## Config differences\n\n" + (markdown(["param", *names], [[k, *(p.get(k) for p in params)] for k in differing])
                                       if differing else "(none)"),
        "## Final metrics\n\n" + markdown(["metric", *names], [[k, *(f.get(k) for f in finals)]
                                                               for k in sorted(set().union(*finals))]),
        "## Eval scores\n\n" + (markdown(["task/metric", *names],
                                         [[k[len(PREFIX):], *(s.get(k) for s in scores)]
                                          for k in sorted(set().union(*scores)) if not k.endswith("_stderr")])
                                if any(scores) else "(no evaluations: `llmforge eval` or train.eval_tasks)"),
    ]
    table = "\n\n".join(sections)
    out_dir = Path(output) if output else Path(tempfile.mkdtemp(prefix="llmforge-compare-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(table + "\n", encoding="utf-8")
    plot = out_dir / "compare.png"
    draw(client, runs, names, scores, plot)

    compare_run = client.create_run(runs[0].info.experiment_id, run_name="compare",
                                    tags={"job": "compare", "llmforge.compared": ",".join(ids)})
    client.log_artifact(compare_run.info.run_id, str(plot))
    client.log_artifact(compare_run.info.run_id, str(out_dir / "compare.md"))
    client.set_terminated(compare_run.info.run_id)
    return {"event": "compare_done", "runs": ids, "differing_params": differing, "plot": str(plot),
            "table_file": str(out_dir / "compare.md"), "run_id": compare_run.info.run_id, "tracking_uri": uri,
            "table": table}


def draw(client, runs, names: list[str], scores: list[dict[str, float]], path: Path) -> None:
    """Loss curves (training loss solid, validation dashed) and bars of the scores between 0 and 1 (accuracies and
    the like; perplexities stay in the table), with their standard errors."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.5))
    for run, name, color in zip(runs, names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4):
        for metric, style in (("loss", "-"), ("val_loss", "--o")):
            history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
            if history:
                curves.plot([m.step for m in history], [m.value for m in history], style, color=color, markersize=3,
                            label=f"{name} {metric}")
    curves.set(xlabel="step", ylabel="loss", title="loss")
    if curves.lines:
        curves.legend(fontsize=7)
    keys = sorted(k for k in set().union(*scores) if not k.endswith("_stderr")
                  and all(0 <= s.get(k, 0) <= 1 for s in scores))
    width = 0.8 / max(len(runs), 1)
    for i, (name, s) in enumerate(zip(names, scores)):
        bars.bar([j + i * width for j in range(len(keys))], [s.get(k, 0) for k in keys], width,
                 yerr=[s.get(f"{k}_stderr", 0) for k in keys], capsize=2, label=name)
    bars.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(keys))])
    bars.set_xticklabels([k[len(PREFIX):] for k in keys], rotation=30, ha="right", fontsize=7)
    bars.set(ylim=(0, 1), title="eval scores (± stderr)")
    if keys:
        bars.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
