"""lm-eval tasks on a checkpoint with Monte Carlo likelihoods, and paper-style comparison tables.

Tasks with an offline copy (`sinkdlm data benchmarks`) run from it with the Hub switched off;
others (RACE, any lm-eval task) go through lm-eval's own task and need the Hugging Face Hub.
Results: <output>/results.json (lm-eval's, plus our settings) and <output>/results.md; with
`log_samples`, <output>/samples_<task>.jsonl (each document's responses, filtered answers, metrics).
Under torchrun every rank evaluates its share of the documents and rank 0 alone writes (harness.py).
"""

from __future__ import annotations

import difflib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkdlm.checkpoint import resolve
from sinkdlm.data.fetch import require_hub
from sinkdlm.errors import UserError
from sinkdlm.eval import task_data
from sinkdlm.eval.likelihood import Estimator, LikelihoodConfig
from sinkdlm.fields import check_choices, setting
from sinkdlm.files import atomic_write
from sinkdlm.intervals import format_share
from sinkdlm.optional import require

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
EVAL_SUBDIR = "eval"  # default output folder, inside the checkpoint it measures
PERCENT = 100.0
METRIC = "acc"  # the paper reports accuracy on every task
EXACT_MATCH = "exact_match"  # generation tasks' metric, one per filter (lm-eval's gsm8k)
TYPO_CUTOFF = 0.8  # difflib similarity above which an unknown task name is taken for a misspelt offline one
PERPLEXITY_BOOTSTRAP = 1000  # lm-eval bootstraps the perplexity's stderr; its default 100k is slow
# the sampler's settings, which model_args (and `sinkdlm eval --sampling`) may give; declared here, where
# both the model class and the command read them without importing lm-eval
SHARED_FIELDS = ("guidance", "seed")  # one value serves scoring and sampling (own options in `sinkdlm eval`)
# answer options of the multiple-choice tasks (lm-eval's task definitions): a guess scores 1/options. ARC's
# count is nominal (a few questions have 3 or 5). Tasks not named (LAMBADA, GSM8K, ...) get no chance level.
CHOICES = {"arc_easy": 4, "arc_challenge": 4, "hellaswag": 4, "openbookqa": 4, "race": 4, "sciq": 4,
           "social_iqa": 3, "piqa": 2, "boolq": 2, "winogrande": 2, "copa": 2}
CHANCE_LABEL = "chance (1 / options)"


@dataclass
class EvalConfig:
    """How `evaluate_checkpoint` scores: the preset's per-task settings, and what overrides them."""

    preset: str = setting("default", "likelihood preset: per-task estimator settings")
    limit: int | None = setting(None, "first N documents per task", unset="every document", at_least=1)
    mc_num: int | None = setting(None, "MC samples per continuation", unset="the preset's", at_least=1)
    estimator: Estimator | None = setting(None, "likelihood estimator", unset="the preset's per task")
    guidance: float | None = setting(None, "classifier-free guidance weight", unset="the preset's per task",
                                     at_least=0)
    batch_size: int = setting(LikelihoodConfig.batch_size, "sequences per forward", at_least=1)
    seed: int | None = setting(None, "seed", unset="LikelihoodConfig.seed for the MC masks, SampleConfig's for the sampler",
                               at_least=0)
    crn: bool = setting(True, "common random numbers across the choices of a question")
    device: str = setting("cpu", "torch device, e.g. cuda")
    num_fewshot: int | None = setting(None, "few-shot examples", unset="each task's own", at_least=0)
    sampling: dict[str, Any] = setting({}, "SampleConfig fields for generation tasks")
    log_samples: bool = setting(False, "keep every document's inputs and outputs")

    def __post_init__(self) -> None:
        check_choices(self, "")


