"""`sinkdlm export --checkpoint DIR --out FOLDER`: a folder transformers loads (sinkdlm.interop.export)."""

from __future__ import annotations

import argparse

from sinkdlm.checkpoint import resolve
from sinkdlm.interop.export import export


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    parser.add_argument("--llama", action="store_true",
                        help="the plain variant's weights as LlamaForCausalLM (whose attention is causal: "
                             "see the card) instead of sinkdlm's code for transformers")


def run(args: argparse.Namespace) -> int:
    out = export(args.checkpoint, args.out, args.overwrite, args.llama)
    loader = "LlamaForCausalLM.from_pretrained(...) (causal attention)" if args.llama else \
        "AutoModel.from_pretrained(..., trust_remote_code=True)"
    print(f"exported {resolve(args.checkpoint)} -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))}); "
          f"transformers loads it with {loader}")
    return 0
