"""`sinkdlm config [--config X.yaml] [--model 472] [section.key=value ...]`: every key a recipe may set.

Prints each `section.key` with its type (a number's with its allowed range), its value and its help: the
defaults, or what the given recipe, shortcuts and overrides resolve to (exactly what `sinkdlm train` with
the same arguments would train).
"""

from __future__ import annotations

import argparse

from sinkdlm.config import describe_keys
from sinkdlm.training.recipes import add_recipe_arguments, recipe_config, shortcuts_of


def configure(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    print("\n".join(describe_keys(recipe_config(args.config, args.overrides, **shortcuts_of(args)))))
    return 0
