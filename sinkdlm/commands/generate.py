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

from sinkdlm import settings
from sinkdlm.errors import UserError
from sinkdlm.jsonl import is_jsonl, read_jsonl
from sinkdlm.sample import DEFAULT_BATCH, SampleConfig, load_for_sampling

FORMATS = ("auto", "text", "jsonl")  # auto: text on a terminal, jsonl into a file or a pipe


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (its latest)")
    parser.add_argument("--prompt", action="append",
                        help="a prompt (repeat for several; default: none, then --input gives them)")
    parser.add_argument("--input", help="prompts: a .jsonl file with a 'prompt' field per line, else one prompt "
                                         "per line (default: none, then --prompt gives them)")
    parser.add_argument("--output", help="write here (default: stdout)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="text: prompt and completion as plain text; jsonl: one JSON object per line; "
                             "auto: text on a terminal, jsonl into a file or a pipe")
    settings.add_arguments(parser, SampleConfig)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help="prompts per forward; a completion does not depend on it")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")


def read_prompts(args: argparse.Namespace) -> list[str]:
    if bool(args.prompt) == bool(args.input):
        raise UserError("give prompts with --prompt TEXT (repeatable) or --input FILE, not both or neither")
    if args.prompt:
        return args.prompt
    path = Path(args.input)
    if not path.is_file():
        raise UserError(f"--input {path} does not exist")
    lines = path.read_text().splitlines()
    if not is_jsonl(path):
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
    from sinkdlm.sample import complete

    cfg = SampleConfig(**settings.values_from(args, SampleConfig))  # checked before loading anything
    texts = read_prompts(args)
    if args.batch_size <= 0:
        raise UserError(f"--batch-size={args.batch_size} must be > 0")
    model, tok, eos = load_for_sampling(args.checkpoint, args.device)
    out = open(args.output, "w") if args.output else sys.stdout
    fmt = output_format(args.format, out)
    progress = len(texts) > args.batch_size or bool(args.output)
    try:
        for number, (text, completion) in enumerate(
                zip(texts, complete(model, tok, eos, texts, cfg, args.batch_size, progress)), start=1):
            out.write(format_sample(fmt, number, text, completion))
            out.flush()
    finally:
        if args.output:
            out.close()
    return 0
