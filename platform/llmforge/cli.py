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


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args, rest = _parser().parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        if args.command == "prepare":
            run_prepare(args, overrides)
        elif args.command == "config":
            print(dump_config(load_config(None if args.defaults else args.config, overrides)), end="")
    except LLMForgeError as exc:
        print(f"llmforge {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
