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
from llmforge.errors import ConfigError, LLMForgeError
from llmforge.runtime import disconnect_ray, setup_logging

log = logging.getLogger("llmforge")

EXAMPLES = {
    "quickstart": """examples:
  llmforge quickstart                          # about 3 minutes on 2 CPU cores
  llmforge quickstart --train.max_steps=400    # overrides apply to the pretraining stage
Its two stages' settings: {samples}/quickstart.yaml and quickstart-lora.yaml.""",
    "prepare": """examples:
  llmforge prepare --input corpus/ --output runs/my-dataset
  llmforge prepare --input 's3://bucket/raw/*.jsonl.gz' --output s3://bucket/datasets/web --data.min_chars=100
  llmforge prepare --input docs/ --output runs/ds --data.txt_mode=paragraph --data.tokenizer.vocab_size=32000
Writes manifest.json, tokens/{train,val}/, tokenizer/, clean/, rejects/, stats.json (docs/data.md).""",
    "pretrain": """examples:
  llmforge pretrain                            # deepseek-tiny on the sample corpus (prepared first)
  llmforge pretrain --config configs/pretrain/deepseek-tiny.yaml --data.dataset=runs/my-dataset
  llmforge pretrain --config configs/pretrain/deepseek-125m.yaml --data.dataset=s3://b/ds \\
      --train.storage_path=s3://b/ckpts --train.run_name=ds125m-v1   # resubmit: resumes
Exports OUTPUT_DIR/model (a Hugging Face dir); last line: a pretrain_done JSON summary (docs/training.md).""",
    "finetune": """examples:
  llmforge finetune --base runs/quickstart/model --data chat.jsonl --output runs/lora --merge
  llmforge finetune --base models:/llmforge-quickstart/1 --data s3://b/sft.jsonl --output s3://b/lora \\
      --config configs/finetune/lora-tiny.yaml --finetune.lora.rank=16
  llmforge finetune --method full --base runs/quickstart/model --data chat.jsonl --output runs/sft
Data: {"messages": [...]} or {"prompt", "completion"} JSONL (docs/post-training.md).""",
    "align": """examples:
  llmforge align --method dpo --base runs/sft/model --data pairs.jsonl --output runs/dpo
  llmforge align --method dpo --base runs/sft/model --data pairs.jsonl --output runs/dpo-frozen \
      --align.reference=frozen --train.zero_stage=3
  llmforge align --method simpo --base models:/llmforge-sft/2 --data s3://b/pairs.jsonl --output s3://b/simpo \
      --align.beta=2.0 --align.simpo_gamma=1.0
Data: {"prompt", "chosen", "rejected"} JSONL, strings or message lists (docs/post-training.md).
Exports OUTPUT/model; last line: an align_done JSON summary.""",
    "distill": """examples:
  llmforge distill --teacher runs/quickstart/model --data.dataset runs/sample-dataset --output runs/distill \
      --model.preset=deepseek-tiny --model.overrides='{hidden_size: 64, num_hidden_layers: 2}'
  llmforge distill --teacher models:/llmforge-quickstart/1 --config student.yaml --data.dataset s3://b/ds \
      --distill.kl=reverse --distill.temperature=1.0
The teacher's tokenizer must be the dataset's. Exports OUTPUT/model; last line: a distill_done JSON summary.""",
    "recipe": """examples:
  llmforge recipe --config configs/recipes/tiny.yaml      # pretrain -> SFT -> DPO, a few minutes on 2 CPU cores
  llmforge recipe --config configs/recipes/tiny.yaml      # again: finished stages are skipped
  llmforge recipe --config my.yaml --output_dir=s3://b/recipes/v2 --train.num_workers=4   # over every stage
Last line: a recipe_done JSON summary (docs/post-training.md#recipes).""",
    "serve": """examples:
  llmforge serve --model runs/quickstart/model --adapter chat=runs/quickstart/lora/adapter
  LLMFORGE_API_KEY=secret llmforge serve --model models:/llmforge-quickstart/1 --port 8000
  curl -s http://127.0.0.1:8000/v1/models
Prints READY http://HOST:PORT/v1 and blocks until Ctrl-C (docs/serving.md).""",
    "eval": """examples:
  llmforge eval --model runs/quickstart/model --tasks handbook_ending_en,handbook_ending_zh,handbook_lastword_en
  llmforge eval --model models:/llmforge-quickstart/1 --tasks handbook_ending_en --endpoint http://127.0.0.1:8000/v1
  llmforge eval --model runs/m/model --tasks my_tasks/,val_perplexity --data runs/sample-dataset --limit 100
Shipped tasks: {tasks}; also task YAML files or dirs, and lm-eval's own tasks.
Last line: an eval_done JSON summary; results in MLflow and the model card (docs/evaluation.md).""",
    "compare": """examples:
  llmforge compare RUN_ID_1 RUN_ID_2                     # in MLFLOW_TRACKING_URI (or --tracking-uri)
  llmforge compare models:/llmforge-quickstart/1 models:/llmforge-quickstart/2 --output runs/compare
Prints the config differences, final metrics and eval scores; writes compare.png (docs/evaluation.md).""",
    "config": """examples:
  llmforge config --defaults                                   # every field and its default
  llmforge config --config configs/pretrain/deepseek-1b.yaml --train.max_steps=10
Reference of every field: docs/configuration.md.""",
}


