"""The paper's ablation as one command: train every variant on the same data order, seeds and FLOPs
budget through the normal trainer, evaluate each, and write one comparison table and plots.

Each run lives in `<out>/<variant>-seed<S>/` and is resumed if present, so an interrupted study
continues where it stopped.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sinkdlm.config import Config, load_config
from sinkdlm.errors import UserError
from sinkdlm.files import METRICS_LOG
from sinkdlm.optional import available, install_hint, require

# variant name -> model overrides (each a field of the one model; see README)
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "gate": {"attn_gate": "elementwise"},
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
METRIC_PANELS_PER_ROW = 4
LINE_STYLES = ("-", "--", "-.", ":")  # one per variant: curves that coincide stay distinguishable
MARKERS = ("o", "s", "^", "D", "v", "P")
HEADROOM = 1.15  # open-ended metric axes reach this far above the highest point
ACCURACY_SUFFIX = " acc %"  # benchmark columns: lm-eval's `acc` (not acc_norm), in percent
TABLE_NOTE = ("Cells: mean ± standard deviation over seeds when there are several, else the one value. "
              "val_elbo: validation ELBO in nats/token (lower is better); acc %: lm-eval's `acc` (accuracy, "
              "not acc_norm) in percent.")
STUDY_TABLE = "study.md"
STUDY_RESULTS = "study.json"
# every variant starts from these, so a recipe's own sink/gate settings never leak into "plain"
PLAIN = {"sink_tokens": 0, "sink_position": "front", "sink_init": "learned", "sink_zero_value": False,
         "sink_self_only": True, "attn_gate": "none"}


@dataclass
class Run:
    variant: str
    seed: int
    out: Path
    metrics: dict[str, float] = field(default_factory=dict)


def base_config(preset: str) -> Config:
    """`demo` = the demo recipe on Shakespeare; an SMDM size = the paper's 472M recipe at that size."""
    if preset == "demo":
        from sinkdlm.demo import demo_config

        return demo_config()
    recipe = Path(__file__).resolve().parents[1] / "configs" / "paper_472_plain.yaml"
    if not recipe.is_file():
        raise UserError(f"--preset {preset} needs the repository's {recipe}; run from a source checkout")
    return load_config(recipe, [f"model.preset={preset}"])


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UserError(f"unknown variant(s) {unknown or text!r}; choose from {', '.join(VARIANTS)}")
    return names


