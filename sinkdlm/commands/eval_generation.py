"""`sinkdlm eval-generation --checkpoint DIR --out DIR [--limit N] [--prompt-tokens K] [--judge M] [sampling]`.

Samples --limit completions (unconditional, or prompted by held-out text) and scores them: Gen-PPL
under a judge causal LM (default the offline SmolLM2-135M), the judge's per-token NLL histogram,
unigram entropy, distinct-1/2/3, self-BLEU and, where mauve-text is installed, MAUVE against the
held-out continuations; each with a 95% interval over samples (sinkdlm.eval.generation). Writes
<out>/samples.jsonl (continued by the same command after a stop), generation.json, generation.md,
gen_ppl_vs_entropy.png and judge_nll_hist.png. `--compare DIR ... --out DIR` puts several finished
runs in one table and figure.
"""

from __future__ import annotations

import argparse

from sinkdlm import fields
from sinkdlm.errors import UserError
from sinkdlm.eval.generation import GenerationEvalConfig
from sinkdlm.sample import DEFAULT_BATCH, SampleConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="checkpoint folder or run folder (its latest) to sample from "
                        "(no default: required unless --compare)")
    parser.add_argument("--out", required=True, help="output folder (samples, results, figures)")
    parser.add_argument("--text", help="held-out text file for prompts and MAUVE references "
                                       "(default: the validation split of the checkpoint's training data)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an --out that holds samples of other settings, or replace a comparison")
    parser.add_argument("--compare", nargs="+", metavar="DIR",
                        help="instead of sampling: one table and figure of these eval-generation folders "
                             "(default: none, sample --checkpoint)")
    parser.add_argument("--labels", type=fields.comma_list(str), metavar="A,B,...",
                        help="names of the --compare folders in the table and figure (default: folder names)")
    fields.add_arguments(parser, GenerationEvalConfig)
    fields.add_arguments(parser, SampleConfig)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help="completions per forward; a completion does not depend on it")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from sinkdlm.eval import generation

    if args.compare:
        print(f"comparison: {generation.compare(args.compare, args.out, args.labels, args.overwrite)}")
        return 0
    if not args.checkpoint:
        raise UserError("give --checkpoint DIR to sample from (or --compare DIR ... to compare finished runs)")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size={args.batch_size} must be > 0")
    settings = GenerationEvalConfig(**fields.values_from(args, GenerationEvalConfig))
    sampling = SampleConfig(**fields.values_from(args, SampleConfig))
    result = generation.evaluate_generation(args.checkpoint, settings, sampling, args.out, args.text, args.overwrite,
                                            args.batch_size, args.device, not args.no_progress)
    print(f"{generation.summary_line(result)}; {result['samples']} samples in {args.out}")
    return 0
