"""`sinkdlm generate --checkpoint DIR (--prompt TEXT ... | --input FILE) [--output out.jsonl] [options]`.

Prompts come from the command line or a UTF-8 file (.jsonl with a "prompt" field per line, else one
prompt per line); every prompt is checked before any is generated. Completions go to stdout or
--output, a file written under a temporary name and renamed when complete (an existing one is
replaced only with --overwrite), so an interrupted run leaves no half file. `--format text` prints
each prompt and its completion as plain text (the default on a terminal); `--format jsonl` writes one
{"prompt", "completion"} object per line (the default for a file or a pipe).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from sinkdlm import fields
from sinkdlm.errors import UserError
from sinkdlm.files import atomic_open
from sinkdlm.jsonl import is_jsonl, read_jsonl, read_text
from sinkdlm.sample import DEFAULT_BATCH, SampleConfig, load_for_sampling

FORMATS = ("auto", "text", "jsonl")  # auto: text on a terminal, jsonl into a file or a pipe


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (its latest)")
    parser.add_argument("--prompt", action="append",
                        help="a prompt (repeat for several; default: none, then --input gives them)")
    parser.add_argument("--input", help="prompts: a .jsonl file with a 'prompt' field per line, else one prompt "
                                         "per line (default: none, then --prompt gives them)")
    parser.add_argument("--output", help="write here (default: stdout)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="text: prompt and completion as plain text; jsonl: one JSON object per line; "
                             "auto: text on a terminal, jsonl into a file or a pipe")
    fields.add_arguments(parser, SampleConfig)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help="prompts per forward; a completion does not depend on it")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompt or --input, in order."""
    return [text for text, _ in labelled_prompts(args)]


def labelled_prompts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(prompt, how an error names it): its number in the output, and for a file its line."""
    if bool(args.prompt) == bool(args.input):
        raise UserError("give prompts with --prompt TEXT (repeatable) or --input FILE, not both or neither")
    if args.prompt:
        return [(text, f"prompt {n}") for n, text in enumerate(args.prompt, start=1)]
    path = Path(args.input)
    if not path.is_file():
        raise UserError(f"--input {path} does not exist")
    if is_jsonl(path):
        rows = [(line, row["prompt"]) for line, row in read_jsonl(path, ["prompt"])]
    else:
        rows = [(line, text) for line, text in enumerate(read_text(path).splitlines(), start=1) if text.strip()]
    return [(text, f"prompt {n} ({path}:{line})") for n, (line, text) in enumerate(rows, start=1)]


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an --output that cannot be written, or would replace a file without --overwrite."""
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; pass a file name, e.g. {path / 'completions.jsonl'}")
    if path.exists() and not overwrite:
        raise UserError(f"--output {path} already exists; pass --overwrite to replace it or choose another file")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"--output {path}: folder {folder} does not exist; create it or choose another file")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--output {path}: folder {folder} is not writable; choose another file")


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

    cfg = SampleConfig(**fields.values_from(args, SampleConfig))  # checked before loading anything
    if args.batch_size <= 0:
        raise UserError(f"--batch-size={args.batch_size} must be > 0")
    prompts = labelled_prompts(args)
    texts, labels = [text for text, _ in prompts], [label for _, label in prompts]
    if args.output:
        check_output(Path(args.output), args.overwrite)
    model, tok, eos = load_for_sampling(args.checkpoint, args.device)
    progress = len(texts) > args.batch_size or bool(args.output)
    completions = complete(model, tok, eos, texts, cfg, args.batch_size, progress, labels)  # checks every prompt
    with atomic_open(args.output) if args.output else contextlib.nullcontext(sys.stdout) as out:
        fmt = output_format(args.format, out)
        for number, (text, completion) in enumerate(zip(texts, completions), start=1):
            out.write(format_sample(fmt, number, text, completion))
            out.flush()
    return 0
