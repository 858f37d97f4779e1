"""`sinkdlm prepare --source CORPUS --out DIR [--tokenizer bpe:N] [--workers N] ...`: tokenize a corpus
into a prepared folder of token shards (sinkdlm.data.prepare; docs/prepare.md)."""

from __future__ import annotations

import argparse

from sinkdlm.data.prepare import (
    DEFAULT_SEED,
    DEFAULT_TOKENIZER,
    DEFAULT_VAL_FRACTION,
    default_workers,
    prepare,
    summary,
)
from sinkdlm.data.shards import DEFAULT_SHARD_TOKENS, PackedData


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("A stopped prepare (Ctrl-C, a kill, a crash) continues from its last filled shard when the "
                     "same command is run again. See docs/prepare.md.")
    parser.add_argument("--source", required=True,
                        help="demo | boolq | a .txt/.md/.jsonl file or a folder of them | hf:NAME[:CONFIG][@SPLIT] | "
                             "synthetic:bigram-backcopy|bigram-induction[:seed=S,length=N,k=K,vocab=V,docs=D] "
                             "(docs/study-mechanism.md)")
    parser.add_argument("--out", required=True, help="folder to write (meta.json, tokenizer.json, token shards)")
    parser.add_argument("--tokenizer", default=None,
                        help="bpe:N (train on the corpus) | gpt2 | tokenizer.json | HF folder | Hub name "
                             f"(default {DEFAULT_TOKENIZER}; a synthetic source: its own symbol tokenizer)")
    parser.add_argument("--text-field", default="text", help="JSONL / HF field holding the text (default text)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help=f"share of documents held out for validation (default {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--val-source", default=None,
                        help="the corpus's own validation split instead of --val-fraction (same forms as "
                             "--source, e.g. hf:cerebras/SlimPajama-627B@validation; default: none)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seeds the train/val split")
    parser.add_argument("--max-docs", type=int, default=None, help="use only the first N documents of --source (default: all)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="stop before the train split would pass N tokens (whole documents; default: no limit)")
    parser.add_argument("--exclude", action="append", default=[], metavar="FIELD=VALUE",
                        help="drop JSON records whose dotted FIELD equals VALUE (repeatable), e.g. "
                             "meta.redpajama_set_name=RedPajamaGithub; default: none)")
    parser.add_argument("--include", action="append", default=[], metavar="FIELD=VALUE",
                        help="keep only JSON records matching one of these (repeatable; default: all records)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="tokenizing processes; 1 = this process (default: the CPU cores, here "
                             f"{default_workers()}); the output does not depend on it")
    parser.add_argument("--overwrite", action="store_true", help="replace a prepared folder at --out (default: off)")


def run(args: argparse.Namespace) -> int:
    out = prepare(args.source, args.out, args.tokenizer, text_field=args.text_field,
                  val_fraction=args.val_fraction, val_source=args.val_source, seed=args.seed,
                  max_docs=args.max_docs, max_tokens=args.max_tokens, shard_tokens=args.shard_tokens,
                  exclude=args.exclude, include=args.include, workers=args.workers, overwrite=args.overwrite)
    print(summary(PackedData(out)))
    return 0
