"""Serving throughput and latency: llmforge's Ray Serve app with its own engine and with vLLM, against two
baselines, measured in one run.

    python bench/serve_load.py [--concurrency 1 8 32] [--requests-per-worker 6] [--rounds 3] [--skip-hf-serve]
                               [--skip-vllm] [--set KEY=VALUE]

The vLLM column is the same app with ``serve.engine=vllm`` (Ray Serve LLM's LLMServer running vLLM, `make
vllm`), on the same model, requests and replica CPUs. After the rounds on the Llama-shape model, a DeepSeek-shape
one (the ``deepseek-tiny`` preset: MLA with vLLM's 512+64 latent, 8 routed experts) is measured with both engines
at every level (``deepseek``): `transformers serve --continuous-batching` fails on MLA models (an
``index_copy_`` shape error in its paged cache), so it has no DeepSeek column.

One 4-layer Llama-shape model (~7M parameters, random weights, a BPE tokenizer trained on the bundled
sample corpus) is written to a temp dir. Requests mix prompt lengths (8-120 tokens) and output lengths
(32-128 tokens), greedy; each concurrency level keeps that many streaming clients (the official `openai`
client) busy. Reported per level: output tokens/s, p50/p99 request latency, p50/p99 time to first token.
Baselines on the same model and requests: sequential unbatched `model.generate` in this process (16
requests, all CPUs as torch threads), and the
`transformers serve --continuous-batching` server driven by the same client. The top level runs ``--rounds``
times, each round with its own baselines measured right before and after it, each measurement started on
an idle machine (it waits for the CPUs to settle below 15%, ``settled_s``); the ratios reported at the
end (``c32_over_sequential``, ``c32_over_transformers_serve``, ``c32_p50_ttft_s``) are the medians of the
rounds' ratios, each round's figures listed in ``c32_rounds``. Prints one JSON line (each round also goes
to stderr as it ends).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from llmforge.config import TokenizerConfig, load_config  # noqa: E402
from llmforge.data.tokenizer import train_tokenizer  # noqa: E402

OUTPUT_LENGTHS = (32, 64, 96, 128)


def sample_texts() -> list[str]:
    """The bundled corpus's texts (it holds malformed lines on purpose: those are skipped)."""
    texts = []
    with gzip.open(REPO / "platform" / "llmforge" / "sample_data" / "corpus.jsonl.gz", "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                text = json.loads(line).get("text")
            except (ValueError, AttributeError):
                continue
            if isinstance(text, str) and len(text) > 200:
                texts.append(text)
    return texts


def build_model(out: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    train_tokenizer(sample_texts(), TokenizerConfig(vocab_size=8192), out, model_max_length=1024)
    tok = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=688, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def workload(model_dir: Path, count: int) -> list[tuple[str, int]]:
    """``count`` (prompt, max_tokens) pairs with mixed lengths, the same for every system."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = sample_texts()
    out = []
    for i in range(count):
        ids = tok.encode(texts[i % len(texts)], add_special_tokens=False)[: 8 + (i * 37) % 113]
        out.append((tok.decode(ids), OUTPUT_LENGTHS[i % len(OUTPUT_LENGTHS)]))
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def drive(base_url: str, model: str, requests: list[tuple[str, int]], concurrency: int, tokenizer) -> dict:
    """Stream every request through the openai client with ``concurrency`` clients at a time."""
    import openai
    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)

    def one(item):
        prompt, max_tokens = item
        start = time.perf_counter()
        first, text, tokens = None, "", None
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter()
                text += chunk.choices[0].text
            if getattr(chunk, "usage", None):
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        if tokens is None:  # a server that sends no usage: count the text
            tokens = len(tokenizer.encode(text, add_special_tokens=False))
        return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, requests))
    wall = time.perf_counter() - started
    lat, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    return {"requests": len(results), "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "p50_latency_s": round(percentile(lat, 0.5), 3), "p99_latency_s": round(percentile(lat, 0.99), 3),
            "p50_ttft_s": round(percentile(ttft, 0.5), 3), "p99_ttft_s": round(percentile(ttft, 0.99), 3)}


def sequential_generate(model_dir: Path, requests: list[tuple[str, int]], threads: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokens, started = 0, time.perf_counter()
    with torch.inference_mode():
        for prompt, max_tokens in requests:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    return tokens / (time.perf_counter() - started)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 180) -> None:
    import urllib.request
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def run_levels(base_url: str, model: str, model_dir: Path, levels: list[int], per_worker: int) -> dict:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    drive(base_url, model, workload(model_dir, 4), 4, tok)  # warm-up
    return {f"c{c}": drive(base_url, model, workload(model_dir, max(8, c * per_worker)), c, tok) for c in levels}


def build_deepseek(out: Path, tokenizer_dir: Path) -> Path:
    """The deepseek-tiny preset on the Llama model's tokenizer (random weights)."""
    import shutil

    from llmforge.config import ModelConfig
    from llmforge.model.build import build_model as build_preset, model_config
    from transformers import AutoTokenizer
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    tok = AutoTokenizer.from_pretrained(out)
    config = model_config(ModelConfig(preset="deepseek-tiny"), len(tok), 1024, tok.eos_token_id, tok.pad_token_id)
    build_preset(config, seed=0).save_pretrained(out)
    return out


def guarded(measure, *args) -> dict:
    """A measurement that may fail (a third-party engine): its error instead of its figures."""
    try:
        return measure(*args)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def llmforge_levels(model_dir: Path, levels: list[int], per_worker: int, cpus: int, replica_cpus: int,
                    overrides: dict) -> dict:
    import ray
    from ray import serve

    from llmforge.serve.app import start
    port = free_port()
    cfg = load_config(None, {"serve.model": str(model_dir), "serve.model_name": "bench", "serve.port": port,
                             "serve.num_cpus": replica_cpus, "serve.max_batch_size": 32, **overrides})
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "platform")}})
    try:
        url = start(cfg, None)
        wait_ready(f"{url}/health", None)
        return run_levels(f"{url}/v1", "bench", model_dir, levels, per_worker)
    finally:
        serve.shutdown()
        ray.shutdown()


