"""`sinkdlm generate --checkpoint DIR (--prompt TEXT ... | --input FILE) [--output out.jsonl] [options]`.

Prompts come from the command line or a file (.jsonl with a "prompt" field per line, else one prompt
per line); completions go to stdout or --output. `--format text` prints each prompt and its completion
as plain text (the default on a terminal); `--format jsonl` writes one {"prompt", "completion"} object
per line (the default for a file or a pipe).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from sinkdlm.errors import UserError
from sinkdlm.jsonl import read_jsonl
from sinkdlm.sample import SampleConfig

DEFAULT_BATCH = 8
FORMATS = ("auto", "text", "jsonl")  # auto: text on a terminal, jsonl into a file or a pipe


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """Decoding options shared by generate and eval-gsm8k (defaults: SampleConfig's)."""
    d = SampleConfig()
    parser.add_argument("--gen-length", type=int, default=d.gen_length, help="new tokens per prompt")
    parser.add_argument("--steps", type=int, default=d.steps, help="denoising steps (a multiple of the block count)")
    parser.add_argument("--block-length", type=int, help="semi-autoregressive block length (default: one block)")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="Gumbel temperature; 0 = argmax")
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--remasking", default=d.remasking, help="low_confidence | random | margin | entropy")
    parser.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="unsupervised CFG weight w")
    parser.add_argument("--threshold", type=float, help="confidence-threshold parallel decoding (Fast-dLLM)")
    parser.add_argument("--eos", default=d.eos, help="stop: cut at the first EOS | fill: EOS after it")
    parser.add_argument("--min-length", type=int, default=d.min_length, help="no EOS in the first N tokens")
    parser.add_argument("--suppress-eos-steps", type=int, default=d.suppress_eos_steps)
    parser.add_argument("--batch-ranking", default=d.batch_ranking,
                        help="per_sequence | flattened_batch (SMDM GSM8K script compatibility)")
    parser.add_argument("--cache", default=d.cache, help="none | prefix | dual (approximate KV cache)")
    parser.add_argument("--padding", default=d.padding, help="right | left")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="prompts per forward")
    parser.add_argument("--device", default="cpu")


def sample_config(args: argparse.Namespace, **changes) -> SampleConfig:
    return SampleConfig(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, remasking=args.remasking,
        cfg_scale=args.cfg_scale, threshold=args.threshold, eos=args.eos, min_length=args.min_length,
        suppress_eos_steps=args.suppress_eos_steps, batch_ranking=args.batch_ranking, cache=args.cache,
        padding=args.padding, seed=args.seed, **changes)


def load_for_sampling(checkpoint: str, device: str):
    """(model, tokenizer, eos id) of a checkpoint; UserError when its tokenizer has no EOS."""
    from sinkdlm.checkpoint import load_meta, load_model, load_tokenizer
    from sinkdlm.data.tokenizer import eos_id as find_eos

    model, _ = load_model(checkpoint, device)
    tok = load_tokenizer(checkpoint)
    eos = load_meta(checkpoint).get("eos_id")
    return model, tok, int(eos) if eos is not None else find_eos(tok)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (its latest)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    parser.add_argument("--input", help="prompts: .jsonl with a 'prompt' field, else one per line")
    parser.add_argument("--output", help="write here instead of stdout")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="text: prompt and completion as plain text; jsonl: one JSON object per line; "
                             "auto: text on a terminal, jsonl into a file or a pipe (default: %(default)s)")
    add_sample_arguments(parser)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if bool(args.prompt) == bool(args.input):
        raise UserError("give prompts with --prompt TEXT (repeatable) or --input FILE, not both or neither")
    if args.prompt:
        return args.prompt
    path = Path(args.input)
    if not path.is_file():
        raise UserError(f"--input {path} does not exist")
    lines = path.read_text().splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    return [row["prompt"] for _, row in read_jsonl(path, ["prompt"])]


def output_format(requested: str, stream) -> str:
    """The format to write: `auto` is text for a person at a terminal, JSONL for a file or a program."""
    if requested != "auto":
        return requested
    return "text" if stream.isatty() else "jsonl"


def format_sample(fmt: str, number: int, prompt: str, completion: str) -> str:
    """One prompt and its completion; text keeps newlines real and marks where the model's part starts."""
    if fmt == "jsonl":
        return json.dumps({"prompt": prompt, "completion": completion}) + "\n"
    return f"--- prompt {number} ---\n{prompt}\n--- completion {number} ---\n{completion}\n\n"


def run(args: argparse.Namespace) -> int:
    from sinkdlm.sample import generate

    cfg = sample_config(args)  # validate options before loading anything
    texts = read_prompts(args)
    if args.batch_size <= 0:
        raise UserError(f"--batch-size={args.batch_size} must be > 0")
    model, tok, eos = load_for_sampling(args.checkpoint, args.device)
    out = open(args.output, "w") if args.output else sys.stdout
    fmt = output_format(args.format, out)
    try:
        for lo in tqdm(range(0, len(texts), args.batch_size), desc="generate", unit="batch",
                       disable=len(texts) <= args.batch_size and not args.output):
            chunk = texts[lo: lo + args.batch_size]
            ids = [tok.encode(t).ids for t in chunk]
            completions = generate(model, ids, cfg, model.mask_id, eos, indices=range(lo, lo + len(ids)))
            for number, (text, tokens) in enumerate(zip(chunk, completions), start=lo + 1):
                out.write(format_sample(fmt, number, text, tok.decode(tokens, skip_special_tokens=True)))
            out.flush()
    finally:
        if args.output:
            out.close()
    return 0
