"""Recipes (llmforge recipe) and distillation (llmforge distill): the tiny recipe run as a job, killed in its
second stage, submitted again (it resumes that stage) and once more (it skips everything), its lineage read
back from MLflow; then a student distilled from the recipe's pretrained model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmforge.config import load_config
from llmforge.errors import InputError
from llmforge.train.checkpoint import complete_checkpoints
from llmforge.train.distill import distill
from llmforge.train.trainer import pretrain

from conftest import REPO

pytestmark = pytest.mark.integration
TINY = REPO / "configs" / "recipes" / "tiny.yaml"


def _recipe_file(tmp_path: Path) -> Path:
    """The shipped tiny recipe with shorter stages (the same three stages and settings otherwise)."""
    tree = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    steps = {"pretrain": (60, 30), "sft": (16, 8), "dpo": (8, 8)}  # max_steps, checkpoint/eval every
    for stage in tree["stages"]:
        total, every = steps[stage["name"]]
        stage["config"]["train"].update(max_steps=total, checkpoint_every=every, eval_every=every)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def _submit(args: list[str], log: Path) -> subprocess.Popen:
    import ray
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "recipe.py"), *args,
                             f"--ray.address={ray.get_runtime_context().gcs_address}"],
                            cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "platform")})


def _last_json(log: Path) -> dict:
    return json.loads(log.read_text().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def recipe(sample_dataset, tmp_path_factory):
    """The recipe three times: killed (SIGKILL, the whole job) after its SFT stage's first checkpoint; again
    (to the end); once more."""
    dataset, _ = sample_dataset
    tmp = tmp_path_factory.mktemp("recipe")
    out = tmp / "out"
    args = ["--config", str(_recipe_file(tmp)), f"--output_dir={out}", f"--data.dataset={dataset}"]
    killed = tmp / "killed.log"
    proc = _submit(args, killed)
    deadline = time.time() + 900
    while not any(complete_checkpoints(str(d)) for d in (out / "sft" / "checkpoints").glob("tiny-sft-*") if d.is_dir()):
        assert proc.poll() is None and time.time() < deadline, killed.read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    logs = []
    for name in ("resumed", "again"):
        log = tmp / f"{name}.log"
        proc = _submit(args, log)
        assert proc.wait(900) == 0, log.read_text()[-3000:]
        logs.append(log)
    return out, killed, _last_json(logs[0]), _last_json(logs[1])


def test_the_tiny_recipe_resumes_its_failed_stage_skips_finished_ones_and_records_lineage(recipe):
    out, killed, resumed, again = recipe
    assert "recipe_done" not in killed.read_text()
    assert resumed["event"] == "recipe_done"
    assert [(s["name"], s["skipped"]) for s in resumed["stages"]] == [("pretrain", True), ("sft", False), ("dpo", False)]
    sft = json.loads((out / "sft" / "stage.json").read_text())["summary"]
    assert sft["restored_from_step"] == 8 and sft["steps"] == 16  # resumed, not started again
    assert [s["skipped"] for s in again["stages"]] == [True, True, True]
    assert [s["run_id"] for s in again["stages"]] == [s["run_id"] for s in resumed["stages"]]
    assert again["parent_run_id"] == resumed["parent_run_id"]

    import mlflow
    client = mlflow.tracking.MlflowClient(resumed["tracking_uri"])
    parent = client.get_run(resumed["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["recipe"] == "tiny"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    ids = {s["run_id"] for s in resumed["stages"]}
    assert ids <= {c.info.run_id for c in children}  # (the killed SFT attempt is a child too)
    runs = {s["name"]: client.get_run(s["run_id"]) for s in resumed["stages"]}
    model = {s["name"]: s["model_dir"] for s in resumed["stages"]}
    tags = {name: run.data.tags for name, run in runs.items()}
    assert tags["pretrain"]["llmforge.base_model"] == "none (random init)"
    assert tags["sft"]["llmforge.base_model"] == model["pretrain"] and tags["dpo"]["llmforge.base_model"] == model["sft"]
    assert tags["sft"]["llmforge.base_run_id"] == runs["pretrain"].info.run_id
    assert tags["dpo"]["llmforge.base_run_id"] == runs["sft"].info.run_id
    assert len({t["llmforge.tokenizer_sha256"] for t in tags.values()}) == 1  # one tokenizer all the way
    assert all(len(t["llmforge.data_sha256"]) == 64 for t in tags.values())
    assert len({t["llmforge.data_sha256"] for t in tags.values()}) == 3
    assert len(tags["sft"]["llmforge.chat_template_sha256"]) == 64
    assert [t["llmforge.stage"] for t in tags.values()] == ["pretrain", "sft", "dpo"]
    version = client.get_model_version("llmforge-recipe-tiny", "1")
    assert version.run_id == runs["dpo"].info.run_id and parent.data.tags["llmforge.final_model"] == model["dpo"]


def test_a_distilled_student_beats_the_same_student_trained_from_scratch(recipe, sample_dataset, tmp_path):
    """The same student (llama-tiny, 2 layers; seed, data and steps the same) trained from scratch and distilled
    from the recipe's pretrained DeepSeek-style model: distillation ends with the lower validation loss."""
    out, *_ = recipe
    dataset, _ = sample_dataset
    common = {"data.dataset": str(dataset), "model.preset": "llama-tiny", "model.overrides": {"num_hidden_layers": 2},
              "train.micro_batch_size": 4, "train.max_steps": 16, "train.warmup_steps": 2, "train.lr": 3e-3,
              "train.log_every": 4, "train.eval_every": 16, "train.eval_batches": 4, "train.checkpoint_every": 16}
    scratch = pretrain(load_config(None, {**common, "output_dir": str(tmp_path / "scratch")}))
    distilled = distill(load_config(None, {**common, "output_dir": str(tmp_path / "distilled"), "distill.alpha": 0.9,
                                           "distill.teacher": str(out / "pretrain" / "model")}))
    assert distilled["event"] == "distill_done" and distilled["steps"] == 16
    assert distilled["teacher_val_loss"] < distilled["val_loss"]  # the teacher is the better model
    # Measured while writing this test: 6.48 against 6.60 (T=1, alpha 0.9); T=2, alpha 0.5 gave 6.57.
    assert distilled["val_loss"] < scratch["val_loss"] - 0.05, (distilled["val_loss"], scratch["val_loss"])
    from transformers import AutoModelForCausalLM
    student = AutoModelForCausalLM.from_pretrained(distilled["model_dir"])
    assert student.config.model_type == "llama" and student.config.num_hidden_layers == 2
    import mlflow
    metrics = mlflow.tracking.MlflowClient(distilled["tracking_uri"]).get_run(distilled["run_id"]).data.metrics
    assert {"kl", "ce", "teacher_ce", "val_kl", "val_objective_loss"} <= set(metrics)


def test_a_teacher_of_another_tokenizer_is_refused_before_any_worker(sample_dataset, tmp_path):
    from tiny_models import tiny_model
    dataset, _ = sample_dataset
    teacher = tiny_model(tmp_path / "teacher")  # its own 400-token tokenizer
    cfg = {"data.dataset": str(dataset), "output_dir": str(tmp_path / "out")}
    with pytest.raises(InputError, match="another tokenizer than distill.teacher"):
        distill(load_config(None, {**cfg, "distill.teacher": str(teacher)}))
    with pytest.raises(InputError, match="No teacher model"):
        distill(load_config(None, cfg))
