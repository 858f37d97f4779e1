"""`sinkdlm train --config X.yaml [--model 472] [--flops 300] [section.key=value ...]`."""

from __future__ import annotations

import argparse

from sinkdlm.recipes import add_recipe_arguments, recipe_config, shortcuts_of, training_summary


def configure(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from sinkdlm.train import train

    print(training_summary(train(recipe_config(args.config, args.overrides, **shortcuts_of(args)))))
    return 0
