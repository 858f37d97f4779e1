"""The mechanism study's probes over training (issue 22; docs/study-mechanism.md): from each run's
probes.json (sinkdlm.eval.probes.probe_run, one row per kept checkpoint), per layer the dedicated
sink's share of attention and dormant queries' mass on [MASK] keys, each over its uniform share, and
copy accuracy, against the training step: one colour per variant, the mean over seeds with a min-max
band, and the same numbers as a markdown table.

Every number is first the mean over the probe's mask levels (0.15 and 0.5), as the study's
pre-registered tests take them (docs/study-mechanism.md, section 4), then the mean over seeds.
A run without a complete probes.json (not evaluated yet, or interrupted part-way) is left out and
named under the table.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Protocol

from sinkdlm.errors import UserError
from sinkdlm.files import atomic_write


class Run(Protocol):
    """What the figures read of a study run (sinkdlm.experiments.study_report.Run has it)."""

    variant: str
    seed: int
    out: Path


PROBES_DIR = "probes"  # inside the study folder
FIGURE = "probes_over_training.png"
COPY_FIGURE = "copy_accuracy.png"
TABLE = "probes_over_training.md"
COPY, SINK, MASK = "copy accuracy", "sink share x uniform", "dormant [MASK] mass x uniform"
LAYER_METRICS = {SINK: "dedicated sink's share of attention / its uniform share",
                 MASK: "dormant queries' mass on [MASK] keys / their uniform share"}
BAND_ALPHA = 0.2
UNIFORM = 1.0  # both layer metrics read 1 under uniform attention

# variant -> step -> one point per seed: {COPY: float | None, SINK: [per layer], MASK: [per layer]}
Points = dict[str, dict[int, list[dict[str, Any]]]]


def read_probes(run_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(probe rows oldest first, None), or ([], why the run is left out): no probes.json, an
    unreadable one, or one that lacks some of the run's checkpoints."""
    from sinkdlm.checkpoint import list_checkpoints
    from sinkdlm.eval.probes import PROBE_CACHE

    path = run_dir / PROBE_CACHE
    if not path.is_file():
        return [], f"no {PROBE_CACHE} (not probed yet)"
    try:
        probed = json.loads(path.read_text())["checkpoints"]
        rows = sorted(probed.values(), key=lambda row: row["step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [], f"{PROBE_CACHE} is unreadable ({type(e).__name__}: {e})"
    missing = [c.name for c in list_checkpoints(run_dir) if c.name not in probed]
    if missing or not rows:
        return [], f"{PROBE_CACHE} is partial: it lacks {', '.join(missing) or 'every checkpoint'}"
    return rows, None


def level_mean(row: dict[str, Any]) -> dict[str, Any]:
    """One probed checkpoint's copy accuracy and per-layer sink share and dormant [MASK] ratio (each
    x its uniform share), every one the mean over the row's mask levels where it is defined."""
    from sinkdlm.eval.probes import summary_row

    at = [summary_row(row, float(level)) for level in row["levels"]]
    layers = len(at[0]["dormant_mask_x_uniform"])
    return {COPY: _mean_defined([s["copy_accuracy"] for s in at]),
            SINK: [_mean_defined([s["sink_share_x_uniform"][i] for s in at]) for i in range(layers)],
            MASK: [_mean_defined([s["dormant_mask_x_uniform"][i] for s in at]) for i in range(layers)]}


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(defined) if defined else None


def collect(runs: list[Run]) -> tuple[Points, list[str], list[str]]:
    """(points of every run with complete probes, the mask levels met, one note per run left out)."""
    points: Points = {}
    levels: dict[str, None] = {}
    skipped = []
    for run in runs:
        rows, problem = read_probes(run.out)
        try:
            means = [(row["step"], level_mean(row)) for row in rows]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            means, problem = [], f"a row of its probes.json is incomplete ({type(e).__name__}: {e})"
        if problem:
            skipped.append(f"{run.variant}, seed {run.seed} ({run.out}): {problem}")
            continue
        levels.update(dict.fromkeys(level for row in rows for level in row["levels"]))
        for step, mean in means:
            points.setdefault(run.variant, {}).setdefault(step, []).append(mean)
    return points, list(levels), skipped


def over_seeds(seeds: list[dict[str, Any]], metric: str, layer: int | None = None
               ) -> tuple[float, float, float, int] | None:
    """(mean, min, max, n) over the seeds where `metric` (of `layer`) is defined; None where it is nowhere."""
    values = [p[metric] if layer is None else (p[metric][layer] if layer < len(p[metric]) else None) for p in seeds]
    values = [v for v in values if v is not None]
    return (statistics.fmean(values), min(values), max(values), len(values)) if values else None


def n_layers(points: Points) -> int:
    return max((len(p[MASK]) for steps in points.values() for seeds in steps.values() for p in seeds), default=0)


# ---- table ----------------------------------------------------------------------------------------


def probe_table(points: Points, levels: list[str], skipped: list[str], bigram_copy: float | None) -> str:
    """Markdown: one line per (variant, step), each cell the mean over seeds (layer 0 first)."""
    layers = range(n_layers(points))
    lines = [f"| variant | step | seeds | {COPY} | {SINK} (per layer) | {MASK} (per layer) |", "|---" * 6 + "|"]
    for variant, steps in points.items():
        for step in sorted(steps):
            seeds = steps[step]
            cells = [_cell(over_seeds(seeds, COPY), len(seeds))]
            cells += [" / ".join(_cell(over_seeds(seeds, metric, i), len(seeds)) for i in layers)
                      for metric in LAYER_METRICS]
            lines.append(f"| {variant} | {step} | {len(seeds)} | " + " | ".join(cells) + " |")
    notes = [f"Each cell: the mean over seeds of the mean over the probe's mask levels ({', '.join(levels) or '-'}); "
             f"per-layer cells list layer 0 first; the figures add the min-max band over seeds. "
             f"{SINK}: the {LAYER_METRICS[SINK]}; {MASK}: the {LAYER_METRICS[MASK]} (heads averaged); "
             f"both read 1 under uniform attention. (n=K): defined in only K of the step's seeds; "
             f"-: undefined (no dedicated sink, or no dormant query).",
             f"Copy accuracy of the bigram alone (meta.json task.bigram_copy_accuracy): {_number(bigram_copy)}."]
    if not points:
        notes.append("No run had complete probes: nothing to tabulate or draw.")
    notes += [f"Left out: {note}." for note in skipped]
    return "\n".join(lines + [""] + notes) + "\n"


def _cell(stat: tuple[float, float, float, int] | None, seeds: int) -> str:
    if stat is None:
        return "-"
    return f"{stat[0]:.3f}" + (f" (n={stat[3]})" if stat[3] < seeds else "")


def _number(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3f}"


# ---- figures --------------------------------------------------------------------------------------


def _series(steps: dict[int, list[dict[str, Any]]], metric: str, layer: int | None = None
            ) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, means, mins, maxes) over seeds where defined."""
    found = [(step, over_seeds(steps[step], metric, layer)) for step in sorted(steps)]
    found = [(step, stat) for step, stat in found if stat is not None]
    return ([s for s, _ in found], [st[0] for _, st in found], [st[1] for _, st in found],
            [st[2] for _, st in found])


def _draw(ax, points: Points, metric: str, layer: int | None = None) -> None:
    """One line per variant (mean over seeds) with its min-max band, colour i of the cycle for variant i."""
    for i, steps in enumerate(points.values()):
        x, mean, low, high = _series(steps, metric, layer)
        if x:
            ax.fill_between(x, low, high, color=f"C{i}", alpha=BAND_ALPHA, lw=0)
            ax.plot(x, mean, color=f"C{i}", marker="o", ms=3)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def _legend(fig, points: Points, reference: str) -> None:
    from sinkdlm.analysis.plots import plt

    seeds = {v: max(len(s) for s in steps.values()) for v, steps in points.items()}
    handles = [plt.Line2D([], [], color=f"C{i}", marker="o",
                          label=f"{v} (mean of {seeds[v]} seed{'s' if seeds[v] > 1 else ''})")
               for i, v in enumerate(points)]
    handles += [plt.Rectangle((0, 0), 1, 1, color="0.5", alpha=BAND_ALPHA, label="band: min-max over seeds"),
                plt.Line2D([], [], color="0.3", ls="--", label=reference)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=9)


def plot_layers(points: Points, levels: list[str], path: Path, title: str) -> Path:
    """Row 1: the dedicated sink's share x uniform; row 2: dormant [MASK] mass x uniform; one column per layer."""
    from sinkdlm.analysis.plots import plt, save  # says in one line when matplotlib is missing

    layers = n_layers(points)
    fig, axes = plt.subplots(len(LAYER_METRICS), layers, figsize=(5.0 * layers, 7.5), squeeze=False,
                             sharex=True, layout="constrained")
    for row, metric in zip(axes, LAYER_METRICS):
        for layer, ax in enumerate(row):
            _draw(ax, points, metric, layer)
            ax.axhline(UNIFORM, color="0.3", ls="--", lw=0.8)
            ax.set_ylim(bottom=0)
            ax.set_title(f"layer {layer}: {metric}", fontsize=10)
    _legend(fig, points, "uniform attention (1x)")
    fig.suptitle(f"{title}\neach point: mean over mask levels {', '.join(levels)}; variants without a dedicated "
                 f"sink have no line in the top row")
    return save(fig, path)


def plot_copy(points: Points, levels: list[str], bigram_copy: float | None, path: Path, title: str) -> Path:
    """Copy accuracy against the step per variant, the bigram alone's accuracy dashed."""
    from sinkdlm.analysis.plots import plt, save

    fig, ax = plt.subplots(figsize=(7.5, 5.0), layout="constrained")
    _draw(ax, points, COPY)
    if bigram_copy is not None:
        ax.axhline(bigram_copy, color="0.3", ls="--", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"copy accuracy (mean over mask levels {', '.join(levels)})")
    _legend(fig, points, f"bigram alone ({_number(bigram_copy)})")
    ax.set_title(title)
    return save(fig, path)


# ---- the study's report ---------------------------------------------------------------------------


def bigram_copy_accuracy(runs: list[Run]) -> float | None:
    """meta.json task.bigram_copy_accuracy of the first run whose corpus says it (None where none does)."""
    from sinkdlm.checkpoint import load_config_of
    from sinkdlm.data.synthetic import corpus_task

    for run in runs:
        try:
            task = corpus_task(load_config_of(run.out).data.path)
        except (UserError, OSError):
            continue
        if task is not None and task.get("bigram_copy_accuracy") is not None:
            return float(task["bigram_copy_accuracy"])
    return None


def write_probe_report(runs: list[Run], out: Path, title: str = "probes over training") -> str:
    """TABLE, FIGURE and COPY_FIGURE of the runs into `out` (the figures only where some run has probes);
    returns the table."""
    points, levels, skipped = collect(runs)
    bigram = bigram_copy_accuracy(runs)
    out.mkdir(parents=True, exist_ok=True)
    text = probe_table(points, levels, skipped, bigram)
    atomic_write(out / TABLE, text)
    if points:
        plot_layers(points, levels, out / FIGURE, title)
        plot_copy(points, levels, bigram, out / COPY_FIGURE, title)
    return text


def report_links(folder: Path) -> str:
    """study.md's links to the probe figures and table of a study folder, those that exist ('' when none)."""
    names = {FIGURE: "![probes over training]({})", COPY_FIGURE: "![copy accuracy over training]({})",
             TABLE: "[probes over training, table]({})"}
    return "\n\n".join(link.format(f"{PROBES_DIR}/{name}") for name, link in names.items()
                       if (folder / PROBES_DIR / name).is_file())
