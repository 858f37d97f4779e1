"""`sinkdlm eval`: lm-eval tasks with Monte Carlo likelihoods, and paper-style comparison tables.

    sinkdlm eval --checkpoint runs/demo --tasks arc_easy,piqa --limit 200 [--preset paper]
    sinkdlm eval --checkpoint runs/sft --tasks gsm8k --num-fewshot 0 --sampling gen_length=64,temperature=0.1
    torchrun --nproc-per-node 2 -m sinkdlm eval --checkpoint runs/demo --tasks arc_easy   (rank 0 writes)
    sinkdlm eval --compare runs/plain runs/gated runs/sink

The library side is sinkdlm.eval.run: offline tasks, results.json and results.md.
"""

from __future__ import annotations

import argparse

from sinkdlm.errors import UserError
from sinkdlm.eval.likelihood import Estimator, LikelihoodConfig
from sinkdlm.eval.presets import LIKELIHOOD_PRESETS
from sinkdlm.eval.run import EVAL_SUBDIR, SHARED_FIELDS, EvalConfig, evaluate_checkpoint, load_results, markdown_table
from sinkdlm.fields import choices_of
from sinkdlm.sample import SAMPLING_FIELDS


def key_values(text: str) -> dict[str, str]:
    """"steps=64,temperature=0.1" -> {"steps": "64", "temperature": "0.1"}; the model class converts
    and checks the values against SampleConfig's declarations. Parsed here rather than by argparse, whose
    type errors print a usage line too."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise UserError(f"--sampling {text!r} should be KEY=VALUE pairs separated by commas, "
                        f"e.g. steps=64,temperature=0.1")
    return {k.strip(): v.strip() for k, v in pairs}


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
                        help="unsupervised classifier-free guidance weight, for scoring and sampling "
                             "(default: the preset's per task for scoring, none for sampling)")
    parser.add_argument("--batch-size", type=int, default=LikelihoodConfig.batch_size, help="sequences per forward")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"seeds the Monte Carlo masks and the sampler (default: {LikelihoodConfig.seed} for the "
                             f"masks, the sampler's own default for generation)")
    parser.add_argument("--no-crn", action="store_true", help="independent random numbers for each choice")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    parser.add_argument("--sampling", default="", metavar="KEY=VALUE,...",
                        help="sampler settings for generation tasks (gsm8k), any of "
                             f"{', '.join(f for f in SAMPLING_FIELDS if f not in SHARED_FIELDS)} "
                             "(default: the task's max_gen_toks as gen_length, steps = gen_length, the "
                             "sampler's other defaults; see docs/lm-eval.md)")
    parser.add_argument("--log-samples", action="store_true",
                        help="also write samples_<task>.jsonl (responses, filtered answers, metrics)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
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
    options = EvalConfig(preset=args.preset, limit=args.limit, mc_num=args.mc_num, estimator=args.estimator,
                          guidance=args.guidance, batch_size=args.batch_size, seed=args.seed, crn=not args.no_crn,
                          device=args.device, num_fewshot=args.num_fewshot, sampling=key_values(args.sampling),
                          log_samples=args.log_samples)
    tasks = [t for t in args.tasks.split(",") if t]
    results, out = evaluate_checkpoint(args.checkpoint, tasks, options, args.output)
    if results is None:  # a rank other than 0 of a torchrun: rank 0 reports
        return 0
    print(markdown_table([results]))
    print(f"\n{results['sinkdlm']['seconds']} s; results in {out}")
    return 0