def _parser() -> argparse.ArgumentParser:
    from llmforge import __version__
    from llmforge.evals.harness import shipped_tasks
    from llmforge.samples import SAMPLE_DATA

    parser = argparse.ArgumentParser(
        prog="llmforge", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="From raw text to a served model on Ray: prepare -> pretrain -> finetune -> serve.",
        epilog="Every command also takes config overrides: --section.field=value (llmforge config --defaults\n"
               "lists them). `llmforge COMMAND --help` shows a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"llmforge {__version__} ({Path(__file__).parent})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, epilog=EXAMPLES[name].replace("{samples}", str(SAMPLE_DATA))
                              .replace("{tasks}", ", ".join(shipped_tasks())),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    command("quickstart", "run the whole platform on the sample data: prepare, pretrain, generate, LoRA, serve")

    prep = command("prepare", "clean, deduplicate, tokenize and pack a corpus (Ray Data)")
    prep.add_argument("--input", action="append", default=[], metavar="PATH_OR_GLOB",
                      help="a .jsonl/.jsonl.gz/.txt/.parquet file, directory or glob, local or s3:// (repeatable)")
    prep.add_argument("--output", required=True, metavar="DIR", help="dataset dir, local or s3://")
    prep.add_argument("--config", metavar="FILE", help="YAML config (defaults when omitted)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing output dir")

    pre = command("pretrain", "pretrain a model on a prepared dataset (Ray Train + DeepSpeed)")
    pre.add_argument("--config", metavar="FILE", help="YAML config, e.g. configs/pretrain/deepseek-tiny.yaml")
    pre.add_argument("--resume-from", metavar="CHECKPOINT", help="start a new run from this checkpoint dir")

    ft = command("finetune", "supervised fine-tuning (LoRA or full) of a base model on chat or instruction JSONL")
    ft.add_argument("--base", help="HF model dir, s3:// copy of one, or models:/NAME/VERSION")
    ft.add_argument("--data", help="chat ({messages}) or instruction ({prompt, completion}) JSONL, local or s3://")
    ft.add_argument("--output", help="output dir (adapter/ and merged/, or model/; checkpoints, sft_data/)")
    ft.add_argument("--method", choices=["lora", "qlora", "full"],
                    help="lora (default): adapters on the frozen base; qlora: on a 4-bit base; full: every parameter")
    ft.add_argument("--config", metavar="FILE", help="YAML config, e.g. configs/finetune/lora-tiny.yaml")
    ft.add_argument("--merge", action="store_true", help="also write a merged full model")

    al = command("align", "preference alignment (DPO, IPO, SimPO) of a model on {prompt, chosen, rejected} pairs")
    al.add_argument("--method", choices=["dpo", "ipo", "simpo"], help="the preference loss (default dpo)")
    al.add_argument("--base", help="the model to align (and the reference): HF dir, s3://, or models:/NAME/VERSION")
    al.add_argument("--data", help="JSONL pairs, local or s3://")
    al.add_argument("--output", help="output dir (model/, pref_data/ with rejects, checkpoints)")
    al.add_argument("--config", metavar="FILE", help="YAML config")

    dst = command("distill", "train a student on a teacher's token distributions over a prepared dataset")
    dst.add_argument("--teacher", help="the teacher: HF dir, s3:// copy, or models:/NAME/VERSION")
    dst.add_argument("--output", help="output dir (model/, checkpoints)")
    dst.add_argument("--config", metavar="FILE", help="YAML config: the student (model.*), train.*, distill.*")

    rec = command("recipe", "run training stages in order (pretrain, finetune, align, distill), each on the last's model")
    rec.add_argument("--config", metavar="FILE", required=True, help="the recipe, e.g. configs/recipes/tiny.yaml")

    srv = command("serve", "serve a model behind an OpenAI-compatible API (Ray Serve); blocks until Ctrl-C")
    srv.add_argument("--model", help="HF model dir, s3:// copy of one, or models:/NAME/VERSION")
    srv.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                     help="a LoRA adapter served as model NAME (repeatable; DIR local or s3://)")
    srv.add_argument("--host", help="address of the HTTP proxy (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port of the HTTP proxy (default 8000)")
    srv.add_argument("--api-key-file", metavar="FILE", help="require the key in this file (default: $LLMFORGE_API_KEY "
                     "when set, else no key, which only 127.0.0.1 allows)")
    srv.add_argument("--api-key", help="require this key; prefer $LLMFORGE_API_KEY or --api-key-file: a key on the "
                     "command line is visible to every user of the machine and stored with cluster jobs")
    srv.add_argument("--config", metavar="FILE", help="YAML config, e.g. configs/serve/quickstart.yaml")

    ev = command("eval", "lm-eval-harness tasks on a model, in-process or against its served endpoint; results in MLflow")
    ev.add_argument("--model", required=True, help="HF model dir, s3:// copy, or models:/NAME/VERSION (with --endpoint: "
                    "the served model's own dir or URI, for its tokenizer)")
    ev.add_argument("--tasks", action="append", default=[], metavar="T1,T2",
                    help="task names (shipped, or lm-eval's), task YAML files or dirs; val_perplexity needs --data")
    ev.add_argument("--endpoint", metavar="URL", help="evaluate the served copy at this OpenAI-compatible API "
                    "(http://HOST:PORT/v1; key from LLMFORGE_API_KEY or OPENAI_API_KEY)")
    ev.add_argument("--served-model", metavar="NAME", help="the model name at the endpoint (default: its first)")
    ev.add_argument("--chat", action="store_true", help="with --endpoint: generative tasks through /v1/chat/completions "
                    "(lm-eval's local-chat-completions, the server's chat template)")
    ev.add_argument("--limit", type=float, help="at most this many items per task (below 1: a fraction)")
    ev.add_argument("--num-fewshot", type=int, help="few-shot examples per item (default: each task's own)")
    ev.add_argument("--batch-size", type=int, default=16, help="in-process batch size (default 16)")
    ev.add_argument("--output", metavar="DIR", help="write DIR/results.json (local or s3://)")
    ev.add_argument("--data", metavar="DATASET_DIR", help="a prepared dataset, for the val_perplexity task")
    ev.add_argument("--prompt", action="append", default=[], help="also a sample generation of this prompt (repeatable)")

    cmp = command("compare", "config differences, final metrics and eval scores of MLflow runs, and a plot")
    cmp.add_argument("runs", nargs="+", metavar="RUN_OR_MODEL", help="run IDs, runs:/ID, models:/NAME/VERSION or @ALIAS")
    cmp.add_argument("--output", metavar="DIR", help="write DIR/compare.png and DIR/compare.md (default: a temp dir)")
    cmp.add_argument("--tracking-uri", help="the MLflow store (default: tracking.tracking_uri, else MLFLOW_TRACKING_URI)")

    conf = command("config", "print the resolved configuration")
    conf.add_argument("--config", metavar="FILE", help="YAML config to resolve")
    conf.add_argument("--defaults", action="store_true", help="ignore --config; print every field's default")
    return parser


