"""`llmforge quickstart` (`make quickstart`): the whole platform on its embedded default, in five stages.

1. prepare the sample corpus (skipped when already prepared) with Ray Data;
2. pretrain the DeepSeek-style tiny model on 2 CPU workers with ZeRO-2 and export it (MLflow run, registered);
3. print sample generations from the exported model;
4. fine-tune a LoRA adapter on the sample chat set;
5. serve the model and the adapter on Ray Serve and ask each through the `openai` client, then stop serving.

It ends with a summary block (where everything is, what to try next) and one JSON line. The two stages'
settings are package data (``sample_data/quickstart.yaml``, ``quickstart-lora.yaml``); command-line
overrides apply to the pretraining stage.
"""

from __future__ import annotations

import json
import time

from llmforge.config import load_config
from llmforge.runtime import disconnect_ray
from llmforge.samples import prepare_sample, sample_file

PROMPTS = ["Debian is a", "To install a package,", "软件包"]
QUESTION = "How do I install git?"
SERVE_PORT = 8765
EVAL_LIMIT = 100  # items per shipped task: about 10 s on 2 CPU cores
STAGES = 5


class _Stages:
    """Announces each stage on stdout and remembers how long it took."""

    def __init__(self) -> None:
        self.started = time.time()
        self._stage_started = self.started
        self.seconds: dict[str, float] = {}
        self._name: str | None = None

    def begin(self, name: str, what: str) -> None:
        self._end()
        self._name, self._stage_started = name, time.time()
        print(f"\n==> [{len(self.seconds) + 1}/{STAGES}] {what}", flush=True)

    def _end(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.time() - self._stage_started, 1)
            print(f"    done in {self.seconds[self._name]:.0f}s", flush=True)
            self._name = None

    def finish(self) -> float:
        self._end()
        return time.time() - self.started


def serve_once(ray_cfg, model_dir: str, adapter_dir: str) -> dict:
    """Serve the model and its adapter on Ray Serve, ask each one question through the openai client, stop."""
    import openai
    from ray import serve

    from llmforge.serve.app import start

    serve_cfg = load_config(None, {"serve.model": model_dir, "serve.model_name": "quickstart",
                                   "serve.adapters": {"chat": adapter_dir}, "serve.port": SERVE_PORT,
                                   "serve.num_cpus": 1})
    serve_cfg.ray = ray_cfg
    url = start(serve_cfg, None)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=2, timeout=120)
        answers = {model: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
            temperature=0.8, seed=0).choices[0].message.content for model in ("quickstart", "chat")}
    finally:
        serve.shutdown()
    return {"url": f"{url}/v1", "answers": answers}


