"""The paper's ablation as one command: train every variant on the same data order, seeds and FLOPs
budget through the normal trainer, evaluate each, follow its sinks over training, and write one
comparison (study_report: mean ± sd over seeds, paired differences with 95% t intervals) and plots.

Each run lives in `<out>/<variant>-seed<S>/`. The same command again skips what is done: a finished
run is not trained again, an interrupted one resumes from its last checkpoint, and evaluations and
checkpoint analyses are cached beside each run (keyed by their settings and the final checkpoint).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkdlm.config import (
    Config,
    ModelConfig,
    config_from_dict,
    gate_matched_intermediate_size,
    gate_params,
    load_config,
)
from sinkdlm.data import synthetic
from sinkdlm.errors import UserError
from sinkdlm.experiments import probe_plots
from sinkdlm.experiments import study_report as report
from sinkdlm.experiments.study_report import ACCURACY_SUFFIX, SINK_COLUMNS, VAL_ELBO, Run
from sinkdlm.fields import check_choices, setting
from sinkdlm.files import atomic_write
from sinkdlm.optional import available, install_hint, require

# variant name -> model overrides (each a field of the one model; see README), or a function of the
# plain model giving them (the parameter-matched gate narrows the MLP by what the gate adds)
VARIANTS: dict[str, dict[str, Any] | Callable[[ModelConfig], dict[str, Any]]] = {
    "plain": {},
    "gate": {"attn_gate": "elementwise"},
    "gate_matched": lambda m: {"attn_gate": "elementwise", "intermediate_size": gate_matched_intermediate_size(m)},
    "headgate": {"attn_gate": "headwise"},
    "sink": {"sink_tokens": 1},
    "sink_end": {"sink_tokens": 1, "sink_position": "end"},
    "sink2": {"sink_tokens": 2},
    "sink4": {"sink_tokens": 4},
    "sink_zero_value": {"sink_tokens": 1, "sink_zero_value": True},
    "sink_zero_init": {"sink_tokens": 1, "sink_init": "zero"},
    "sink_sees_all": {"sink_tokens": 1, "sink_self_only": False},
}
PAPER_VARIANTS = ["plain", "gate", "sink"]
CPU_VARIANTS = ["plain", "gate", "gate_matched", "sink", "sink_sees_all", "sink_zero_value", "sink_end", "sink2"]
# every variant starts from these, so a recipe's own sink/gate settings never leak into "plain"
PLAIN = {"sink_tokens": 0, "sink_position": "front", "sink_init": "learned", "sink_zero_value": False,
         "sink_self_only": True, "attn_gate": "none"}
CURVE_POINTS = 8  # checkpoints kept per run for the sinks-over-training analysis (and the last one)
EVAL_CACHE = "study-eval.json"
CURVES_DIR = "training"
# bumped whenever the sink metrics change meaning (issue 22's fixes: Gu rate, mid-ranks, analytic nulls,
# event-locked change): part of the sinks evaluator's cache key, so an older study-eval.json is re-analysed
SINK_METRICS_VERSION = 2
# `cpu`: the demo model on BoolQ's Wikipedia passages for 3.3M tokens, where a check run formed a
# dedicated sink (after 2.5M tokens; 1.6M were not enough; in the 3-seed study 1 seed of 3 did): about
# 2.3 h on 2 idle cores for 8 variants x 3 seeds, about 5 min per run measured (docs/study-cpu.md)
CPU_RECIPE = {
    "model": {"preset": "demo"},
    "data": {"path": "runs/cpu-data", "val_windows": 64},
    "optim": {"lr": 2.0e-3, "min_lr": 2.0e-4, "warmup_min_steps": 50},
    "train": {"global_batch": 32, "micro_batch": 32, "max_steps": 800, "log_every": 10, "sink_monitor_every": 0},
}
MECHANISM_VARIANTS = ["plain", "sink", "sink_zero_value", "sink_sees_all"]
# `mechanism`: configs/mechanism.yaml on masked Bigram-Backcopy's far-copy variant with the setting the
# pilot chose (docs/study-mechanism.md, section 2)
MECHANISM_SOURCE = "synthetic:bigram-induction"
MECHANISM_SETTING = ["model.n_head=8", "optim.weight_decay=0.1", "train.max_steps=1000"]
# preset -> (corpus source for `sinkdlm prepare`, default variants); SMDM sizes bring their own data
PRESET_DATA = {"demo": ("demo", PAPER_VARIANTS), "cpu": ("boolq", CPU_VARIANTS),
               "mechanism": (MECHANISM_SOURCE, MECHANISM_VARIANTS)}
DEFAULT_TASKS = "arc_easy,piqa"
PRESET_TASKS = {"mechanism": ""}  # a synthetic task has no benchmark; its probes are the evaluation


@dataclass
class StudyConfig:
    preset: str = setting("demo", "demo, cpu, mechanism or an SMDM size")
    variants: list[str] | None = setting(None, "model variants to compare", unset="the preset's")
    seeds: list[int] = setting([1], "training seeds of every variant", at_least=0)
    out: Path | None = setting(None, "study folder", unset="runs/study-<preset>")
    data: str | None = setting(None, "prepared data folder", unset="the preset's corpus")
    overrides: list[str] = setting([], "section.key=value for every run")
    tasks: str | None = setting(None, "offline lm-eval tasks ('' = none)",
                                unset=f"{DEFAULT_TASKS}; none at --preset mechanism")
    limit: int = setting(200, "documents per task", at_least=1)
    mc_num: int = setting(16, "Monte Carlo samples per choice", at_least=1)
    analysis_texts: int = setting(16, "held-out windows (trajectories) for the sink metrics", at_least=1)
    curves: bool = setting(True, "analyse every kept checkpoint (sinks over training)")
    command: str = setting("sinkdlm study", "as typed, for the table's header")

    def __post_init__(self) -> None:
        check_choices(self, "study ")

    @property
    def task_names(self) -> str:
        return self.tasks if self.tasks is not None else PRESET_TASKS.get(self.preset, DEFAULT_TASKS)

    @property
    def folder(self) -> Path:
        return self.out or Path(f"runs/study-{self.preset}")


# ---- configs --------------------------------------------------------------------------------------


def base_config(preset: str) -> Config:
    """`demo` = the demo recipe on Shakespeare; `cpu` = CPU_RECIPE on BoolQ passages; `mechanism` =
    configs/mechanism.yaml with MECHANISM_SETTING; an SMDM size = the paper's 472M recipe at that size."""
    if preset == "demo":
        from sinkdlm.experiments.demo import demo_config

        return demo_config()
    if preset == "cpu":
        return config_from_dict(CPU_RECIPE, "cpu study preset")
    name, overrides = ("mechanism", MECHANISM_SETTING) if preset == "mechanism" else \
        ("paper_472_plain", [f"model.preset={preset}"])
    recipe = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"  # the checkout's configs/
    if not recipe.is_file():
        raise UserError(f"--preset {preset} needs the repository's {recipe}; run from a source checkout")
    return load_config(recipe, overrides)


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UserError(f"unknown variant(s) {unknown or text!r}; choose from {', '.join(VARIANTS)}")
    return names


