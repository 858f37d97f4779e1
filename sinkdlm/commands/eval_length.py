"""`sinkdlm eval-length --checkpoint A [--checkpoint B ...] [--labels a,b] --out DIR [--multiples 1,2,4,8]`.

Length generalisation (RoPE extrapolation): each checkpoint read at multiples of its training length,
on windows of its own validation split: the ELBO (Monte Carlo, as `sinkdlm eval`) with a 95% interval
over windows, the attention mass on the sink and the sink's value-norm ratio (as the training run's
sink monitor). Writes <out>/length.json (continued after a stop), length.md and length.png
(sinkdlm.experiments.length).
"""

from __future__ import annotations

import argparse

from sinkdlm import fields
from sinkdlm.experiments.length import LengthConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="checkpoint folder or run folder (its latest); repeat to compare models")
    parser.add_argument("--labels", type=fields.comma_list(str), metavar="A,B,...",
                        help="a name per --checkpoint for the table and figure (default: the folder names)")
    parser.add_argument("--out", required=True, help="output folder (length.json, length.md, length.png)")
    parser.add_argument("--overwrite", action="store_true", help="start again in an --out measured with other settings")
    fields.add_arguments(parser, LengthConfig)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sinkdlm.experiments.length import TABLE_FILE, study

    settings = LengthConfig(**fields.values_from(args, LengthConfig))
    labels = args.labels or [Path(c).resolve().name for c in args.checkpoint]
    study(args.checkpoint, labels, settings, args.out, args.overwrite)
    print(f"table: {Path(args.out) / TABLE_FILE}")
    return 0
