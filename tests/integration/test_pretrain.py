import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmforge.config import load_config
from llmforge.errors import ConfigError, InputError, TrainingDiverged
from llmforge.train.checkpoint import checkpoint_problem, checkpoint_world_size, complete_checkpoints
from llmforge.train.trainer import pretrain

from conftest import REPO
from multinode import train_worker_pids

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


def test_zero3_trains_with_relative_paths(sample_dataset, tmp_path, monkeypatch):
    """ZeRO-3, and paths relative to the driver's directory (as `make quickstart` passes them): the workers,
    which run in other directories, must still find the data and the run's checkpoints."""
    dataset, _ = sample_dataset
    monkeypatch.chdir(tmp_path)
    relative_dataset = os.path.relpath(dataset, tmp_path)
    summary = pretrain(load_config(None, tiny(relative_dataset, "out", **{
        "train.zero_stage": 3, "train.eval_tasks": ["handbook_ending_zh"], "train.eval_tasks_limit": 40})))
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(summary["model_dir"]).num_parameters() > 1_000_000
    # train.eval_tasks under ZeRO-3 (every rank runs the tasks: its forwards gather the partitioned weights): a
    # curve beside the loss, and the last pass in the model card.
    history = mlflow_client(summary["tracking_uri"]).get_metric_history(summary["run_id"], "eval/handbook_ending_zh/acc")
    assert [m.step for m in history] == [6, 12] and all(0 <= m.value <= 1 for m in history)
    card = (Path(summary["model_dir"]) / "README.md").read_text()
    assert f"| handbook_ending_zh | acc | {history[-1].value:.4g} |" in card


def _job(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """jobs/pretrain.py in a process of its own, on the test session's Ray unless args name a cluster."""
    import ray
    if not any(a.startswith("--ray.address=") for a in args):
        args = [*args, f"--ray.address={ray.get_runtime_context().gcs_address}"]
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "pretrain.py"), *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "platform"), **(env or {})})


def _summary(log: Path) -> dict:
    return json.loads(log.read_text().strip().splitlines()[-1])


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 600):
    deadline = time.time() + timeout
    while not (found := predicate()):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return found


RESUME_TEST = {"train.checkpoint_every": 4, "train.eval_every": 100, "train.max_failures": 2}


@pytest.fixture(scope="module")
def reference(sample_dataset, tmp_path_factory):
    """One uninterrupted 2-worker run that the failure tests compare against (same seed, same batches)."""
    dataset, _ = sample_dataset
    out = tmp_path_factory.mktemp("reference")
    log = out / "full.log"
    proc = _job([f"--{k}={v}" for k, v in {**tiny(dataset, out, **RESUME_TEST), "train.run_name": "full"}.items()], log)
    assert proc.wait(600) == 0, log.read_text()[-3000:]
    summary = _summary(log)
    assert summary["steps"] == 12 and summary["restored_from_step"] is None and summary["nonfinite_skipped"] == 0
    return out, summary


