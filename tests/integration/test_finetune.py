import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from llmforge.config import load_config
from llmforge.errors import ConfigError
from llmforge.train.finetune import finetune
from llmforge.samples import SAMPLE_DATA
from llmforge.train.lora import resolve_base

from conftest import REPO

pytestmark = pytest.mark.integration
CHAT = SAMPLE_DATA / "chat.jsonl"


@pytest.fixture(scope="module")
def base_dir(sample_dataset, tmp_path_factory) -> Path:
    from tiny_models import sample_base
    dataset, manifest = sample_dataset
    return sample_base(dataset, manifest, tmp_path_factory.mktemp("base"), seed=3, context=128)


def digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_lora_lowers_loss_only_adapter_changes_and_merge_matches(base_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(CHAT.read_text() + '{"messages": [{"role": "user", "content": "no reply"}]}\n'
                    + '{"prompt": 1}\n' + "not json\n", encoding="utf-8")
    before = digest(base_dir)
    summary = finetune(load_config(REPO / "configs" / "finetune" / "lora-tiny.yaml", {
        "finetune.base": str(base_dir), "finetune.data": str(data), "output_dir": str(tmp_path / "out"),
        # 40 steps: the MLA latent vLLM takes (512+64) gives the random tiny base more to adapt than 32+16 did, and
        # 30 steps lowered the loss by 0.29 there.
        "finetune.merge": True, "train.max_steps": 40, "train.micro_batch_size": 4, "train.eval_every": 20,
        "train.checkpoint_every": 20, "train.lr": 1e-2, "train.warmup_steps": 2}))
    assert summary["val_loss"] is not None and summary["examples"]["train"] > 50
    assert 0 < summary["trainable_params"] < 200_000

    rejects = pq.read_table(str(tmp_path / "out" / "sft_data" / "rejects")).to_pylist()
    reasons = sorted(r["reason"].split(":")[0] for r in rejects)
    assert reasons == ["invalid_record", "invalid_record", "malformed_json"]

    # The base model on disk is untouched, and the adapter holds only LoRA weights that moved.
    assert digest(base_dir) == before
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    adapter = load_file(str(Path(summary["adapter_dir"]) / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    cfg = json.loads((Path(summary["adapter_dir"]) / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = PeftModel.from_pretrained(base, summary["adapter_dir"]).eval()
    for name, value in tuned.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(value, original[key]), name
    merged = AutoModelForCausalLM.from_pretrained(summary["merged_dir"]).eval()
    x = torch.randint(0, base.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = tuned(input_ids=x).logits, merged(input_ids=x).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-4)

    # On the fine-tuning examples (assistant tokens only), the adapter lowers the loss of the base.
    train = pq.read_table(str(tmp_path / "out" / "sft_data" / "train")).slice(0, 32)
    ids = torch.tensor(train.column("input_ids").to_pylist())
    labels = torch.tensor(train.column("labels").to_pylist())
    with torch.no_grad():
        base_loss = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=ids, labels=labels).loss.item()
        tuned_loss = tuned(input_ids=ids, labels=labels).loss.item()
    assert tuned_loss < base_loss - 0.3, (base_loss, tuned_loss, summary["first_loss"], summary["final_loss"])


def test_bad_target_modules_listed(base_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"not Linear layers.*choose from: .*q_a_proj"):
        finetune(load_config(None, {"finetune.base": str(base_dir), "finetune.data": str(CHAT),
                                    "finetune.lora.target_modules": ["query_key_value"], "output_dir": str(tmp_path)}))


def test_full_fine_tuning_trains_every_parameter_and_exports_a_model(base_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    before = digest(base_dir)
    summary = finetune(load_config(REPO / "configs" / "finetune" / "lora-tiny.yaml", {
        "finetune.method": "full", "finetune.base": str(base_dir), "finetune.data": str(CHAT),
        "output_dir": str(tmp_path / "out"), "train.max_steps": 12, "train.micro_batch_size": 4,
        "train.eval_every": 12, "train.checkpoint_every": 12, "train.lr": 2e-3, "train.warmup_steps": 2}))
    assert summary["method"] == "full" and summary["adapter_dir"] is None
    assert summary["final_loss"] < summary["first_loss"] - 0.3 and summary["val_loss"] is not None
    assert digest(base_dir) == before  # the base on disk is untouched
    base, tuned = load_file(base_dir / "model.safetensors"), load_file(Path(summary["model_dir"]) / "model.safetensors")
    assert set(tuned) == set(base)
    moved = [name for name in base if not torch.equal(base[name], tuned[name])]
    assert len(moved) > 0.9 * len(base), f"only {len(moved)} of {len(base)} tensors changed"  # not only adapters
    model = AutoModelForCausalLM.from_pretrained(summary["model_dir"])  # a complete HF dir, tokenizer included
    assert model.config.model_type == "deepseek_v3" and (Path(summary["model_dir"]) / "tokenizer.json").is_file()
    with pytest.raises(ConfigError, match="merge"):
        finetune(load_config(None, {"finetune.base": str(base_dir), "finetune.data": str(CHAT), "finetune.method": "full",
                                    "finetune.merge": True, "output_dir": str(tmp_path)}))


def test_qlora_trains_an_adapter_on_a_4bit_base_on_cpu(base_dir, tmp_path):
    """bitsandbytes 0.50's CPU backend: the base's Linear layers in NF4 on the workers (the loop refuses to go on
    without them), the LoRA adapter trained in fp32 and exported for the full-precision base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    summary = finetune(load_config(REPO / "configs" / "finetune" / "lora-tiny.yaml", {
        "finetune.method": "qlora", "finetune.base": str(base_dir), "finetune.data": str(CHAT),
        "output_dir": str(tmp_path / "out"), "train.max_steps": 20, "train.micro_batch_size": 4,
        "train.eval_every": 20, "train.checkpoint_every": 20, "train.lr": 1e-2, "train.warmup_steps": 2}))
    assert summary["method"] == "qlora" and summary["final_loss"] < summary["first_loss"] - 0.2
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), summary["adapter_dir"]).eval()
    train = pq.read_table(str(tmp_path / "out" / "sft_data" / "train")).slice(0, 16)
    ids, labels = (torch.tensor(train.column(c).to_pylist()) for c in ("input_ids", "labels"))
    with torch.no_grad():
        base_loss = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=ids, labels=labels).loss.item()
        tuned_loss = tuned(input_ids=ids, labels=labels).loss.item()
    assert tuned_loss < base_loss - 0.1, (base_loss, tuned_loss)


def test_base_from_mlflow_registry(base_dir, tmp_path):
    from llmforge.tracking import log_model_dir
    import mlflow
    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    assert log_model_dir(uri, run.info.run_id, base_dir, "tiny-base") == 1
    local = resolve_base("models:/tiny-base/1", uri)
    assert (local / "config.json").is_file() and (local / "model.safetensors").is_file()
