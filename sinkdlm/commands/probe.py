"""`sinkdlm probe RUN [RUN ...] [--level 0.15]`: copy accuracy, ELBO per mask-ratio bin and where attention
goes (Gu rate by key type, sink and [MASK] shares, the copy head) for every checkpoint of runs trained
on a synthetic corpus (sinkdlm.eval.probes; docs/study-mechanism.md). Results are cached in each run's
probes.json, so a second call probes only new checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkdlm.errors import UserError
from sinkdlm.eval.probes import DEFAULT_WINDOWS, MASK_LEVELS, markdown_table, probe_run


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders written by sinkdlm train on a synthetic corpus")
    parser.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                        help=f"validation windows probed (default {DEFAULT_WINDOWS})")
    parser.add_argument("--level", type=float, default=MASK_LEVELS[0],
                        help=f"mask level of the printed table, one of {list(MASK_LEVELS)} (default {MASK_LEVELS[0]}); "
                             f"probes.json holds both")
    parser.add_argument("--seed", type=int, default=0, help="seeds the probe masks (default 0)")


def run(args: argparse.Namespace) -> int:
    if args.level not in MASK_LEVELS:
        raise UserError(f"--level {args.level} is not a probed mask level; choose one of {list(MASK_LEVELS)}")
    if args.windows < 1:
        raise UserError(f"--windows {args.windows} should be >= 1")
    runs = {Path(r).name: probe_run(r, args.windows, MASK_LEVELS, args.seed) for r in args.runs}
    print(markdown_table(runs, args.level))
    return 0