def test_failures_resume_from_the_last_complete_checkpoint(sample_dataset, reference, tmp_path):
    """Two failures, each of which must end with the same 12 steps and (nearly) the same loss as the
    uninterrupted reference run: the job's driver killed and the job submitted again with the same run name;
    the newest checkpoint damaged on disk (the resume falls back to the one before, with a warning)."""
    dataset, _ = sample_dataset
    common = tiny(dataset, tmp_path, **RESUME_TEST)
    args = lambda out, name: [f"--{k}={v}" for k, v in {**common, "output_dir": out, "train.run_name": name}.items()]
    ref_dir, full = reference

    # 1. The driver dies (a RayJob's submitter pod lost); the same job submitted again continues.
    killed_log = tmp_path / "killed.log"
    proc = _job(args(tmp_path / "resub", "resub"), killed_log)
    run_dir = str(tmp_path / "resub" / "checkpoints" / "resub")
    steps = _wait_for(lambda: complete_checkpoints(run_dir), proc, killed_log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "pretrain_done" not in killed_log.read_text()
    resumed_log = tmp_path / "resumed.log"
    proc = _job(args(tmp_path / "resub", "resub"), resumed_log)
    assert proc.wait(600) == 0, resumed_log.read_text()[-3000:]
    resumed = _summary(resumed_log)
    assert resumed["restored_from_step"] >= steps[0][0] and resumed["restored_from_step"] in (4, 8)
    assert resumed["steps"] == 12
    assert resumed["first_loss"] == pytest.approx(full["first_loss"], abs=1e-4)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=0.03)

    # 2. A training worker process dying (Ray Train restarts the worker group, the loop restores) is the DPO
    # test's case (test_align.py, the same loop and restore), which also prints the recovery time; a case here
    # too cost about 55 s of a suite near its 35-minute budget.

    # 3. The newest checkpoint is damaged: the resume skips it for the one before.
    newest_step, newest = complete_checkpoints(str(ref_dir / "checkpoints" / "full"))[0]
    shard = max(Path(newest).rglob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert checkpoint_problem(newest) is not None
    damaged_log = tmp_path / "damaged.log"
    proc = _job(args(ref_dir, "full"), damaged_log)
    assert proc.wait(600) == 0, damaged_log.read_text()[-3000:]
    again = _summary(damaged_log)
    assert newest_step == 12 and again["restored_from_step"] == 8 and again["steps"] == 12
    assert "not resuming from" in damaged_log.read_text() or "skipping incomplete checkpoint" in damaged_log.read_text()
    assert again["final_loss"] == pytest.approx(full["final_loss"], rel=0.03)


def _kill_after_first_checkpoint(args: list[str], run_dir: Path, log: Path) -> int:
    proc = _job(args, log)
    steps = _wait_for(lambda: complete_checkpoints(str(run_dir)), proc, log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return steps[0][0]


# ZeRO-2 going 2 -> 1 and 1 -> 2 is covered by the elastic half of test_node_loss_on_a_multinode_cluster (it
# was a case here too, until the suite ran close to 30 min); the exact-loss check is this ZeRO-3 case's.
@pytest.mark.parametrize("zero_stage,first,then", [
    (3, {"train.num_workers": 1, "train.grad_accum": 2}, {"train.num_workers": "[1,2]", "train.grad_accum": 1}),
])
def test_resume_on_another_worker_count(sample_dataset, reference, tmp_path, zero_stage, first, then):
    """A checkpoint written by N workers resumes on M (DeepSpeed's universal format in between), with the
    global batch kept at 8 sequences by gradient accumulation, and the data continuing at the same global
    position: the run ends with the loss of the uninterrupted 2-worker run of the first test (same seed,
    same batches, fp32), here for ZeRO-3 going 1 -> 2 workers (an elastic [1, 2] range)."""
    dataset, _ = sample_dataset
    common = tiny(dataset, tmp_path, **{"train.checkpoint_every": 4, "train.eval_every": 100, "train.max_failures": 0,
                                        "train.zero_stage": zero_stage, "train.run_name": "elastic",
                                        "output_dir": tmp_path / "out"})
    args = lambda extra: [f"--{k}={v}" for k, v in {**common, **extra}.items()]
    saved_step = _kill_after_first_checkpoint(args(first), tmp_path / "out" / "checkpoints" / "elastic",
                                              tmp_path / "first.log")
    log = tmp_path / "then.log"
    proc = _job(args(then), log)
    assert proc.wait(600) == 0, log.read_text()[-3000:]
    resumed = _summary(log)
    assert resumed["restored_from_step"] >= saved_step and resumed["steps"] == 12
    assert "converting it to DeepSpeed's universal format" in log.read_text()
    assert resumed["final_loss"] == pytest.approx(reference[1]["final_loss"], rel=0.03)


def _poisoned_dataset(dataset: Path, out: Path, clean_rows: int, poisoned_rows: int) -> Path:
    """A copy of ``dataset`` whose training split is ``clean_rows`` sequences plus one row group of
    ``poisoned_rows`` whose labels are all ignored (-100): a micro-batch drawn only from those has no token
    to learn from, so its loss is NaN, the way a bad shard shows up in a real run."""
    import shutil
    import pyarrow as pa
    import pyarrow.parquet as pq
    from llmforge.data.pipeline import load_manifest
    shutil.copytree(dataset, out)
    train = out / "tokens" / "train"
    ids = pq.read_table(train).column("input_ids").to_pylist()
    shutil.rmtree(train)
    train.mkdir()
    clean, bad = ids[:clean_rows], ids[clean_rows:clean_rows + poisoned_rows]
    if clean:
        pq.write_table(pa.table({"input_ids": clean, "labels": clean}), train / "clean.parquet")
    pq.write_table(pa.table({"input_ids": bad, "labels": [[-100] * len(r) for r in bad]}), train / "poisoned.parquet")
    manifest = load_manifest(str(out))
    manifest["splits"]["train"]["sequences"] = len(clean) + len(bad)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_nonfinite_losses_are_skipped_then_stop_the_run(sample_dataset, tmp_path):
    dataset, _ = sample_dataset
    # 64 clean sequences and 16 poisoned ones: 12 steps of 8 pass all of them, so one or two global
    # micro-batches are all NaN; each is skipped on every rank and counted, and the run goes on.
    some_bad = _poisoned_dataset(dataset, tmp_path / "some", clean_rows=64, poisoned_rows=16)
    summary = pretrain(load_config(None, tiny(some_bad, tmp_path / "a", **{"train.max_failures": 0,
                                                                            "train.max_nonfinite_in_row": 3})))
    assert summary["steps"] == 12 and 1 <= summary["nonfinite_skipped"] <= 2
    assert summary["final_loss"] < summary["first_loss"]

    # Nothing but NaN: the run stops with a clear error after max_nonfinite_in_row micro-batches in a row.
    all_bad = _poisoned_dataset(dataset, tmp_path / "all", clean_rows=0, poisoned_rows=32)
    cfg = load_config(None, tiny(all_bad, tmp_path / "b", **{"train.max_failures": 0, "train.max_nonfinite_in_row": 2}))
    with pytest.raises(TrainingDiverged, match="NaN/Inf for 2 micro-batches in a row at step 1") as info:
        pretrain(cfg)
    assert "train.max_nonfinite_in_row" in str(info.value)


def test_s3_outage_during_checkpoint_uploads(sample_dataset, s3, s3_proxy, tmp_path):
    """The job writes its checkpoints to S3 through an endpoint that goes away while it trains (a TCP proxy in
    front of moto_server, taken down and brought back). 8 s down: the uploads are retried with back-off and
    the run finishes without a restart. Down for good: the run stops with a clear message once the retries
    are spent, and the checkpoints written before stay complete."""
    dataset, _ = sample_dataset
    s3.create_bucket(Bucket="flaky")
    run = lambda name: [f"--{k}={v}" for k, v in tiny(dataset, tmp_path / name, **{
        "train.storage_path": "s3://flaky/runs", "train.run_name": name, "train.checkpoint_every": 2,
        "train.keep_checkpoints": 3, "train.eval_every": 100, "train.max_failures": 0}).items()]

    log = tmp_path / "outage.log"
    proc = _job(run("outage"), log, env={"AWS_ENDPOINT_URL": s3_proxy.url})
    _wait_for(lambda: complete_checkpoints("s3://flaky/runs/outage"), proc, log)
    s3_proxy.stop()
    time.sleep(8)
    s3_proxy.start()
    assert proc.wait(600) == 0, log.read_text()[-3000:]
    summary = _summary(log)
    assert summary["steps"] == 12 and summary["restored_from_step"] is None
    assert [step for step, _ in complete_checkpoints("s3://flaky/runs/outage")] == [12, 10, 8]

    log = tmp_path / "gone.log"
    proc = _job(run("gone"), log, env={"AWS_ENDPOINT_URL": s3_proxy.url, "LLMFORGE_S3_MAX_ATTEMPTS": "3"})
    before = _wait_for(lambda: complete_checkpoints("s3://flaky/runs/gone"), proc, log)
    s3_proxy.stop()
    assert proc.wait(600) != 0
    text = log.read_text()
    assert "Could not write the checkpoint" in text and "same train.run_name" in text, text[-3000:]
    after = complete_checkpoints("s3://flaky/runs/gone")
    assert after and after[-1][0] <= before[0][0] <= after[0][0]


def test_mlflow_server_and_s3_checkpoints(sample_dataset, s3, mlflow_server, tmp_path):
    dataset, _ = sample_dataset
    s3.create_bucket(Bucket="ckpts")
    summary = pretrain(load_config(None, tiny(dataset, tmp_path, **{
        "tracking.tracking_uri": mlflow_server, "train.storage_path": "s3://ckpts/runs", "train.run_name": "s3run",
        "train.max_steps": 6, "train.checkpoint_every": 3, "train.eval_every": 3,
        "tracking.registered_model_name": "s3-tiny"})))
    assert summary["checkpoint"].startswith("s3://ckpts/runs/s3run/checkpoint_")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpts", Prefix="runs/s3run/")["Contents"]]
    assert any(k.endswith("/latest") for k in keys) and any("optim_states" in k for k in keys)
    client = mlflow_client(mlflow_server)
    assert len(client.get_metric_history(summary["run_id"], "loss")) >= 2
    art = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["Contents"]]
    assert any(k.endswith("model/model.safetensors") for k in art)

    # `llmforge eval` of the registered version: the scores on a child of the training run, the version tagged.
    log = tmp_path / "eval.log"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model", "models:/s3-tiny/1",
                           "--tasks", "handbook_ending_en,val_perplexity", "--data", str(dataset), "--limit", "16",
                           f"--tracking.tracking_uri={mlflow_server}"],
                          stdout=open(log, "w"), stderr=subprocess.STDOUT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO / "platform")})
    assert proc.returncode == 0, log.read_text()[-3000:]
    done = _summary(log)
    assert done["event"] == "eval_done" and done["tracking_uri"] == mlflow_server and done["endpoint"] is None
    assert set(done["results"]) == {"handbook_ending_en", "val_perplexity"}
    child = client.get_run(done["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == summary["run_id"]
    assert child.data.metrics["eval/handbook_ending_en/acc"] == done["results"]["handbook_ending_en"]["acc"]
    assert client.get_model_version("s3-tiny", "1").tags["eval_run_id"] == done["run_id"]
    art = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["Contents"]]
    assert any(k.endswith("model_card/README.md") for k in art)


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


def test_continued_pretraining_starts_at_the_base_models_loss(sample_dataset, reference, tmp_path):
    """model.init_from: the weights of the reference run's export, a fresh optimizer and schedule; the first
    step's loss is the trained model's, not a random init's (about ln(vocab))."""
    import math
    dataset, manifest = sample_dataset
    _, base = reference
    summary = pretrain(load_config(None, tiny(dataset, tmp_path, **{"model.init_from": base["model_dir"],
                                                                    "train.max_steps": 4, "train.eval_every": 4,
                                                                    "train.checkpoint_every": 4})))
    from_scratch = math.log(manifest["vocab_size"])
    assert summary["steps"] == 4 and summary["restored_from_step"] is None  # a new run: nothing to resume
    # The reference's 12 steps take it about 1 nat below a random init; the new run starts where it ended.
    assert summary["first_loss"] < base["first_loss"] - 0.5 and summary["first_loss"] < from_scratch - 0.5
    assert abs(summary["first_loss"] - base["final_loss"]) < 0.4, (summary["first_loss"], base["final_loss"])
    run = mlflow_client(summary["tracking_uri"]).get_run(summary["run_id"])
    assert run.data.tags["job"] == "continued_pretraining" and run.data.tags["init_from"] == base["model_dir"]
    assert "Continued pretraining from" in (Path(summary["model_dir"]) / "README.md").read_text()


def test_continued_pretraining_refuses_a_dataset_of_another_tokenizer(sample_dataset, tmp_path):
    from tiny_models import tiny_model
    dataset, _ = sample_dataset
    other = tiny_model(tmp_path / "other", "llama-tiny")  # its own 400-token tokenizer
    with pytest.raises(InputError, match="another tokenizer") as err:
        pretrain(load_config(None, tiny(dataset, tmp_path, **{"model.init_from": str(other)})))
    assert "--data.tokenizer.path=" in err.value.fix
    with pytest.raises(InputError, match="not a Hugging Face model dir"):
        pretrain(load_config(None, tiny(dataset, tmp_path, **{"model.init_from": str(tmp_path / "nothing")})))


def test_a_second_live_job_with_the_same_run_name_refuses_before_any_worker(sample_dataset, tmp_path):
    """Two jobs with one train.run_name would resume from each other's checkpoints, prune each other's and
    overwrite one export; the second refuses while the first holds the run's lease (and starts no MLflow run)."""
    from llmforge.errors import LeaseHeld
    from llmforge.train.trainer import run_lease
    dataset, _ = sample_dataset
    cfg = load_config(None, tiny(dataset, tmp_path, **{"train.run_name": "shared"}))
    with run_lease(cfg, "shared"):
        with pytest.raises(LeaseHeld, match="training run shared"):
            pretrain(cfg)
    # Refused before anything was written: no MLflow store or run, no checkpoint, no export.
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "checkpoints" / "shared").exists() and not (tmp_path / "model").exists()