def hf_serve_levels(model_dir: Path, levels: list[int], per_worker: int) -> dict:
    exe = Path(sys.executable).parent / "transformers"
    port = free_port()
    cache = Path(tempfile.mkdtemp(prefix="hf-cache-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([str(exe), "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
                             str(model_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc)
        return run_levels(f"http://127.0.0.1:{port}/v1", str(model_dir), model_dir, levels, per_worker)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def settle(limit_s: float = 60.0, busy: float = 0.15) -> float:
    """Wait until the machine is idle (a stopped server's processes can take seconds to exit and free their
    memory, and a measurement started meanwhile is slowed): seconds waited."""
    import psutil
    started = time.perf_counter()
    psutil.cpu_percent(None)
    while time.perf_counter() - started < limit_s:
        if psutil.cpu_percent(interval=1.0) / 100 < busy:
            break
    return round(time.perf_counter() - started, 1)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-worker", type=int, default=6,
                        help="requests each client sends in turn (was 3: with 3, the ramp-up and the tail, where fewer "
                             "clients are left, took a large share of a level's time)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the top level is measured this many times, each round with its own baselines")
    parser.add_argument("--skip-hf-serve", action="store_true", help="leave out the transformers serve baseline")
    parser.add_argument("--skip-vllm", action="store_true", help="leave out serve.engine=vllm (and the DeepSeek model)")
    parser.add_argument("--replica-cpus", type=int, default=1,
                        help="CPUs (torch threads) of the serving replica; the rest is left to Ray's proxy and the clients")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for llmforge's app, e.g. --set serve.stream_interval_s=0.25")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cpus = os.cpu_count() or 1
    model_dir = build_model(Path(tempfile.mkdtemp(prefix="bench-serve-")))
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    top = max(args.concurrency)
    key = f"c{top}"
    import yaml
    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    result = {"bench": "serve_load", "params": params, "cpus": cpus, "replica_cpus": args.replica_cpus, **overrides}
    # A shared VM's speed drifts by 20-30% over minutes, so one run's ratio says little. Each round measures
    # the three systems back to back (sequential generate, llmforge, transformers serve; one at a time, each
    # server stopped before the next starts) and gives its own ratios; the headline is their median. The
    # first round also measures the lower concurrency levels.
    rounds = []
    for r in range(args.rounds):
        levels = args.concurrency if r == 0 else [top]
        waited = [settle()]
        sequential = sequential_generate(model_dir, workload(model_dir, 16), threads=cpus)
        waited.append(settle())
        ours = llmforge_levels(model_dir, levels, args.requests_per_worker, cpus, args.replica_cpus,
                               {"serve.engine": "llmforge", **overrides})
        vllm = {}
        if not args.skip_vllm:
            waited.append(settle())
            vllm = guarded(llmforge_levels, model_dir, levels, args.requests_per_worker, cpus, args.replica_cpus,
                           {**overrides, "serve.engine": "vllm"})
        hf = {}
        if not args.skip_hf_serve:
            waited.append(settle())
            try:
                hf = hf_serve_levels(model_dir, levels, args.requests_per_worker)
            except Exception as exc:  # the baseline is a third-party server: report why it is missing, keep ours
                hf = {"error": f"{type(exc).__name__}: {exc}"}
        if r == 0:
            result.update({"sequential_generate_tokens_per_s": round(sequential, 1), "llmforge": ours})
            if not args.skip_hf_serve:
                result["transformers_serve_cb"] = hf
            if not args.skip_vllm:
                result["vllm"] = vllm
        entry = {"settled_s": waited, "sequential": round(sequential, 1), "llmforge": ours[key]["tokens_per_s"],
                 "p50_ttft_s": ours[key]["p50_ttft_s"], "over_sequential": round(ours[key]["tokens_per_s"] / sequential, 2)}
        if key in vllm:
            entry.update({"vllm": vllm[key]["tokens_per_s"],
                          "llmforge_over_vllm": round(ours[key]["tokens_per_s"] / vllm[key]["tokens_per_s"], 2)})
        if key in hf:
            entry.update({"transformers_serve": hf[key]["tokens_per_s"],
                          "over_transformers_serve": round(ours[key]["tokens_per_s"] / hf[key]["tokens_per_s"], 2)})
        rounds.append(entry)
        print(json.dumps({"round": r + 1, **entry}), file=sys.stderr, flush=True)
    result[f"{key}_rounds"] = rounds
    if not args.skip_vllm:  # the DeepSeek-shape model: both engines, every level, one round
        deepseek = build_deepseek(Path(tempfile.mkdtemp(prefix="bench-serve-deepseek-")), model_dir)
        result["deepseek"] = {"params": sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM
                                            .from_pretrained(deepseek).parameters())}
        for engine in ("llmforge", "vllm"):
            settle()
            result["deepseek"][engine] = guarded(llmforge_levels, deepseek, args.concurrency, args.requests_per_worker,
                                                 cpus, args.replica_cpus, {**overrides, "serve.engine": engine})
            print(json.dumps({"deepseek": engine, **result["deepseek"][engine]}), file=sys.stderr, flush=True)
    for name, digits in (("over_sequential", 2), ("over_transformers_serve", 2), ("llmforge_over_vllm", 2),
                         ("p50_ttft_s", 3)):
        values = [entry[name] for entry in rounds if name in entry]
        if values:
            result[f"{key}_{name}"] = round(median(values), digits)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