def check_task_names(tasks: list[str]) -> None:
    """A task without an offline copy that is one typo away from one that has it is a typo, not a Hub
    task: say so at once rather than after lm-eval tries the Hub."""
    for task in tasks:
        if task in task_data.OFFLINE_TASKS or task in task_data.NOT_OFFLINE:
            continue
        close = difflib.get_close_matches(task, list(task_data.OFFLINE_TASKS), n=1, cutoff=TYPO_CUTOFF)
        if close:
            raise UserError(f"unknown task {task!r}; did you mean {close[0]!r}? offline tasks: "
                            f"{', '.join(sorted(task_data.OFFLINE_TASKS))}")


def import_harness() -> Any:
    """sinkdlm.eval.harness, or a UserError naming the `eval` extra (lm-eval is optional)."""
    require("lm_eval", "sinkdlm eval")
    import sinkdlm.eval.harness as harness

    return harness


def evaluate_checkpoint(checkpoint: str | Path, tasks: list[str], options: EvalConfig,
                        output: str | Path | None = None) -> tuple[dict[str, Any] | None, Path]:
    """Run `tasks` on the checkpoint; write results.json and results.md into `output` (default:
    <checkpoint>/eval) and return (results, that folder). Under torchrun only rank 0 writes and gets
    the results; the other ranks get None."""
    ckpt = resolve(checkpoint)
    harness = import_harness()  # before fetching any benchmark data
    tasks = [task_data.canonical(t) for t in tasks if t]
    check_task_names(tasks)
    harness.split_model_args(options.sampling)  # a typo fails now, not after the likelihood tasks
    shared = sorted(set(options.sampling) & set(SHARED_FIELDS))
    if shared:
        raise UserError(f"set {', '.join(shared)} with --{' / --'.join(shared)} (not in --sampling): one value "
                        f"serves the likelihood tasks and the sampler")
    rank, world, _ = harness.init_distributed(options.device)
    local = [t for t in tasks if t in task_data.OFFLINE_TASKS]
    if rank == 0:
        task_data.materialise(local)
    if world > 1:  # the other ranks read what rank 0 wrote
        import torch.distributed as dist

        dist.barrier()
    hub_tasks = [t for t in tasks if t not in local]
    if hub_tasks:
        require_hub(f"tasks {hub_tasks} (no offline copy: {', '.join(sorted(task_data.OFFLINE_TASKS))} have one)")
    if len(local) == len(tasks):  # nothing needs the Hub: never wait on it
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    results = _simple_evaluate(harness, ckpt, tasks, options, needs_hub=len(local) < len(tasks))
    out = Path(output) if output else ckpt / EVAL_SUBDIR
    if results is None:
        return None, out
    results["sinkdlm"]["seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    for task, samples in results.pop("samples", {}).items():
        atomic_write(out / f"samples_{task}.jsonl", "".join(json.dumps(s, default=str) + "\n" for s in samples))
    atomic_write(out / RESULTS_JSON, json.dumps(results, indent=2, default=str))
    atomic_write(out / RESULTS_MD, markdown_table([results]) + "\n")
    return results, out


def _simple_evaluate(harness: Any, ckpt: Path, tasks: list[str], options: EvalConfig,
                     needs_hub: bool) -> dict[str, Any] | None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = harness.DiffusionLM(pretrained=str(ckpt), device=options.device, batch_size=options.batch_size,
                                preset=options.preset, estimator=options.estimator, guidance=options.guidance,
                                mc_num=options.mc_num, seed=options.seed, crn=options.crn, **options.sampling)
    manager = TaskManager(include_path=str(task_data.tasks_dir()), include_defaults=needs_hub)
    try:
        results = lm_eval.simple_evaluate(model=model, tasks=tasks, limit=options.limit, task_manager=manager,
                                          num_fewshot=options.num_fewshot, bootstrap_iters=PERPLEXITY_BOOTSTRAP,
                                          log_samples=options.log_samples)
    except (ConnectionError, OSError, KeyError, ValueError) as e:
        missing = [t for t in tasks if t not in task_data.OFFLINE_TASKS]
        hint = "; ".join(task_data.NOT_OFFLINE.get(t, f"{t} has no offline copy and needs the Hub") for t in missing)
        raise UserError(f"lm-eval could not load tasks {tasks} ({type(e).__name__}: {str(e)[:200]})"
                        + (f"; {hint}" if hint else "")) from None
    info = _run_info(ckpt, tasks, options, model)  # every rank takes part in its gathering
    if results is not None:
        results["sinkdlm"] = info
    return results


def _run_info(ckpt: Path, tasks: list[str], options: EvalConfig, model: Any) -> dict[str, Any]:
    """What produced the numbers: checkpoint, per-task settings, forward counts and mean MC standard
    error over every rank, the processes that shared the work."""
    per_rank = model.gather_object((dict(model.estimates), vars(model.stats))) or []
    stderrs: dict[str, list[float]] = {}
    forwards: dict[str, int] = {}
    for estimates, stats in per_rank:
        for task, es in estimates.items():
            stderrs.setdefault(task, []).extend(e.stderr for e in es)
        forwards = {k: forwards.get(k, 0) + v for k, v in stats.items()}
    mc_stderr = {t: sum(sorted(s)) / len(s) for t, s in stderrs.items() if s}  # sorted: the same sum on any split
    return {"checkpoint": str(ckpt), "variant": model.config.model.variant(), "preset": options.preset,
            "limit": options.limit, "num_fewshot": options.num_fewshot, "processes": model.world_size,
            "settings": {t: vars(model.settings_for(t)) for t in tasks}, "sampling": model.sampling,
            "bos_ids": model.bos, "forward_stats": forwards, "mean_mc_stderr": mc_stderr}


def accuracies(results: dict[str, Any]) -> dict[str, float]:
    """task -> accuracy in percent, for the tasks that report one."""
    return {task: PERCENT * r[f"{METRIC},none"] for task, r in results["results"].items() if f"{METRIC},none" in r}


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


def _metrics(task_results: dict[str, Any]) -> list[str]:
    """The keys a task's column(s) show: accuracy, else generation's exact match per filter (GSM8K's
    strict-match and flexible-extract)."""
    if f"{METRIC},none" in task_results:
        return [f"{METRIC},none"]
    return [k for k in task_results if k.startswith(f"{EXACT_MATCH},")]


def _cell(task_results: dict[str, Any] | None, key: str, n: int | None) -> str:
    if not task_results or key not in task_results:
        return "-"
    value = task_results[key]
    return format_share(value, n) if n else f"{PERCENT * value:.1f}"


def _header(task: str, key: str) -> str:
    metric, kind = key.split(",", 1)
    return f"{task} {metric if kind == 'none' else kind} % [95% Wilson CI]"


def _label(results: dict[str, Any]) -> str:
    info = results.get("sinkdlm", {})
    ckpt = Path(info.get("checkpoint", "?"))
    return f"{ckpt.parent.name}/{ckpt.name} ({info.get('variant', '?')})"


def markdown_table(all_results: list[dict[str, Any]]) -> str:
    """Rows = checkpoints, columns = tasks (a generation task: one per filter), cells = accuracy %
    [95% Wilson interval over the questions]; a last row gives a guess's accuracy
    where a column is a multiple-choice task's."""
    columns: list[tuple[str, str]] = []
    for r in all_results:
        columns += [(t, k) for t, c in r.get("results", {}).items() for k in _metrics(c) if (t, k) not in columns]
    lines = ["| checkpoint | " + " | ".join(_header(t, k) for t, k in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for r in all_results:
        n = {t: c.get("effective") for t, c in r.get("n-samples", {}).items()}
        lines.append(f"| {_label(r)} | " + " | ".join(_cell(r["results"].get(t), k, n.get(t)) for t, k in columns)
                     + " |")
    chance = [_chance_cell(t, k) for t, k in columns]
    if any(chance):
        lines.append(f"| {CHANCE_LABEL} | " + " | ".join(chance) + " |")
    return "\n".join(lines)


def _chance_cell(task: str, key: str) -> str:
    """A uniform guess's accuracy in percent, for a multiple-choice task's accuracy column; else blank."""
    options = CHOICES.get(task_data.canonical(task))
    return f"{PERCENT / options:.1f}" if options and key == f"{METRIC},none" else ""
