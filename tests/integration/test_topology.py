"""The production topology on one machine (`make topology`): a Ray head started with `ray start`, token
authentication on, an `mlflow server` whose artifacts live on S3 (moto_server), pretraining submitted with
`ray job submit --working-dir .` reading its dataset from S3 and writing checkpoints there, then the serving
app started from the MLflow model URI answering through the openai client. Everything started is stopped."""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llmforge import storage

from conftest import REPO, free_port, stop_tree, wait_http

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture()
def ray_head(tmp_path, mlflow_server):
    """`ray start --head --block` on 127.0.0.1 with its own ports, temp dir and auth token."""
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rayh")  # short: Ray's socket paths have a length limit
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    gcs, dashboard = free_port(), free_port()
    # RAY_ADDRESS: this cluster's processes must find it, not the test session's own Ray on this machine.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ADDRESS": f"127.0.0.1:{gcs}", "MLFLOW_TRACKING_URI": mlflow_server,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    ports = {"--port": gcs, "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    log = open(tmp_path / "ray_head.log", "w")
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
                             f"--temp-dir={temp_dir}", *(f"{k}={v}" for k, v in ports.items())],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{dashboard}/api/gcs_healthz", proc, timeout=120)
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}", "log": tmp_path / "ray_head.log"}
    finally:
        stop_tree(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_production_topology(sample_dataset, s3, mlflow_server, ray_head, tmp_path):
    dataset, _ = sample_dataset
    for bucket in ("data", "ckpts", "runs"):
        s3.create_bucket(Bucket=bucket)
    storage.upload_dir(dataset, "s3://data/sample")
    env = ray_head["env"]

    # Without the token, the cluster refuses the job.
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", ray_head["dashboard"]],
                             env=no_token, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0

    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(REPO), "--",
         "python", "jobs/pretrain.py", "--config", "configs/pretrain/deepseek-tiny.yaml", "--data.dataset=s3://data/sample",
         "--output_dir=s3://runs/prod", "--train.storage_path=s3://ckpts/runs", "--train.run_name=prod",
         "--train.max_steps=8", "--train.warmup_steps=2", "--train.checkpoint_every=4", "--train.eval_every=4",
         "--train.log_every=2", f"--tracking.tracking_uri={mlflow_server}",
         "--tracking.registered_model_name=llmforge-prod"],
        env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    summary = json.loads(re.findall(r"^\{\"event\": \"pretrain_done\".*$", job.stdout, re.M)[-1])
    assert summary["steps"] == 8 and summary["registered_model"] == {"name": "llmforge-prod", "version": 1}

    # Checkpoints in the S3 bucket, metrics and the model in the MLflow server (artifacts on S3).
    assert summary["checkpoint"].startswith("s3://ckpts/runs/prod/checkpoint_")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpts", Prefix="runs/prod/")["Contents"]]
    assert any(k.endswith("llmforge_manifest_rank00001.json") for k in keys)
    import mlflow
    client = mlflow.tracking.MlflowClient(mlflow_server)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "loss")) >= 4
    artifacts = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["Contents"]]
    assert any(k.endswith("model/model.safetensors") for k in artifacts)

    # Serve the registered model on the same cluster, fetched by its MLflow URI.
    port = free_port()
    serve_log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve.py"), "--model", "models:/llmforge-prod/1",
                              f"--ray.address={ray_head['gcs']}", f"--serve.port={port}", "--serve.num_cpus=0.5",
                              "--serve.max_batch_size=4"],
                             stdout=open(serve_log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while "READY" not in serve_log.read_text():
            assert serve.poll() is None and time.time() < deadline, serve_log.read_text()[-3000:]
            time.sleep(0.5)
        from openai import OpenAI
        api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        [model] = [m.id for m in api.models.list().data]
        out = api.completions.create(model=model, prompt="Debian is", max_tokens=8, temperature=0)
        assert out.choices[0].text and out.usage.completion_tokens >= 1
    finally:
        stop_tree(serve, "jobs/serve.py")
