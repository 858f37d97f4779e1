"""`sinkdlm eval`: lm-eval tasks with Monte Carlo likelihoods, and paper-style comparison tables.

    sinkdlm eval --checkpoint runs/demo --tasks arc_easy,piqa --limit 200 [--preset paper]
    sinkdlm eval --compare runs/plain runs/gated runs/sink

Tasks with an offline copy (`sinkdlm data benchmarks`) run from it with the Hub switched off;
others (RACE, any lm-eval task) go through lm-eval's own task and need the Hugging Face Hub.
Results: <output>/results.json (lm-eval's, plus our settings) and <output>/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from sinkdlm.checkpoint import resolve
from sinkdlm.errors import UserError
from sinkdlm.eval import benchmarks, presets
from sinkdlm.optional import require
from sinkdlm.intervals import format_share

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
EVAL_SUBDIR = "eval"  # default output folder, inside the checkpoint it measures
PERCENT = 100.0
METRIC = "acc"  # the paper reports accuracy on every task
PERPLEXITY_BOOTSTRAP = 1000  # lm-eval bootstraps the perplexity's stderr; its default 100k is slow


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--tasks", default="arc_easy,piqa", help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, default=None, help="first N documents per task")
    parser.add_argument("--preset", default="default", choices=list(presets.PRESETS),
                        help="per-task estimator and CFG; `paper` = the released scripts' settings")
    parser.add_argument("--mc-num", type=int, default=None, help="MC samples (default: the preset's, 128 / 1024)")
    parser.add_argument("--estimator", choices=["mc", "chain_rule"], default=None, help="override the preset")
    parser.add_argument("--cfg", type=float, default=None, help="unsupervised CFG weight (override the preset)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-crn", action="store_true", help="independent random numbers for each choice")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--output", default=None, help=f"results folder (default: <checkpoint>/{EVAL_SUBDIR})")
    parser.add_argument("--compare", nargs="+", metavar="DIR", default=None,
                        help="print one table of earlier results (eval output, checkpoint or run folders)")


def run(args: argparse.Namespace) -> int:
    if args.compare:
        print(markdown_table([load_results(d) for d in args.compare]))
        return 0
    if not args.checkpoint:
        raise UserError("--checkpoint is required (or use --compare DIR ...)")
    ckpt = resolve(args.checkpoint)
    harness = import_harness()  # before fetching any benchmark data
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tasks = [benchmarks.canonical(t) for t in args.tasks.split(",") if t]
    local = [t for t in tasks if t in benchmarks.BENCHMARKS]
    benchmarks.materialise(local)
    if len(local) == len(tasks):  # nothing needs the Hub: never wait on it
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    results = evaluate(harness, ckpt, tasks, args, needs_hub=len(local) < len(tasks))
    results["sinkdlm"]["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.output) if args.output else ckpt / EVAL_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2, default=str))
    table = markdown_table([results])
    (out / RESULTS_MD).write_text(table + "\n")
    print(table)
    print(f"\n{results['sinkdlm']['seconds']} s; results in {out}")
    return 0


def evaluate(harness: Any, ckpt: Path, tasks: list[str], args: argparse.Namespace, needs_hub: bool) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = harness.DiffusionLM(pretrained=str(ckpt), device=args.device, batch_size=args.batch_size,
                                preset=args.preset, estimator=args.estimator, cfg=args.cfg,
                                mc_num=args.mc_num, seed=args.seed, crn=not args.no_crn)
    manager = TaskManager(include_path=str(benchmarks.tasks_dir()), include_defaults=needs_hub)
    try:
        results = lm_eval.simple_evaluate(model=model, tasks=tasks, limit=args.limit, task_manager=manager,
                                          bootstrap_iters=PERPLEXITY_BOOTSTRAP, log_samples=False)
    except (ConnectionError, OSError, KeyError, ValueError) as e:
        missing = [t for t in tasks if t not in benchmarks.BENCHMARKS]
        hint = "; ".join(benchmarks.NOT_OFFLINE.get(t, f"{t} has no offline copy and needs the Hub") for t in missing)
        raise UserError(f"lm-eval could not load tasks {tasks} ({type(e).__name__}: {str(e)[:200]})"
                        + (f"; {hint}" if hint else "")) from None
    results["sinkdlm"] = _run_info(ckpt, tasks, args, model)
    return results


def import_harness() -> Any:
    """sinkdlm.eval.harness, or a UserError naming the `eval` extra (lm-eval is optional)."""
    require("lm_eval", "sinkdlm eval")
    import sinkdlm.eval.harness as harness

    return harness


def _run_info(ckpt: Path, tasks: list[str], args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """What produced the numbers: checkpoint, per-task settings, forward counts, mean MC standard error."""
    mc_stderr = {t: sum(e.stderr for e in es) / len(es) for t, es in model.estimates.items() if es}
    return {"checkpoint": str(ckpt), "variant": model.config.model.variant(), "preset": args.preset,
            "limit": args.limit, "settings": {t: vars(model.settings_for(t)) for t in tasks}, "bos_ids": model.bos,
            "forward_stats": vars(model.stats), "mean_mc_stderr": mc_stderr}


def load_results(path: str | Path) -> dict[str, Any]:
    """results.json from an eval output folder, a checkpoint folder or a run folder."""
    p = Path(path)
    candidates = [p / RESULTS_JSON, p / EVAL_SUBDIR / RESULTS_JSON]
    if not candidates[0].is_file() and not candidates[1].is_file():
        try:
            candidates.append(resolve(p) / EVAL_SUBDIR / RESULTS_JSON)
        except UserError:
            pass
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text())
    raise UserError(f"no {RESULTS_JSON} under {p}; run `sinkdlm eval --checkpoint {p} --tasks ...` first")


def _cell(task_results: dict[str, Any] | None, n: int | None) -> str:
    if not task_results or f"{METRIC},none" not in task_results:
        return "-"
    value = task_results[f"{METRIC},none"]
    return format_share(value, n) if n else f"{PERCENT * value:.1f}"


def _label(results: dict[str, Any]) -> str:
    info = results.get("sinkdlm", {})
    ckpt = Path(info.get("checkpoint", "?"))
    return f"{ckpt.parent.name}/{ckpt.name} ({info.get('variant', '?')})"


def markdown_table(all_results: list[dict[str, Any]]) -> str:
    """Rows = checkpoints, columns = tasks, cells = accuracy % [95% Wilson interval over the questions]."""
    tasks: list[str] = []
    for r in all_results:
        tasks += [t for t in r.get("results", {}) if t not in tasks]
    lines = ["| checkpoint | " + " | ".join(f"{t} {METRIC} % [95% Wilson CI]" for t in tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    for r in all_results:
        n = {t: c.get("effective") for t, c in r.get("n-samples", {}).items()}
        lines.append(f"| {_label(r)} | " + " | ".join(_cell(r["results"].get(t), n.get(t)) for t in tasks) + " |")
    return "\n".join(lines)