def variant_fields(variant: str, plain: ModelConfig) -> dict[str, Any]:
    """The model fields a variant changes from the plain model `plain`."""
    fields = VARIANTS[variant]
    return fields(plain) if callable(fields) else dict(fields)


def variant_config(base: Config, variant: str, seed: int, out: Path, overrides: list[str]) -> Config:
    """One run's config: the plain model plus the variant's fields, the seed, resume on, and (unless
    overridden) a checkpoint and a validation every 1/CURVE_POINTS of the run, all kept; under a
    FLOPs budget, the plain model's number of steps."""
    train = [f"train.seed={seed}", f"train.out_dir={out}", "train.resume=true"]
    plain = load_config(None, [*_model_overrides(PLAIN), *train, *overrides], base=base)
    steps = plain.steps()
    every = max(1, steps // CURVE_POINTS)
    curves = [f"train.save_every={every}", f"train.val_every={every}", "train.keep_last=0"]
    # a FLOPs budget counts SMDM's N, which a narrowed MLP lowers: every variant trains plain's steps
    same_steps = [f"train.max_steps={steps}", "train.flops=0"] if plain.train.flops > 0 else []
    fields = {**PLAIN, **variant_fields(variant, plain.model)}
    return load_config(None, [*_model_overrides(fields), *train, *curves, *overrides, *same_steps], base=base)


def _model_overrides(fields: dict[str, Any]) -> list[str]:
    return [f"model.{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in fields.items()]


def corpus_ready(path: Path, source: str, tokenizer: str) -> bool:
    """Whether `path` holds `source` prepared with `tokenizer` (an old or broken folder: no)."""
    from sinkdlm.data.shards import PackedData

    try:
        settings = PackedData(path).meta.get("settings") or {}
    except (UserError, OSError, KeyError, ValueError):
        return False
    return settings.get("source") == source and settings.get("tokenizer") == tokenizer


def study_data(preset: str, base: Config, data: str | None) -> list[str]:
    """The data override of every run: --data, else the preset's corpus (prepared once, reused)."""
    if data:
        return [f"data.path={data}"]
    if preset not in PRESET_DATA:
        return []  # an SMDM size: the recipe's data.path, or data.path=... among the overrides
    if preset == "demo":
        from sinkdlm.experiments.demo import prepared_demo_data

        return [f"data.path={prepared_demo_data(base.data.path)}"]
    from sinkdlm.data.prepare import prepare
    from sinkdlm.experiments.demo import DEMO_VOCAB

    source, path = PRESET_DATA[preset][0], Path(base.data.path)
    tokenizer = synthetic.TOKENIZER_SPEC if synthetic.is_synthetic(source) else f"bpe:{DEMO_VOCAB}"
    if not corpus_ready(path, source, tokenizer):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(f"under torchrun every rank would prepare the {source} corpus at once; run `sinkdlm "
                            f"prepare --source {source} --tokenizer {tokenizer} --out {path}` first")
        prepare(source, path, tokenizer, overwrite=True)
    return [f"data.path={path}"]


# ---- training -------------------------------------------------------------------------------------


def run_info(cfg: Config) -> dict[str, Any]:
    """Steps, tokens and epochs of the training split a run sees, and its parameters (gate included)."""
    from sinkdlm.data.shards import PackedData

    steps = cfg.steps()
    tokens = steps * cfg.train.global_batch * cfg.seq_len
    try:
        train_tokens = PackedData(cfg.data.path).meta["splits"]["train"]["n_tokens"]
    except (UserError, OSError, KeyError):
        train_tokens = None
    model = cfg.model
    return {"steps": steps, "tokens": tokens, "epochs": tokens / train_tokens if train_tokens else None,
            "params": model.non_embedding_params() + gate_params(model)}


def train_runs(base: Config, variants: list[str], seeds: list[int], out: Path,
               overrides: list[str]) -> list[Run]:
    """Train (or resume, or skip when finished) every (variant, seed) run."""
    from sinkdlm.training.trainer import train

    runs = []
    for variant in variants:
        for seed in seeds:
            run_dir = out / f"{variant}-seed{seed}"
            print(f"\n== study: {variant}, seed {seed} -> {run_dir}")
            cfg = variant_config(base, variant, seed, run_dir, overrides)
            result = train(cfg)
            vocab = _vocab(run_dir)
            runs.append(Run(variant, seed, run_dir, {VAL_ELBO: result["val_loss"]},
                            {VAL_ELBO: math.log(vocab)} if vocab else {}, run_info(cfg)))
    return runs


def _vocab(run_dir: Path) -> int | None:
    from sinkdlm.checkpoint import load_config_of

    try:
        return load_config_of(run_dir).model.vocab_size
    except UserError:
        return None


def is_global_zero() -> bool:
    """True unless this is a non-zero rank of a multi-process run (the trainer set up the group)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---- evaluation, cached beside each run -----------------------------------------------------------


@dataclass
class Evaluator:
    """A named evaluation: run -> (metric columns, their uniform baselines); `key` its settings."""

    name: str
    key: dict[str, Any]
    evaluate: Callable[[Run], tuple[dict[str, float], dict[str, float]]]


def evaluate_runs(runs: list[Run], evaluators: list[Evaluator]) -> None:
    """Each evaluator once per final checkpoint and settings: results are cached in <run>/study-eval.json."""
    from sinkdlm.checkpoint import resolve

    for run in runs:
        path, final = run.out / EVAL_CACHE, resolve(run.out).name
        cache = json.loads(path.read_text()) if path.is_file() else {}
        if cache.get("checkpoint") != final:
            cache = {"checkpoint": final, "evaluations": {}}
        for ev in evaluators:
            done = cache["evaluations"].get(ev.name)
            if done is None or done["key"] != ev.key:
                metrics, baselines = ev.evaluate(run)
                done = cache["evaluations"][ev.name] = {"key": ev.key, "metrics": metrics, "baselines": baselines}
                atomic_write(path, json.dumps(cache, indent=1))  # a kill part-way leaves the previous cache
            run.metrics.update(done["metrics"])
            run.baselines.update(done["baselines"])


def lm_eval_evaluator(tasks: str, limit: int, mc_num: int) -> Callable[[Run], dict[str, float]]:
    """Offline benchmark accuracy (%) through the lm-eval model, when lm-eval is installed."""
    from sinkdlm.eval.run import EvalConfig, accuracies, evaluate_checkpoint

    def evaluate(run: Run) -> dict[str, float]:
        results, _ = evaluate_checkpoint(run.out, tasks.split(","), EvalConfig(limit=limit, mc_num=mc_num),
                                         run.out / "eval")
        return {f"{task}{ACCURACY_SUFFIX}": acc for task, acc in accuracies(results).items()}

    return evaluate


def default_evaluators(s: StudyConfig, synthetic_data: bool = False) -> list[Evaluator]:
    evaluators = [sink_evaluator(s.analysis_texts)]
    if synthetic_data:
        evaluators.append(probe_evaluator())
    if s.task_names:
        if available("lm_eval"):
            accuracy = lm_eval_evaluator(s.task_names, s.limit, s.mc_num)
            evaluators.append(Evaluator("lm_eval", {"tasks": s.task_names, "limit": s.limit, "mc_num": s.mc_num},
                                        lambda run: (accuracy(run), {})))
        else:
            print(f"study: lm-eval is not installed; skipping benchmark accuracy ({install_hint('lm_eval')})")
    return evaluators


def sink_columns(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """The study's sink columns of an analysis and the uniform baselines of those that have one."""
    values, baselines = {}, {}
    for key, label in SINK_COLUMNS.items():
        if isinstance(key, tuple):  # (null model, metric)
            value, base = ((metrics.get("nulls") or {}).get(key[0]) or {}).get(key[1]), None
        else:
            value, base = metrics["summary"].get(key), metrics["baselines"].get(key)
        if value is not None:
            values[label] = float(value)
            if base is not None:
                baselines[label] = float(base)
    return values, baselines


COPY_TARGET = 0.9  # P5: the first kept checkpoint whose copy accuracy reaches this
# part of the probes evaluator's cache key: 2 = undefined (NaN) columns left out, so a study-eval.json
# that cached plain's NaN sink value ratio is evaluated again (from probes.json, no new probing)
PROBE_COLUMNS_VERSION = 2


def probe_columns(rows: list[dict[str, Any]], bigram_copy: float | None) -> tuple[dict[str, float], dict[str, float]]:
    """The study's copy-task columns (docs/study-mechanism.md) from probe_run's rows, oldest first: the
    last checkpoint's copy accuracy, copy head, Gu rates, [MASK] mass and ELBO per t-bin, and the
    steps to COPY_TARGET copy accuracy at the first mask level (the last step + 1 bin when never)."""
    from sinkdlm.eval.probes import ELBO_BINS, MASK_LEVELS, summary_row

    last, values = rows[-1], {}
    for level in MASK_LEVELS:
        s = summary_row(last, level)
        values[f"copy acc @{level}"] = s["copy_accuracy"]
        values[f"copy head: dormant on sink @{level}"] = s["copy_head_dormant_on_sink"]
        values[f"copy head: active on sink @{level}"] = s["copy_head_active_on_sink"]
        values[f"copy head: sink value ratio @{level}"] = last["levels"][str(level)]["copy_head"]["sink_value_ratio"]
        for layer, (rate, mask) in enumerate(zip(s["gu_rate"], s["dormant_mask_x_uniform"])):
            values[f"Gu rate L{layer} @{level}"] = rate
            values[f"dormant [MASK] x uniform L{layer} @{level}"] = mask
    for b, elbo in enumerate(last["elbo_bins"]):
        values[f"ELBO t {b / ELBO_BINS:.1f}-{(b + 1) / ELBO_BINS:.1f}"] = elbo
    reached = [r["step"] for r in rows if (summary_row(r)["copy_accuracy"] or 0.0) >= COPY_TARGET]
    steps = [r["step"] for r in rows]
    values[f"steps to {COPY_TARGET} copy acc"] = reached[0] if reached else steps[-1] + (steps[-1] - steps[0]) / max(
        1, len(steps) - 1)
    baselines = {f"copy acc @{level}": bigram_copy for level in MASK_LEVELS} if bigram_copy is not None else {}
    # undefined (None or NaN: no dedicated sink, no dormant query) is left out: a NaN would break the sd over seeds
    return {k: float(v) for k, v in values.items() if v is not None and not math.isnan(v)}, baselines


def probe_evaluator() -> Evaluator:
    """The copy-task probes of every kept checkpoint (cached in <run>/probes.json); the bigram's
    accuracy at copy positions is the copy columns' baseline (what ignoring the rule gets)."""
    from sinkdlm.data.shards import PackedData
    from sinkdlm.eval.probes import DEFAULT_WINDOWS, MASK_LEVELS, probe_run

    def evaluate(run: Run) -> tuple[dict[str, float], dict[str, float]]:
        from sinkdlm.checkpoint import load_config_of

        meta = PackedData(load_config_of(run.out).data.path).meta["task"]
        return probe_columns(probe_run(run.out, progress=False), meta.get("bigram_copy_accuracy"))

    return Evaluator("probes", {"windows": DEFAULT_WINDOWS, "levels": list(MASK_LEVELS),
                                "columns_version": PROBE_COLUMNS_VERSION}, evaluate)


def sink_evaluator(n_texts: int) -> Evaluator:
    """Sink metrics of a denoising trajectory, their baselines and null models (sinkdlm analyze, no
    interventions); the full report with figures goes to <run>/analysis."""
    from sinkdlm.analysis import AnalysisConfig, run_analysis
    from sinkdlm.analysis.report import write_report

    def evaluate(run: Run) -> tuple[dict[str, float], dict[str, float]]:
        settings = AnalysisConfig(interventions=False, max_windows=n_texts, max_prompts=n_texts,
                                    progress=False, seed=run.seed)
        metrics, trajectory = run_analysis(run.out, settings=settings)
        write_report(run.out / "analysis", metrics, trajectory)
        return sink_columns(metrics)

    return Evaluator("sinks", {"texts": n_texts, "metrics_version": SINK_METRICS_VERSION}, evaluate)


def sinks_over_training(runs: list[Run], out: Path, n_texts: int) -> None:
    """Analyse every kept checkpoint of every run (cached per run) and draw one line per variant."""
    from sinkdlm.analysis import AnalysisConfig
    from sinkdlm.analysis.training import analyze_run, write_training

    rows = []
    for run in runs:
        settings = AnalysisConfig(interventions=False, max_windows=n_texts, max_prompts=n_texts, progress=False,
                                    seed=run.seed)
        rows += analyze_run(run.out, "all", settings, out / f"{run.out.name}.json")
    write_training(rows, out, f"sinks over training: {out.parent.name}")


# ---- the whole study ------------------------------------------------------------------------------


def run_study(s: StudyConfig) -> list[Run] | None:
    """Train, evaluate, follow the sinks over training and write the comparison; None on ranks > 0."""
    require("matplotlib", "sinkdlm study (its figures)")  # before the corpus download and hours of training
    variants = s.variants or PRESET_DATA.get(s.preset, (None, PAPER_VARIANTS))[1]
    base = base_config(s.preset)
    overrides = study_data(s.preset, base, s.data) + list(s.overrides)
    runs = train_runs(base, variants, s.seeds, s.folder, overrides)
    if not is_global_zero():  # several training processes: rank 0 alone evaluates and writes
        return None
    synthetic_data = _is_synthetic_data(runs)
    evaluate_runs(runs, default_evaluators(s, synthetic_data))
    if s.curves:
        sinks_over_training(runs, s.folder / CURVES_DIR, s.analysis_texts)
    if synthetic_data:  # the probes of every kept checkpoint, over training (docs/study-mechanism.md)
        probe_plots.write_probe_report(runs, s.folder / probe_plots.PROBES_DIR)
    title = f"study {s.preset}: {', '.join(dict.fromkeys(variants))}; seeds {','.join(map(str, s.seeds))}"
    text = write_study(s.folder, title, s.command, runs, synthetic_data)
    print(f"\n{text}\ntable, plots and results in {s.folder}")
    return runs


def _is_synthetic_data(runs: list[Run]) -> bool:
    """Whether the runs trained on a synthetic corpus (its meta.json has a `task`)."""
    from sinkdlm.checkpoint import load_config_of
    from sinkdlm.data.synthetic import corpus_task

    try:
        return corpus_task(load_config_of(runs[0].out).data.path) is not None
    except (UserError, OSError, IndexError):
        return False


def write_study(out: Path, title: str, command: str, runs: list[Run], synthetic_data: bool = False) -> str:
    """study.md (the table with its intervals, the command, the figures), study.json (every run and the
    statistics) and the figures in `out`; returns the markdown. On a synthetic copy task the report
    carries the mechanism study's pre-registered tests P1-P5 (docs/study-mechanism.md), Holm over them."""
    planned = report.mechanism_family(runs) if synthetic_data else None
    return report.write_outputs(out, title, command, runs, planned)
