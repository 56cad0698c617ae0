import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmforge.config import load_config
from llmforge.errors import ConfigError, InputError
from llmforge.train.trainer import pretrain

from conftest import REPO, free_port, stop, wait_http

pytestmark = pytest.mark.integration


def tiny(dataset, out, **extra) -> dict:
    overrides = {"data.dataset": str(dataset), "output_dir": str(out), "train.micro_batch_size": 4,
                 "train.max_steps": 12, "train.warmup_steps": 2, "train.log_every": 3, "train.eval_every": 6,
                 "train.eval_batches": 2, "train.checkpoint_every": 6, "train.lr": 5e-3}
    overrides.update(extra)
    return overrides


def mlflow_client(uri):
    import mlflow
    return mlflow.tracking.MlflowClient(uri)


def test_zero2_trains_exports_and_tracks(sample_dataset, tmp_path):
    dataset, _ = sample_dataset
    summary = pretrain(load_config(None, tiny(dataset, tmp_path, **{"tracking.registered_model_name": "tiny-ds"})))
    assert summary["steps"] == 12 and summary["restored_from_step"] is None
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    assert summary["val_loss"] is not None and summary["tokens_per_s"] > 0 and 0 < summary["mfu"]

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    tok = AutoTokenizer.from_pretrained(summary["model_dir"])
    assert model.config.model_type == "deepseek_v3"
    ids = tok("Debian is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert (Path(summary["model_dir"]) / "README.md").read_text().count("deepseek-tiny") >= 1
    # The exported weights are the trained ones: the validation loss matches what training reported.
    from llmforge.evaluate import evaluate_model
    result = evaluate_model(summary["model_dir"], str(dataset), max_batches=4, prompts=["Debian"])
    assert result["loss"] < summary["first_loss"] - 0.5

    client = mlflow_client(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.data.params["model.preset"] == "deepseek-tiny" and run.data.tags["preset"] == "deepseek-tiny"
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(summary["run_id"], "loss")
    assert len(losses) >= 4 and {m.key for m in losses} == {"loss"}
    assert client.get_metric_history(summary["run_id"], "mfu") and client.get_metric_history(summary["run_id"], "val_loss")
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "model")}
    assert "model/model.safetensors" in artifacts and "model/config.json" in artifacts
    assert summary["registered_model"]["version"] == 1
    assert client.get_model_version("tiny-ds", "1").run_id == summary["run_id"]
    # The config travels with the checkpoint.
    assert "preset: deepseek-tiny" in (Path(summary["checkpoint"]) / "llmforge_config.yaml").read_text()


def test_zero3_trains(sample_dataset, tmp_path):
    dataset, _ = sample_dataset
    summary = pretrain(load_config(None, tiny(dataset, tmp_path, **{"train.zero_stage": 3})))
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(summary["model_dir"]).num_parameters() > 1_000_000


def _job(args: list[str], log: Path) -> subprocess.Popen:
    import ray
    address = ray.get_runtime_context().gcs_address
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "pretrain.py"), *args, f"--ray.address={address}"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "platform")})


def _summary(log: Path) -> dict:
    return json.loads(log.read_text().strip().splitlines()[-1])


def test_killed_run_resumes_with_same_loss(sample_dataset, tmp_path):
    """A job killed after its first checkpoint and submitted again with the same run name continues from
    that step and ends with the loss of an uninterrupted run with the same seed."""
    dataset, _ = sample_dataset
    common = tiny(dataset, tmp_path, **{"train.checkpoint_every": 4, "train.eval_every": 100})
    args = lambda out, name: [f"--{k}={v}" for k, v in {**common, "output_dir": out, "train.run_name": name}.items()]

    full_log = tmp_path / "full.log"
    proc = _job(args(tmp_path / "full", "full"), full_log)
    assert proc.wait(600) == 0, full_log.read_text()[-3000:]
    full = _summary(full_log)

    killed_log = tmp_path / "killed.log"
    proc = _job(args(tmp_path / "resumed", "resumed"), killed_log)
    ckpt_root = tmp_path / "resumed" / "checkpoints" / "resumed"
    deadline = time.time() + 600
    while not list(ckpt_root.glob("checkpoint_*/latest")):
        assert proc.poll() is None and time.time() < deadline, killed_log.read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "pretrain_done" not in killed_log.read_text()

    resumed_log = tmp_path / "resumed.log"
    proc = _job(args(tmp_path / "resumed", "resumed"), resumed_log)
    assert proc.wait(600) == 0, resumed_log.read_text()[-3000:]
    resumed = _summary(resumed_log)
    assert resumed["restored_from_step"] in (4, 8)
    assert resumed["steps"] == full["steps"] == 12
    assert resumed["first_loss"] == pytest.approx(full["first_loss"], abs=1e-4)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=0.03)


@pytest.fixture()
def mlflow_server(s3, tmp_path):
    s3.create_bucket(Bucket="mlflow")
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", "s3://mlflow/artifacts"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, timeout=120)
        yield url
    finally:
        stop(proc)


def test_mlflow_server_and_s3_checkpoints(sample_dataset, s3, mlflow_server, tmp_path):
    dataset, _ = sample_dataset
    s3.create_bucket(Bucket="ckpts")
    summary = pretrain(load_config(None, tiny(dataset, tmp_path, **{
        "tracking.tracking_uri": mlflow_server, "train.storage_path": "s3://ckpts/runs", "train.run_name": "s3run",
        "train.max_steps": 6, "train.checkpoint_every": 3, "train.eval_every": 3})))
    assert summary["checkpoint"].startswith("s3://ckpts/runs/s3run/checkpoint_")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpts", Prefix="runs/s3run/")["Contents"]]
    assert any(k.endswith("/latest") for k in keys) and any("optim_states" in k for k in keys)
    client = mlflow_client(mlflow_server)
    assert len(client.get_metric_history(summary["run_id"], "loss")) >= 2
    art = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["Contents"]]
    assert any(k.endswith("model/model.safetensors") for k in art)


def test_bad_requests_fail_before_workers(sample_dataset, tmp_path):
    dataset, _ = sample_dataset
    with pytest.raises(InputError, match="not a prepared dataset"):
        pretrain(load_config(None, tiny(tmp_path, tmp_path)))
    with pytest.raises(InputError, match="No dataset"):
        pretrain(load_config(None, {"output_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="vocab_size"):
        pretrain(load_config(None, tiny(dataset, tmp_path, **{"model.overrides": {"vocab_size": 123}})))
    with pytest.raises(ConfigError, match="micro_batch_size"):
        pretrain(load_config(None, tiny(dataset, tmp_path, **{"train.micro_batch_size": 100000})))
    with pytest.raises(ConfigError, match="Unknown model preset"):
        pretrain(load_config(None, tiny(dataset, tmp_path, **{"model.preset": "gpt-17"})))
    with pytest.raises(ConfigError, match="num_workers"):
        pretrain(load_config(None, tiny(dataset, tmp_path, **{"train.num_workers": 64})))
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(None, {"train.max_steps": 5, "train.warmup_steps": 10})
