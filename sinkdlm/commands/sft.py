"""`sinkdlm sft --config configs/sft_demo.yaml --init-from CKPT [--data train.txt|x.jsonl] [section.key=value ...]`.

Supervised fine-tuning is the ordinary trainer with train.objective=sft, train.init_from and
data.sft_path (sinkdlm.data.sft). The architecture is the checkpoint's. Without a data file the run trains
on a SYNTHETIC arithmetic set in GSM8K's train.txt format, written into the run folder: real GSM8K
train data cannot be fetched offline, so give `--data` for a real run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkdlm.training.recipes import SYNTHETIC_SFT_FILE, add_recipe_arguments, report_training, sft_config, shortcuts_of

SHORTCUTS = ("out", "resume", "overwrite")  # --data is the SFT data here, not a prepared corpus


def configure(parser: argparse.ArgumentParser) -> None:
    from sinkdlm.data.sft import template_help

    parser.epilog = template_help("runs/demo-sft")
    parser.add_argument("--init-from", required=True, help="pretrained checkpoint, or a run folder (its latest)")
    parser.add_argument("--data", help="SFT data: JSONL {prompt, response} or SMDM's GSM8K train.txt "
                                       "(default: a synthetic GSM8K-format set, NOT GSM8K)")
    add_recipe_arguments(parser, SHORTCUTS)


def run(args: argparse.Namespace) -> int:
    from sinkdlm.data.sft import next_steps
    from sinkdlm.training.trainer import train

    cfg = sft_config(args.init_from, args.config, args.overrides, args.data,
                     **shortcuts_of(args, SHORTCUTS))
    result = train(cfg)
    report_training(result)
    if result.get("rank", 0) == 0:
        run = cfg.train.out_dir
        print(next_steps(run, Path(cfg.data.sft_path) == Path(run) / SYNTHETIC_SFT_FILE, cfg.data.sft_path))
    return 0
