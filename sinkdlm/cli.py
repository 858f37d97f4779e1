"""`sinkdlm <command>`: each command lives in its own module, imported only when it runs.

A command module exposes `configure(parser)` (its arguments) and `run(args) -> int`.
Expected mistakes raise UserError: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sinkdlm.errors import EXIT_BAD_INPUT, UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sinkdlm.commands.demo", "fetch Shakespeare, train a small sink-token DLM on the CPU, report val loss"),
    "prepare": ("sinkdlm.data.prepare", "tokenize a corpus into packed token shards + metadata"),
    "train": ("sinkdlm.commands.train", "pretrain a diffusion LM from a YAML config (SMDM recipe)"),
    "sft": ("sinkdlm.commands.sft", "supervised fine-tuning (prompt never masked), e.g. on GSM8K"),
    "generate": ("sinkdlm.commands.generate", "sample completions by reverse diffusion"),
    "eval-gsm8k": ("sinkdlm.commands.eval_gsm8k", "GSM8K accuracy by diffusion sampling"),
    "eval": ("sinkdlm.commands.eval", "lm-evaluation-harness tasks with Monte Carlo likelihoods"),
    "data": ("sinkdlm.commands.data", "materialise offline benchmark data (`sinkdlm data benchmarks`)"),
    "analyze": ("sinkdlm.commands.analyze", "attention-sink analysis of a checkpoint: metrics, plots, report"),
    "study": ("sinkdlm.commands.study", "train and compare the paper's variants/ablations at any scale"),
    "convert": ("sinkdlm.commands.convert", "import a Llama/Qwen2-family causal LM as a DLM checkpoint"),
    "adapt": ("sinkdlm.commands.adapt", "continue a converted AR model with the diffusion loss"),
    "export": ("sinkdlm.commands.export", "write a self-contained folder to publish a checkpoint"),
}


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The top-level parser, and the parser of the command named in sys.argv (None if none is)."""
    parser = argparse.ArgumentParser(
        prog="sinkdlm",
        description="Train, sample, evaluate and dissect masked diffusion LMs with a sink token.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    chosen = None
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module, command=name)
        # arguments are declared by the module, imported lazily only for the chosen command
        if len(sys.argv) > 1 and sys.argv[1] == name:
            importlib.import_module(module).configure(p)
            chosen = p
    return parser, chosen


def parse_args(argv: list[str]) -> argparse.Namespace:
    """A command's arguments are parsed intermixed, so `section.key=value` overrides may stand
    before or after options (plain parsing would blame an override before an option on a later one)."""
    parser, chosen = build_parser()
    if chosen is None or any(isinstance(a, argparse._SubParsersAction) for a in chosen._actions):
        return parser.parse_args(argv)  # no command, help, or a command with its own subcommands
    return chosen.parse_intermixed_args(argv[1:])


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = parse_args(sys.argv[1:])
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
