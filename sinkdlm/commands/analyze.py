"""`sinkdlm analyze --checkpoint DIR [--text FILE | --prompt ...] --out REPORT_DIR`: sink analysis.

Records a denoising trajectory (or fixed text at masking levels), measures attention sinks per
step, layer and head, runs the interventions, and writes metrics.json, PNG figures and report.md.
With --checkpoint-steps, DIR is a run or study folder and its checkpoints are analysed over training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkdlm.analysis.stats import DEFAULT_EPS, DEFAULT_STD_K, RULES
from sinkdlm.errors import UserError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} should be comma-separated integers, e.g. 0,3") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} should be comma-separated numbers, e.g. 0.25,0.5") from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)")
    parser.add_argument("--checkpoint-steps",
                        help="sinks over training: `all` or steps (e.g. 200,400) of the run folder, or of every "
                             "run of the study folder, given as --checkpoint (no interventions)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="UTF-8 text file to analyse (default: the run's validation data)")
    source.add_argument("--prompt", action="append", help="a prompt to generate from (repeatable)")
    parser.add_argument("--out", required=True, help="report folder (metrics.json, PNGs, report.md)")
    parser.add_argument("--mode", choices=("trajectory", "masked"), default="trajectory",
                        help="trajectory: record a generation; masked: fixed text at masking levels")
    parser.add_argument("--levels", type=_floats, default=[0.75, 0.5, 0.25], help="masked mode: masking levels")
    parser.add_argument("--steps", type=int, default=32, help="trajectory: denoising steps")
    parser.add_argument("--gen-length", type=int, default=32, help="trajectory: tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS, help="sink rule of 2510.15731 on column sums")
    parser.add_argument("--std-k", type=float, default=DEFAULT_STD_K, help="sink rule mean + k * std")
    parser.add_argument("--rule", choices=RULES, default="eps", help="detection rule behind the tables")
    parser.add_argument("--layers", type=_ints, help="layers to record, e.g. 0,3 (default: all)")
    parser.add_argument("--map-steps", type=_ints, help="two steps for the attention-map figure")
    parser.add_argument("--top-k", type=_ints, default=[1, 4], help="intervention: hide the top-K sinks of step t-1")
    parser.add_argument("--no-interventions", action="store_true", help="skip the intervention runs")
    parser.add_argument("--elbo-samples", type=int, default=8, help="masking levels per window for the ELBO")
    parser.add_argument("--max-windows", type=int, default=4, help="held-out windows to use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from sinkdlm.analysis import AnalysisSettings, run_analysis
    from sinkdlm.analysis.report import summary_lines, write_report

    texts = None
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise UserError(f"--text {path} does not exist; pass a UTF-8 text file")
        texts = [path.read_text(encoding="utf-8")]
    settings = AnalysisSettings(
        mode=args.mode, levels=args.levels, steps=args.steps, gen_length=args.gen_length,
        temperature=args.temperature, eps=args.eps, std_k=args.std_k, rule=args.rule, layers=args.layers,
        map_steps=args.map_steps, top_k=args.top_k, interventions=not args.no_interventions,
        elbo_samples=args.elbo_samples, max_windows=args.max_windows, seed=args.seed, device=args.device)
    if args.checkpoint_steps is not None:
        return _over_training(args, texts, settings)
    metrics, trajectory = run_analysis(args.checkpoint, texts=texts, prompts=args.prompt, settings=settings)
    report = write_report(args.out, metrics, trajectory)
    print("\n".join(summary_lines(metrics, report)))
    return 0


def _over_training(args: argparse.Namespace, texts: list[str] | None, settings) -> int:
    from sinkdlm.analysis.training import FIGURE_FILE, TABLE_FILE, analyze_over_training, parse_steps

    steps = parse_steps(args.checkpoint_steps)
    rows = analyze_over_training(args.checkpoint, args.out, steps, settings, texts, args.prompt)
    print(f"sinks over training: {len(rows)} checkpoints of {len({r['run'] for r in rows})} run(s); "
          f"{Path(args.out) / TABLE_FILE}, {Path(args.out) / FIGURE_FILE}")
    return 0