def _last_step(log: Path) -> int:
    """The last step the job's log shows as trained (its per-step lines: ``step N/MAX loss ...``)."""
    return max([int(n) for n in re.findall(r"step (\d+)/\d+ loss", log.read_text())] or [0])


def test_node_loss_on_a_multinode_cluster(sample_dataset, reference, multinode, tmp_path):
    """Ray's multi-node test cluster (a head that takes no work, two 1-CPU nodes; one training worker per
    node): the node under a training worker is killed mid-run and a new node joins.
    Fixed 2 workers: the group waits for the new node, restarts and continues from the last checkpoint, and
    ends at the loss of the uninterrupted reference run. Elastic [1, 2]: it carries on with 1 worker at once
    (same global batch, by gradient accumulation), then grows back to 2 when the new node is there."""
    dataset, _ = sample_dataset
    env = {"RAY_ADDRESS": multinode.address}
    run = lambda name, **extra: [f"--{k}={v}" for k, v in {
        **tiny(dataset, tmp_path / name, **RESUME_TEST), "train.cpus_per_worker": 1, "train.max_failures": 3,
        "train.run_name": name, "ray.address": multinode.address, **extra}.items()]

    # Fixed worker count.
    log = tmp_path / "fixed.log"
    proc = _job(run("fixed"), log, env)
    _wait_for(lambda: complete_checkpoints(str(tmp_path / "fixed" / "checkpoints" / "fixed")), proc, log)
    multinode.ask("remove-training-node")
    removed_at, trained = time.time(), _last_step(log)
    multinode.ask("add")
    _wait_for(lambda: re.search(r"restored from step \d+ on 2 worker", log.read_text()), proc, log)
    recovery_s = time.time() - removed_at
    assert proc.wait(600) == 0, log.read_text()[-3000:]
    fixed = _summary(log)
    assert fixed["restored_from_step"] in (4, 8) and fixed["steps"] == 12 and fixed["workers"] == 2
    assert fixed["final_loss"] == pytest.approx(reference[1]["final_loss"], rel=0.03)

    # Elastic range: shrink, then grow when a node joins. Ray's view of the cluster is refreshed every 20 s (its
    # AutoscalingCoordinator's tick), so right after the loss it may still count the dead node and ask for 2
    # workers: it gives up on those after train.worker_start_timeout_s (10 s here; Ray's default is 60 s) and
    # starts with the 1 there is. Growing is checked every train.elastic_resize_interval_s (2 s here; 60 s by
    # default). The run is long enough never to end on its own here: once it has trained and checkpointed
    # on 2 workers again the test stops it.
    log, run_dir = tmp_path / "elastic.log", str(tmp_path / "elastic" / "checkpoints" / "elastic")
    proc = _job(run("elastic", **{"train.num_workers": "[1,2]", "train.max_steps": 2000, "train.log_every": 2,
                                  "train.elastic_resize_interval_s": 2, "train.worker_start_timeout_s": 10}), log, env)
    try:
        first = _wait_for(lambda: complete_checkpoints(run_dir), proc, log)
        assert checkpoint_world_size(first[-1][1]) == 2  # it started with both nodes' workers
        multinode.ask("remove-training-node")
        removed_at = time.time()
        shrunk_from = int(_wait_for(lambda: re.search(r"restored from step (\d+) on 1 worker", log.read_text()),
                                    proc, log)[1])
        shrink_s = time.time() - removed_at
        shrunk = len(log.read_text())
        # The node comes back only once the 1-worker group has checkpointed: else the growth can restore from
        # the very checkpoint it shrank from (a race seen on a busy machine), and the order checked below is moot.
        _wait_for(lambda: [c for c in complete_checkpoints(run_dir) if c[0] > shrunk_from], proc, log)
        multinode.ask("add")
        added_at = time.time()
        grown_from = int(_wait_for(lambda: re.search(r"restored from step (\d+) on 2 worker", log.read_text()[shrunk:]),
                                   proc, log)[1])
        grow_s = time.time() - added_at
        # It trained on with 1 worker (and checkpointed) before growing, and goes on with 2.
        assert grown_from > shrunk_from
        later = _wait_for(lambda: [c for c in complete_checkpoints(run_dir) if c[0] > grown_from], proc, log)
        assert checkpoint_world_size(later[0][1]) == 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    losses = [float(x) for x in re.findall(r"step \d+/2000 loss ([\d.]+)", text)]
    assert losses[-1] < losses[0] - 0.5
    # MLflow follows the worker count: 2, then 1, then 2 again.
    run_id, uri = re.search(r"MLflow run (\w+) at (\S+)", text).groups()
    history = sorted(mlflow_client(uri).get_metric_history(run_id, "workers"), key=lambda m: (m.timestamp, m.step))
    counts = [int(m.value) for m in history]
    assert [c for i, c in enumerate(counts) if i == 0 or c != counts[i - 1]] == [2, 1, 2], counts
    print(json.dumps({"figure": "node_loss", "fixed_lost_to_resumed_s": round(recovery_s, 1),
                      "fixed_steps_lost": max(0, trained - fixed["restored_from_step"]),
                      "elastic_lost_to_1_worker_s": round(shrink_s, 1), "elastic_joined_to_2_workers_s": round(grow_s, 1)}))
