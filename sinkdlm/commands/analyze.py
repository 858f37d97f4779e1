"""`sinkdlm analyze --checkpoint DIR [--text FILE | --prompt ...] --out REPORT_DIR`: sink analysis.

Records a denoising trajectory (or fixed text at masking levels), measures attention sinks per
step, layer and head, runs the interventions, and writes metrics.json, PNG figures and report.md.
With --checkpoint-steps, DIR is a run or study folder and its checkpoints are analysed over training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkdlm import fields
from sinkdlm.analysis import AnalysisConfig
from sinkdlm.errors import UserError
from sinkdlm.jsonl import read_text

# AnalysisConfig fields that are options (the rest keep their defaults)
OPTIONS = ("mode", "levels", "steps", "gen_length", "temperature", "eps", "std_k", "rule", "layers", "map_steps",
           "top_k", "interventions", "nulls", "elbo_samples", "max_windows", "seed", "device", "dtype")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)")
    parser.add_argument("--checkpoint-steps", default=None,
                        help="sinks over training: `all` or steps (e.g. 200,400) of the run folder, or of every "
                             "run of the study folder, given as --checkpoint (no interventions; "
                             "default: none, analyse the one checkpoint)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="UTF-8 text file to analyse (default: the run's validation data)")
    source.add_argument("--prompt", action="append",
                        help="a prompt to generate from (repeatable; default: cut from the validation data)")
    parser.add_argument("--out", required=True, help="report folder (metrics.json, PNGs, report.md)")
    fields.add_arguments(parser, AnalysisConfig, OPTIONS)


def run(args: argparse.Namespace) -> int:
    from sinkdlm.analysis import run_analysis
    from sinkdlm.analysis.report import summary_lines, write_report

    texts = None
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise UserError(f"--text {path} does not exist; pass a UTF-8 text file")
        texts = [read_text(path)]
    check_out(Path(args.out))
    chosen = AnalysisConfig(**fields.values_from(args, OPTIONS))
    if args.checkpoint_steps is not None:
        return _over_training(args, texts, chosen)
    metrics, trajectory = run_analysis(args.checkpoint, texts=texts, prompts=args.prompt, settings=chosen)
    report = write_report(args.out, metrics, trajectory)
    print("\n".join(summary_lines(metrics, report)))
    return 0


def check_out(out: Path) -> None:
    """Refuse a report folder that could not be created, before any time is spent analysing."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder; pass a folder for the report "
                        f"(created if missing)")


def _over_training(args: argparse.Namespace, texts: list[str] | None, chosen: AnalysisConfig) -> int:
    from sinkdlm.analysis.training import FIGURE_FILE, TABLE_FILE, analyze_over_training, parse_steps

    steps = parse_steps(args.checkpoint_steps)
    rows = analyze_over_training(args.checkpoint, args.out, steps, chosen, texts, args.prompt)
    print(f"sinks over training: {len(rows)} checkpoints of {len({r['run'] for r in rows})} run(s); "
          f"{Path(args.out) / TABLE_FILE}, {Path(args.out) / FIGURE_FILE}")
    return 0
