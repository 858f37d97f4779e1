"""`sinkdlm <command>`: each command lives in its own module, imported only when it runs.

A command module exposes `configure(parser)` (its arguments) and `run(args) -> int`; it turns
arguments into settings and calls the library, and only this table imports it.
Expected mistakes raise UserError: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sinkdlm.errors import EXIT_BAD_INPUT, UserError
from sinkdlm.fields import Parser

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
    "eval-generation": ("sinkdlm.commands.eval_generation", "quality of sampled text: Gen-PPL under a judge LM, "
                        "entropy, distinct-n, self-BLEU, MAUVE"),
    "eval-length": ("sinkdlm.commands.eval_length", "ELBO, sink attention and value norms at 1x-8x the training "
                    "length (RoPE extrapolation)"),
    "data": ("sinkdlm.commands.data", "materialise offline benchmark data (`sinkdlm data benchmarks`)"),
    "analyze": ("sinkdlm.commands.analyze", "attention-sink analysis of a checkpoint: metrics, plots, report"),
    "probe": ("sinkdlm.commands.probe", "copy accuracy, ELBO per mask ratio and sink attention of runs on a "
              "synthetic copy task"),
    "study": ("sinkdlm.commands.study", "train and compare the paper's variants/ablations at any scale"),
    "convert": ("sinkdlm.commands.convert", "import a Llama/Qwen2 causal LM, LLaDA, Dream, an SMDM .pth or an exported folder"),
    "adapt": ("sinkdlm.commands.adapt", "continue a converted AR model with the diffusion loss"),
    "export": ("sinkdlm.commands.export", "write a self-contained folder to publish a checkpoint"),
    "serve": ("sinkdlm.commands.serve", "an OpenAI-compatible HTTP server (completions, chat, streaming) for a checkpoint"),
}


THREADS_HELP = ("torch CPU threads (default: torch's, one fewer per core that other processes keep busy "
                "(1-minute load average); OMP_NUM_THREADS, where set, is left as it is)")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def default_threads(current: int) -> int:
    """The torch threads to use when --threads is not given: torch's `current`, less the busy cores.

    torch starts one thread per core, and on a shared machine its OpenMP workers spin against the
    other processes' (a small model then trains ~10-25x slower): leave the busy cores free. Said
    nowhere but --help and README, so that a refusal stays one line.
    """
    if os.environ.get("OMP_NUM_THREADS"):  # set by the user or torchrun: theirs to choose
        return current
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(current, cores - round(load)))


def set_threads(requested: int | None) -> None:
    import torch  # only when a command runs: --help stays fast

    threads = requested or default_threads(torch.get_num_threads())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


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
        p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
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
        set_threads(args.threads)
        code = int(importlib.import_module(args._module).run(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe found at exit would print a traceback
        return code
    except BrokenPipeError:  # `sinkdlm config | head`: the reader left; no traceback, nothing more to write
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command whose reader closed the pipe
    except UserError as e:
        print(f"sinkdlm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:  # the trainer's says where the run stands and how to continue it
        print(f"sinkdlm {args.command}: interrupted" + (f" {e}" if str(e) else ""), file=sys.stderr)
        return 130
