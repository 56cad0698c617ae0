"""Preference alignment (llmforge align): DPO and SimPO on a tiny model, on the one training loop."""

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmforge.config import load_config
from llmforge.errors import ConfigError, InputError
from llmforge.samples import SAMPLE_DATA
from llmforge.train.align import align, to_pair
from llmforge.train.checkpoint import complete_checkpoints
from llmforge.train.lora import to_messages
from multinode import train_worker_pids

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_dir(sample_dataset, tmp_path_factory) -> Path:
    from tiny_models import sample_base
    dataset, manifest = sample_dataset
    return sample_base(dataset, manifest, tmp_path_factory.mktemp("align-base"), seed=5, context=192)


BAD_ROWS = ['{"prompt": "hi", "chosen": "a"}',                                    # no rejected
            '{"prompt": "hi", "chosen": "same", "rejected": "same"}',             # nothing to prefer
            '{"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], '
            '"chosen": "a", "rejected": "b"}',                                   # the prompt already answered
            'not json']


def preference_pairs(path: Path) -> Path:
    """Pairs from the sample chat data where the preferred reply is the original and the other the same reply
    in capitals: a preference a model can learn and carry to prompts it never saw. Half as strings, half in
    TRL's conversational shape."""
    rows = []
    for i, line in enumerate(SAMPLE_DATA.joinpath("chat.jsonl").read_text(encoding="utf-8").splitlines()):
        messages, _ = to_messages(json.loads(line))  # chat or {prompt, completion} rows
        if not messages or messages[-1]["role"] != "assistant":
            continue
        reply = messages[-1]["content"]
        if reply.upper() == reply:
            continue
        prompt = messages[:-1]
        if i % 2:
            user = " ".join(m["content"] for m in prompt if m["role"] == "user")
            rows.append({"prompt": user, "chosen": reply, "rejected": reply.upper()})
        else:
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": reply}],
                         "rejected": [{"role": "assistant", "content": reply.upper()}]})
    random.Random(0).shuffle(rows)
    path.write_text("\n".join([json.dumps(r, ensure_ascii=False) for r in rows] + BAD_ROWS) + "\n", encoding="utf-8")
    return path


def settings(base_dir, tmp_path, method, **extra):
    return {"align.method": method, "align.base": str(base_dir), "align.data": str(preference_pairs(tmp_path / "pairs.jsonl")),
            "align.max_seq_len": 192, "align.val_fraction": 0.2, "output_dir": str(tmp_path / "out"),
            "train.micro_batch_size": 4, "train.max_steps": 24, "train.warmup_steps": 2, "train.lr": 1e-3,
            "train.log_every": 4, "train.eval_every": 12, "train.eval_batches": 4, "train.checkpoint_every": 12, **extra}


def _trained_past(uri: str, step: int) -> bool:
    """Whether a run in the MLflow store logged a loss after ``step`` (the step line after a restore)."""
    import mlflow
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return any(m.step > step for r in runs for m in client.get_metric_history(r.info.run_id, "loss"))


def test_dpo_lifts_reward_accuracy_on_held_out_prompts_and_resumes_after_a_worker_dies(base_dir, tmp_path, monkeypatch):
    """One DPO run, one of whose Ray Train workers is SIGKILLed after the first checkpoint: Ray Train restarts
    the worker group, which resumes from that checkpoint (the reference log-probs come with the data, not
    recomputed), and the run still ends with held-out reward accuracy far above chance."""
    cfg = load_config(None, settings(base_dir, tmp_path, "dpo", **{"train.run_name": "dpo", "train.max_failures": 2}))
    result: dict = {}
    errors: list = []

    def run():
        try:
            result.update(align(cfg))
        except Exception as exc:  # re-raised below, on the test's thread
            errors.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    run_dir = tmp_path / "out" / "checkpoints" / "dpo"
    deadline = time.time() + 600
    while not complete_checkpoints(str(run_dir)):
        assert thread.is_alive() and time.time() < deadline, errors
        time.sleep(0.2)
    os.kill(train_worker_pids()[0], signal.SIGKILL)
    killed_at = time.time()
    while not _trained_past(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", 12):
        assert thread.is_alive() and time.time() < deadline, errors
        time.sleep(0.2)
    recovery_s = time.time() - killed_at
    thread.join(900)
    assert not errors and not thread.is_alive(), errors
    summary = result
    assert summary["restored_from_step"] == 12  # resumed from the checkpoint, not from step 0
    print(json.dumps({"figure": "worker_death_to_resumed_s", "value": round(recovery_s, 1),
                      "restored_from_step": summary["restored_from_step"]}))
    assert summary["event"] == "align_done" and summary["method"] == "dpo" and summary["steps"] == 24
    assert summary["first_loss"] == pytest.approx(0.693, abs=0.05)  # the policy starts as the reference: ln 2
    assert summary["final_loss"] < summary["first_loss"] - 0.2
    assert summary["reward_accuracy"] >= 0.8 and summary["reward_margin"] > 0  # chance is 0.5
    assert summary["rejected"] == len(BAD_ROWS) and summary["pairs"]["val"] >= 8
    rejects = pq.read_table(str(tmp_path / "out" / "pref_data" / "rejects")).to_pylist()
    assert sorted(r["reason"].split(":")[0] for r in rejects) == ["invalid_pair"] * 3 + ["malformed_json"]
    # the validation prompts are ones the training never saw
    train = pq.read_table(str(tmp_path / "out" / "pref_data" / "train"), columns=["chosen_input_ids"]).to_pylist()
    val = pq.read_table(str(tmp_path / "out" / "pref_data" / "val"), columns=["chosen_input_ids"]).to_pylist()
    assert not {tuple(r["chosen_input_ids"]) for r in train} & {tuple(r["chosen_input_ids"]) for r in val}

    import mlflow
    client = mlflow.tracking.MlflowClient(summary["tracking_uri"])
    logged = client.get_run(summary["run_id"]).data.metrics
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "val_rewards/accuracies"} <= set(logged)
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(summary["model_dir"]).config.model_type == "deepseek_v3"

    # A resubmitted job (same output dir) reads the stored pairs and reference log-probs back, scoring nothing.
    from llmforge.train import align as align_module
    monkeypatch.setattr(align_module, "prepare_pairs", lambda *a, **k: pytest.fail("pairs prepared again"))
    files = [str(tmp_path / "pairs.jsonl")]
    data_uri = str(tmp_path / "out" / "pref_data")
    counts = align_module._pairs(files, base_dir, cfg, data_uri, score=True)
    assert counts["train"] == summary["pairs"]["train"] and counts["scored"]


