"""`sinkdlm analyze --checkpoint DIR [--text FILE | --prompt ...] --out REPORT_DIR`: sink analysis.

Records a denoising trajectory (or fixed text at masking levels), measures attention sinks per
step, layer and head, runs the interventions, and writes metrics.json, PNG figures and report.md.
With --checkpoint-steps, DIR is a run or study folder and its checkpoints are analysed over training.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from sinkdlm import checkpoint as ckpt
from sinkdlm import fields
from sinkdlm.analysis import AnalysisConfig
from sinkdlm.analysis.explorer import ExplorerConfig
from sinkdlm.errors import UserError
from sinkdlm.jsonl import read_text

# AnalysisConfig fields that are no options (they keep their defaults); every other field is one
NOT_OPTIONS = ("prompt_tokens", "max_prompts", "progress")
OPTIONS = tuple(f.name for f in dataclasses.fields(AnalysisConfig) if f.name not in NOT_OPTIONS)


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
    parser.add_argument("--compare", default=None,
                        help="a second checkpoint (or run folder) recorded with the same settings and prompts "
                             "and shown beside the first in explorer.html, e.g. the plain model beside the "
                             "sink model (no interventions or report of its own; default: none)")
    fields.add_arguments(parser, AnalysisConfig, OPTIONS)
    fields.add_arguments(parser, ExplorerConfig)


def run(args: argparse.Namespace) -> int:
    from sinkdlm.analysis import run_analysis
    from sinkdlm.analysis.explorer import write_explorer
    from sinkdlm.analysis.report import summary_lines, write_report

    texts = None
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise UserError(f"--text {path} does not exist; pass a UTF-8 text file")
        texts = [read_text(path)]
    check_out(Path(args.out))
    chosen = AnalysisConfig(**fields.values_from(args, OPTIONS))
    explorer = ExplorerConfig(**fields.values_from(args, ExplorerConfig))
    if args.checkpoint_steps is not None:
        if args.compare is not None:
            raise UserError("--compare shows two checkpoints side by side; it does not apply to "
                            "--checkpoint-steps (drop one of them)")
        return _over_training(args, texts, chosen)
    if args.compare is not None:
        try:  # refused now, not after the first analysis
            ckpt.resolve(args.compare)
        except UserError as e:
            raise UserError(f"--compare: {e}") from None
    metrics, trajectory = run_analysis(args.checkpoint, texts=texts, prompts=args.prompt, settings=chosen)
    report = write_report(args.out, metrics, trajectory)
    print("\n".join(summary_lines(metrics, report)))
    analyses = [(trajectory, metrics)]
    if args.compare is not None:
        analyses.append(_compared(args.compare, texts, args.prompt, chosen, metrics))
    page = write_explorer(args.out, analyses, explorer.explorer_max_mb)
    print(f"explorer: {page} ({page.stat().st_size / 1e6:.2f} MB; open it in a browser)")
    return 0


def _compared(path: str, texts: list[str] | None, prompts: list[str] | None, chosen: AnalysisConfig,
              first: dict) -> tuple:
    """The second checkpoint's recording: the same settings, and the first's prompts as text."""
    from sinkdlm.analysis import run_analysis

    if chosen.mode == "trajectory" and not prompts:
        prompts = first["prompts"]
    settings = dataclasses.replace(chosen, interventions=False, nulls=False)
    metrics, trajectory = run_analysis(path, texts=texts, prompts=prompts, settings=settings)
    return trajectory, metrics


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
