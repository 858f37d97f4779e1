"""`sinkdlm train --config X.yaml [--model 472] [--flops 300] [section.key=value ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkdlm.config import Config, load_config, merge
from sinkdlm.errors import UserError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every training-like command shares: a YAML recipe plus overrides."""
    parser.add_argument("--config", help="YAML recipe (sections model/data/optim/train), e.g. configs/demo.yaml")
    parser.add_argument("--model", help="model preset: an SMDM size (6 ... 2121, e.g. 472), tiny or demo")
    parser.add_argument("--flops", type=float, help="training budget in 1e18 FLOPs (SMDM), > 0; sets the steps")
    parser.add_argument("--data", help="prepared data folder (sinkdlm prepare); same as data.path=")
    parser.add_argument("--out", help="run folder; same as train.out_dir=")
    parser.add_argument("--resume", action="store_true", help="continue the run in the out folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in the out folder")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override any config field, e.g. train.max_steps=100 model.sink_tokens=1")


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    shortcuts: dict[str, dict] = {"model": {}, "data": {}, "train": {}}
    if args.model:
        shortcuts["model"]["preset"] = args.model
    if args.flops is not None:
        if not args.flops > 0:
            raise UserError(f"--flops {args.flops:g} should be a positive budget in 1e18 FLOPs, e.g. --flops 300; "
                            f"leave it out to train train.max_steps")
        shortcuts["train"]["flops"] = args.flops
    if args.data:
        shortcuts["data"]["path"] = args.data
    if args.out:
        shortcuts["train"]["out_dir"] = args.out
    if args.resume:
        shortcuts["train"]["resume"] = True
    if args.overwrite:
        shortcuts["train"]["overwrite"] = True
    cfg = load_config(args.config, base=base)
    cfg = merge(cfg, shortcuts, "command line")
    return load_config(None, args.overrides, base=cfg)


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from sinkdlm.train import train

    result = train(config_from_args(args))
    print_result(result)
    return 0


def print_result(result: dict) -> None:
    """What every training command ends with: where the checkpoint is and its held-out ELBO."""
    print(f"\ncheckpoint: {Path(result['checkpoint']).resolve()}")
    print(f"validation ELBO: {result['val_loss']:.4f} nats/token (an upper bound on the NLL)")
