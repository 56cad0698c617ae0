"""``llmforge <command>``: thin argument parsing over one function per job.

Job-specific flags are parsed here; everything else on the command line is a dotted config
override (``--data.min_chars=50``). Errors the user can fix are printed as one paragraph, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from llmforge.config import dump_config, load_config, parse_overrides
from llmforge.errors import LLMForgeError
from llmforge.runtime import setup_logging

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_CORPUS = REPO_ROOT / "data" / "sample"

log = logging.getLogger("llmforge")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmforge", description=__doc__.splitlines()[0],
                                     epilog="Any other --section.field=value sets a config field.")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="clean, deduplicate, tokenize and pack a corpus (Ray Data)")
    prep.add_argument("--input", action="append", default=[], metavar="PATH_OR_GLOB",
                      help="a .jsonl/.jsonl.gz/.txt/.parquet file, directory or glob, local or s3:// (repeatable)")
    prep.add_argument("--output", required=True, metavar="DIR", help="dataset dir, local or s3://")
    prep.add_argument("--config", metavar="FILE", help="YAML config (defaults when omitted)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing output dir")

    pre = sub.add_parser("pretrain", help="pretrain a model on a prepared dataset (Ray Train + DeepSpeed)")
    pre.add_argument("--config", metavar="FILE", help="YAML config, e.g. configs/pretrain/deepseek-tiny.yaml")
    pre.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint dir")

    ft = sub.add_parser("finetune", help="LoRA fine-tuning of a base model on chat or instruction JSONL")
    ft.add_argument("--base", help="HF model dir, s3:// copy of one, or models:/NAME/VERSION")
    ft.add_argument("--data", help="chat ({messages}) or instruction ({prompt, completion}) JSONL, local or s3://")
    ft.add_argument("--output", help="output dir (adapter/, merged/, checkpoints, sft_data/)")
    ft.add_argument("--config", metavar="FILE", help="YAML config, e.g. configs/finetune/lora-tiny.yaml")
    ft.add_argument("--merge", action="store_true", help="also write a merged full model")

    srv = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API (Ray Serve); blocks until Ctrl-C")
    srv.add_argument("--model", help="HF model dir, s3:// copy of one, or models:/NAME/VERSION")
    srv.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                     help="a LoRA adapter served as model NAME (repeatable; DIR local or s3://)")
    srv.add_argument("--host", help="address of the HTTP proxy (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port of the HTTP proxy (default 8000)")
    srv.add_argument("--api-key", help="require this key (default: $LLMFORGE_API_KEY when set, else no key)")
    srv.add_argument("--config", metavar="FILE", help="YAML config, e.g. configs/serve/tiny.yaml")

    ev = sub.add_parser("eval", help="validation perplexity and sample generations of an exported model")
    ev.add_argument("--model", required=True, metavar="DIR", help="a Hugging Face model dir")
    ev.add_argument("--data", required=True, metavar="DATASET_DIR", help="a prepared dataset dir")
    ev.add_argument("--max-batches", type=int, default=20)
    ev.add_argument("--prompt", action="append", default=[], help="prompt for a sample generation (repeatable)")

    conf = sub.add_parser("config", help="print the resolved configuration")
    conf.add_argument("--config", metavar="FILE")
    conf.add_argument("--defaults", action="store_true", help="ignore --config; print every field's default")
    return parser


def run_prepare(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.data.pipeline import prepare

    cfg = load_config(args.config, overrides)
    manifest = prepare(args.input, args.output, cfg, overwrite=args.overwrite)
    summary = {"event": "prepare_done", "output": args.output, "splits": manifest["splits"],
               "vocab_size": manifest["vocab_size"], "seq_len": manifest["seq_len"]}
    print(json.dumps(summary), flush=True)
    return summary


def run_pretrain(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.quickstart import SAMPLE_DATASET, prepare_sample
    from llmforge.train.trainer import pretrain

    if args.resume_from:
        overrides["train.resume_from"] = args.resume_from
    cfg = load_config(args.config, overrides)
    if cfg.data.dataset is None:
        log.info("no --data.dataset: using the bundled sample corpus, prepared at %s", SAMPLE_DATASET)
        prepare_sample(SAMPLE_DATASET, cfg.ray)
        cfg.data.dataset = SAMPLE_DATASET
    summary = pretrain(cfg)
    disconnect_ray()
    print(json.dumps(summary), flush=True)
    return summary


def disconnect_ray() -> None:
    """Disconnect from Ray so that no forwarded worker log line lands after the summary line."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    sys.stderr.flush()
    sys.stdout.flush()


def run_finetune(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.train.finetune import finetune

    for flag, key in (("base", "finetune.base"), ("data", "finetune.data"), ("output", "output_dir")):
        if getattr(args, flag):
            overrides[key] = getattr(args, flag)
    if args.merge:
        overrides["finetune.merge"] = True
    summary = finetune(load_config(args.config, overrides))
    disconnect_ray()
    print(json.dumps(summary), flush=True)
    return summary


def run_serve(args: argparse.Namespace, overrides: dict) -> dict:
    import os

    from llmforge.serve.app import API_KEY_ENV, parse_adapters, serve_forever

    for flag, key in (("model", "serve.model"), ("host", "serve.host"), ("port", "serve.port")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.adapter:
        overrides["serve.adapters"] = parse_adapters(args.adapter)
    cfg = load_config(args.config, overrides)
    summary = serve_forever(cfg, args.api_key or os.environ.get(API_KEY_ENV) or None)
    disconnect_ray()
    print(json.dumps(summary), flush=True)
    return summary


def run_eval(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.evaluate import evaluate_model

    result = evaluate_model(args.model, args.data, max_batches=args.max_batches, prompts=args.prompt or None)
    print(json.dumps(result, ensure_ascii=False), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args, rest = _parser().parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        if args.command == "prepare":
            run_prepare(args, overrides)
        elif args.command == "pretrain":
            run_pretrain(args, overrides)
        elif args.command == "finetune":
            run_finetune(args, overrides)
        elif args.command == "serve":
            run_serve(args, overrides)
        elif args.command == "eval":
            run_eval(args, overrides)
        elif args.command == "config":
            print(dump_config(load_config(None if args.defaults else args.config, overrides)), end="")
    except LLMForgeError as exc:
        print(f"llmforge {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
