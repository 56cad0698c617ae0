"""lm-eval-harness on the shipped tasks, in-process (the baseline) and against llmforge's OpenAI API on a local
socket (uvicorn, the engine of `llmforge serve` without Ray Serve's proxy), on the same tiny model.

    python bench/eval_throughput.py [--preset deepseek-tiny] [--limit 100] [--engine-batch 16]

The model is random-initialised from the preset with a tokenizer trained on the bundled sample corpus (nothing
downloaded). Prints one JSON line: items and loglikelihood requests per second each way, the endpoint's time over
in-process, and the largest relative difference between the two ways' scores.
"""

from __future__ import annotations

import argparse
import gzip
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))


def build(preset: str, out: Path) -> Path:
    from transformers import AutoTokenizer

    from llmforge.config import ModelConfig, TokenizerConfig
    from llmforge.data.tokenizer import train_tokenizer
    from llmforge.model.build import build_model, model_config
    from llmforge.samples import sample_file
    texts = []
    with gzip.open(sample_file("corpus.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:  # the sample plants malformed lines: skipped here
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                texts.append(record["text"])
    train_tokenizer(texts, TokenizerConfig(vocab_size=4096), out, model_max_length=256)
    tok = AutoTokenizer.from_pretrained(out)
    config = model_config(ModelConfig(preset=preset), len(tok), 256, tok.eos_token_id, tok.pad_token_id)
    build_model(config, seed=0).save_pretrained(out)
    return out


def serve(model_dir: Path, batch: int):
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmforge.serve.engine import Engine, EngineSettings
    from llmforge.serve.openai_api import ModelServer, build_api
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(model, tok, EngineSettings(max_batch_size=batch, max_model_len=256))
    api = ModelServer(engine=engine, tokenizer=tok, model_name="m", adapters=[], max_model_len=256,
                      default_max_tokens=8, max_body_bytes=8 << 20, api_key=None, blocked_terms=(),
                      body_read_timeout_s=30.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(build_api(api), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=web.run, daemon=True).start()
    deadline = time.time() + 60
    while not web.started:
        if time.time() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", web, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="deepseek-tiny")
    parser.add_argument("--limit", type=int, default=100, help="items per task")
    parser.add_argument("--engine-batch", type=int, default=16, help="the engine's max_batch_size")
    args = parser.parse_args()

    import logging

    import torch

    from llmforge.evals import harness
    logging.disable(logging.INFO)
    tasks = list(harness.shipped_tasks())
    model_dir = build(args.preset, Path(tempfile.mkdtemp(prefix="llmforge-bench-eval-")))
    url, web, engine = serve(model_dir, args.engine_batch)
    runs = {}
    for name, endpoint in (("in_process", None), ("endpoint", url)):
        started = time.perf_counter()
        out = harness.evaluate(str(model_dir), tasks, endpoint=endpoint, limit=args.limit)
        runs[name] = (time.perf_counter() - started, out)
    web.should_exit = True
    engine.shutdown()
    counts = runs["in_process"][1]["raw"]["n-samples"]  # lm-eval's items per task
    items = sum(n["effective"] for n in counts.values())
    # One loglikelihood request per choice: 4 for the ending tasks, 1 for the last word.
    requests = sum((4 if task.startswith("handbook_ending") else 1) * n["effective"] for task, n in counts.items())
    local, remote = runs["in_process"][1]["results"], runs["endpoint"][1]["results"]
    diff = max(abs(remote[t][m] - v) / max(abs(v), 1e-12) for t in local for m, v in local[t].items() if v)
    result = {"bench": "eval_throughput", "preset": args.preset, "tasks": tasks, "items": items,
              "loglikelihood_requests": requests, "threads": torch.get_num_threads(), "engine_batch": args.engine_batch}
    for name, (seconds, _) in runs.items():
        result[name] = {"s": round(seconds, 2), "items_per_s": round(items / seconds, 1),
                        "requests_per_s": round(requests / seconds, 1)}
    result["endpoint_over_in_process"] = round(runs["endpoint"][0] / runs["in_process"][0], 2)
    result["max_rel_score_diff"] = float(f"{diff:.2g}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
