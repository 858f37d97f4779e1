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
import dataclasses

from sinkdlm.checkpoint import load_config_of, resolve
from sinkdlm.commands.train import add_config_arguments, config_from_args, print_result
from sinkdlm.config import Config, ModelConfig
from sinkdlm.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init-from", required=True,
                        help="converted checkpoint (sinkdlm convert --out), or a run folder (its latest)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from sinkdlm.train import train

    result = train(adapt_config(args))
    print_result(result)
    return 0


def adapt_config(args: argparse.Namespace) -> Config:
    """The recipe and overrides on top of the checkpoint's model config, with train.init_from set."""
    if args.model:
        raise UserError("--model does not apply to adapt: the architecture is the --init-from checkpoint's")
    ckpt = resolve(args.init_from)
    model = load_config_of(ckpt).model
    cfg = config_from_args(args, base=Config(model=dataclasses.replace(model)))
    check_same_model(cfg.model, model, str(ckpt))
    cfg.train.init_from = str(ckpt)
    return cfg


def check_same_model(wanted: ModelConfig, have: ModelConfig, where: str) -> None:
    """Only ModelConfig.RUNTIME_FIELDS may differ from the checkpoint: they change no weights."""
    differing = wanted.differences(have, ModelConfig.RUNTIME_FIELDS)
    if differing:
        key = differing[0]
        raise UserError(f"model.{key}={getattr(wanted, key)!r} but the checkpoint {where} has "
                        f"{getattr(have, key)!r}; the architecture comes from the checkpoint: drop the key, "
                        f"or convert again (e.g. --sink-tokens); only {sorted(ModelConfig.RUNTIME_FIELDS)} "
                        f"may differ")
