"""The Config of a training command: a YAML recipe, shortcut flags, then `section.key=value` overrides.

train, adapt, sft and demo all build their Config here and hand it to the one trainer. Fine-tuning
(adapt, sft) takes the architecture from its checkpoint: a model field the recipe or the command
line sets must agree with it, except the runtime fields (ModelConfig.RUNTIME_FIELDS).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, NamedTuple

from sinkdlm.checkpoint import load_config_of, resolve
from sinkdlm.config import Config, load_config, merge
from sinkdlm.errors import UserError


class Shortcut(NamedTuple):
    """A flag that stands for one config key."""

    section: str
    key: str
    help: str
    argparse: dict[str, Any] | None = None  # keywords beyond help, e.g. a type


SHORTCUTS: dict[str, Shortcut] = {
    "model": Shortcut("model", "preset", "model preset: an SMDM size (6 ... 2121, e.g. 472), tiny or demo "
                                        "(default: the recipe's); same as model.preset="),
    "flops": Shortcut("train", "flops", "training budget in 1e18 FLOPs (SMDM), > 0; sets the steps (default: "
                                        "train.max_steps steps); same as train.flops=", {"type": float}),
    "data": Shortcut("data", "path", "prepared data folder (sinkdlm prepare) (default: the recipe's); "
                                     "same as data.path="),
    "out": Shortcut("train", "out_dir", "run folder (default: the recipe's); same as train.out_dir="),
    "resume": Shortcut("train", "resume", "continue the run in the out folder", {"action": "store_true"}),
    "overwrite": Shortcut("train", "overwrite", "replace the run in the out folder", {"action": "store_true"}),
}
LIST_KEYS = "sinkdlm config [--config X.yaml] [section.key=value ...]"
OVERRIDES_HELP = f"override any config field, e.g. train.max_steps=100; every key, its type and default: `{LIST_KEYS}`"
SYNTHETIC_SFT_FILE = "synthetic_gsm8k_train.txt"  # written into the run folder when sft has no --data
SYNTHETIC_SFT_LINES = 2000


def add_overrides_argument(parser: argparse.ArgumentParser, help_: str = OVERRIDES_HELP) -> None:
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=help_)


def add_recipe_arguments(parser: argparse.ArgumentParser, shortcuts: tuple[str, ...] = tuple(SHORTCUTS)) -> None:
    """The arguments every training-like command shares: a YAML recipe, the `shortcuts` and overrides."""
    parser.add_argument("--config", help="YAML recipe (sections model/data/optim/train), e.g. configs/demo.yaml "
                                         "(default: none, the built-in defaults)")
    for name in shortcuts:
        parser.add_argument(f"--{name}", help=SHORTCUTS[name].help, **(SHORTCUTS[name].argparse or {}))
    add_overrides_argument(parser)


def shortcuts_of(args: argparse.Namespace, names: tuple[str, ...] = tuple(SHORTCUTS)) -> dict[str, Any]:
    """The values of the shortcut flags `names`, by name."""
    return {name: getattr(args, name) for name in names}


def recipe_config(recipe: str | Path | None, overrides: list[str], base: Config | None = None,
                  updates: dict[str, dict[str, Any]] | None = None, **shortcuts: Any) -> Config:
    """base, then the YAML recipe, then `updates` and the shortcuts given (not None, not False), then
    the overrides."""
    flops = shortcuts.get("flops")
    if flops is not None and not flops > 0:
        raise UserError(f"--flops {flops:g} should be a positive budget in 1e18 FLOPs, e.g. --flops 300; "
                        f"leave it out to train train.max_steps")
    merged = {section: dict(values) for section, values in (updates or {}).items()}
    for name, value in shortcuts.items():
        if value is not None and value is not False:
            shortcut = SHORTCUTS[name]
            merged.setdefault(shortcut.section, {})[shortcut.key] = value
    cfg = merge(load_config(recipe, base=base), merged, "command line")
    return load_config(None, overrides, base=cfg)


def from_checkpoint(init_from: str | Path, recipe: str | Path | None, overrides: list[str],
                    updates: dict[str, dict[str, Any]] | None = None, **shortcuts: Any) -> Config:
    """A fine-tuning Config: the checkpoint's model, the recipe and command line on top (checked against
    the checkpoint's architecture), and train.init_from set."""
    ckpt = resolve(init_from)
    model = load_config_of(ckpt).model
    cfg = recipe_config(recipe, overrides, Config(model=dataclasses.replace(model)), updates, **shortcuts)
    cfg.model.require_architecture_of(model, str(ckpt))
    cfg.train.init_from = str(ckpt)
    return cfg


def adapt_config(init_from: str | Path, recipe: str | Path | None, overrides: list[str], **shortcuts: Any) -> Config:
    """Continue a converted AR model with the diffusion loss: the ordinary trainer with train.init_from."""
    if shortcuts.get("model"):
        raise UserError("--model does not apply to adapt: the architecture is the --init-from checkpoint's")
    return from_checkpoint(init_from, recipe, overrides, **shortcuts)


def sft_config(init_from: str | Path, recipe: str | Path | None, overrides: list[str], sft_data: str | None = None,
               **shortcuts: Any) -> Config:
    """Supervised fine-tuning: objective=sft on `sft_data`, else on a synthetic GSM8K-format set written
    into the run folder (real GSM8K train data cannot be fetched offline)."""
    updates = {"train": {"objective": "sft"}, "data": {"sft_path": sft_data} if sft_data else {}}
    cfg = from_checkpoint(init_from, recipe, overrides, updates, **shortcuts)
    if not cfg.data.sft_path:
        cfg.data.sft_path = str(write_synthetic_sft_data(Path(cfg.train.out_dir), cfg.train.seed))
    return cfg


def write_synthetic_sft_data(run_dir: Path, seed: int) -> Path:
    from sinkdlm.data.sft import write_synthetic_gsm8k

    path = write_synthetic_gsm8k(run_dir / SYNTHETIC_SFT_FILE, SYNTHETIC_SFT_LINES, seed)
    print(f"*** no --data given: training on {SYNTHETIC_SFT_LINES} SYNTHETIC arithmetic problems in GSM8K "
          f"format ({path}), NOT on GSM8K. Pass --data train.txt for real SFT. ***", file=sys.stderr)
    return path


def report_training(result: dict[str, Any]) -> None:
    """Print `training_summary` once: on global rank 0 when several processes trained together."""
    if result.get("rank", 0) == 0:
        print(training_summary(result))


def training_summary(result: dict[str, Any]) -> str:
    """What every training command ends with: where the checkpoint is and its held-out ELBO."""
    return (f"\ncheckpoint: {Path(result['checkpoint']).resolve()}\n"
            f"validation ELBO: {result['val_loss']:.4f} nats/token (an upper bound on the NLL)")
