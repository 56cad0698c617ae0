"""MLflow: one run per job, created by the driver; rank 0 logs metrics into it; models registered."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

from llmforge import storage
from llmforge.config import Config, dump_config
from llmforge.errors import InputError

log = logging.getLogger(__name__)


def tracking_uri(cfg: Config) -> str:
    """``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store in the output dir."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    base = Path(cfg.output_dir) if not storage.is_s3(cfg.output_dir) else Path("runs")
    base = base.resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


def _hash_into(digest, uri: str) -> None:
    fs, path = storage.resolve(uri)
    with fs.open_input_stream(path) as f:  # in 4 MiB reads: a data file may be larger than memory
        while chunk := f.read(1 << 22):
            digest.update(chunk)


def file_sha256(uri: str) -> str | None:
    """The SHA-256 of a file (local or ``s3://``), or None when there is none."""
    import hashlib
    if not storage.exists(uri):
        return None
    digest = hashlib.sha256()
    _hash_into(digest, uri)
    return digest.hexdigest()


def files_sha256(uris: list[str]) -> str:
    """One SHA-256 over several files' names and contents (a job's input data), read in chunks."""
    import hashlib
    digest = hashlib.sha256()
    for uri in sorted(uris):
        digest.update(uri.encode() + b"\0")
        _hash_into(digest, uri)
        digest.update(b"\0")
    return digest.hexdigest()


def lineage_tags(base: str | None, data: str, data_sha256: str | None, tokenizer: Path | None) -> dict[str, str]:
    """What a run was made from, as tags the MLflow UI shows and searches (``tags.`llmforge.base_model` = ...``):
    the base model's URI (none: random init), the data and its fingerprint (a prepared dataset's manifest.json,
    or the input files), the tokenizer's fingerprint (its tokenizer.json) and its chat template's."""
    tags = {"llmforge.base_model": base or "none (random init)", "llmforge.data": str(data)}
    if data_sha256:
        tags["llmforge.data_sha256"] = data_sha256
    if tokenizer is not None and (tokenizer / "tokenizer.json").is_file():
        import hashlib
        import json
        tags["llmforge.tokenizer_sha256"] = hashlib.sha256((tokenizer / "tokenizer.json").read_bytes()).hexdigest()
        template = None
        if (tokenizer / "tokenizer_config.json").is_file():
            template = json.loads((tokenizer / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        if template is None and (tokenizer / "chat_template.jinja").is_file():
            template = (tokenizer / "chat_template.jinja").read_text(encoding="utf-8")
        tags["llmforge.chat_template_sha256"] = (hashlib.sha256(str(template).encode()).hexdigest()
                                                 if template else "none")
    return tags


def ensure_experiment(client, uri: str, name: str) -> str:
    """The experiment's ID, created if missing (a SQLite store keeps its artifacts in ``mlartifacts/`` beside it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_run(cfg: Config, run_name: str, tags: dict[str, str]) -> tuple[str, str]:
    """Create the job's run with the resolved config as params and artifact; returns (run_id, uri)."""
    import mlflow

    uri = tracking_uri(cfg)
    client = mlflow.tracking.MlflowClient(uri)
    experiment_id = ensure_experiment(client, uri, cfg.tracking.experiment)
    commit = git_commit()
    parent = cfg.tracking.parent_run_id  # a recipe's stage: a child of the recipe's run
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={**tags, **({"git_commit": commit} if commit else {}),
                                  **({"mlflow.parentRunId": parent} if parent else {})})
    params = _flatten(cfg.model_dump(mode="json"))
    from mlflow.entities import Param
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    client.log_text(run.info.run_id, dump_config(cfg), "config.yaml")
    return run.info.run_id, uri


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    import mlflow
    mlflow.tracking.MlflowClient(uri).set_terminated(run_id, status=status)


def log_model_dir(uri: str, run_id: str, model_dir: Path, registered_name: str | None) -> int | None:
    """Log the exported HF model dir as the run's ``model`` artifact; register a version when named."""
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    if not registered_name:
        return None
    from mlflow.exceptions import MlflowException
    try:
        client.create_registered_model(registered_name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(registered_name, source=source, run_id=run_id)
    return int(version.version)


def local_dir(uri: str, what: str, tracking_uri: str | None = None) -> Path:
    """A local copy of a model or adapter dir given as a path, an ``s3://`` prefix or an MLflow URI
    (``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``; from ``tracking_uri``, else ``MLFLOW_TRACKING_URI``)."""
    if uri.startswith(("models:/", "runs:/")):
        import mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="llmforge-")))
        except Exception as exc:  # MLflow raises several types for unknown names, versions and stores
            raise InputError(f"Cannot fetch {what} {uri} from MLflow ({mlflow.get_tracking_uri()}): {exc}",
                             fix="check the name/version and MLFLOW_TRACKING_URI.") from None
    if storage.is_s3(uri):
        return storage.download_dir(uri, tempfile.mkdtemp(prefix="llmforge-"))
    return Path(uri)


class RankZeroMetrics:
    """A training run's metrics into its MLflow run (created by the driver), from rank 0 only; the other ranks
    and a job without a run log nothing. Non-finite and missing values are left out."""

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
