"""`sinkdlm train --config X.yaml [--model 472] [--flops 300] [section.key=value ...]`."""

from __future__ import annotations

import argparse

from sinkdlm.training.recipes import add_recipe_arguments, recipe_config, report_training, shortcuts_of


def configure(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from sinkdlm.training.trainer import train

    report_training(train(recipe_config(args.config, args.overrides, **shortcuts_of(args))))
    return 0
