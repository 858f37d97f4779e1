"""`sinkdlm <command>`: each command lives in its own module, imported only when it runs.

A command module exposes `configure(parser)` (its arguments) and `run(args) -> int`; it turns
arguments into settings and calls the library, and only this table imports it.
Expected mistakes raise UserError: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sinkdlm.errors import EXIT_BAD_INPUT, UserError
from sinkdlm.settings import Parser

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sinkdlm.commands.demo", "fetch Shakespeare, train a small sink-token DLM on the CPU, report val loss"),
    "prepare": ("sinkdlm.commands.prepare", "tokenize a corpus into packed token shards + metadata"),
    "train": ("sinkdlm.commands.train", "pretrain a diffusion LM from a YAML config (SMDM recipe)"),
    "config": ("sinkdlm.commands.config", "print every section.key of a config with its type and value"),
    "sft": ("sinkdlm.commands.sft", "supervised fine-tuning (prompt never masked), e.g. on GSM8K"),
    "generate": ("sinkdlm.commands.generate", "sample completions by reverse diffusion"),
    "eval-gsm8k": ("sinkdlm.commands.eval_gsm8k", "GSM8K accuracy by diffusion sampling"),
    "eval": ("sinkdlm.commands.eval", "lm-evaluation-harness tasks with Monte Carlo likelihoods"),
    "data": ("sinkdlm.commands.data", "materialise offline benchmark data (`sinkdlm data benchmarks`)"),
    "analyze": ("sinkdlm.commands.analyze", "attention-sink analysis of a checkpoint: metrics, plots, report"),
    "study": ("sinkdlm.commands.study", "train and compare the paper's variants/ablations at any scale"),
    "convert": ("sinkdlm.commands.convert", "import a Llama/Qwen2 causal LM, LLaDA, Dream, an SMDM .pth or an exported folder"),
    "adapt": ("sinkdlm.commands.adapt", "continue a converted AR model with the diffusion loss"),
    "export": ("sinkdlm.commands.export", "write a self-contained folder to publish a checkpoint"),
}


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The top-level parser, and the parser of `command` (None if it names none). Only that command's
    module is imported to declare its arguments."""
    parser = Parser(prog="sinkdlm",
                    description="Train, sample, evaluate and dissect masked diffusion LMs with a sink token.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    chosen = None
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module, command=name)
        if name == command:
            importlib.import_module(module).configure(p)
            chosen = p
    return parser, chosen


def parse_args(argv: list[str]) -> argparse.Namespace:
    """A command's arguments are parsed intermixed, so `section.key=value` overrides may stand
    before or after options (plain parsing would blame an override before an option on a later one)."""
    parser, chosen = build_parser(argv[0] if argv else None)
    if chosen is None or chosen._subparsers is not None:
        return parser.parse_args(argv)  # no command, help, or a command with its own subcommands
    return chosen.parse_intermixed_args(argv[1:])


def main(argv: list[str] | None = None) -> int:
    """Run the command `argv` names (default: sys.argv[1:]); returns the exit code, also for --help (0)
    and usage errors (2), which argparse reports by exiting."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as done:
        return int(done.code or 0)
    if not args.command:
        build_parser()[0].print_help()
        return 0
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as e:
        print(f"sinkdlm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"sinkdlm {args.command}: interrupted", file=sys.stderr)
        return 130