def test_dpo_with_a_lora_policy_uses_the_base_with_the_adapter_disabled_as_reference(base_dir, tmp_path):
    """align.lora: only an adapter trains; the reference is the base under it (no scoring pass, no stored
    log-probs), and the output is the merged model. (SimPO and IPO: their arithmetic is unit-tested.)"""
    summary = align(load_config(None, settings(base_dir, tmp_path, "dpo", **{"align.lora": True, "train.lr": 5e-3})))
    assert summary["first_loss"] == pytest.approx(0.693, abs=0.05)  # an adapter starts at zero: policy = reference
    assert summary["reward_accuracy"] >= 0.8 and summary["final_loss"] < summary["first_loss"] - 0.2
    columns = pq.read_table(str(tmp_path / "out" / "pref_data" / "train")).column_names
    assert not any(c.startswith("ref_") for c in columns)  # nothing precomputed
    from safetensors.torch import load_file
    assert all("lora_" in k for k in load_file(Path(summary["adapter_dir"]) / "adapter_model.safetensors"))
    merged, base = load_file(Path(summary["model_dir"]) / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert set(merged) == set(base) and any(not (merged[k] == base[k]).all() for k in base)


def test_dpo_with_a_frozen_reference_partitioned_by_zero3(base_dir, tmp_path):
    """align.reference=frozen under ZeRO-3 on two workers: each worker holds half of a frozen copy of the base
    beside the policy (its parameters partitioned like the policy's), run in every step; nothing precomputed."""
    summary = align(load_config(None, settings(base_dir, tmp_path, "dpo", **{
        "align.reference": "frozen", "train.zero_stage": 3, "train.num_workers": 2, "train.max_steps": 16,
        "train.eval_every": 16, "train.checkpoint_every": 16})))
    assert summary["reference"] == "frozen"
    assert summary["first_loss"] == pytest.approx(0.693, abs=0.05)  # the copy is the policy at step 0
    assert summary["reward_accuracy"] >= 0.75 and summary["final_loss"] < summary["first_loss"] - 0.2
    columns = pq.read_table(str(tmp_path / "out" / "pref_data" / "train")).column_names
    assert not any(c.startswith("ref_") for c in columns)  # nothing precomputed
    import mlflow
    from safetensors.torch import load_file
    client = mlflow.tracking.MlflowClient(summary["tracking_uri"])
    held = client.get_metric_history(summary["run_id"], "frozen_params_on_rank")[0].value
    total = sum(t.numel() for t in load_file(base_dir / "model.safetensors").values())
    assert held == pytest.approx(total / 2, rel=0.02)  # rank 0's partition: half of the copy


def test_pair_shapes_and_bad_requests(base_dir, tmp_path):
    assert to_pair({"prompt": "p", "chosen": "a", "rejected": "b"})[0] == ([{"role": "user", "content": "p"}], "a", "b")
    assert "missing rejected" in to_pair({"prompt": "p", "chosen": "a"})[1]
    assert "non-empty assistant reply" in to_pair({"prompt": "p", "chosen": [{"role": "user", "content": "a"}],
                                                   "rejected": "b"})[1]
    with pytest.raises(ConfigError, match="SimPO has no reference"):
        load_config(None, {"align.method": "simpo", "align.reference": "frozen"})
    with pytest.raises(ConfigError, match="needs align.lora=true"):
        load_config(None, {"align.reference": "adapter"})
    with pytest.raises(InputError, match="No preference data"):
        align(load_config(None, {"align.base": str(base_dir), "output_dir": str(tmp_path)}))
    with pytest.raises(InputError, match="does not exist"):
        align(load_config(None, {"align.base": str(base_dir), "align.data": str(tmp_path / "none.jsonl"),
                                 "output_dir": str(tmp_path)}))
