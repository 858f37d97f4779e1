"""`sinkdlm eval`: lm-eval tasks with Monte Carlo likelihoods, and paper-style comparison tables.

    sinkdlm eval --checkpoint runs/demo --tasks arc_easy,piqa --limit 200 [--preset paper]
    sinkdlm eval --compare runs/plain runs/gated runs/sink

The library side is sinkdlm.eval.run: offline tasks, results.json and results.md.
"""

from __future__ import annotations

import argparse

from sinkdlm.errors import UserError
from sinkdlm.eval.likelihood import Estimator, Settings
from sinkdlm.eval.presets import LIKELIHOOD_PRESETS
from sinkdlm.eval.run import EVAL_SUBDIR, EvalOptions, evaluate_checkpoint, load_results, markdown_table
from sinkdlm.settings import choices_of


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint); "
                                             "required unless --compare (default: none)")
    parser.add_argument("--tasks", default="arc_easy,piqa", help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, default=None, help="first N documents per task (default: all)")
    parser.add_argument("--preset", default="default", choices=list(LIKELIHOOD_PRESETS),
                        help="per-task estimator and guidance; `paper` = the released scripts' settings")
    parser.add_argument("--mc-num", type=int, default=None, help="MC samples (default: the preset's, 128 / 1024)")
    parser.add_argument("--estimator", choices=choices_of(Estimator), default=None,
                        help="likelihood estimator (default: the preset's per task)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="unsupervised classifier-free guidance weight (default: the preset's per task)")
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size, help="sequences per forward")
    parser.add_argument("--seed", type=int, default=Settings.seed, help="seeds the Monte Carlo masks")
    parser.add_argument("--no-crn", action="store_true", help="independent random numbers for each choice")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--output", default=None, help=f"results folder (default: <checkpoint>/{EVAL_SUBDIR})")
    parser.add_argument("--compare", nargs="+", metavar="DIR", default=None,
                        help="print one table of earlier results (eval output, checkpoint or run folders) "
                             "instead of evaluating (default: off)")


def run(args: argparse.Namespace) -> int:
    if args.compare:
        print(markdown_table([load_results(d) for d in args.compare]))
        return 0
    if not args.checkpoint:
        raise UserError("--checkpoint is required (or use --compare DIR ...)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = EvalOptions(preset=args.preset, limit=args.limit, mc_num=args.mc_num, estimator=args.estimator,
                          guidance=args.guidance, batch_size=args.batch_size, seed=args.seed, crn=not args.no_crn,
                          device=args.device)
    tasks = [t for t in args.tasks.split(",") if t]
    results, out = evaluate_checkpoint(args.checkpoint, tasks, options, args.output)
    print(markdown_table([results]))
    print(f"\n{results['sinkdlm']['seconds']} s; results in {out}")
    return 0
