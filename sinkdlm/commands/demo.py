"""`sinkdlm demo`: the default job, end to end on a laptop CPU (sinkdlm.experiments.demo).

Running it again continues (or just re-reports) the same run; --fresh starts over.
"""

from __future__ import annotations

import argparse

from sinkdlm.experiments.demo import DEMO, ending, run_demo
from sinkdlm.training.recipes import add_overrides_argument, training_summary


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEMO["train"]["out_dir"], help="run folder")
    parser.add_argument("--data", default=DEMO["data"]["path"], help="where the prepared corpus goes")
    parser.add_argument("--steps", type=int, default=DEMO["train"]["max_steps"], help="optimizer steps")
    parser.add_argument("--fresh", action="store_true", help="discard an earlier demo run in --out")
    add_overrides_argument(parser, "any config override, e.g. train.micro_batch=8")


def run(args: argparse.Namespace) -> int:
    result = run_demo(args.out, args.data, args.steps, args.fresh, args.overrides)
    print(training_summary(result))
    print(ending(result["checkpoint"], args.out))
    return 0
