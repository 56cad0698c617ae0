"""The embedded default run (`make quickstart`): prepare the bundled sample corpus (skipped when already
prepared), pretrain the DeepSeek-style tiny model on 2 CPU workers with ZeRO-2, print three generations
from the exported model, fine-tune a LoRA adapter on the bundled chat sample and answer one question
with it, serve the model and the adapter on Ray Serve and ask both through the openai client, and end
with the pretraining summary line."""

from __future__ import annotations

import json
import logging
import sys
import time

from llmforge import storage
from llmforge.cli import REPO_ROOT, SAMPLE_CORPUS
from llmforge.config import load_config, parse_overrides
from llmforge.data.pipeline import MANIFEST, prepare
from llmforge.errors import LLMForgeError
from llmforge.runtime import setup_logging

log = logging.getLogger("llmforge")
QUICKSTART_CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"
SAMPLE_DATASET = "runs/sample-dataset"
SAMPLE_DATA_SETTINGS = {"data.seq_len": 256, "data.tokenizer.vocab_size": 4096}
PROMPTS = ["Debian is a", "To install a package,", "软件包"]
LORA_CONFIG = REPO_ROOT / "configs" / "finetune" / "lora-tiny.yaml"
CHAT_SAMPLE = REPO_ROOT / "data" / "sample-chat" / "chat.jsonl"


def prepare_sample(dataset: str, ray_cfg=None) -> dict:
    """Prepare the bundled sample corpus into ``dataset`` unless a complete dataset is already there."""
    if storage.exists(storage.join(dataset, MANIFEST)):
        log.info("sample dataset already prepared at %s (delete it to prepare again)", dataset)
        return storage.read_json(storage.join(dataset, MANIFEST))
    cfg = load_config(None, SAMPLE_DATA_SETTINGS)
    if ray_cfg is not None:
        cfg.ray = ray_cfg
    return prepare([str(SAMPLE_CORPUS)], dataset, cfg, overwrite=True)


def serve_once(cfg, model_dir: str, adapter_dir: str) -> dict:
    """Serve the model and its adapter on Ray Serve, ask each one question through the openai client, stop."""
    import openai
    from ray import serve

    from llmforge.serve.app import start

    serve_cfg = load_config(None, {"serve.model": model_dir, "serve.model_name": "quickstart",
                                   "serve.adapters": {"chat": adapter_dir}, "serve.port": 8765, "serve.num_cpus": 1})
    serve_cfg.ray = cfg.ray
    url = start(serve_cfg, None)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=2, timeout=120)
        answers = {model: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "How do I install git?"}], max_tokens=24,
            temperature=0.8, seed=0).choices[0].message.content for model in ("quickstart", "chat")}
    finally:
        serve.shutdown()
    return {"url": f"{url}/v1", "answers": answers}


def main(argv: list[str]) -> int:
    from llmforge.cli import disconnect_ray
    from llmforge.evaluate import generate, load_model
    from llmforge.train.finetune import finetune
    from llmforge.train.trainer import pretrain

    setup_logging()
    started = time.time()
    try:
        cfg = load_config(QUICKSTART_CONFIG, parse_overrides(argv))
        prepare_sample(cfg.data.dataset, cfg.ray)
        summary = pretrain(cfg)
        model, tokenizer = load_model(summary["model_dir"])
        print("\nSample generations from the exported model:", flush=True)
        for text in generate(model, tokenizer, PROMPTS, max_new_tokens=30):
            print(f"  >>> {text!r}", flush=True)
        lora_cfg = load_config(LORA_CONFIG, {"finetune.base": summary["model_dir"], "finetune.data": str(CHAT_SAMPLE),
                                             "finetune.merge": True, "output_dir": f"{cfg.output_dir}/lora"})
        lora_cfg.ray = cfg.ray
        lora_cfg.tracking.tracking_uri = summary["tracking_uri"]  # one MLflow store for the whole quickstart
        tuned = finetune(lora_cfg)
        served = serve_once(cfg, summary["model_dir"], tuned["adapter_dir"])
        disconnect_ray()
    except LLMForgeError as exc:
        print(f"llmforge quickstart: error: {exc}", file=sys.stderr)
        return exc.exit_code
    merged, merged_tok = load_model(tuned["merged_dir"])
    question = merged_tok.apply_chat_template([{"role": "user", "content": "How do I install git?"}],
                                              tokenize=False, add_generation_prompt=True)
    print(f"\nLoRA adapter ({tuned['trainable_params']:,} trainable parameters, loss {tuned['first_loss']:.2f} -> "
          f"{tuned['final_loss']:.2f}) answering 'How do I install git?':", flush=True)
    print(f"  >>> {generate(merged, merged_tok, [question], max_new_tokens=30)[0]!r}")
    print(json.dumps(tuned), flush=True)
    print(f"\nServed on Ray Serve and called with the openai client ({served['url']}):", flush=True)
    for model, text in served["answers"].items():
        print(f"  [{model}] >>> {text!r}", flush=True)
    print(f"\nQuickstart finished in {time.time() - started:.0f}s. Browse the run: make mlflow-ui "
          f"(or mlflow ui --backend-store-uri {summary['tracking_uri']})\n", flush=True)
    print(json.dumps(summary), flush=True)
    return 0
