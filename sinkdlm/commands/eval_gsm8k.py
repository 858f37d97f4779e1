"""`sinkdlm eval-gsm8k --checkpoint DIR [--preset paper|demo|synthetic] [--data test.jsonl|synthetic] [--limit N] [--out DIR]`.

Writes <out>/gsm8k_samples.jsonl (prompt, output, gold, and per metric the extracted answer and
whether it is correct) and <out>/gsm8k_summary.json (strict-match and flexible-extract accuracy with
standard errors, the preset's headline metric, settings). Each data set has its own default folder
inside the checkpoint folder (gsm8k/, gsm8k-synthetic/, gsm8k-<file name>/), and an earlier result is
replaced only with --overwrite. `--preset paper` is the paper's decoding (length 256 counting the
prompt, 256 steps, temperature 0.1, guidance 0.1, two stages) with strict-match as headline; sampling
options given explicitly override the stage-1 settings of the preset. `--data synthetic` scores the
held-out problems of the synthetic arithmetic SFT set (NOT GSM8K; sinkdlm.data.sft), by default with the
`synthetic` preset (threshold + KV cache; `--exact` for the reference decoding): a check that SFT,
the template and decoding work, offline. Before decoding it says how many problems and batches it
will run and what full decoding costs.
"""

from __future__ import annotations

import argparse
import dataclasses

from sinkdlm import fields
from sinkdlm.eval.gsm8k import DEFAULT_PRESET, GSM8K_PRESETS, SYNTHETIC, GSM8KConfig, exact, preset_for
from sinkdlm.sample import DEFAULT_BATCH, SampleConfig

# SampleConfig fields whose options override the preset's stage 1
SAMPLE_FIELDS = ("gen_length", "steps", "block_length", "temperature", "remasking", "guidance", "threshold",
                 "threshold_factor", "cache", "cache_refresh_tokens", "batch_ranking", "seed")
RIVAL_RULES = ("threshold", "threshold_factor")  # one replaces the preset's other


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="SFT checkpoint (sinkdlm sft) or its run folder")
    parser.add_argument("--preset", choices=list(GSM8K_PRESETS),
                        help=f"decoding settings: paper (SMDM's evaluate_gsm8k.py), demo (CPU smoke runs) or "
                             f"synthetic (fast, for the synthetic set) (default: {SYNTHETIC} for --data "
                             f"{SYNTHETIC}, else {DEFAULT_PRESET})")
    parser.add_argument("--data", help=f"JSONL with question/answer, or '{SYNTHETIC}' (the 198 held-out problems of "
                                       "the synthetic arithmetic SFT set, NOT GSM8K) (default: the GSM8K test set, "
                                       "fetched once)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N problems (default: all)")
    parser.add_argument("--out", help="output folder (default: inside the checkpoint folder, gsm8k/ for the GSM8K "
                                      "test, gsm8k-synthetic/ for --data synthetic, gsm8k-<file name>/ for a JSONL)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier result in the output folder")
    parser.add_argument("--one-stage", action="store_true", help="skip the second stage")
    parser.add_argument("--exact", action="store_true",
                        help="decode without the preset's confidence threshold and KV cache, in both stages "
                             "(slower: the reference the fast settings were measured against)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help="problems per forward; a problem's output does not depend on it")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    fields.add_arguments(parser, SampleConfig, SAMPLE_FIELDS, overrides_preset=True)


def settings_from(args: argparse.Namespace) -> GSM8KConfig:
    preset = GSM8K_PRESETS[preset_for(args.data, args.preset)]
    preset = exact(preset) if args.exact else preset
    given = fields.values_from(args, SAMPLE_FIELDS, given_only=True)
    for rule, rival in (RIVAL_RULES, RIVAL_RULES[::-1]):
        if rule in given:
            given.setdefault(rival, None)
    first = dataclasses.replace(preset.first, **given)
    return dataclasses.replace(preset, first=first, second=None if args.one_stage else preset.second)


def run(args: argparse.Namespace) -> int:
    from sinkdlm.eval.gsm8k import SAMPLES, evaluate_gsm8k, summary_line

    name = preset_for(args.data, args.preset) + (" (exact)" if args.exact else "")
    out, summary = evaluate_gsm8k(args.checkpoint, settings_from(args), args.data, args.limit, args.out,
                                       args.overwrite, args.batch_size, args.device, not args.no_progress, name)
    data = "synthetic (NOT GSM8K)" if args.data == SYNTHETIC else "GSM8K"
    print(f"{summary_line(summary, data)}; samples: {out / SAMPLES}")
    return 0
