"""Recipe files: what they accept, what they refuse, and what decides whether a stage runs again."""

from pathlib import Path

import pytest
import yaml

from llmforge.errors import ConfigError
from llmforge.recipe import fingerprint, load_recipe, stage_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, tree) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def test_the_shipped_tiny_recipe_chains_pretrain_sft_dpo():
    recipe = load_recipe(REPO / "configs" / "recipes" / "tiny.yaml", {"output_dir": "/tmp/r"})
    assert [(s.name, s.job) for s in recipe.stages] == [("pretrain", "pretrain"), ("sft", "finetune"), ("dpo", "align")]
    sft = stage_config(recipe, recipe.stages[1], "/tmp/r/pretrain/model", "PARENT", "sqlite:///x.db")
    assert sft.finetune.base == "/tmp/r/pretrain/model" and sft.output_dir == "/tmp/r/sft"
    assert sft.tracking.parent_run_id == "PARENT" and sft.tracking.tracking_uri == "sqlite:///x.db"
    assert sft.train.micro_batch_size == 4 and sft.train.num_workers == 2  # the stage's over the recipe's


def test_command_line_overrides_apply_to_every_stage_over_its_own_settings(tmp_path):
    recipe = load_recipe(REPO / "configs" / "recipes" / "tiny.yaml", {"train.max_steps": 8, "output_dir": str(tmp_path)})
    assert all(stage_config(recipe, s, None, None, None).train.max_steps == 8 for s in recipe.stages)


def test_a_lora_stage_is_merged_for_the_next_one_and_a_named_base_wins(tmp_path):
    recipe = load_recipe(write(tmp_path, {"recipe": "r", "output_dir": str(tmp_path), "stages": [
        {"name": "a", "job": "finetune", "base": "/models/base", "config": {"finetune": {"data": "x.jsonl"}}}]}), {})
    cfg = stage_config(recipe, recipe.stages[0], "/elsewhere", None, None)
    assert cfg.finetune.merge and cfg.finetune.base == "/models/base"


@pytest.mark.parametrize("tree,message", [
    ({"recipe": "r", "output_dir": "o", "stages": []}, "stages"),
    ({"recipe": "r", "output_dir": "o", "stages": [{"name": "a", "job": "pretrain"}, {"name": "a", "job": "align"}]},
     "unique"),
    ({"recipe": "r", "output_dir": "o", "stages": [{"name": "A B", "job": "pretrain"}]}, "lower-case"),
    ({"recipe": "r", "output_dir": "o", "stages": [{"name": "a", "job": "kto"}]}, "stages.0.job"),
    ({"recipe": "r", "output_dir": "o", "stages": [{"name": "a", "job": "align"}]}, "has no base model"),
    ({"recipe": "r", "output_dir": "o", "stages": [{"name": "a", "job": "pretrain", "config": {"train": {"run_name": "x"}}}]},
     "train.run_name is set by the recipe"),
    ({"recipe": "r", "output_dir": "o", "stages": [{"name": "a", "job": "pretrain", "config": {"train": {"lr": -1}}}]},
     "stage a"),
])
def test_bad_recipes_are_refused_before_any_stage_runs(tmp_path, tree, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(write(tmp_path, tree), {})


def test_a_stage_runs_again_when_its_settings_or_its_base_change(tmp_path):
    recipe = load_recipe(REPO / "configs" / "recipes" / "tiny.yaml", {"output_dir": str(tmp_path)})
    cfg = stage_config(recipe, recipe.stages[1], "/m", "P1", "sqlite:///x.db")
    same = fingerprint(cfg, "finetune", "RUN1")
    assert fingerprint(stage_config(recipe, recipe.stages[1], "/m", "P2", "sqlite:///x.db"), "finetune", "RUN1") == same
    assert fingerprint(cfg, "finetune", "RUN2") != same   # its base was made again
    cfg.train.lr = 1e-3
    assert fingerprint(cfg, "finetune", "RUN1") != same


def test_lineage_tags_fingerprint_the_tokenizer_and_its_chat_template(tmp_path):
    import hashlib
    import json

    from llmforge.tracking import file_sha256, files_sha256, lineage_tags
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {}}')
    (tok / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    tags = lineage_tags(None, "data.jsonl", "abc", tok)
    assert tags["llmforge.base_model"] == "none (random init)" and tags["llmforge.data_sha256"] == "abc"
    assert tags["llmforge.tokenizer_sha256"] == hashlib.sha256(b'{"model": {}}').hexdigest()
    assert tags["llmforge.chat_template_sha256"] == hashlib.sha256(b"{{ messages }}").hexdigest()
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "chat_template.jinja").write_text("{{ other }}")  # where newer transformers save it
    assert lineage_tags("m", "d", None, tok)["llmforge.chat_template_sha256"] == hashlib.sha256(b"{{ other }}").hexdigest()
    (tok / "chat_template.jinja").unlink()
    assert lineage_tags("m", "d", None, tok)["llmforge.chat_template_sha256"] == "none"
    data = tmp_path / "a.jsonl"
    data.write_bytes(b"x" * (5 << 20))  # more than one read
    assert file_sha256(str(data)) == hashlib.sha256(b"x" * (5 << 20)).hexdigest()
    assert files_sha256([str(data)]) != files_sha256([str(data), str(tok / "tokenizer.json")])
    assert file_sha256(str(tmp_path / "missing")) is None
