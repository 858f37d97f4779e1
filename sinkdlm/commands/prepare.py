"""`sinkdlm prepare --source CORPUS --out DIR [--tokenizer bpe:N]`: tokenize a corpus into a prepared
folder (sinkdlm.data.prepare)."""

from __future__ import annotations

import argparse

from sinkdlm.data.prepare import DEFAULT_SEED, DEFAULT_TOKENIZER, DEFAULT_VAL_FRACTION, prepare, summary
from sinkdlm.data.shards import PackedData


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="demo | a .txt/.md/.jsonl file or a folder of them | hf:NAME[:CONFIG]")
    parser.add_argument("--out", required=True, help="folder to write (meta.json, tokenizer.json, *.bin)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="bpe:N (train on the corpus) | gpt2 | tokenizer.json | HF folder | Hub name")
    parser.add_argument("--text-field", default="text", help="JSONL / HF field holding the text")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="share of documents held out for validation")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seeds the train/val split")
    parser.add_argument("--max-docs", type=int, default=None,
                        help="use only the first N documents (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace a prepared folder at --out")


def run(args: argparse.Namespace) -> int:
    out = prepare(args.source, args.out, args.tokenizer, text_field=args.text_field,
                  val_fraction=args.val_fraction, seed=args.seed, max_docs=args.max_docs,
                  overwrite=args.overwrite)
    print(summary(PackedData(out)))
    return 0
