"""`sinkdlm adapt --init-from CKPT --config configs/adapt_*.yaml [--data DIR] [section.key=value ...]`.

Continue a converted AR model (`sinkdlm convert`) with the diffusion loss: the ordinary trainer with
train.init_from. The architecture is the checkpoint's, so the recipe need not repeat it; a model
field the recipe (or command line) does set must agree with the checkpoint, which catches a recipe
meant for another model or a checkpoint converted without the intended sink. The runtime fields
(ModelConfig.RUNTIME_FIELDS: attn_impl, logit_shift, causal) change no weights: they may be set, and
the run saves them.
"""

from __future__ import annotations

import argparse

from sinkdlm.training.recipes import adapt_config, add_recipe_arguments, report_training, shortcuts_of


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init-from", required=True,
                        help="converted checkpoint (sinkdlm convert --out), or a run folder (its latest)")
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from sinkdlm.training.trainer import train

    cfg = adapt_config(args.init_from, args.config, args.overrides, **shortcuts_of(args))
    report_training(train(cfg))
    return 0
