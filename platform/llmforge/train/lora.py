"""LoRA fine-tuning on the pretraining machinery: data rendering with assistant-only labels, the peft
model, and the adapter / merged-model export.

Chat records (``{"messages": [...]}``) and instruction records (``{"prompt", "completion"}``) are rendered
with the tokenizer's chat template. Labels are -100 everywhere except on assistant replies: for each
assistant turn the conversation is rendered up to the reply (with the generation prompt) and up to its
end, and the characters in between are the reply, so it works with any template that renders a prefix
of the conversation as a prefix of the text.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from llmforge.config import LoraConfig
from llmforge.errors import ConfigError, InputError
from llmforge.train.checkpoint import copy_tokenizer

log = logging.getLogger(__name__)

IGNORE = -100
ROLES = {"system", "user", "assistant"}
# Projections LoRA adapts by default, per model family: MLA's low-rank and output projections for
# DeepSeek-style models, attention and MLP projections for Llama/Qwen.
DEFAULT_TARGETS = {
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def resolve_base(uri: str, tracking_uri: str | None = None) -> Path:
    """A local HF model dir for ``uri``: a dir, an ``s3://`` copy (downloaded) or ``models:/NAME/VERSION``."""
    from llmforge.tracking import local_dir
    local = local_dir(uri, "base model", tracking_uri)
    if not (local / "config.json").is_file():
        raise InputError(f"Base model {uri} is not a Hugging Face model dir (no config.json).",
                         fix="pass the model/ dir that `llmforge pretrain` exported, its s3:// copy or models:/NAME/VERSION.")
    return local


def load_pretrained(uri: str, tracking_uri: str | None, dtype: torch.dtype):
    """The causal LM at ``uri`` (see :func:`resolve_base`) in ``dtype``, with SDPA attention."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(resolve_base(uri, tracking_uri), dtype=dtype, attn_implementation="sdpa")


def linear_module_names(base_dir: Path) -> list[str]:
    """Distinct leaf names of the base model's Linear layers (built on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name != "lm_head"})


def target_modules(base_dir: Path, cfg: LoraConfig) -> list[str]:
    from transformers import AutoConfig
    available = linear_module_names(base_dir)
    model_type = AutoConfig.from_pretrained(base_dir).model_type
    wanted = cfg.target_modules or [m for m in DEFAULT_TARGETS.get(model_type, available) if m in available]
    unknown = [m for m in wanted if m not in available]
    if unknown or not wanted:
        raise ConfigError(f"finetune.lora.target_modules {unknown or wanted} are not Linear layers of this "
                          f"{model_type} model.", fix=f"choose from: {', '.join(available)}.")
    return wanted


def build_lora_model(base_dir: Path, cfg: LoraConfig, targets: list[str], load_in_4bit: bool = False):
    """The base with LoRA adapters on ``targets``; with ``load_in_4bit`` (QLoRA) the base's Linear layers are
    bitsandbytes NF4 (frozen, dequantized on the fly; compute in bf16 on GPU, fp32 on CPU) and only the
    adapters, in full precision, are trained."""
    import peft
    from transformers import AutoModelForCausalLM
    if load_in_4bit:
        from transformers import BitsAndBytesConfig
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=compute)
        base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, dtype=compute,
                                                    device_map={"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu")
        base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                           task_type="CAUSAL_LM")
    return peft.get_peft_model(base, lora)


def to_messages(record: object) -> tuple[list[dict] | None, str | None]:
    """Chat or instruction record -> messages, or ``(None, reason)``."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return None, "messages must be a non-empty list"
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return None, f"bad message {json.dumps(m, ensure_ascii=False)[:80]}: needs role in {sorted(ROLES)} and string content"
        if not any(m["role"] == "assistant" for m in messages):
            return None, "no assistant message"
        return messages, None
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}], None
    return None, "neither {messages: [...]} nor {prompt, completion}"


def render(messages: list[dict], tokenizer, max_len: int) -> tuple[list[int], list[int]] | str:
    """Token ids and labels (assistant replies only), or the reason the example is rejected."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end_text = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not text.startswith(end_text):
            raise InputError("The tokenizer's chat template does not render a conversation's prefix as a prefix.",
                             fix="use a template like ChatML, or a tokenizer prepared by llmforge.")
        spans.append((start, len(end_text)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if len(ids) > max_len:
        return f"too_long: {len(ids)} tokens > finetune.max_seq_len {max_len}"
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE for tok, (a, _) in zip(ids, enc["offset_mapping"])]
    if all(label == IGNORE for label in labels):
        return "no_assistant_tokens"
    return ids, labels


def pad(ids: list[int], labels: list[int], length: int, pad_id: int) -> tuple[list[int], list[int]]:
    return ids + [pad_id] * (length - len(ids)), labels + [IGNORE] * (length - len(labels))


def pack_examples(examples: list[tuple[list[int], list[int]]], length: int, pad_id: int) -> list[tuple[list[int], list[int]]]:
    """Greedy packing: whole examples, in order, into ``length``-token rows padded at the end."""
    rows, ids, labels = [], [], []
    for e_ids, e_labels in examples:
        if ids and len(ids) + len(e_ids) > length:
            rows.append(pad(ids, labels, length, pad_id))
            ids, labels = [], []
        ids, labels = ids + e_ids, labels + e_labels
    if ids:
        rows.append(pad(ids, labels, length, pad_id))
    return rows


def merge_adapter(peft_model, base_dir: Path, out_dir: Path) -> Path:
    """The base with the adapter folded into its weights, as a plain HF model dir (the peft model is left as is)."""
    import copy
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer(base_dir, out_dir)
    return out_dir
