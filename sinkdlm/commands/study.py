"""`sinkdlm study --preset demo --variants plain,gate,sink [--seeds 1,2,3]`: the paper's ablation.

At `--preset demo` it runs on a 2-core CPU in minutes, at `--preset cpu` in hours (8 variants x 3
seeds); at `--preset 472` it is the paper's experiment (launch it on GPUs with `torchrun
--nproc-per-node N -m sinkdlm study ... train.devices=N` so every rank runs the same training loop;
rank 0 alone then evaluates and writes the table). The same command again resumes a stopped study.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkdlm.experiments import study
from sinkdlm.fields import comma_ints
from sinkdlm.training.recipes import add_overrides_argument


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo",
                        help="demo (CPU minutes), cpu (CPU hours, docs/study-cpu.md), mechanism (the synthetic "
                             "copy task, docs/study-mechanism.md) or an SMDM size, e.g. 472")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from: {', '.join(study.VARIANTS)} "
                             f"(default: {','.join(study.PAPER_VARIANTS)}; at --preset cpu: "
                             f"{','.join(study.CPU_VARIANTS)}; at --preset mechanism: "
                             f"{','.join(study.MECHANISM_VARIANTS)})")
    parser.add_argument("--seeds", default="1", help="comma-separated training seeds")
    parser.add_argument("--out", default=None, help="study folder (default runs/study-<preset>)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the preset's)")
    parser.add_argument("--flops", type=float, default=None,
                        help="budget per run in 1e18 FLOPs, the same for all variants (default: the steps)")
    parser.add_argument("--data", default=None,
                        help="prepared data folder (default: the preset's corpus, prepared once: Shakespeare at "
                             "demo, BoolQ passages at cpu, the synthetic copy task at mechanism)")
    parser.add_argument("--tasks", default=None,
                        help=f"offline lm-eval tasks ('' = none; default {study.DEFAULT_TASKS}, none at --preset "
                             f"mechanism)")
    parser.add_argument("--limit", type=int, default=200, help="documents per task")
    parser.add_argument("--mc-num", type=int, default=16, help="Monte Carlo samples per choice")
    parser.add_argument("--analysis-texts", type=int, default=study.StudyConfig.analysis_texts,
                        help="held-out windows (denoising trajectories) for the sink metrics")
    add_overrides_argument(parser, "config overrides applied to every run; every key: `sinkdlm config`")


def seeds_of(text: str) -> list[int]:
    return comma_ints(text, f"--seeds {text!r} should be comma-separated integers, e.g. 1,2,3")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    if args.flops is not None:
        overrides.append(f"train.flops={args.flops}")
    chosen = study.StudyConfig(
        preset=args.preset, variants=study.parse_variants(args.variants) if args.variants else None,
        seeds=seeds_of(args.seeds), out=Path(args.out) if args.out else None, data=args.data, overrides=overrides,
        tasks=args.tasks, limit=args.limit, mc_num=args.mc_num, analysis_texts=args.analysis_texts,
        command="sinkdlm study " + " ".join(_argv(args)))
    study.run_study(chosen)
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The command as the table's header shows it; --limit and --mc-num only where benchmarks run."""
    tasks = args.tasks if args.tasks is not None else study.PRESET_TASKS.get(args.preset, study.DEFAULT_TASKS)
    flags = ["preset", "variants", "seeds", "steps", "flops", "tasks"] + (["limit", "mc_num"] if tasks else [])
    parts = [f"--{f.replace('_', '-')} {getattr(args, f)}" for f in flags if getattr(args, f) is not None]
    return parts + list(args.overrides)