def variant_config(base: Config, variant: str, seed: int, out: Path, overrides: list[str]) -> Config:
    fields = {**PLAIN, **VARIANTS[variant]}
    model = [f"model.{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in fields.items()]
    train = [f"train.seed={seed}", f"train.out_dir={out}", "train.resume=true"]
    return load_config(None, [*model, *train, *overrides], base=base)


def train_runs(base: Config, variants: list[str], seeds: list[int], out: Path,
               overrides: list[str]) -> list[Run]:
    from sinkdlm.train import train

    require("matplotlib", "sinkdlm study (its figures)")  # before hours of training, not after
    runs = []
    for variant in variants:
        for seed in seeds:
            run_dir = out / f"{variant}-seed{seed}"
            print(f"\n== study: {variant}, seed {seed} -> {run_dir}")
            result = train(variant_config(base, variant, seed, run_dir, overrides))
            runs.append(Run(variant, seed, run_dir, {"val_elbo": result["val_loss"]}))
    return runs


def is_global_zero() -> bool:
    """True unless this is a non-zero rank of a multi-process run (the trainer set up the group)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def evaluate_runs(runs: list[Run], evaluators: list[Callable[[Run], dict[str, float]]]) -> None:
    for run in runs:
        for evaluate in evaluators:
            run.metrics.update(evaluate(run))


def summarise(runs: list[Run]) -> tuple[list[str], dict[str, dict[str, tuple[float, float, int]]]]:
    """variant -> metric -> (mean, std over seeds, n seeds), keeping the metrics' first-seen order."""
    columns: list[str] = []
    for run in runs:
        columns += [k for k in run.metrics if k not in columns]
    table: dict[str, dict[str, tuple[float, float, int]]] = {}
    for variant in dict.fromkeys(r.variant for r in runs):
        table[variant] = {}
        for col in columns:
            values = [r.metrics[col] for r in runs if r.variant == variant and col in r.metrics]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                table[variant][col] = (statistics.fmean(values), std, len(values))
    return columns, table


def markdown(columns: list[str], table: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for variant, row in table.items():
        cells = []
        for col in columns:
            if col not in row:
                cells.append("-")
                continue
            mean, std, n = row[col]
            cells.append(f"{mean:.4g} ± {std:.2g}" if n > 1 else f"{mean:.4g}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", TABLE_NOTE])


def read_curves(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train loss, validation ELBO) points from a run's metrics.jsonl."""
    train_pts, val_pts = [], []
    for line in (run_dir / METRICS_LOG).read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train_pts.append((rec["step"], rec["loss"]))
        if "val_loss" in rec:
            val_pts.append((rec["step"], rec["val_loss"]))
    return train_pts, val_pts


def plot_curves(runs: list[Run], path: Path, title: str) -> Path:
    """Training loss and validation ELBO of every variant on one shared y axis that reaches the uniform
    guess (ln V): the raw per-step loss is drawn faintly behind its smoothed curve to show the spread,
    and each variant has its own line style and marker so that equal curves stay visible."""
    require("matplotlib", "drawing the study's figures").use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    variants = list(dict.fromkeys(r.variant for r in runs))
    style = {v: (plt.cm.tab10.colors[i % 10], LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)])
             for i, v in enumerate(variants)}
    val_points = []
    for run in runs:
        train_pts, val_pts = read_curves(run.out)
        colour, ls, marker = style[run.variant]
        label = f"{run.variant} (seed {run.seed})"
        if train_pts:
            steps, values = zip(*train_pts)
            ax_train.plot(steps, values, color=colour, lw=0.6, alpha=0.25)
            ax_train.plot(steps, _smooth(values), color=colour, ls=ls, label=label, lw=1.4)
        if val_pts:
            steps, values = zip(*val_pts)
            ax_val.plot(steps, values, color=colour, ls=ls, marker=marker, label=label, ms=6, mfc="none")
        val_points.append(len(val_pts))
    uniform = _uniform_loss(runs)
    for ax in (ax_train, ax_val):
        if uniform is not None:
            ax.axhline(uniform, color="0.4", lw=0.8, ls=":", label=f"uniform guess, ln V = {uniform:.2f}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_train.set_ylabel("nats / token")
    ax_train.set_title("training loss (ELBO; faint: per step, bold: smoothed)")
    one = max(val_points, default=0) <= 1
    ax_val.set_title("validation ELBO (fixed masks)" + ("\none validation per run (train.val_every >= steps)"
                                                        if one else ""))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _uniform_loss(runs: list[Run]) -> float | None:
    """ln V of the runs' vocabulary: the loss of a uniform guess, the top of every loss axis."""
    from sinkdlm.checkpoint import load_config_of

    try:
        return math.log(load_config_of(runs[0].out).model.vocab_size)
    except (UserError, IndexError):
        return None


def _smooth(values: tuple[float, ...], weight: float = 0.9) -> list[float]:
    """Exponential moving average, as TensorBoard draws it."""
    out, last = [], values[0]
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot_metric_bars(columns: list[str], table: dict[str, dict[str, tuple[float, float, int]]],
                     path: Path, title: str) -> Path | None:
    """One panel per metric: each variant's mean, with its std over seeds as an error bar. Each axis
    spans the metric's natural range (a share 0..1, an accuracy 0..100 %, a loss from 0), so that a
    difference inside the noise is not blown up to fill the panel; a panel says which variants have no
    value (e.g. dedicated-sink metrics of models without a sink)."""
    require("matplotlib", "drawing the study's figures").use("Agg")
    import matplotlib.pyplot as plt

    if not columns:
        return None
    ncols = min(len(columns), METRIC_PANELS_PER_ROW)
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.2 * nrows), squeeze=False)
    variants = list(table)
    colours = plt.cm.tab10.colors
    for ax, col in zip(axes.flat, columns):
        for i, v in enumerate(variants):
            if col in table[v]:
                mean, std, _ = table[v][col]
                ax.errorbar([i], [mean], yerr=[std], fmt="o", color=colours[i % len(colours)], capsize=4, ms=7)
        ax.set_xticks(range(len(variants)), variants, rotation=30, fontsize=8)
        ax.set_xlim(-0.5, len(variants) - 0.5)
        tops = [mean + std for v in variants if col in table[v] for mean, std, _ in [table[v][col]]]
        ax.set_ylim(*axis_range(col, max(tops, default=1.0)))
        missing = [v for v in variants if col not in table[v]]
        ax.set_title(col + (f"\n(no value for {', '.join(missing)})" if missing else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    seeds = max(n for row in table.values() for _, _, n in row.values())
    fig.suptitle(title + ("\none seed: no spread over seeds to show" if seeds == 1 else
                          "\nerror bars: std over seeds"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def axis_range(column: str, highest: float) -> tuple[float, float]:
    """(bottom, top) of a metric's panel: its natural range; losses and counts from zero to just above
    the highest value (plus its error bar)."""
    if column.endswith(ACCURACY_SUFFIX):
        return 0.0, 100.0
    if column in SHARE_COLUMNS:
        return 0.0, 1.0
    return 0.0, HEADROOM * highest


def lm_eval_evaluator(tasks: str, limit: int, mc_num: int) -> Callable[[Run], dict[str, float]]:
    """Offline benchmark accuracy (%) through the lm-eval model, when lm-eval is installed."""
    from sinkdlm.eval.run import EvalOptions, accuracies, evaluate_checkpoint

    def evaluate(run: Run) -> dict[str, float]:
        results, _ = evaluate_checkpoint(run.out, tasks.split(","), EvalOptions(limit=limit, mc_num=mc_num),
                                         run.out / "eval")
        return {f"{task}{ACCURACY_SUFFIX}": acc for task, acc in accuracies(results).items()}

    return evaluate


def default_evaluators(args: Any) -> list[Callable[[Run], dict[str, float]]]:
    evaluators: list[Callable[[Run], dict[str, float]]] = [sink_evaluator(args.analysis_texts)]
    if args.tasks:
        if available("lm_eval"):
            evaluators.append(lm_eval_evaluator(args.tasks, args.limit, args.mc_num))
        else:
            print(f"study: lm-eval is not installed; skipping benchmark accuracy ({install_hint('lm_eval')})")
    return evaluators


# moving_sink_summary key -> table column
SINK_COLUMNS = {
    "dominant_stability": "dominant-sink stability",
    "sink_set_iou": "sink-set IoU",
    "distinct_dominant_positions": "distinct dominant positions",
    "dedicated_capture_share": "dedicated-sink capture",
    "value_rank_sinks": "sink value-norm rank",
}
SHARE_COLUMNS = {SINK_COLUMNS[k] for k in ("dominant_stability", "sink_set_iou", "dedicated_capture_share",
                                           "value_rank_sinks")}  # values in [0, 1]


def sink_evaluator(n_texts: int) -> Callable[[Run], dict[str, float]]:
    """Moving-sink metrics of a denoising trajectory (sinkdlm analyze, no interventions); the full
    report with figures goes to <run>/analysis."""
    from sinkdlm.analysis import AnalysisSettings, run_analysis
    from sinkdlm.analysis.report import write_report

    def evaluate(run: Run) -> dict[str, float]:
        settings = AnalysisSettings(interventions=False, max_windows=n_texts, max_prompts=n_texts,
                                    progress=False, seed=run.seed)
        metrics, trajectory = run_analysis(run.out, settings=settings)
        write_report(run.out / "analysis", metrics, trajectory)
        summary = metrics["summary"]
        return {label: float(summary[key]) for key, label in SINK_COLUMNS.items() if summary.get(key) is not None}

    return evaluate


def write_study(out: Path, title: str, command: str, runs: list[Run], columns: list[str],
                table: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    """study.md (the table, the command, the figures), study.json (every run) and the two figures in
    `out`; returns the markdown table."""
    plot_curves(runs, out / "loss_curves.png", title)
    plot_metric_bars(columns, table, out / "metrics.png", title)
    text = markdown(columns, table)
    (out / STUDY_TABLE).write_text(f"# {title}\n\n`{command}`\n\n{text}\n\n![curves](loss_curves.png)\n\n"
                                   f"![metrics](metrics.png)\n")
    (out / STUDY_RESULTS).write_text(json.dumps([vars(r) | {"out": str(r.out)} for r in runs], indent=2))
    return text