def run_prepare(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.data.pipeline import prepare

    cfg = load_config(args.config, overrides)
    # The process ends with the pipeline: a local Ray it starts needs no dashboard.
    manifest = prepare(args.input, args.output, cfg, overwrite=args.overwrite, dashboard=False)
    summary = {"event": "prepare_done", "output": args.output, "splits": manifest["splits"],
               "vocab_size": manifest["vocab_size"], "seq_len": manifest["seq_len"]}
    print(json.dumps(summary), flush=True)
    return summary


def run_pretrain(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.samples import SAMPLE_DATASET, prepare_sample
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


def run_finetune(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.train.finetune import finetune

    for flag, key in (("base", "finetune.base"), ("data", "finetune.data"), ("output", "output_dir")):
        if getattr(args, flag):
            overrides[key] = getattr(args, flag)
    if args.merge:
        overrides["finetune.merge"] = True
    if args.method:
        overrides["finetune.method"] = args.method
    summary = finetune(load_config(args.config, overrides))
    disconnect_ray()
    print(json.dumps(summary), flush=True)
    return summary


def run_align(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.train.align import align

    for flag, key in (("method", "align.method"), ("base", "align.base"), ("data", "align.data"), ("output", "output_dir")):
        if getattr(args, flag):
            overrides[key] = getattr(args, flag)
    summary = align(load_config(args.config, overrides))
    disconnect_ray()
    print(json.dumps(summary), flush=True)
    return summary


def run_distill(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.train.distill import distill

    for flag, key in (("teacher", "distill.teacher"), ("output", "output_dir")):
        if getattr(args, flag):
            overrides[key] = getattr(args, flag)
    summary = distill(load_config(args.config, overrides))
    disconnect_ray()
    print(json.dumps(summary), flush=True)
    return summary


def run_recipe(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.recipe import load_recipe, run_recipe as run

    summary = run(load_recipe(args.config, overrides), Path(args.config).read_text(encoding="utf-8"))
    disconnect_ray()
    print(json.dumps(summary), flush=True)
    return summary


def run_serve(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.serve.app import parse_adapters, serve_forever

    for flag, key in (("model", "serve.model"), ("host", "serve.host"), ("port", "serve.port")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.adapter:
        overrides["serve.adapters"] = parse_adapters(args.adapter)
    cfg = load_config(args.config, overrides)
    summary = serve_forever(cfg, api_key_of(args))
    disconnect_ray()
    print(json.dumps(summary), flush=True)
    return summary


def run_quickstart(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.quickstart import run_quickstart as quickstart

    return quickstart(overrides)


def api_key_of(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file or $LLMFORGE_API_KEY; an empty one is an error, not "no key"."""
    from llmforge.serve.app import key_from_env

    if args.api_key is not None:
        log.warning("--api-key puts the key in this process's command line (visible in `ps`) and in the job's "
                    "record on a cluster; prefer LLMFORGE_API_KEY or --api-key-file")
        key, source = args.api_key, "--api-key"
    elif args.api_key_file is not None:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise ConfigError(f"--api-key-file {path} does not exist.", fix="write the key into that file first.")
        key, source = path.read_text(encoding="utf-8"), f"--api-key-file {path}"
    else:
        return key_from_env()
    if not key.strip():
        raise ConfigError(f"The API key from {source} is empty, which would turn authentication off.",
                          fix="give a key (for example `openssl rand -hex 24`), or none to serve on 127.0.0.1 only.")
    return key.strip()


def run_eval(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.evals.job import run_eval as evaluate

    tasks = [t for spec in args.tasks for t in spec.split(",") if t.strip()]
    if not tasks:
        if not args.data:
            from llmforge.evals.harness import shipped_tasks
            raise ConfigError("No --tasks given.", fix=f"pass --tasks, e.g. --tasks {','.join(shipped_tasks())} "
                                                         "(or --data DATASET for val_perplexity alone).")
        tasks = ["val_perplexity"]
    if args.output:
        overrides.setdefault("output_dir", args.output)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit {args.limit} must be positive.", fix="pass a number of items, or a fraction below 1.")
    summary = evaluate(load_config(None, overrides), args.model, tasks, endpoint=args.endpoint,
                       served_model=args.served_model, limit=limit, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size, data=args.data, output=args.output, prompts=args.prompt,
                       chat=args.chat)
    print(json.dumps(summary, ensure_ascii=False), flush=True)
    return summary


def run_compare(args: argparse.Namespace, overrides: dict) -> dict:
    from llmforge.evals.compare import compare

    cfg = load_config(None, overrides)
    summary = compare(args.runs, tracking_uri=args.tracking_uri or cfg.tracking.tracking_uri, output=args.output)
    print(summary.pop("table"), flush=True)
    print(json.dumps(summary, ensure_ascii=False), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args, rest = _parser().parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        if args.command == "quickstart":
            run_quickstart(args, overrides)
        elif args.command == "prepare":
            run_prepare(args, overrides)
        elif args.command == "pretrain":
            run_pretrain(args, overrides)
        elif args.command == "finetune":
            run_finetune(args, overrides)
        elif args.command == "align":
            run_align(args, overrides)
        elif args.command == "distill":
            run_distill(args, overrides)
        elif args.command == "recipe":
            run_recipe(args, overrides)
        elif args.command == "serve":
            run_serve(args, overrides)
        elif args.command == "eval":
            run_eval(args, overrides)
        elif args.command == "compare":
            run_compare(args, overrides)
        elif args.command == "config":
            print(dump_config(load_config(None if args.defaults else args.config, overrides)), end="")
    except LLMForgeError as exc:
        print(f"llmforge {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