def run_quickstart(overrides: dict) -> dict:
    from llmforge.evals.harness import shipped_tasks
    from llmforge.evals.job import run_eval
    from llmforge.evaluate import generate, load_model
    from llmforge.train.finetune import finetune
    from llmforge.train.trainer import pretrain

    stages = _Stages()
    cfg = load_config(sample_file("quickstart.yaml"), overrides)

    stages.begin("prepare", f"Preparing the sample corpus into {cfg.data.dataset} (clean, filter, mask PII, "
                            "deduplicate, train a tokenizer, pack)")
    manifest = prepare_sample(cfg.data.dataset, cfg.ray)
    print(f"    {manifest['splits']['train']['sequences']} training sequences of {manifest['seq_len']} tokens, "
          f"vocabulary {manifest['vocab_size']}; stats.json and rejects/ beside them", flush=True)

    stages.begin("pretrain", f"Pretraining {cfg.model.preset} for {cfg.train.max_steps} steps on "
                             f"{cfg.train.num_workers} workers (Ray Train + DeepSpeed ZeRO-{cfg.train.zero_stage})")
    summary = pretrain(cfg)

    stages.begin("generate", f"Sample generations from the exported model ({summary['model_dir']})")
    model, tokenizer = load_model(summary["model_dir"])
    for text in generate(model, tokenizer, PROMPTS, max_new_tokens=30):
        print(f"    >>> {text!r}", flush=True)

    registered = summary.get("registered_model")
    model_uri = f"models:/{registered['name']}/{registered['version']}" if registered else summary["model_dir"]
    stages.begin("evaluate", f"lm-eval-harness on the shipped tasks ({', '.join(shipped_tasks())}; "
                             f"{EVAL_LIMIT} items each; chance 25% on the two ending tasks)")
    eval_cfg = cfg.model_copy(deep=True)
    eval_cfg.tracking.tracking_uri = summary["tracking_uri"]
    evaluated = run_eval(eval_cfg, model_uri, list(shipped_tasks()), limit=EVAL_LIMIT, card_dir=summary["model_dir"])
    for task, metrics in evaluated["results"].items():
        print(f"    {task}: " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if not k.endswith("_stderr")),
              flush=True)

    lora_cfg = load_config(sample_file("quickstart-lora.yaml"), {
        "finetune.base": summary["model_dir"], "finetune.data": str(sample_file("chat.jsonl")),
        "output_dir": f"{cfg.output_dir}/lora"})
    stages.begin("finetune", f"LoRA fine-tuning on the sample chat set for {lora_cfg.train.max_steps} steps")
    lora_cfg.ray = cfg.ray
    lora_cfg.tracking.tracking_uri = summary["tracking_uri"]  # one MLflow store for the whole quickstart
    tuned = finetune(lora_cfg)

    stages.begin("serve", f"Serving the model and the adapter on Ray Serve (port {SERVE_PORT}), asking each "
                          f"{QUESTION!r} through the openai client")
    served = serve_once(cfg.ray, summary["model_dir"], tuned["adapter_dir"])
    for name, text in served["answers"].items():
        print(f"    [{name}] >>> {text!r}", flush=True)
    disconnect_ray()
    elapsed = stages.finish()

    result = {"event": "quickstart_done", "seconds": round(elapsed, 1), "stage_seconds": stages.seconds,
              "dataset": cfg.data.dataset, "model_dir": summary["model_dir"], "adapter_dir": tuned["adapter_dir"],
              "merged_dir": tuned["merged_dir"], "tracking_uri": summary["tracking_uri"],
              "pretrain_run_id": summary["run_id"], "finetune_run_id": tuned["run_id"],
              "registered_model": summary.get("registered_model"), "eval_run_id": evaluated["run_id"],
              "eval": evaluated["results"],
              "pretrain_loss": [summary["first_loss"], summary["final_loss"]], "val_loss": summary["val_loss"],
              "finetune_loss": [tuned["first_loss"], tuned["final_loss"]], "served_url": served["url"]}
    print(summary_block(result), flush=True)
    print(json.dumps(result), flush=True)
    return result


def summary_block(r: dict) -> str:
    model, adapter = r["model_dir"], r["adapter_dir"]
    registered = r.get("registered_model")
    lines = [
        "", f"Quickstart finished in {r['seconds']:.0f}s.",
        f"  dataset   {r['dataset']}  (manifest.json, stats.json, clean/, rejects/)",
        f"  model     {model}  (loss {r['pretrain_loss'][0]:.2f} -> {r['pretrain_loss'][1]:.2f}, "
        f"val {r['val_loss']:.2f})" + (f"; registered as models:/{registered['name']}/{registered['version']}"
                                       if registered else ""),
        f"  adapter   {adapter}  (merged model: {r['merged_dir']})",
        f"  eval      " + ", ".join(f"{task} {m['acc']:.2f}" for task, m in r["eval"].items() if "acc" in m)
        + " (acc; a child run of the pretraining run, and the model card's table)",
        f"  MLflow    {r['tracking_uri']}  (runs {r['pretrain_run_id'][:8]}, {r['finetune_run_id'][:8]})",
        f"  served    {r['served_url']}  (stopped now)",
        "Next:",
        "  make mlflow-ui                                     # the runs, metrics and model in the MLflow UI",
        f"  llmforge serve --model {model} --adapter chat={adapter}",
        "  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        "       -d '{\"model\": \"chat\", \"messages\": [{\"role\": \"user\", \"content\": \"How do I install git?\"}]}'",
        f"  llmforge compare {r['pretrain_run_id']} {r['finetune_run_id']} --tracking-uri {r['tracking_uri']}",
        "  llmforge --help                                    # every command; docs/ for each stage",
        "",
    ]
    return "\n".join(lines)
